r"""The evaluation metrics of paper §4, and tools to choose :math:`\varepsilon`.

Four splits are evaluated: :math:`D \setminus S`, :math:`S`, :math:`T \setminus T_a` and
:math:`T_a` (:math:`T` the test set, :math:`T_a` its samples of the removed class or attribute).
Models are compared through their outputs on a split :math:`C`: per-attribute ROC-AUC for
multi-attribute binary classifiers (Def. 4.1, 4.2), confusion matrices for multinomial ones
(Def. 4.3, 4.4). Inputs may be numpy arrays or tensors.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score
from torch import nn

from ssse_ext.validation import (check_callable, check_choice, check_int, check_nonneg_float,
                                 check_positive_int)

from .batches import (Split, batch_len, batch_slice, check_data, check_loss, check_module,
                      check_reiterable, is_batch, run_model, split_batch, task_of)
from .model import (BATCH_SIZE, FlatModel, check_inverse, data_size, iter_batches,
                     per_sample_losses)
from .forgetting import forgetting_quality
from .gradients import hessian_vector_products
from .rows import row_stream

__all__ = [
    "accuracy",
    "predict",
    "attribute_aucs",
    "performance_similarity",
    "similarity_ratio",
    "confusion_distance",
    "normalized_confusion_distance",
    "normalized_parameter_distance",
    "split_report",
    "membership_inference",
    "forgetting_quality",
    "estimate_epsilon",
    "select_epsilon",
    "CRITERIA",
]

#: ``select_epsilon`` criteria: maximise :math:`\gamma_S` or minimise :math:`\delta_S`.
CRITERIA = ("similarity_ratio", "confusion")


def _numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception:
        raise TypeError(f"{name} must be a numpy array or a tensor, got {type(x).__name__}") \
            from None


def _scores_2d(x, name: str) -> np.ndarray:
    a = _numpy(x, name)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (n, A) (or (n,) for one attribute), got "
                         f"{a.shape}")
    return a


def _ratio(num: float, other: float) -> float:
    """``num / (num + other)``, and 0.5 when both are 0 (indistinguishable)."""
    total = num + other
    return 0.5 if total == 0 else float(num / total)


# ---- multi-attribute binary: ROC-AUC --------------------------------------------------------

def attribute_aucs(scores, labels) -> np.ndarray:
    """Per-attribute ROC-AUC :math:`\\alpha_i^C` of ``scores`` ``(n, A)`` against binary
    ``labels`` ``(n, A)``; an attribute whose labels are all equal on this split (absent, or
    present everywhere) has no AUC and counts as 0 (the paper's convention)."""
    s = _scores_2d(scores, "scores")
    lab = _scores_2d(labels, "labels")
    if s.shape != lab.shape:
        raise ValueError(f"scores and labels must have the same shape, got {s.shape} and "
                         f"{lab.shape}")
    out = np.zeros(s.shape[1])
    for i in range(s.shape[1]):
        col = lab[:, i]
        if np.unique(col).size == 2:
            out[i] = roc_auc_score(col, s[:, i])
        elif np.unique(col).size > 2:
            raise ValueError(f"labels[:, {i}] must be binary, got values {np.unique(col)[:5]}")
    return out


def performance_similarity(scores_a, scores_b, labels) -> float:
    r"""Performance similarity (paper Def. 4.1) of two models on a split :math:`C`:

    .. math:: \mathbb D_C(\theta_1, \theta_2) = \sum_{i=1}^{A}
              \lvert \alpha_i^C(\theta_1) - \alpha_i^C(\theta_2) \rvert

    Args:
        scores_a, scores_b: ``(n, A)`` scores (logits or probabilities) of the two models.
        labels: ``(n, A)`` binary labels.
    """
    a = attribute_aucs(scores_a, labels)
    b = attribute_aucs(scores_b, labels)
    return float(np.abs(a - b).sum())


def similarity_ratio(scores_hat, scores_orig, scores_retrained, labels) -> float:
    r"""Similarity ratio (paper Def. 4.2):

    .. math:: \gamma_S = \frac{\mathbb D_S(\hat\theta, \theta^*)}
              {\mathbb D_S(\hat\theta, \theta^*) + \mathbb D_S(\hat\theta, \theta^*_{-S})}
              \in [0, 1]

    1: :math:`\hat\theta` behaves as the retrained model; 0: as the original; 0.5 when it is
    equally far from both, including when it is indistinguishable from both (0/0).
    """
    d_orig = performance_similarity(scores_hat, scores_orig, labels)
    d_retr = performance_similarity(scores_hat, scores_retrained, labels)
    return _ratio(d_orig, d_retr)


# ---- multinomial: confusion matrices --------------------------------------------------------

def _predictions(pred, name: str) -> np.ndarray:
    p = _numpy(pred, name)
    if p.ndim == 2:
        p = p.argmax(axis=1)
    if p.ndim != 1:
        raise ValueError(f"{name} must be (n,) class predictions or (n, C) scores, got shape "
                         f"{p.shape}")
    return p


def _class_indices(values: np.ndarray, name: str, num_classes: int) -> np.ndarray:
    # confusion_matrix(labels=...) silently drops values outside the label set
    if values.size and (not np.all(np.isfinite(values)) or np.any(values != np.round(values))
                        or values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{name} must hold class indices in 0..{num_classes - 1}, got values "
                         f"{np.unique(values)[:5]}")
    return values.astype(np.int64)


def _confusion(pred, labels, num_classes: int, normalize, name: str) -> np.ndarray:
    raw = _numpy(pred, name)
    if raw.ndim == 2 and raw.shape[1] != num_classes:
        raise ValueError(f"{name} has scores for {raw.shape[1]} classes, expected "
                         f"num_classes={num_classes}")
    p = _class_indices(_predictions(raw, name), name, num_classes)
    y = _class_indices(_numpy(labels, "labels").reshape(-1), "labels", num_classes)
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{name} has {p.shape[0]} predictions but labels has {y.shape[0]}")
    if y.size == 0:  # an empty split: no counts
        return np.zeros((num_classes, num_classes))
    return confusion_matrix(y, p, labels=np.arange(num_classes), normalize=normalize)


def confusion_distance(pred_a, pred_b, labels, num_classes: int, *,
                       normalize: str | None = None) -> float:
    r"""Confusion distance (paper Def. 4.3) of two models on a split :math:`C`:

    .. math:: \mathbb S_C(\theta_1, \theta_2) = \sum_{i,j} \lvert m_C(\theta_1)_{ij} -
              m_C(\theta_2)_{ij} \rvert

    Args:
        pred_a, pred_b: ``(n,)`` predicted classes or ``(n, C)`` scores (argmax is taken).
        labels: ``(n,)`` true classes.
        num_classes: :math:`C`.
        normalize: passed to :func:`sklearn.metrics.confusion_matrix` (``None``: counts).
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    ma = _confusion(pred_a, labels, num_classes, normalize, "pred_a")
    mb = _confusion(pred_b, labels, num_classes, normalize, "pred_b")
    return float(np.abs(ma - mb).sum())


def normalized_confusion_distance(pred_hat, pred_orig, pred_retrained, labels,
                                  num_classes: int, *, normalize: str | None = None) -> float:
    r"""Normalised confusion distance (paper Def. 4.4):

    .. math:: \delta_S = \frac{\mathbb S_S(\hat\theta, \theta^*_{-S})}
              {\mathbb S_S(\hat\theta, \theta^*) + \mathbb S_S(\hat\theta, \theta^*_{-S})}

    Below 0.5: :math:`\hat\theta` is closer to the retrained model; 0.5 when equally far from
    both, including when it is indistinguishable from both (0/0).
    """
    s_orig = confusion_distance(pred_hat, pred_orig, labels, num_classes, normalize=normalize)
    s_retr = confusion_distance(pred_hat, pred_retrained, labels, num_classes,
                                normalize=normalize)
    return _ratio(s_retr, s_orig)


# ---- parameters -----------------------------------------------------------------------------

def _flat_params(x, name: str) -> torch.Tensor:
    if isinstance(x, nn.Module):
        return FlatModel(check_module(x, name)).flat(dtype=torch.float64, device="cpu")
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if isinstance(x, Mapping):
        parts = [v.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
                 for v in x.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if not parts:
            raise ValueError(f"{name} has no floating-point tensors")
        return torch.cat(parts)
    raise TypeError(f"{name} must be an nn.Module, a state_dict or a flat tensor, got "
                    f"{type(x).__name__}")


def normalized_parameter_distance(params, params_orig, params_retrained) -> float:
    r"""How far the parameters still are from the retrained ones, relative to the original:

    .. math:: \frac{\lVert\hat\theta - \theta^*_{-S}\rVert}{\lVert\theta^* - \theta^*_{-S}\rVert}

    0: at the retrained model, 1: no closer than the original. Each argument is an
    ``nn.Module`` (its trainable parameters), a ``state_dict`` (its floating-point entries, in
    key order) or a flat tensor; all three must flatten to the same length.
    """
    a = _flat_params(params, "params")
    o = _flat_params(params_orig, "params_orig")
    r = _flat_params(params_retrained, "params_retrained")
    if not a.shape == o.shape == r.shape:
        raise ValueError(f"the parameters have different sizes: {a.numel()}, {o.numel()}, "
                         f"{r.numel()}")
    denom = float((o - r).norm())
    num = float((a - r).norm())
    if denom == 0:
        return 0.0 if num == 0 else math.inf
    return num / denom


# ---- model-level reports --------------------------------------------------------------------

def _infer_task(output: torch.Tensor, y: torch.Tensor) -> str:
    if output.dim() == 2 and output.shape[1] > 1 and y.dim() == 1 and not y.is_floating_point():
        return "categorical"
    return "bernoulli"


def _default_loss(task: str):
    if task == "categorical":
        return nn.CrossEntropyLoss(reduction="none")
    bce = nn.BCEWithLogitsLoss(reduction="none")
    return lambda out, y: bce(out.reshape(y.shape), y.to(out.dtype))


def _correct(output: torch.Tensor, y: torch.Tensor, task: str) -> tuple[float, int]:
    if task == "categorical":
        return float((output.argmax(1) == y).sum()), y.shape[0]
    pred = (output.reshape(y.shape) > 0).to(y.dtype)
    return float((pred == y).sum()), y.numel()


@torch.no_grad()
def predict(model: nn.Module, data, *, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """The model's outputs (logits) on the inputs of ``data`` (an ``(X, y)`` pair or an
    iterable of batches), in float64 on the CPU, computed ``batch_size`` rows at a time."""
    check_module(model)
    batch_size = check_positive_int(batch_size, "batch_size")
    p = next(model.parameters())
    out = [run_model(model, x).double().cpu()
           for x, _ in iter_batches(data, "data", batch_size=batch_size, device=p.device,
                                    dtype=p.dtype)]
    out = [o for o in out if o.shape[0]]
    return torch.cat(out) if out else torch.zeros(0, 1, dtype=torch.float64)


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of a model's ``outputs`` against ``labels``: top-1 for ``(n, C)`` scores with
    integer class labels, else per entry of sigmoid logits (positive means 1) against 0/1
    labels (multi-attribute models). NaN for an empty split."""
    if outputs.shape[0] == 0:
        return math.nan
    correct, total = _correct(outputs, labels, _infer_task(outputs, labels))
    return correct / total


