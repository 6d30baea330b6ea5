r"""The unlearning community's forgetting test: can an attacker tell models erased by a method
from models retrained without the erased samples?

The test compares two families of models over seeds (for example over random draws of the
training data): models trained on :math:`D` and then erased of :math:`S`, and models retrained
on :math:`D \setminus S`. Per sample of :math:`S` it fits the distribution of a scalar
statistic in each family and scores a model by the likelihood ratio of its statistic (the
per-example attack U-LiRA of Hayes, Shumailov, Triantafillou, Khalifa & Papernot, "Inexact
unlearning needs more careful evaluations to avoid a false sense of privacy", 2024, built on
LiRA: Carlini et al., "Membership inference attacks from first principles", IEEE S&P 2022).
An erasure that behaves as retraining leaves the attacker at chance: TPR = FPR at every
threshold, and :math:`\varepsilon = 0` in the sense of the NeurIPS 2023 unlearning challenge
(Triantafillou et al., "Are we making progress in unlearning? Findings from the first NeurIPS
unlearning competition", 2024).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["DEFAULT_FPRS", "VARIANCES", "challenge_epsilon", "forget_score",
           "forgetting_quality", "logit_confidence"]

#: The false-positive rates at which the attack's true-positive rate is reported.
DEFAULT_FPRS = (0.01, 0.05, 0.1)
#: How the attack estimates the spread of each family: one variance per family over all
#: samples (LiRA's choice when there are few models) or one per sample.
VARIANCES = ("global", "per_sample")
#: The challenge's bins of per-sample ε: width 0.5, 13 bins; a sample in bin n scores 2 / 2^n.
_BIN_WIDTH, _BINS = 0.5, 13


def _array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        out = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}") from None
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} must hold finite numbers only")
    return out


def logit_confidence(logits, labels) -> np.ndarray:
    r"""LiRA's statistic: the logit-scaled confidence of the true class,
    :math:`\log\frac{p_y}{1-p_y} = z_y - \log\sum_{c \ne y} e^{z_c}`, computed from the logits
    :math:`z` without forming :math:`p` (exact where :math:`p_y` rounds to 1).

    Args:
        logits: ``(..., k, C)`` outputs of softmax classifiers on ``k`` samples.
        labels: ``(k,)`` integer classes in ``[0, C)``.

    Returns:
        The statistic, shape ``(..., k)``.
    """
    z = _array(logits, "logits")
    if z.ndim < 2 or z.shape[-1] < 2:
        raise ValueError(f"logits must have shape (..., k, C) with C >= 2 classes, got "
                         f"{tuple(z.shape)}")
    y = _labels(labels, z.shape[-2], z.shape[-1])
    true = np.take_along_axis(z, np.broadcast_to(y[:, None], z.shape[:-1] + (1,)), axis=-1)
    others = z.copy()
    np.put_along_axis(others, np.broadcast_to(y[:, None], z.shape[:-1] + (1,)), -np.inf,
                      axis=-1)
    top = others.max(axis=-1, keepdims=True)
    rest = top[..., 0] + np.log(np.exp(others - top).sum(axis=-1))
    return true[..., 0] - rest


def _labels(labels, k: int, classes: int) -> np.ndarray:
    if labels is None:
        raise ValueError("labels are needed with logits of shape (models, k, C)")
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.shape != (k,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be {k} integers (one per sample), got shape "
                         f"{tuple(y.shape)} of {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got {y.min()}..{y.max()}")
    return y.astype(np.int64)


def challenge_epsilon(fpr, fnr, delta: float = 0.01) -> float:
    r"""The NeurIPS 2023 unlearning challenge's :math:`\varepsilon` of a set of attacks with
    false-positive and false-negative rates ``fpr``, ``fnr`` (one per attack or threshold):

    .. math:: \hat\varepsilon = \max_{\text{attacks}} \max\Big(
              \log\frac{1-\delta-\mathrm{FPR}}{\mathrm{FNR}},\;
              \log\frac{1-\delta-\mathrm{FNR}}{\mathrm{FPR}}\Big)

    (the organisers' "Evaluation for the NeurIPS Machine Unlearning Competition", 2023, and
    Triantafillou et al. 2024), with their conventions: an attack with both rates 0 gives
    :math:`+\infty`, one with exactly one rate 0 is discarded (its ratio is an artefact of the
    finite number of models), a term whose numerator is not positive is ignored, and an attack
    with both terms ignored (wrong almost always: its negation is near-perfect) gives
    :math:`+\infty`. Not clipped; :func:`forgetting_quality` clips its estimates at 0 (an
    :math:`(\varepsilon, \delta)` guarantee has :math:`\varepsilon \ge 0`). No attack left
    gives 0.
    """
    fpr, fnr = np.asarray(fpr, dtype=np.float64), np.asarray(fnr, dtype=np.float64)
    both = (fpr == 0) & (fnr == 0)
    if both.any():
        return math.inf
    keep = (fpr > 0) & (fnr > 0)
    fpr, fnr = fpr[keep], fnr[keep]
    if fpr.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(1 - delta - fpr > 0, np.log(1 - delta - fpr) - np.log(fnr), np.nan)
        b = np.where(1 - delta - fnr > 0, np.log(1 - delta - fnr) - np.log(fpr), np.nan)
    per_attack = np.where(np.isnan(a) & np.isnan(b), math.inf, np.fmax(a, b))
    return float(per_attack.max())


def forget_score(epsilons) -> float:
    r"""The challenge's forgetting quality :math:`\mathcal F` of per-sample
    :math:`\varepsilon`: each sample scores :math:`2/2^{n}` with :math:`n` its bin (bins of
    width 0.5 from 0, the 13th open-ended), averaged; 1 when every
    :math:`\varepsilon < 0.5`, near 0 when the attacks succeed on every sample."""
    eps = np.maximum(np.asarray(epsilons, dtype=np.float64), 0.0)
    bins = np.digitize(eps, np.arange(_BINS) * _BIN_WIDTH)
    return float(np.mean(2.0 / 2.0 ** bins))


def _scores(erased: np.ndarray, retrained: np.ndarray, variance: str):
    """The likelihood-ratio scores ``log N(x; erased fit) - log N(x; retrained fit)`` of every
    (model, sample), each model scored by Gaussians fitted without it: pair ``r`` (erased model
    ``r`` and retrained model ``r``) is left out of both fits, so that under the null both
    members of the pair are scored alike. Returns (scores of erased, scores of retrained)."""
    models = erased.shape[0]
    pos, neg = np.empty_like(erased), np.empty_like(retrained)
    scale = 1e-12 * max(1.0, float(np.mean(erased ** 2)), float(np.mean(retrained ** 2)))
    for r in range(models):
        rest = np.arange(models) != r
        fits = []
        for family in (erased[rest], retrained[rest]):
            mean, var = family.mean(axis=0), family.var(axis=0, ddof=1)
            if variance == "global":
                var = np.full_like(var, var.mean())
            fits.append((mean, np.maximum(var, scale)))
        for x, out in ((erased[r], pos), (retrained[r], neg)):
            (m1, v1), (m0, v0) = fits
            out[r] = 0.5 * (np.log(v0 / v1) + (x - m0) ** 2 / v0 - (x - m1) ** 2 / v1)
    return pos.reshape(-1), neg.reshape(-1)


def _per_sample_epsilon(erased: np.ndarray, retrained: np.ndarray, delta: float) -> np.ndarray:
    """The challenge's per-sample ε: every threshold on the statistic, in both directions."""
    out = np.empty(erased.shape[1])
    for j in range(erased.shape[1]):
        e, r = np.sort(erased[:, j]), np.sort(retrained[:, j])
        t = np.unique(np.concatenate([e, r]))
        # "erased if x > t": FPR = P(retrained > t), FNR = P(erased <= t)
        fpr = 1 - np.searchsorted(r, t, side="right") / r.size
        fnr = np.searchsorted(e, t, side="right") / e.size
        # "erased if x <= t" swaps the decisions: rates 1 - FPR and 1 - FNR
        out[j] = max(0.0, challenge_epsilon(np.concatenate([fpr, 1 - fpr]),
                                            np.concatenate([fnr, 1 - fnr]), delta))
    return out


