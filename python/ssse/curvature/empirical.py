r"""The empirical Fisher (the paper's): one row per sample, its gradient
:math:`u_i = \nabla_\theta \ell_i(\theta)`, weight decay included, so that

.. math:: F = \lambda I + \frac1n \sum_i \nabla\ell_i \nabla\ell_i^\top ,\qquad N = n;

with ``minibatch = b > 1`` one row per group of :math:`b` consecutive samples, their mean
gradient, and :math:`N` the number of groups (paper §3, b = 10 on CIFAR-10).
"""

from __future__ import annotations

import warnings

import torch
from torch.func import grad, vmap

from ..model import per_sample_losses
from . import register_curvature
from .base import Curvature

__all__ = ["EmpiricalFisher", "group_gradients"]

# What torch.func.vmap raises for a module it cannot batch (data-dependent control flow,
# .item(), in-place writes to unbatched tensors): only these switch to the per-sample loop.
_VMAP_UNSUPPORTED = ("vmap", "batching rule", "batched tensor", "functorch")


def _vmap_cannot_batch(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    if "out of memory" in text or "can't allocate memory" in text:
        return False
    return any(key in text for key in _VMAP_UNSUPPORTED)


def _loop_grads(fm, group_loss, params: dict, xg: torch.Tensor, yg: torch.Tensor) -> torch.Tensor:
    out = []
    for xi, yi in zip(xg, yg):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            gs = torch.autograd.grad(group_loss(leaves, xi, yi), [leaves[k] for k in fm.names],
                                     allow_unused=True)
        out.append(torch.cat([(torch.zeros_like(leaves[k]) if g is None else g).reshape(-1)
                              for k, g in zip(fm.names, gs)]))
    return torch.stack(out)


def group_gradients(fm, loss_fn, params: dict, frozen: dict, x: torch.Tensor, y: torch.Tensor,
                    b: int, state: dict) -> torch.Tensor:
    r"""``(ceil(m / b), d)`` mean gradients :math:`\frac1b\sum_{i\in g}\nabla\ell_i` of
    consecutive groups of ``b`` samples of one batch (``b = 1``: per-sample gradients), by
    ``vmap(grad)``; a model ``vmap`` cannot batch falls back to a loop, with a warning, for the
    rest of the stream (``state``)."""
    m = x.shape[0]
    full = m // b

    def group_loss(p, xg, yg):
        return per_sample_losses(loss_fn, fm(p, xg, frozen), yg).mean()

    rows = []
    if full:
        xg = x[:full * b].reshape((full, b) + tuple(x.shape[1:]))
        yg = y[:full * b].reshape((full, b) + tuple(y.shape[1:]))
        if state.get("loop"):
            rows.append(_loop_grads(fm, group_loss, params, xg, yg))
        else:
            try:
                g = vmap(grad(group_loss), in_dims=(None, 0, 0), randomness="different")(
                    params, xg, yg)
                rows.append(fm.flatten_rows(g, full))
                del g  # the per-parameter copy, before the next
            except RuntimeError as exc:
                if not _vmap_cannot_batch(exc):
                    raise  # out of memory, shape errors, the loss's own errors: not vmap's
                warnings.warn(f"per-sample gradients: torch.func.vmap failed ({type(exc).__name__}:"
                              f" {exc}); falling back to a per-sample loop, which is much slower",
                              RuntimeWarning, stacklevel=5)
                state["loop"] = True
                rows.append(_loop_grads(fm, group_loss, params, xg, yg))
    if full * b < m:
        g = grad(group_loss)(params, x[full * b:], y[full * b:])
        rows.append(fm.flatten_rows({k: v.unsqueeze(0) for k, v in g.items()}, 1))
    return torch.cat(rows) if len(rows) > 1 else rows[0]


class EmpiricalFisher(Curvature):
    """The per-sample (or per-group) gradients, weight decay included (see the module
    docstring)."""

    name = "empirical"
    needs_labels = True
    allows_minibatch = True
    includes_weight_decay = True
    rows_are_gradients = True

    def rows(self, fm, params, frozen, x, y, *, loss_fn, likelihood, generator, mc_samples,
             minibatch, state):
        return group_gradients(fm, loss_fn, params, frozen, x, y, minibatch, state).detach()


EMPIRICAL = register_curvature(EmpiricalFisher())