def split_report(model: nn.Module, splits: Mapping, *, loss_fn=None,
                 weight_decay: float = 0.0) -> dict[str, dict[str, float]]:
    r"""Loss, gradient norm and accuracy of ``model`` on each split (paper §4: typically
    ``{"D\\S": ..., "S": ..., "T\\T_a": ..., "T_a": ...}``).

    Args:
        model: the model to evaluate (called in its current mode, without gradients tracked
            on the model).
        splits: ``{name: data}``, data an ``(X, y)`` pair, an iterable of batches, or ``None``
            (an empty split: NaN values).
        loss_fn: per-sample loss; default cross-entropy for ``(n, C)`` logits with integer
            labels, else binary cross-entropy with logits summed over attributes.
        weight_decay: L2 coefficient folded into every :math:`\ell_i` (loss and gradient).

    Returns:
        ``{name: {"n", "loss", "grad_norm", "accuracy"}}``: the mean of :math:`\ell_i`, the norm
        of the mean gradient :math:`\lVert\frac1n\sum_i\nabla\ell_i\rVert` and the accuracy
        (per attribute entry for multi-attribute models).
    """
    check_module(model)
    if not isinstance(splits, Mapping):
        raise TypeError(f"splits must be a mapping name -> data, got {type(splits).__name__}")
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    if loss_fn is not None:
        check_loss(loss_fn)
    fm = FlatModel(model, loss_fn=loss_fn)
    theta = fm.flat()
    report = {}
    for name, data in splits.items():
        stats = {"n": 0, "loss": math.nan, "grad_norm": math.nan, "accuracy": math.nan}
        report[name] = stats
        if data is None:
            continue
        check_data(data, f"splits[{name!r}]", fm.task)
        params = {k: v.detach().requires_grad_(True) for k, v in fm.param_dict().items()}
        grad_sum = torch.zeros(fm.dim, dtype=fm.dtype, device=fm.device)
        loss_sum, correct, total, n = 0.0, 0.0, 0, 0
        for x, y in iter_batches(data, f"splits[{name!r}]", batch_size=BATCH_SIZE,
                                 device=fm.device, dtype=fm.dtype, task=fm.task):
            if batch_len(y) == 0:
                continue
            with torch.enable_grad():
                out = fm(params, x)
                task = None if fm.task else _infer_task(out, y)
                lf = loss_fn or _default_loss(task)
                loss = per_sample_losses(lf, out, y).sum()
                gs = torch.autograd.grad(loss, [params[k] for k in fm.names], allow_unused=True)
            grad_sum += torch.cat([(torch.zeros_like(params[k]) if g is None else g).reshape(-1)
                                   for k, g in zip(fm.names, gs)])
            loss_sum += float(loss.detach())
            c, t = (math.nan, 1) if task is None else _correct(out.detach(), y, task)
            correct, total, n = correct + c, total + t, n + batch_len(y)
        if n == 0:
            continue
        reg = 0.5 * weight_decay * float((theta * theta).sum())
        stats.update(n=n, loss=loss_sum / n + reg,
                     grad_norm=float((grad_sum / n + weight_decay * theta).norm()),
                     accuracy=correct / total)
    return report


