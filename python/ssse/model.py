"""The model as a function of its flat parameter vector (:class:`FlatModel`), data iteration
and per-sample losses, and the end of every update (checks, ``state_dict``, ``inplace``)."""

from __future__ import annotations

import warnings
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call

import ssse_ext
from ssse_ext.validation import check_callable, check_data, check_module, is_pair

__all__ = ["BATCH_SIZE", "FlatModel", "LossReductionError", "available_memory", "check_inverse",
           "check_request", "concat_data", "data_size", "finish_update", "iter_batches",
           "per_sample_losses", "rebatch", "warn_if_training"]

#: Rows per batch when the library cuts an ``(X, y)`` pair for a full-batch pass (gradient
#: sums, Hessian-vector products, evaluation).
BATCH_SIZE = 1024


# ---- data -----------------------------------------------------------------------------------

def data_size(data) -> int | None:
    """The number of samples of an ``(X, y)`` pair or a list of such batches; ``None`` for
    another iterable (its size is not known before it is read)."""
    if is_pair(data):
        return int(data[0].shape[0])
    if isinstance(data, (list, tuple)) and all(is_pair(b) for b in data):
        return sum(int(b[0].shape[0]) for b in data)
    return None


def iter_batches(data, name: str, *, batch_size: int | None = None,
                 device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of ``data`` (validated), moved to ``device``; floating-point inputs
    are cast to ``dtype``. A pair is cut into batches of ``batch_size`` rows (one batch if
    ``None``); the batches of an iterable are passed through as they come."""
    check_data(data, name)
    if is_pair(data):
        xs, ys = data  # not x, y: the loop below rebinds those while the generator runs
        n = xs.shape[0]
        step = batch_size or max(n, 1)
        source: Iterable = ((xs[i:i + step], ys[i:i + step]) for i in range(0, n, step))
        pair = True
    else:
        source, pair = data, False
    for k, batch in enumerate(source):
        label = name if pair else f"{name}[{k}]"
        if not is_pair(batch):
            raise TypeError(f"{label} must be an (x, y) pair of tensors, got "
                            f"{type(batch).__name__}")
        x, y = check_data(batch, label)
        if device is not None:
            x, y = x.to(device), y.to(device)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        if dtype is not None and y.is_floating_point():
            y = y.to(dtype)
        yield x, y


def concat_data(data, name: str, *, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``data`` as one ``(X, y)`` pair."""
    xs, ys = [], []
    for x, y in iter_batches(data, name, device=device, dtype=dtype):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(f"{name} is empty")
    return torch.cat(xs), torch.cat(ys)


def rebatch(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int):
    """Regroups a stream of ``(x, y)`` batches into batches of exactly ``size`` rows (the last
    one may be smaller), carrying leftovers across batch boundaries."""
    xs, ys, held = [], [], 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        held += x.shape[0]
        if held >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            full = (held // size) * size
            for i in range(0, full, size):
                yield x_all[i:i + size], y_all[i:i + size]
            xs, ys, held = [x_all[full:]], [y_all[full:]], held - full
    if held:
        yield torch.cat(xs), torch.cat(ys)


# ---- the model as a function of its flat parameter vector -----------------------------------

_STATEFUL_IN_TRAINING = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                         nn.Dropout3d, nn.AlphaDropout)


def warn_if_training(model: nn.Module, where: str):
    if model.training and any(isinstance(m, _STATEFUL_IN_TRAINING) for m in model.modules()):
        warnings.warn(f"{where}: the model is in training mode and has BatchNorm or Dropout "
                      "layers, whose per-sample gradients are then ill-defined; call "
                      "model.eval() first", RuntimeWarning, stacklevel=3)


class FlatModel:
    r"""A model seen as a function of its flat trainable parameter vector :math:`\theta`.

    :math:`\theta` concatenates the trainable parameters (``requires_grad``) in
    ``named_parameters()`` order (docs/maths.md); frozen parameters and buffers are held fixed.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        self.names = [k for k, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.params = [p for _, p in named]
        self.dim = sum(self.numels)
        self.dtype = named[0][1].dtype
        self.device = named[0][1].device
        self.frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
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

    def __call__(self, params: dict, x: torch.Tensor, frozen: dict | None = None) -> torch.Tensor:
        return functional_call(self.model, (params, self.frozen if frozen is None else frozen),
                               (x,))

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


def per_sample_losses(loss_fn, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``loss_fn(output, y)`` reduced to one loss per row (elements beyond the batch dimension,
    e.g. one per attribute, are summed)."""
    loss = loss_fn(output, y)
    if not isinstance(loss, torch.Tensor) or loss.dim() == 0:
        raise LossReductionError(
            "loss_fn must return per-sample losses of shape (batch,) (use reduction='none'), got "
            f"{'a scalar' if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    if loss.shape[0] != output.shape[0]:
        raise LossReductionError(f"loss_fn must return one loss per sample: got shape "
                                 f"{tuple(loss.shape)} for a batch of {output.shape[0]}")
    return loss.reshape(loss.shape[0], -1).sum(dim=1) if loss.dim() > 1 else loss


class LossReductionError(ValueError):
    """``loss_fn`` does not return per-sample losses."""


# ---- checks and the end of an update ----------------------------------------------------------

def check_inverse(inv, fm: FlatModel, name: str = "inv_fisher") -> ssse_ext.BlockInverseFisher:
    """A :class:`ssse_ext.BlockInverseFisher` over the model's ``d`` trainable parameters."""
    if not isinstance(inv, ssse_ext.BlockInverseFisher):
        raise TypeError(f"{name} must be a ssse_ext.BlockInverseFisher, got {type(inv).__name__}")
    if inv.dim != fm.dim:
        raise ValueError(f"{name} has dim={inv.dim}, the model has d={fm.dim} trainable "
                         "parameters")
    return inv


def check_request(model, loss_fn, removed,
                  inv_fisher) -> tuple[FlatModel, ssse_ext.BlockInverseFisher]:
    """The checks every erasure with a stored inverse starts with; returns the flat model and
    the inverse."""
    check_module(model)
    check_callable(loss_fn, "loss_fn")
    check_data(removed, "removed")
    fm = FlatModel(model)
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
