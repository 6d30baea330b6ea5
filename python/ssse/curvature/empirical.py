r"""The empirical Fisher (the paper's): one row per sample, its gradient
:math:`u_i = \nabla_\theta \ell_i(\theta)`, weight decay included, so that

.. math:: F = \lambda I + \frac1n \sum_i \nabla\ell_i \nabla\ell_i^\top ,\qquad N = n;

with ``minibatch = b > 1`` one row per group of :math:`b` consecutive samples, their mean
gradient, and :math:`N` the number of groups (paper §3, b = 10 on CIFAR-10).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch.func import grad, vmap

from ..batches import batch_len, batch_map, batch_slice
from ..model import per_sample_losses
from . import register_curvature
from .base import Curvature
from .layer_grads import layer_gradients, linear_owners

__all__ = ["EmpiricalFisher", "group_gradients"]

# What torch.func.vmap raises for a module it cannot batch (data-dependent control flow,
# .item(), in-place writes to unbatched tensors): only these switch to the per-sample loop.
_VMAP_UNSUPPORTED = ("vmap", "batching rule", "batched tensor", "functorch")


def _vmap_cannot_batch(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    if "out of memory" in text or "can't allocate memory" in text:
        return False
    return any(key in text for key in _VMAP_UNSUPPORTED)


def _loop_grads(fm, group_loss, params: dict, xg, yg) -> torch.Tensor:
    out = []
    for i in range(batch_len(yg)):
        xi, yi = batch_map(lambda t: t[i], xg), batch_map(lambda t: t[i], yg)
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            gs = torch.autograd.grad(group_loss(leaves, xi, yi), [leaves[k] for k in fm.names],
                                     allow_unused=True)
        out.append(torch.cat([(torch.zeros_like(leaves[k]) if g is None else g).reshape(-1)
                              for k, g in zip(fm.names, gs)]))
    return torch.stack(out)


#: Models ``vmap`` failed on: later streams go straight to their fallback (a failed attempt
#: costs a partial forward pass per request).
_UNBATCHABLE: "weakref.WeakSet" = weakref.WeakSet()


def _unbatchable(fm, group_loss, params, xg, yg, b, state, exc) -> torch.Tensor:
    """The rows of groups that ``vmap`` could not batch: from one batched pass of linear
    layers (:mod:`~ssse.curvature.layer_grads`) when the model allows it, else a per-sample
    loop, with a warning, for the rest of the stream (``state``)."""
    owners = linear_owners(fm.model, fm.names) if b == 1 else None
    if owners is not None:
        state["engine"] = "layers"
        state["owners"] = owners
        return _layer_rows(fm, group_loss, params, xg, yg, owners)
    why = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    warnings.warn(f"per-sample gradients: torch.func.vmap failed ({why});"
                  " falling back to a per-sample loop, which is much slower", RuntimeWarning,
                  stacklevel=6)
    state["engine"] = "loop"
    return _loop_grads(fm, group_loss, params, xg, yg)


def _layer_rows(fm, group_loss, params, xg, yg, owners) -> torch.Tensor:
    # groups of one: the per-sample losses of the whole batch
    flat = (batch_map(lambda t: t[:, 0], xg), batch_map(lambda t: t[:, 0], yg))
    return layer_gradients(fm, owners, group_loss.losses, params, *flat)


def group_gradients(fm, loss_fn, params: dict, frozen: dict, x, y, b: int,
                    state: dict) -> torch.Tensor:
    r"""``(ceil(m / b), d)`` mean gradients :math:`\frac1b\sum_{i\in g}\nabla\ell_i` of
    consecutive groups of ``b`` samples of one batch (``b = 1``: per-sample gradients), by
    ``vmap(grad)``. For a model ``vmap`` cannot batch, the rest of the stream (``state``) uses
    one batched pass of its linear layers where every selected parameter belongs to one
    (:mod:`~ssse.curvature.layer_grads`), else a per-sample loop, with a warning."""
    m = batch_len(y)
    full = m // b

    def group_loss(p, xg, yg):
        return group_loss.losses(p, xg, yg).mean()

    # the per-sample losses themselves, for the engine of linear layers
    group_loss.losses = lambda p, xs, ys: per_sample_losses(loss_fn, fm(p, xs, frozen), ys)

    def groups(t):
        return t[:full * b].reshape((full, b) + tuple(t.shape[1:]))

    rows = []
    if full:
        xg, yg = batch_map(groups, x), batch_map(groups, y)
        engine = state.get("engine", "vmap")
        if engine == "vmap" and fm.model in _UNBATCHABLE:
            rows.append(_unbatchable(fm, group_loss, params, xg, yg, b, state,
                                     "an earlier call failed on this model"))
        elif engine == "loop":
            rows.append(_loop_grads(fm, group_loss, params, xg, yg))
        elif engine == "layers":
            rows.append(_layer_rows(fm, group_loss, params, xg, yg, state["owners"]))
        else:
            try:
                g = vmap(grad(group_loss), in_dims=(None, 0, 0), randomness="different")(
                    params, xg, yg)
                rows.append(fm.flatten_rows(g, full))
                del g  # the per-parameter copy, before the next
            except RuntimeError as exc:
                if not _vmap_cannot_batch(exc):
                    raise  # out of memory, shape errors, the loss's own errors: not vmap's
                _UNBATCHABLE.add(fm.model)
                rows.append(_unbatchable(fm, group_loss, params, xg, yg, b, state, exc))
    if full * b < m:
        rest = slice(full * b, None)
        g = grad(group_loss)(params, batch_slice(x, rest), batch_slice(y, rest))
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
