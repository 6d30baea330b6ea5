"""The model as a function of its flat parameter vector (:class:`FlatModel`), data iteration
and per-sample losses, and the end of every update (checks, ``state_dict``, ``inplace``)."""

from __future__ import annotations

import warnings
import fnmatch
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

import ssse_ext

from .batches import (batch_len, check_data, check_loss, check_module, concat_data, data_size,
                      is_task, iter_batches, logits_of, rebatch)

__all__ = ["BATCH_SIZE", "FlatModel", "LossReductionError", "available_memory", "check_inverse",
           "check_request", "concat_data", "data_size", "finish_update", "iter_batches",
           "per_sample_losses", "rebatch", "select_parameters", "warn_if_training"]

#: Rows per batch when the library cuts an ``(X, y)`` pair for a full-batch pass (gradient
#: sums, Hessian-vector products, evaluation).
BATCH_SIZE = 1024


# ---- the model as a function of its flat parameter vector -----------------------------------

_STATEFUL_IN_TRAINING = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                         nn.Dropout3d, nn.AlphaDropout)


def warn_if_training(model: nn.Module, where: str):
    """Warns when a BatchNorm or Dropout layer of ``model`` is in training mode (each layer's
    own flag: a wrapper's flag says nothing of the modules inside it)."""
    if any(m.training and isinstance(m, _STATEFUL_IN_TRAINING) for m in model.modules()):
        warnings.warn(f"{where}: the model has BatchNorm or Dropout layers in training mode, "
                      "whose per-sample gradients are then ill-defined; call model.eval() first",
                      RuntimeWarning, stacklevel=3)


def select_parameters(model: nn.Module, params=None, name: str = "params") -> list[str]:
    """The names of the parameters of ``model`` that ``params`` selects, in
    ``named_parameters()`` order.

    ``params``: ``None`` (every parameter with ``requires_grad``), or a name, a glob pattern
    (``"*lora_*"``), a module of ``model``, a parameter, a predicate ``f(name, parameter)``, or
    a list of these (their union). A selection that matches nothing is refused.
    """
    named = list(model.named_parameters())
    if params is None:
        return [k for k, p in named if p.requires_grad]
    items = list(params) if isinstance(params, (list, tuple, set, frozenset)) else [params]
    if not items:
        raise ValueError(f"{name} is empty: select at least one parameter")
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, str):  # a name, else a glob pattern
            hit = {item} if any(k == item for k, _ in named) else \
                {k for k, _ in named if fnmatch.fnmatchcase(k, item)}
        elif isinstance(item, nn.Parameter):
            hit = {k for k, p in named if p is item}
        elif isinstance(item, nn.Module):
            ids = {id(p) for p in item.parameters()}
            hit = {k for k, p in named if id(p) in ids}
        elif callable(item):
            hit = {k for k, p in named if item(k, p)}
        else:
            raise TypeError(f"{name} must hold parameter names, glob patterns, modules, "
                            f"parameters or predicates f(name, parameter), got "
                            f"{type(item).__name__}")
        if not hit:
            raise ValueError(f"{name}: {item!r} selects no parameter of the model (names look "
                             f"like {named[0][0]!r})" if named else f"{name}: the model has no "
                             "parameters")
        chosen |= hit
    return [k for k, _ in named if k in chosen]