def _losses(model: nn.Module, data, name: str, loss_fn) -> np.ndarray:
    fm = FlatModel(model, loss_fn=loss_fn)
    params = fm.param_dict()
    out = []
    with torch.no_grad():
        for x, y in iter_batches(data, name, batch_size=BATCH_SIZE, device=fm.device,
                                 dtype=fm.dtype, task=fm.task):
            if batch_len(y) == 0:
                continue
            o = fm(params, x)
            lf = loss_fn or _default_loss(_infer_task(o, y))
            out.append(per_sample_losses(lf, o, y).double().cpu())
    if not out:
        raise ValueError(f"{name} is empty")
    return torch.cat(out).numpy()


def membership_inference(model: nn.Module, removed, test, *, loss_fn=None) -> dict[str, float]:
    r"""Loss-threshold membership-inference attack: how well the per-sample loss separates the
    removed samples :math:`S` (members of the original training set) from test samples.

    Returns:
        ``{"auc", "member_loss", "nonmember_loss"}``: the ROC-AUC of the score
        :math:`-\ell(x)` for "is in :math:`S`" (0.5: no better than chance, the ideal after
        erasure; higher: :math:`S` still looks like training data) and the mean losses.
    """
    check_module(model)
    if loss_fn is not None:
        check_loss(loss_fn)
    check_data(removed, "removed", task_of(loss_fn))
    check_data(test, "test", task_of(loss_fn))
    member = _losses(model, removed, "removed", loss_fn)
    nonmember = _losses(model, test, "test", loss_fn)
    labels = np.concatenate([np.ones(member.size), np.zeros(nonmember.size)])
    auc = roc_auc_score(labels, -np.concatenate([member, nonmember]))
    return {"auc": float(auc), "member_loss": float(member.mean()),
            "nonmember_loss": float(nonmember.mean())}


