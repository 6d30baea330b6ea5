"""The paper's evaluation (§4) of one model against the original and the retrained one.

Thin glue over :mod:`ssse.metrics`: each model's outputs on a split are computed once and the
reference models' outputs are cached per split.
"""

from __future__ import annotations

import torch
from torch import nn

from ssse import metrics

__all__ = ["accuracy", "outputs", "parameter_distance", "removal_scores", "split_accuracies"]


@torch.no_grad()
def outputs(model: nn.Module, data, batch_size: int = 2048) -> torch.Tensor:
    """The model's outputs (logits) on ``data = (x, y)``, in float64 on the CPU."""
    x = data[0]
    p = next(model.parameters())
    out = [model(x[i:i + batch_size].to(p.device, p.dtype)).double().cpu()
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 1, dtype=torch.float64)


def accuracy(model: nn.Module, data, task: str = "multiclass") -> float:
    """Top-1 accuracy (multiclass) or the accuracy per attribute entry (multi-label), from the
    outputs alone (:func:`ssse.metrics.split_report` also takes gradients, for the tables)."""
    if data[0].shape[0] == 0:
        return float("nan")
    logits, y = outputs(model, data), data[1].cpu()
    if task == "multiclass":
        return float((logits.argmax(1) == y).double().mean())
    return float(((logits > 0).double() == (y > 0.5).double().reshape(logits.shape))
                 .double().mean())


def split_accuracies(model: nn.Module, splits: dict, task: str) -> dict[str, float]:
    return {name: accuracy(model, data, task) for name, data in splits.items()}


def removal_scores(model: nn.Module, original: nn.Module, retrained: nn.Module, data,
                   task: str, num_classes: int, cache: dict | None = None) -> dict[str, float]:
    r"""δ (multiclass, :func:`ssse.metrics.normalized_confusion_distance`; < 0.5: closer to
    retrained) or γ (multi-label, :func:`ssse.metrics.similarity_ratio`; 1: as retrained) of
    ``model`` on one split. ``cache`` keeps the reference models' outputs on that split."""
    cache = {} if cache is None else cache
    if "original" not in cache:
        cache["original"], cache["retrained"] = outputs(original, data), outputs(retrained, data)
    out, labels = outputs(model, data), data[1].cpu()
    if task == "multilabel":
        return {"gamma": metrics.similarity_ratio(out, cache["original"], cache["retrained"],
                                                  labels)}
    return {"delta": metrics.normalized_confusion_distance(out, cache["original"],
                                                           cache["retrained"], labels,
                                                           num_classes)}


def parameter_distance(model: nn.Module, original: nn.Module, retrained: nn.Module) -> float:
    """:func:`ssse.metrics.normalized_parameter_distance` (0: retrained, 1: original)."""
    return metrics.normalized_parameter_distance(model, original, retrained)
