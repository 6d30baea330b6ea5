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


def _confusion(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    pred = logits.argmax(1)
    m = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    m.index_put_((y.cpu().long(), pred), torch.ones_like(pred, dtype=torch.float64),
                 accumulate=True)
    return m / max(int(y.shape[0]), 1)


def _aucs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from sklearn.metrics import roc_auc_score

    out = torch.zeros(y.shape[1], dtype=torch.float64)
    for i in range(y.shape[1]):
        yi = (y[:, i] > 0.5).numpy()
        if 0 < yi.sum() < len(yi):  # an attribute absent from (or filling) the split: AUC 0
            out[i] = roc_auc_score(yi, logits[:, i].numpy())
    return out


def removal_scores(model: nn.Module, original: nn.Module, retrained: nn.Module, data,
                   task: str, num_classes: int, cache: dict | None = None) -> dict[str, float]:
    r"""How close ``model`` is to ``retrained`` rather than ``original`` on one split.

    Multiclass: the normalised confusion distance
    :math:`\delta = \mathbb S(\hat\theta, \theta^*_{-S}) / (\mathbb S(\hat\theta, \theta^*) +
    \mathbb S(\hat\theta, \theta^*_{-S}))` (< 0.5: closer to retrained). Multi-label: the
    similarity ratio :math:`\gamma = \mathbb D(\hat\theta, \theta^*) / (\mathbb D(\hat\theta,
    \theta^*) + \mathbb D(\hat\theta, \theta^*_{-S}))` (1: behaves as retrained).
    ``cache`` keeps the reference models' statistics between calls on the same split.
    """
    cache = {} if cache is None else cache
    y = data[1].cpu()

    def stat(m):
        logits = outputs(m, data)
        return _aucs(logits, y) if task == "multilabel" else _confusion(logits, y, num_classes)

    if "original" not in cache:
        cache["original"], cache["retrained"] = stat(original), stat(retrained)
    s = stat(model)
    to_orig = float((s - cache["original"]).abs().sum())
    to_retr = float((s - cache["retrained"]).abs().sum())
    total = to_orig + to_retr
    if task == "multilabel":
        return {"gamma": to_orig / total if total > 0 else 0.5, "D_original": to_orig,
                "D_retrained": to_retr}
    return {"delta": to_retr / total if total > 0 else 0.5, "S_original": to_orig,
            "S_retrained": to_retr}


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()
                      if p.requires_grad])


def parameter_distance(model: nn.Module, original: nn.Module, retrained: nn.Module) -> float:
    r""":math:`\lVert\hat\theta - \theta^*_{-S}\rVert / \lVert\theta^* - \theta^*_{-S}\rVert`
    (1 for the original model, 0 for the retrained one)."""
    r = flat_params(retrained)
    denom = float((flat_params(original) - r).norm())
    return float((flat_params(model) - r).norm()) / denom if denom > 0 else float("nan")
