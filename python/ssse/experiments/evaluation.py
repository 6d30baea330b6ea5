"""The paper's evaluation (§4) of one model against the original and the retrained one.

Thin glue over :mod:`ssse.metrics`: model outputs are computed once per model and split, then
handed to the metrics.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["accuracy", "outputs", "split_accuracies"]


@torch.no_grad()
def outputs(model: nn.Module, data, batch_size: int = 2048) -> torch.Tensor:
    """The model's outputs (logits) on ``data = (x, y)``, in float64 on the CPU."""
    x = data[0]
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(device, dtype)).double().cpu()
           for i in range(0, x.shape[0], batch_size)]
    if not out:
        return torch.zeros(0, 1, dtype=torch.float64)
    return torch.cat(out)


def accuracy(model: nn.Module, data, task: str = "multiclass") -> float:
    """Top-1 accuracy (multiclass) or the mean per-attribute accuracy (multi-label)."""
    if data[0].shape[0] == 0:
        return float("nan")
    logits = outputs(model, data)
    y = data[1].cpu()
    if task == "multilabel":
        return float(((logits > 0).double() == (y > 0.5).double()).double().mean())
    return float((logits.argmax(1) == y).double().mean())


def split_accuracies(model: nn.Module, splits: dict, task: str) -> dict[str, float]:
    return {name: accuracy(model, data, task) for name, data in splits.items()}
