"""Argument checks shared by :mod:`ssse_ext` and :mod:`ssse` (and the ``ssse`` command).

One rule everywhere: a value of the wrong *type* raises ``TypeError``, a value of the right
type that is out of range raises ``ValueError``, and every message names the argument, what was
expected and what was given.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FLOAT_DTYPES",
    "DEVICE_TYPES",
    "all_finite",
    "check_callable",
    "check_choice",
    "check_device",
    "check_dtype",
    "check_finite_float",
    "check_int",
    "check_matrix",
    "check_vector",
    "check_nonneg_float",
    "check_nonneg_int",
    "check_positive_float",
    "check_positive_int",
    "matrix_chunks",
]

#: The dtypes of gradients and inverses.
FLOAT_DTYPES = (torch.float32, torch.float64)
#: The device types the kernels run on.
DEVICE_TYPES = ("cpu", "cuda")


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def check_finite_float(value, name: str) -> float:
    """A finite real number."""
    out = _number(value, name)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {out}")
    return out


def check_nonneg_float(value, name: str) -> float:
    """A finite number ``>= 0``."""
    out = _number(value, name)
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {out}")
    return out


def check_positive_float(value, name: str) -> float:
    """A finite number ``> 0``."""
    out = _number(value, name)
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {out}")
    return out


def check_int(value, name: str) -> int:
    """An ``int`` (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_nonneg_int(value, name: str) -> int:
    """An ``int >= 0``."""
    out = check_int(value, name)
    if out < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {out}")
    return out


def check_positive_int(value, name: str, *, allow_none: bool = False) -> int | None:
    """An ``int > 0`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    out = check_int(value, name)
    if out <= 0:
        raise ValueError(f"{name} must be a positive integer, got {out}")
    return out


def check_choice(value, name: str, choices: tuple):
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    """``None``, ``torch.float32`` or ``torch.float64``."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def check_device(device, name: str = "device") -> torch.device | None:
    """``None`` or a CPU or CUDA device given as a ``torch.device``, a string or an index."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{name} must be a torch.device or a string such as 'cpu' or 'cuda', "
                        f"got {type(device).__name__}")
    try:
        out = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name} must name a torch device such as 'cpu' or 'cuda:0', got "
                         f"{device!r}") from None
    if out.type not in DEVICE_TYPES:
        raise ValueError(f"{name} must be a CPU or CUDA device, got {str(out)!r}")
    return out


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite."""
    # The sum is NaN/Inf iff an entry is, barring overflow of huge values, which the exact
    # elementwise test (slower: it allocates a mask) then settles. The sum is taken in the
    # tensor's own dtype: sum(dtype=float64) would first make a float64 copy of the tensor.
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_matrix(t, name: str, *, dim: int | None = None, dtype=None, device=None,
                 like: str = "the inverse Fisher") -> torch.Tensor:
    """A finite 2-D float32/float64 CPU or CUDA tensor, optionally with ``dim`` columns and the
    given dtype and device; returned contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, d), got shape {tuple(t.shape)}")
    if t.device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} must have d={dim} columns, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} like {like}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like {like}, got {t.device}")
    if not all_finite(t):
        raise ValueError(f"{name} contains NaN or Inf")
    return t.contiguous()


def matrix_chunks(grads, chunk_size: int | None, name: str = "grads", *, dim: int | None = None,
                  dtype=None, device=None, like: str = "the inverse Fisher"):
    """Validated 2-D chunks of ``grads`` (a tensor, or an iterable of tensors), split into at
    most ``chunk_size`` rows; all chunks share ``dim``, ``dtype`` and ``device`` (by default
    the first chunk's). An empty chunk is yielded as it is (it still tells d, dtype, device)."""
    chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if isinstance(grads, torch.Tensor):
        source = [grads]
    else:
        try:
            source = iter(grads)
        except TypeError:
            raise TypeError(f"{name} must be a (n, d) tensor or an iterable of (m, d) tensors, "
                            f"got {type(grads).__name__}") from None
    for k, chunk in enumerate(source):
        label = name if isinstance(grads, torch.Tensor) else f"{name}[{k}]"
        chunk = check_matrix(chunk, label, dim=dim, dtype=dtype, device=device, like=like)
        dim, dtype, device = chunk.shape[1], chunk.dtype, chunk.device
        if chunk.shape[0] == 0:
            yield chunk
            continue
        step = chunk_size or chunk.shape[0]
        for i in range(0, chunk.shape[0], step):
            yield chunk[i:i + step]


def check_update_operands(theta, v, *, dim: int, dtype, device):
    """``(theta, v, was_1d)`` of an update ``theta + scale * A v``: each ``(d,)`` or ``(d, r)``
    (:func:`check_vector`), of the same shape."""
    base, vec = check_vector(theta, "theta", dim=dim, dtype=dtype, device=device)
    vv, _ = check_vector(v, "v", dim=dim, dtype=dtype, device=device)
    if base.shape != vv.shape:
        raise ValueError(f"theta and v must have the same shape, got {tuple(theta.shape)} "
                         f"and {tuple(v.shape)}")
    return base, vv, vec


def check_vector(v, name: str, *, dim: int, dtype, device,
                 like: str = "the inverse Fisher") -> tuple[torch.Tensor, bool]:
    """A finite ``(dim,)`` or ``(dim, r)`` tensor of the given dtype and device; returns it as
    a contiguous ``(dim, r)`` tensor and whether it was a vector."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() not in (1, 2) or v.shape[0] != dim:
        raise ValueError(f"{name} must have shape ({dim},) or ({dim}, r), got {tuple(v.shape)}")
    if v.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} like {like}, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} must be on {device} like {like}, got {v.device}")
    if not all_finite(v):
        raise ValueError(f"{name} contains NaN or Inf")
    vec = v.dim() == 1
    return (v.reshape(-1, 1) if vec else v).contiguous(), vec


# ---- callables ------------------------------------------------------------------------------

def check_callable(fn, name: str):
    """A callable."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    return fn


