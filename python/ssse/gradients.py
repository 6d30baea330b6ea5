"""Sums of gradients and Hessian-vector products over data; the per-sample rows live in
:mod:`ssse.rows`, the fit in :mod:`ssse.fit`, layouts in :mod:`ssse.layouts` (their names are
re-exported here)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import jvp, vmap

from ssse_ext.validation import check_dtype, check_nonneg_float

from .batches import batch_len, check_data, check_loss, check_module
from .budget import MAX_CHUNK_ROWS, request_budget
from .checkpoint import CHECKPOINT_SECONDS
from .fit import fit_inverse_fisher
from .layouts import LAYOUTS, resolve_layout, row_layout
from .model import BATCH_SIZE, FlatModel, iter_batches, per_sample_losses
from .rows import (likelihood_of_data, likelihood_on, per_sample_grads, row_stream,
                   stacked_rows)

__all__ = ["CHECKPOINT_SECONDS", "LAYOUTS", "MAX_CHUNK_ROWS", "fit_inverse_fisher",
           "gradient_sum", "hessian_vector_products", "likelihood_of_data", "likelihood_on",
           "per_sample_grads", "request_budget", "resolve_layout", "row_layout", "row_stream",
           "stacked_rows"]

#: The old private name of :func:`ssse.rows.row_stream`, kept while callers move.
_grad_stream = row_stream


def _flat(model, loss_fn) -> FlatModel:
    """The flat view of ``model`` (or ``model`` itself when it is one), checked."""
    check_loss(loss_fn)
    if isinstance(model, FlatModel):
        return model
    return FlatModel(check_module(model), loss_fn=loss_fn)


def gradient_sum(model: nn.Module, loss_fn, data, *, weight_decay: float = 0.0,
                 dtype: torch.dtype | None = None, params: dict | None = None,
                 name: str = "data") -> tuple[torch.Tensor, int]:
    r""":math:`\sum_{i} \nabla_\theta \ell_i(\theta)` over ``data`` (one backward pass per batch)
    and the number of samples.

    Args:
        model, loss_fn, data, weight_decay: as in :func:`per_sample_grads` (``model`` may be
            a :class:`~ssse.model.FlatModel`, for a parameter selection).
        dtype: compute dtype (default: the model's).
        params: ``{name: tensor}`` trainable parameters to evaluate at (default: the model's).

    Returns:
        ``(grad, n)``: a ``(d,)`` tensor on the model's device and the sample count.
    """
    fm = _flat(model, loss_fn)
    check_data(data, name, fm.task)
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    dtype = check_dtype(dtype) or fm.dtype
    params = fm.param_dict(dtype) if params is None else params
    frozen = fm.frozen_dict(dtype)
    total = torch.zeros(fm.dim, dtype=dtype, device=fm.device)
    count = 0
    for x, y in iter_batches(data, name, batch_size=BATCH_SIZE, device=fm.device, dtype=dtype,
                             task=fm.task):
        if batch_len(y) == 0:
            continue
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            loss = per_sample_losses(loss_fn, fm(leaves, x, frozen), y).sum()
            gs = torch.autograd.grad(loss, [leaves[k] for k in fm.names], allow_unused=True)
        total += torch.cat([(torch.zeros_like(leaves[k]) if g is None else g).reshape(-1)
                            for k, g in zip(fm.names, gs)])
        count += batch_len(y)
    if weight_decay:
        theta = torch.cat([params[k].reshape(-1) for k in fm.names]).to(dtype)
        total += weight_decay * count * theta
    return total, count


def hessian_vector_products(model: nn.Module, loss_fn, data, vectors: torch.Tensor, *,
                            weight_decay: float = 0.0, dtype: torch.dtype | None = None,
                            chunk: int = 16) -> tuple[torch.Tensor, int]:
    r""":math:`\big(\sum_i \nabla^2_\theta \ell_i(\theta)\big) V` for the columns of ``vectors``
    (forward-over-reverse, ``torch.func.jvp`` of ``grad``), and the number of samples.

    Args:
        vectors: ``(d,)`` or ``(d, r)``.
        chunk: columns pushed through the data at once.

    Returns:
        ``(HV, n)`` with ``HV`` the shape of ``vectors`` (the *sum* over samples; divide by
        ``n`` for the mean Hessian).
    """
    fm = _flat(model, loss_fn)
    check_data(data, "data", fm.task)
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    dtype = check_dtype(dtype) or fm.dtype
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or \
            vectors.shape[0] != fm.dim:
        raise ValueError(f"vectors must be a ({fm.dim},) or ({fm.dim}, r) tensor, got "
                         f"{getattr(vectors, 'shape', type(vectors).__name__)}")
    vec = vectors.dim() == 1
    V = (vectors.reshape(-1, 1) if vec else vectors).to(dtype=dtype, device=fm.device)
    params = fm.param_dict(dtype)
    frozen = fm.frozen_dict(dtype)
    theta = torch.cat([params[k].reshape(-1) for k in fm.names])
    out = torch.zeros_like(V)
    count = 0

    for x, y in iter_batches(data, "data", batch_size=BATCH_SIZE, device=fm.device, dtype=dtype,
                             task=fm.task):
        if batch_len(y) == 0:
            continue

        def g(t):
            return torch.func.grad(
                lambda tt: per_sample_losses(loss_fn, fm(fm.unflatten(tt), x, frozen), y).sum())(t)

        def hvp(v):
            return jvp(g, (theta,), (v,))[1]

        for j in range(0, V.shape[1], chunk):
            block = V[:, j:j + chunk].T.contiguous()
            out[:, j:j + chunk] += vmap(hvp)(block).T
        count += batch_len(y)
    if weight_decay:
        out += weight_decay * count * V
    out = out.detach()
    return (out.view(-1) if vec else out), count
