"""Shared helpers: validation, data iteration and the flat view of a model's parameters."""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call

#: Largest block size used when ``block_size`` is not given.
DEFAULT_BLOCK_SIZE = 1024
#: Rows per chunk of per-sample gradients when the data is a single ``(X, y)`` pair.
DEFAULT_CHUNK_SIZE = 128


# ---- scalar validation ----------------------------------------------------------------------

def check_module(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{name} has no trainable parameters (requires_grad=True)")
    return model


def check_callable(fn, name: str):
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    return fn


def check_nonneg_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_positive_float(value, name: str) -> float:
    value = check_nonneg_float(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_positive_int(value, name: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_choice(value, name: str, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def check_device(device, name: str = "device") -> torch.device | None:
    if device is None:
        return None
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device or a string such as 'cpu' or 'cuda', "
                        f"got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name} must name a torch device such as 'cpu' or 'cuda:0', got "
                         f"{device!r}") from None


# ---- data -----------------------------------------------------------------------------------

def _is_pair(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data))


def data_size(data) -> int | None:
    """The number of samples of an ``(X, y)`` pair, or ``None`` for an iterable of batches."""
    return int(data[0].shape[0]) if _is_pair(data) else None


def check_data(data, name: str):
    """Validates ``data``: an ``(X, y)`` pair of tensors with the same first dimension, or an
    iterable of such batches (checked lazily by :func:`iter_batches`)."""
    if _is_pair(data):
        x, y = data
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{name} must be an (X, y) pair with the same number of rows, got "
                             f"shapes {tuple(x.shape)} and {tuple(y.shape)}")
        return data
    if isinstance(data, torch.Tensor) or isinstance(data, (str, bytes)):
        raise TypeError(f"{name} must be an (X, y) pair of tensors or an iterable of (x, y) "
                        f"batches, got a single {type(data).__name__}")
    try:
        iter(data)
    except TypeError:
        raise TypeError(f"{name} must be an (X, y) pair of tensors or an iterable of (x, y) "
                        f"batches, got {type(data).__name__}") from None
    return data


def check_reiterable(data, name: str):
    """Validates ``data`` like :func:`check_data` and refuses a one-shot iterator (e.g. a
    generator), for functions that read their data more than once: its second pass would
    silently see nothing."""
    check_data(data, name)
    if not _is_pair(data) and isinstance(data, Iterator):
        raise TypeError(f"{name} is read more than once: pass an (X, y) pair or a re-iterable "
                        f"collection of batches (a list, a DataLoader), not a one-shot "
                        f"{type(data).__name__}")
    return data


def iter_batches(data, name: str, *, batch_size: int | None = None,
                 device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of ``data`` (validated), moved to ``device``; floating-point inputs
    are cast to ``dtype``. A pair is cut into batches of ``batch_size`` rows (one batch if
    ``None``); the batches of an iterable are passed through as they come."""
    check_data(data, name)
    if _is_pair(data):
        xs, ys = data  # not x, y: the loop below rebinds those while the generator runs
        n = xs.shape[0]
        step = batch_size or max(n, 1)
        source: Iterable = ((xs[i:i + step], ys[i:i + step]) for i in range(0, n, step))
        pair = True
    else:
        source, pair = data, False
    for k, batch in enumerate(source):
        label = name if pair else f"{name}[{k}]"
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(t, torch.Tensor) for t in batch)):
            raise TypeError(f"{label} must be an (x, y) pair of tensors, got "
                            f"{type(batch).__name__}")
        x, y = batch
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{label} must have x and y with the same number of rows, got "
                             f"shapes {tuple(x.shape)} and {tuple(y.shape)}")
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
    ``named_parameters()`` order (DESIGN §1); frozen parameters and buffers are held fixed.
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
        self.frozen.update({k: b for k, b in model.named_buffers()})

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


def loss_sum_fn(flat_model: FlatModel, loss_fn):
    """``(params, x, y) -> sum of per-sample losses`` (without the L2 term)."""
    def f(params, x, y, frozen=None):
        return per_sample_losses(loss_fn, flat_model(params, x, frozen), y).sum()
    return f


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