# ---- choosing epsilon -----------------------------------------------------------------------

def estimate_epsilon(model: nn.Module, loss_fn, data, *, inv_fisher,
                     weight_decay: float = 0.0, probes: int = 16, probe: str = "gradients",
                     seed: int = 0, details: bool = False):
    r"""Estimates :math:`\varepsilon` of paper eq. 8 without retraining.

    SSSE is the influence update (eq. 4) with :math:`H^{-1}` replaced by
    :math:`\varepsilon F^{-1}`; for confident linear softmax models :math:`H` is close to a
    multiple of :math:`F` (paper Prop. 1), so :math:`\varepsilon` is a property of the model and
    its data. This fits it directly: for probe vectors :math:`u_j` it takes the
    :math:`\varepsilon` that best solves Newton's equation :math:`H \Delta = u` with
    :math:`\Delta = \varepsilon F^{-1} u`,

    .. math:: \hat\varepsilon = \arg\min_\varepsilon \sum_j
              \lVert \varepsilon\, H F^{-1} u_j - u_j \rVert^2
              = \frac{\sum_j \langle H F^{-1} u_j, u_j\rangle}{\sum_j \lVert H F^{-1} u_j\rVert^2}

    with :math:`H = \frac1n\sum_i \nabla^2\ell_i` (exact Hessian-vector products,
    ``torch.func``) and the block inverse ``inv_fisher``.

    Args:
        model, loss_fn, data, weight_decay: as in :func:`ssse.fit_inverse_fisher` (``data``
            the training set).
        inv_fisher: :math:`F^{-1}` at the model's parameters.
        probes: number of probe vectors.
        probe: ``"gradients"`` (per-sample gradients of training samples, drawn at random
            from an ``(X, y)`` pair or the first ones of an iterable: the directions eq. 8 is
            applied to) or ``"gaussian"``.
        seed: seeds the choice of probes.
        details: also return the fit's relative residual
            :math:`\lVert\hat\varepsilon HF^{-1}U - U\rVert / \lVert U\rVert`.

    Returns:
        :math:`\hat\varepsilon` (a float), or ``(epsilon, residual)`` with ``details=True``.
    """
    check_module(model)
    check_data(data, "data", task_of(check_loss(loss_fn)))
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    probes = check_positive_int(probes, "probes")
    check_choice(probe, "probe", ("gradients", "gaussian"))
    seed = check_int(seed, "seed")
    if probe == "gradients":  # probes come from data, then the Hessian reads all of it
        check_reiterable(data, "data", task_of(loss_fn))
    fm = FlatModel(model, loss_fn=loss_fn)
    inv = check_inverse(inv_fisher, fm)
    gen = torch.Generator().manual_seed(seed)
    if probe == "gaussian":
        U = torch.randn(fm.dim, probes, generator=gen, dtype=torch.float64)
    else:
        if is_batch(data, fm.task):
            idx = torch.randperm(data_size(data, fm.task), generator=gen)[:probes]
            subset = split_batch(data, "data", fm.task)
            subset = Split((batch_slice(subset[0], idx), batch_slice(subset[1], idx)))
            rows = list(row_stream(fm, loss_fn, subset, "data", weight_decay=weight_decay,
                                     chunk_size=None, minibatch=1, dtype=inv.dtype))
        else:
            rows, got = [], 0
            for chunk in row_stream(fm, loss_fn, data, "data", weight_decay=weight_decay,
                                      chunk_size=probes, minibatch=1, dtype=inv.dtype):
                rows.append(chunk)
                got += chunk.shape[0]
                if got >= probes:
                    break
        U = torch.cat(rows)[:probes].T.to(torch.float64)
    U = U.to(inv.device)
    W = inv.matvec(U.to(inv.dtype).contiguous()).to(torch.float64)
    HW, n = hessian_vector_products(model, loss_fn, data, W, weight_decay=weight_decay)
    HW = HW.to(U.device, torch.float64) / n
    denom = float((HW * HW).sum())
    if denom == 0:
        raise ValueError("the Hessian-vector products are all zero: cannot estimate epsilon")
    eps = float((HW * U).sum()) / denom
    if details:
        residual = float((eps * HW - U).norm() / U.norm())
        return eps, residual
    return eps


