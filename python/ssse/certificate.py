r"""A per-request certificate: how far an erased model is from stationarity on the data it
keeps.

Retraining on the retained data :math:`D' = D \setminus (S_1 \cup \dots \cup S_t)` ends at a
point where the gradient of the retained objective

.. math:: L_{D'}(\theta) = \frac{1}{|D'|} \sum_{i \in D'} \ell_i(\theta)
          + \frac{w}{2} \lVert\theta\rVert^2

vanishes. The residual :math:`\lVert\nabla L_{D'}(\hat\theta_t)\rVert` of the model after
request :math:`t` (one pass over :math:`D'`) measures what one-step erasure leaves undone,
accumulated over every request so far: it is 0 at the retrained optimum and grows as the
requests' quadratic models drift from the objective. A service records it per request
(``ssse erase --ledger --verify``) and recommends retraining once it crosses a threshold the
user sets (``--retrain-above``).
"""

from __future__ import annotations

import math

import torch

from ssse_ext.validation import check_nonneg_float, check_positive_float

from .gradients import gradient_sum
from .model import FlatModel

__all__ = ["certify", "certify_flat", "gradient_residual"]


def gradient_residual(model, loss_fn, retained, *, weight_decay: float = 0.0,
                      params=None) -> tuple[float, int]:
    r""":math:`\lVert\nabla L_{D'}(\theta)\rVert` at the model's parameters (the selection
    ``params``, as in :func:`ssse.fit_inverse_fisher`), in float64, and :math:`|D'|`."""
    fm = FlatModel(model, params=params, loss_fn=loss_fn)
    return _residual(fm, loss_fn, retained, None, weight_decay)


def _residual(fm: FlatModel, loss_fn, retained, theta, weight_decay) -> tuple[float, int]:
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    params = None if theta is None else \
        {k: v.to(torch.float64) for k, v in fm.unflatten(theta.detach()).items()}
    g, n = gradient_sum(fm, loss_fn, retained, weight_decay=weight_decay, dtype=torch.float64,
                        params=params, name="retained")
    if n == 0:
        raise ValueError("retained is empty: the residual needs at least one sample")
    return float(g.norm()) / n, n


def certify(model, loss_fn, retained, *, weight_decay: float = 0.0, params=None,
            retrain_above: float | None = None) -> dict:
    """The certificate of a model after a request: ``{"residual", "n_retained",
    "retrain_above", "retrain_recommended"}`` (:func:`gradient_residual`; retraining is
    recommended when the residual exceeds ``retrain_above``, never without one)."""
    fm = FlatModel(model, params=params, loss_fn=loss_fn)
    return certify_flat(fm, loss_fn, retained, None, weight_decay=weight_decay,
                        retrain_above=retrain_above)


def certify_flat(fm: FlatModel, loss_fn, retained, theta: torch.Tensor | None, *,
                 weight_decay: float = 0.0, retrain_above: float | None = None) -> dict:
    """:func:`certify` for a :class:`~ssse.model.FlatModel` at the flat parameters ``theta``
    (``None``: its current ones), without touching the model."""
    if retrain_above is not None:
        retrain_above = check_positive_float(retrain_above, "retrain_above")
    residual, n = _residual(fm, loss_fn, retained, theta, weight_decay)
    if not math.isfinite(residual):
        raise FloatingPointError("the gradient residual is not finite")
    return {"residual": residual, "n_retained": n, "retrain_above": retrain_above,
            "retrain_recommended": retrain_above is not None and residual > retrain_above}
