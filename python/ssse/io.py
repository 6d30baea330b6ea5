"""Model and inverse-Fisher files: safetensors with JSON metadata, written atomically.

No pickle is used anywhere: a file holds raw tensors and a JSON header, so loading one can
never run code. Every write goes to a temporary file in the target directory that is then
renamed into place, so an interrupted command leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as _save_bytes

import ssse_ext

from .models import build_model

__all__ = [
    "FORMAT_VERSION",
    "FileFormatError",
    "atomic_path",
    "atomic_write_bytes",
    "load_inverse_fisher",
    "load_model",
    "read_metadata",
    "save_inverse_fisher",
    "save_model",
    "write_json",
    "write_text",
]

#: Version of the metadata schema written by this module; files of a newer version are refused.
FORMAT_VERSION = 1
MODEL_FORMAT = "ssse-model"
FISHER_FORMAT = "ssse-inverse-fisher"


class FileFormatError(ValueError):
    """A file is not a valid ssse model or inverse-Fisher file."""


# ---- atomic writes ----------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it is renamed onto ``path``.

    On an exception (or an interrupt) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


# ---- generic safetensors with metadata ------------------------------------------------------

def _save(path, tensors: dict[str, torch.Tensor], fmt: str, meta: dict) -> Path:
    # safetensors refuses tensors that share storage; copies are cheap for the models used here.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    header = {"format": fmt, "format_version": str(FORMAT_VERSION),
              "ssse": json.dumps(meta, default=_json_default)}
    return atomic_write_bytes(path, _save_bytes(tensors, metadata=header))


def read_metadata(path: str | os.PathLike) -> tuple[str, dict]:
    """The format name and the JSON metadata of an ssse file, without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise FileFormatError(f"{path} is not a safetensors file ({exc})") from None
    fmt = header.get("format")
    if fmt not in (MODEL_FORMAT, FISHER_FORMAT):
        raise FileFormatError(f"{path} is not an ssse file (format={fmt!r})")
    try:
        version = int(header.get("format_version", "0"))
        meta = json.loads(header["ssse"])
    except (KeyError, ValueError) as exc:
        raise FileFormatError(f"{path} has a corrupt ssse header ({exc})") from None
    if not isinstance(meta, dict):
        raise FileFormatError(f"{path} has a corrupt ssse header (not a JSON object)")
    if not 1 <= version <= FORMAT_VERSION:
        raise FileFormatError(f"{path} has format version {version}; this ssse reads up to "
                              f"{FORMAT_VERSION}")
    return fmt, meta


def _load(path, expected: str, device=None) -> tuple[dict[str, torch.Tensor], dict]:
    fmt, meta = read_metadata(path)
    if fmt != expected:
        raise FileFormatError(f"{path} is an {fmt} file, expected an {expected} file")
    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FileFormatError(f"{path}: tensor {key!r} holds NaN or Inf (a corrupt file)")
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


# ---- models ---------------------------------------------------------------------------------

def save_model(path: str | os.PathLike, model: torch.nn.Module, *, spec: dict,
               **meta: Any) -> Path:
    """Saves ``model``'s state dict with the architecture ``spec`` (see
    :func:`ssse.models.build_model`) and free-form JSON metadata ``meta`` (loss,
    weight decay, data set, training recipe, ...)."""
    state = model.state_dict()
    dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()}
    info = {"spec": dict(spec), "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed", **meta}
    return _save(path, state, MODEL_FORMAT, info)


def load_model(path: str | os.PathLike, *, device=None,
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuilds the model saved by :func:`save_model`; returns ``(model, metadata)``."""
    state, meta = _load(path, MODEL_FORMAT)
    if not isinstance(meta.get("spec"), dict):
        raise FileFormatError(f"{path} has no model spec")
    # the spec is checked against the stored shapes before any memory is allocated for it
    try:
        with torch.device("meta"):
            skeleton = build_model(meta["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FileFormatError(f"{path} has an invalid model spec {meta['spec']}: {exc}") from None
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        raise FileFormatError(f"{path} does not match its spec {meta['spec']}: expected "
                              f"tensors {want}, the file holds {have}")
    model = build_model(meta["spec"])
    saved = getattr(torch, meta.get("dtype", "float32"), torch.float32)
    model = model.to(dtype=saved if isinstance(saved, torch.dtype) else torch.float32)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FileFormatError(f"{path} does not match its spec {meta['spec']}: "
                              f"{str(exc).splitlines()[0]}") from None
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model, meta


# ---- inverse Fisher -------------------------------------------------------------------------

def save_inverse_fisher(path: str | os.PathLike, inv: ssse_ext.BlockInverseFisher,
                        **meta: Any) -> Path:
    """Saves a :class:`ssse_ext.BlockInverseFisher` (packed blocks; layout, damping,
    normaliser, number of samples and dtype in the metadata) plus free-form ``meta``."""
    tensors, state = inv.to_state()
    return _save(path, tensors, FISHER_FORMAT, {**meta, "state": state})


def load_inverse_fisher(path: str | os.PathLike, *, device=None,
                        dtype: torch.dtype | None = None
                        ) -> tuple[ssse_ext.BlockInverseFisher, dict]:
    """Loads an inverse Fisher written by :func:`save_inverse_fisher`; returns
    ``(inverse, metadata)``."""
    tensors, meta = _load(path, FISHER_FORMAT)
    try:
        inv = ssse_ext.BlockInverseFisher.from_state(tensors, meta["state"])
    except (KeyError, ValueError, TypeError) as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    if device is not None or dtype is not None:
        inv = inv.to(device=device, dtype=dtype)
    return inv, meta