def select_epsilon(candidates: Iterable[float], evaluate: Callable, *,
                   criterion: str = "similarity_ratio") -> tuple[float, list[tuple[float, float]]]:
    r"""Grid search for :math:`\varepsilon` (paper §4): ``evaluate(epsilon)`` returns the
    criterion on a proxy removal with its own retrain; the best is the argmax of
    :math:`\gamma_S` (``"similarity_ratio"``) or the argmin of :math:`\delta_S`
    (``"confusion"``).

    Args:
        candidates: the grid of :math:`\varepsilon` values.
        evaluate: ``evaluate(epsilon) -> float`` (or a mapping holding the value under
            ``"similarity_ratio"`` / ``"confusion"``, or ``"normalized_confusion_distance"``).
        criterion: ``"similarity_ratio"`` or ``"confusion"``.

    Returns:
        ``(best_epsilon, curve)`` with ``curve`` the ``(epsilon, value)`` pairs in grid order;
        NaN values never win, ties go to the first.
    """
    check_callable(evaluate, "evaluate")
    check_choice(criterion, "criterion", CRITERIA)
    try:
        grid = [float(c) for c in candidates]
    except (TypeError, ValueError):
        raise TypeError("candidates must be an iterable of numbers") from None
    if not grid:
        raise ValueError("candidates must hold at least one epsilon")
    bad = [c for c in grid if not (math.isfinite(c) and c > 0)]
    if bad:
        raise ValueError(f"candidates must be finite numbers > 0, got {bad[:3]}")
    keys = (criterion,) + (("normalized_confusion_distance",) if criterion == "confusion" else ())
    curve = []
    for eps in grid:
        value = evaluate(eps)
        if isinstance(value, Mapping):
            key = next((k for k in keys if k in value), None)
            if key is None:
                raise KeyError(f"evaluate({eps}) returned a mapping without {keys[0]!r}")
            value = value[key]
        curve.append((eps, float(value)))
    valid = [(e, v) for e, v in curve if not math.isnan(v)]
    if not valid:
        raise ValueError("evaluate returned NaN for every candidate")
    sign = -1.0 if criterion == "similarity_ratio" else 1.0
    best = min(valid, key=lambda ev: sign * ev[1])[0]
    return best, curve