def _statistic(x, name: str, labels) -> np.ndarray:
    if isinstance(x, torch.Tensor) or isinstance(x, np.ndarray):
        ndim = x.ndim
    else:
        ndim = _array(x, name).ndim
    if ndim == 3:
        try:
            return logit_confidence(x, labels)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
    out = _array(x, name)
    if out.ndim != 2:
        raise ValueError(f"{name} must have shape (models, k) (a statistic per model and "
                         f"sample) or (models, k, C) (logits), got {tuple(out.shape)}")
    if labels is not None:
        raise ValueError(f"labels apply to logits only: {name} holds a statistic per sample")
    return out


def _check(retrained: np.ndarray, erased: np.ndarray, fprs, delta, variance) -> tuple:
    if erased.shape != retrained.shape:
        raise ValueError(f"erased must have the shape of retrained (the same models and "
                         f"samples), got {tuple(erased.shape)} and {tuple(retrained.shape)}")
    if retrained.shape[0] < 3:
        raise ValueError(f"retrained must hold at least 3 models (each is scored by fits to "
                         f"the others), got {retrained.shape[0]}")
    if retrained.shape[1] < 1:
        raise ValueError("retrained must hold at least one sample")
    if isinstance(fprs, (int, float)) or len(fprs) == 0:
        raise ValueError(f"fprs must be a non-empty sequence of rates, got {fprs!r}")
    fprs = tuple(float(f) for f in fprs)
    if not all(0 < f < 1 for f in fprs):
        raise ValueError(f"fprs must lie in (0, 1), got {fprs}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
        raise ValueError(f"delta must be a number in [0, 1), got {delta!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    return fprs, float(delta)


def forgetting_quality(retrained, erased, labels=None, *, fprs: Sequence[float] = DEFAULT_FPRS,
                       delta: float = 0.01, variance: str = "global") -> dict:
    r"""How well a per-example likelihood-ratio attack tells erased models from retrained
    ones (U-LiRA), and the :math:`\varepsilon` of the NeurIPS 2023 unlearning challenge.

    For sample :math:`j` of :math:`S` and each family (erased, retrained), a Gaussian is fitted
    to the statistic :math:`x_j` over that family's models; a model is scored by
    :math:`\log \mathcal N(x_j; \mu^E_j, \sigma_E^2) - \log \mathcal N(x_j; \mu^R_j,
    \sigma_R^2)` (high: looks erased). Model ``r`` of each family is scored by fits to the
    other models (pair ``r`` left out of both), so the attack is never evaluated on a model it
    was fitted to and, when the families have the same distribution, an erased and a
    retrained model are scored alike. Every (model, sample) is one decision: the attack's ROC
    pools the ``models * k`` decisions of each family (positives: erased).

    Reported: the true-positive rate at false-positive rates ``fprs`` (the best over
    thresholds whose FPR is at most the rate; chance: TPR = FPR), the ROC-AUC (chance: 0.5),
    :math:`\varepsilon` of that ROC by the challenge's formula (see
    :func:`challenge_epsilon`, its thresholds the attacks, clipped at 0; chance: about 0, up
    to the sampling noise of ``models * k`` decisions), and the challenge's own per-sample
    test: per sample, :math:`\varepsilon_j` of every threshold on the statistic in either
    direction (in-sample, as the challenge does: with few models it is biased upwards even when
    the families agree; compare with a control) and its forgetting quality :math:`\mathcal F`
    (:func:`forget_score`; 1: forgotten, near 0: not).

    Args:
        retrained: per model retrained without :math:`S`, its output on :math:`S`: a statistic
            ``(models, k)`` (e.g. the per-sample loss or the logit-scaled confidence) or logits
            ``(models, k, C)``, reduced by :func:`logit_confidence`.
        erased: the same for the models erased by the method, one per retrained model.
        labels: ``(k,)`` classes of :math:`S`, with logits only.
        fprs: false-positive rates in (0, 1) of the reported TPRs.
        delta: :math:`\delta` of the :math:`(\varepsilon, \delta)` estimate, in [0, 1) (the
            challenge uses 0.01).
        variance: ``"global"`` (one variance per family pooled over the samples, LiRA's choice
            for few models) or ``"per_sample"``.

    Returns:
        ``{"tpr_at_fpr": {rate: tpr}, "auc", "epsilon", "per_sample_epsilon" (array of k),
        "forget_score", "models", "samples", "decisions"}``.
    """
    r_stat = _statistic(retrained, "retrained", labels)
    e_stat = _statistic(erased, "erased", labels)
    fprs, delta = _check(r_stat, e_stat, fprs, delta, variance)
    pos, neg = _scores(e_stat, r_stat, variance)
    truth = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    scores = np.concatenate([pos, neg])
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    per_sample = _per_sample_epsilon(e_stat, r_stat, delta)
    return {
        "tpr_at_fpr": {f: float(tpr[fpr <= f].max()) for f in fprs},
        "auc": float(roc_auc_score(truth, scores)),
        "epsilon": max(0.0, challenge_epsilon(fpr, 1 - tpr, delta)),
        "per_sample_epsilon": per_sample,
        "forget_score": forget_score(per_sample),
        "models": int(r_stat.shape[0]), "samples": int(r_stat.shape[1]),
        "decisions": int(pos.size),
    }