class FlatModel:
    r"""A model seen as a function of its flat parameter vector :math:`\theta`.

    :math:`\theta` concatenates the selected parameters (``params``, default: those with
    ``requires_grad``; :func:`select_parameters`) in ``named_parameters()`` order
    (docs/maths.md); the other parameters and the buffers are held fixed. With a
    :class:`~ssse.Task` as ``loss_fn``, the task runs the model.
    """

    def __init__(self, model: nn.Module, *, params=None, loss_fn=None):
        self.model = model
        chosen = set(select_parameters(model, params))
        named = [(k, p) for k, p in model.named_parameters() if k in chosen]
        self.task = loss_fn if is_task(loss_fn) else None
        self.names = [k for k, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.params = [p for _, p in named]
        self.dim = sum(self.numels)
        self.dtype = named[0][1].dtype
        self.device = named[0][1].device
        self.frozen = {k: p.detach() for k, p in model.named_parameters() if k not in chosen}
        # copies: a BatchNorm in training mode updates its running statistics in place during
        # a forward pass, and nothing the caller owns may change (erasure methods, fits)
        self.frozen.update({k: b.detach().clone() for k, b in model.named_buffers()})

    def flat(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The current :math:`\\theta` as a new ``(d,)`` tensor."""
        return torch.cat([p.detach().reshape(-1) for p in self.params]).to(
            dtype=dtype or self.dtype, device=device or self.device).clone()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` views of a ``(d,)`` vector (or of the rows of ``(r, d)``)."""
        out, pos = {}, 0
        lead = tuple(theta.shape[:-1])
        for name, shape, numel in zip(self.names, self.shapes, self.numels):
            out[name] = theta[..., pos:pos + numel].reshape(lead + shape)
            pos += numel
        return out

    def param_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {k: p.detach().to(dtype or p.dtype) for k, p in zip(self.names, self.params)}

    def frozen_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        if dtype is None:
            return dict(self.frozen)
        return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in self.frozen.items()}

    def __call__(self, params: dict, x, frozen: dict | None = None):
        """The model's outputs at ``params`` for the inputs ``x``: ``model(x)`` for a tensor,
        ``model(**x)`` for a mapping (its ``logits`` when it has them), or what the task's
        ``forward`` returns."""
        tensors = (params, self.frozen if frozen is None else frozen)
        if self.task is not None:
            def bound(*args, **kwargs):
                return functional_call(self.model, tensors, args, kwargs)
            return self.task.forward(bound, x)
        if isinstance(x, Mapping):
            return logits_of(functional_call(self.model, tensors, (), dict(x)))
        return logits_of(functional_call(self.model, tensors, (x,)))

    def flatten_rows(self, grads: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
        """Concatenates per-row gradient dicts ``{name: (rows, *shape)}`` into ``(rows, d)``."""
        return torch.cat([grads[k].reshape(rows, -1) for k in self.names], dim=1)

    def state_dict_with(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """A new ``state_dict`` of the model with the trainable parameters set to ``theta``
        (cast to each parameter's dtype and device); everything else is copied."""
        new = {k: v.reshape(s) for k, v, s in
               zip(self.names, torch.split(theta.detach(), self.numels), self.shapes)}
        by_id = {id(p): new[k] for k, p in zip(self.names, self.params)}
        out = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            src = by_id.get(id(value))
            if src is not None:
                out[key] = src.to(dtype=value.dtype, device=value.device).clone()
            else:
                out[key] = value.detach().clone()
        return out

    def write(self, theta: torch.Tensor):
        """Copies ``theta`` into the model's trainable parameters."""
        with torch.no_grad():
            for p, v in zip(self.params, torch.split(theta.detach(), self.numels)):
                p.copy_(v.reshape(p.shape).to(dtype=p.dtype, device=p.device))


def per_sample_losses(loss_fn, output, y) -> torch.Tensor:
    """``loss_fn(output, y)`` reduced to one loss per sample (elements beyond the batch
    dimension, e.g. one per attribute or per token, are summed); a :class:`~ssse.Task`'s
    ``per_sample_loss``."""
    m = batch_len(y)
    loss = loss_fn.per_sample_loss(output, y) if is_task(loss_fn) else loss_fn(output, y)
    if not isinstance(loss, torch.Tensor) or loss.dim() == 0:
        raise LossReductionError(
            "loss_fn must return per-sample losses of shape (batch,) (use reduction='none'), got "
            f"{'a scalar' if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    if loss.shape[0] != m:
        raise LossReductionError(f"loss_fn must return one loss per sample: got shape "
                                 f"{tuple(loss.shape)} for a batch of {m}")
    return loss.reshape(loss.shape[0], -1).sum(dim=1) if loss.dim() > 1 else loss


class LossReductionError(ValueError):
    """``loss_fn`` does not return per-sample losses."""


# ---- checks and the end of an update ----------------------------------------------------------

def check_inverse(inv, fm: FlatModel, name: str = "inv_fisher") -> ssse_ext.BlockInverseFisher:
    """A :class:`ssse_ext.BlockInverseFisher` over the model's ``d`` selected parameters (the
    same names, in the same order, when the inverse records them)."""
    if not isinstance(inv, ssse_ext.BlockInverseFisher):
        raise TypeError(f"{name} must be a ssse_ext.BlockInverseFisher, got {type(inv).__name__}")
    covered = inv.params
    if covered is not None and tuple(covered) != tuple(fm.names):
        extra = [k for k in fm.names if k not in covered]
        missing = [k for k in covered if k not in fm.names]
        raise ValueError(f"{name} covers other parameters than the {len(fm.names)} selected "
                         f"(params=): {len(missing)} of its {len(covered)} not selected "
                         f"{missing[:3]}, {len(extra)} selected not covered {extra[:3]}"
                         + ("" if missing or extra else ", or another order")
                         + "; pass the params= selection the inverse was fitted on")
    if inv.dim != fm.dim:
        raise ValueError(f"{name} has dim={inv.dim}, the model has d={fm.dim} selected "
                         "parameters")
    return inv


def check_request(model, loss_fn, removed, inv_fisher, *,
                  params=None) -> tuple[FlatModel, ssse_ext.BlockInverseFisher]:
    """The checks every erasure with a stored inverse starts with; returns the flat model (of
    the ``params`` selection) and the inverse."""
    check_module(model)
    check_loss(loss_fn)
    check_data(removed, "removed", loss_fn if is_task(loss_fn) else None)
    fm = FlatModel(model, params=params, loss_fn=loss_fn)
    return fm, check_inverse(inv_fisher, fm)


def finish_update(fm: FlatModel, theta_hat: torch.Tensor, *, inplace: bool,
                  what: str) -> dict[str, torch.Tensor]:
    """The end of every erasure method: refuse a non-finite result (nothing changed), build the
    new ``state_dict``, and write the model only when ``inplace``."""
    if not bool(torch.isfinite(theta_hat).all()):
        raise FloatingPointError(f"{what} produced NaN or Inf; nothing was changed")
    state = fm.state_dict_with(theta_hat)
    if inplace:
        fm.write(theta_hat)
    return state


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated now (:func:`ssse_ext.budget.available_memory`: free GPU
    memory on CUDA; on the CPU ``MemAvailable`` within any cgroup limit, or the
    ``SSSE_AVAILABLE_MEMORY`` figure)."""
    return ssse_ext.budget.available_memory(device)
