"""Model and inverse-Fisher files: safetensors with JSON metadata, written atomically.

No pickle is used anywhere: a file holds raw tensors and a JSON header, so loading one can
never run code. Every write goes to a temporary file in the target directory that is then
renamed into place, so an interrupted command leaves either the old file or the new one.

Temporary files are named ``.NAME.ssse-tmp-PID-XXXXXXXX.SUFFIX`` (``PID`` the writing process).
A process killed during a write (``kill -9``, a power cut) leaves its temporary file behind:
the next write to the same folder removes every such file whose process is no longer running.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as _save_bytes

import ssse_ext

from .faults import crash_point
from .models import build_model

__all__ = [
    "FORMAT_VERSION",
    "FileFormatError",
    "atomic_folder",
    "atomic_path",
    "atomic_write_bytes",
    "clean_stale_temporaries",
    "fingerprint",
    "fsync_dir",
    "load_checkpoint",
    "load_extra_tensors",
    "save_checkpoint",
    "load_inverse_fisher",
    "load_model",
    "load_weights",
    "read_metadata",
    "read_model_header",
    "save_inverse_fisher",
    "save_model",
    "uninterrupted",
    "json_default",
    "write_json",
    "write_text",
]

#: Version of the metadata schema written by this module; files of a newer version are refused.
FORMAT_VERSION = 1
MODEL_FORMAT = "ssse-model"
FISHER_FORMAT = "ssse-inverse-fisher"
CHECKPOINT_FORMAT = "ssse-fit-checkpoint"
_FORMATS = (MODEL_FORMAT, FISHER_FORMAT, CHECKPOINT_FORMAT)
# Prefix of the extra tensors of an inverse-Fisher file (see save_inverse_fisher).
_EXTRA = "extra."
_TMP_TAG = ".ssse-tmp-"
_TMP_NAME = re.compile(r"^\..+\.ssse-tmp-(\d+)-[a-z0-9_]+(\.[^/]*)?$")


class FileFormatError(ValueError):
    """A file is not a valid ssse model or inverse-Fisher file."""


# ---- atomic writes ----------------------------------------------------------------------------

def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Removes the temporary files (and staging folders, :func:`atomic_folder`) of our naming
    in ``folder`` whose writing process is no longer running (left by a ``kill -9`` during a
    save); returns what was removed. Those of running processes (this one included) are
    kept."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TMP_NAME.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _running(pid):
            continue
        path = Path(folder) / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:  # removed by another process meanwhile, or not ours to remove
            pass
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or not a pid we can ask about): keep its file
    return True


def fsync_dir(folder: str | os.PathLike) -> None:
    """Makes a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it is renamed onto ``path``.

    On an exception (or an interrupt) the temporary file is removed and ``path`` is untouched.
    Stale temporary files of killed writers in the folder are removed first
    (:func:`clean_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_TAG}{os.getpid()}-",
                               suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        crash_point("atomic-write")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Defers Ctrl-C (SIGINT) until the block is done, so that a set of files is swapped in, or
    a ledger request committed, whole or not at all. Off the main thread (where Python delivers
    no signal) it defers nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder next to ``out`` for a set of outputs; on success every file
    written there is moved into ``out`` at once (:func:`uninterrupted`), so that an error or an
    interrupt leaves ``out`` as it was. The folder is named as :func:`atomic_path`'s temporary
    files, so a killed writer's is removed by the next write next to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_TAG}{os.getpid()}-", dir=out.parent))
    try:
        yield stage
        with uninterrupted():
            out.mkdir(parents=True, exist_ok=True)
            for src in sorted(p for p in stage.rglob("*") if p.is_file()):
                dst = out / src.relative_to(stage)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            fsync_dir(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_default(obj):
    """JSON for tensors, numpy arrays and numpy scalars (``json.dumps(..., default=)``)."""
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and scalars
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def fingerprint(tensors) -> str:
    """``"sha256:..."`` of named tensors (a ``state_dict``, an inverse's state): their names,
    dtypes, shapes and bytes, in name order. Equal for equal contents, wherever they live."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach()
        h.update(f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


# ---- generic safetensors with metadata ------------------------------------------------------

def _save(path, tensors: dict[str, torch.Tensor], fmt: str, meta: dict) -> Path:
    # safetensors refuses tensors that share storage; copies are cheap for the models used here.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    header = {"format": fmt, "format_version": str(FORMAT_VERSION),
              "ssse": json.dumps(meta, default=json_default)}
    return atomic_write_bytes(path, _save_bytes(tensors, metadata=header))


def _raw_header(path: Path) -> dict:
    """The string metadata of a safetensors file, unparsed."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise FileFormatError(f"{path} is not a safetensors file ({exc})") from None


def read_metadata(path: str | os.PathLike) -> tuple[str, dict]:
    """The format name and the JSON metadata of an ssse file, without loading its tensors."""
    path = Path(path)
    header = _raw_header(path)
    fmt = header.get("format")
    if fmt not in _FORMATS:
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
    _check_header(path, meta)
    return fmt, meta


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and \
        abs(v) != float("inf")


#: What a model file's ``dtype`` may say: its floating tensors' dtype ("mixed": several, or
#: none), as :func:`save_model` writes it.
_MODEL_DTYPES = ("float16", "bfloat16", "float32", "float64", "mixed")
#: What an inverse's ``state.dtype`` may say: the dtypes the kernels compute in.
_INVERSE_DTYPES = ("float32", "float64")

#: Header fields that ssse reads back, with what they must hold (an edited header is refused
#: with the file's name rather than failing later, far from it).
_HEADER_FIELDS = {
    "weight_decay": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "n_train": ("an integer > 0", lambda v: _is_int(v) and v > 0),
    "n_remaining": ("an integer > 0", lambda v: _is_int(v) and v > 0),
    "minibatch": ("an integer > 0", lambda v: _is_int(v) and v > 0),
    "seed": ("an integer", _is_int),
    "loss": ("a string", lambda v: isinstance(v, str)),
    "epsilon": ("a number > 0 or null", lambda v: v is None or (_is_number(v) and v > 0)),
    "erased": ("a list of integers >= 0", lambda v: isinstance(v, list) and
               all(_is_int(i) and i >= 0 for i in v)),
    "data": ("an object", lambda v: isinstance(v, dict)),
    "recipe": ("an object", lambda v: isinstance(v, dict)),
    "dtype": ("one of " + ", ".join(_MODEL_DTYPES), lambda v: v in _MODEL_DTYPES),
    "state": ("an object", lambda v: isinstance(v, dict)),
    "origin": ("a fingerprint \"sha256:<64 hex digits>\"",
               lambda v: isinstance(v, str) and _is_sha256(v.removeprefix("sha256:"))
               and v.startswith("sha256:")),
    "ledger_entry": ("a SHA-256 hex string", lambda v: _is_sha256(v)),
    "ledger_request": ("a non-empty string", lambda v: isinstance(v, str) and v.strip() != ""),
}


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _check_header(path, meta: dict) -> None:
    for key, (what, ok) in _HEADER_FIELDS.items():
        if key in meta and not ok(meta[key]):
            raise FileFormatError(f"{path}: header field {key!r} must be {what}, got "
                                  f"{meta[key]!r}")
    state_dtype = meta.get("state", {}).get("dtype", "float64")
    if state_dtype not in _INVERSE_DTYPES:
        raise FileFormatError(f"{path}: header field 'state.dtype' must be one of "
                              f"{', '.join(_INVERSE_DTYPES)}, got {state_dtype!r}")
    # counts that must agree with the training set they describe (a group, a remainder or an
    # index larger than it would be accepted and then misused far from the file)
    n = meta.get("n_train")
    if n is None:
        return
    for key in ("minibatch", "n_remaining"):
        if key in meta and meta[key] > n:
            raise FileFormatError(f"{path}: header field {key!r} must be at most n_train "
                                  f"({n}), got {meta[key]!r}")
    beyond = [i for i in meta.get("erased", ()) if i >= n]
    if beyond:
        raise FileFormatError(f"{path}: header field 'erased' must hold indices below n_train "
                              f"({n}), got {beyond[:5]}")


def _load(path, expected: str, device=None, prefix: str = "") -> tuple[dict[str, torch.Tensor],
                                                                         dict]:
    """The tensors of a file of format ``expected`` whose names start with ``prefix`` (named
    without it), checked finite, and the file's metadata."""
    fmt, meta = read_metadata(path)
    if fmt != expected:
        raise FileFormatError(f"{path} is an {fmt} file, expected an {expected} file")
    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if key.startswith(prefix):
                tensors[key[len(prefix):]] = f.get_tensor(key)
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FileFormatError(f"{path}: tensor {prefix + key!r} holds NaN or Inf (a corrupt "
                                  "file)")
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


# ---- models ---------------------------------------------------------------------------------

def save_model(path: str | os.PathLike, model: torch.nn.Module, *, spec: dict | None,
               **meta: Any) -> Path:
    """Saves ``model``'s state dict with the architecture ``spec`` (see
    :func:`ssse.models.build_model`, or the configuration a model factory is called with;
    ``None``: none is recorded) and free-form JSON metadata ``meta`` (loss, weight decay, data
    set, training recipe, ...)."""
    state = model.state_dict()
    dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()}
    info = {**({} if spec is None else {"spec": dict(spec)}),
            "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed", **meta}
    return _save(path, state, MODEL_FORMAT, info)


def read_model_header(path: str | os.PathLike) -> dict | None:
    """The JSON header of a model file: an ssse model file's (:func:`save_model`), or ``None``
    for a plain safetensors file of a state dict (``safetensors.torch.save_file``, a Hugging
    Face ``model.safetensors``). Other files, an ssse inverse-Fisher file among them, are
    refused (:class:`FileFormatError`)."""
    path = Path(path)
    header = _raw_header(path)
    if header.get("format") not in _FORMATS:
        return None
    fmt, meta = read_metadata(path)
    if fmt != MODEL_FORMAT:
        raise FileFormatError(f"{path} is an {fmt} file, expected a model file")
    return meta


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of a model file, checked finite, on the CPU, and its header
    (:func:`read_model_header`: ``None`` for a plain safetensors file)."""
    meta = read_model_header(path)
    if meta is not None:
        return _load(path, MODEL_FORMAT)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FileFormatError(f"{path}: tensor {key!r} holds NaN or Inf (a corrupt file)")
    return tensors, None


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
    floats = {str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()}
    held = floats.pop() if len(floats) == 1 else "mixed"
    if meta.get("dtype", held) != held:  # the parameters would be cast to what it says
        raise FileFormatError(f"{path}: header field 'dtype' says {meta['dtype']!r}, the file "
                              f"holds {held} tensors")
    model = build_model(meta["spec"])
    saved = getattr(torch, held, torch.float32)
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

def save_inverse_fisher(path: str | os.PathLike, inv: ssse_ext.BlockInverseFisher, *,
                        extra: dict[str, torch.Tensor] | None = None, **meta: Any) -> Path:
    """Saves a :class:`ssse_ext.BlockInverseFisher` (packed blocks and health probe; layout,
    damping, normaliser, number of samples and dtype in the metadata) plus free-form ``meta``
    and ``extra`` tensors (e.g. the parameters the inverse was fitted at; read them back with
    :func:`load_extra_tensors`)."""
    tensors, state = inv.to_state()
    tensors = dict(tensors)
    for name, t in (extra or {}).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"extra[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        tensors[_EXTRA + name] = t
    return _save(path, tensors, FISHER_FORMAT, {**meta, "state": state})


def load_extra_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``extra`` tensors saved with an inverse-Fisher file (none: an empty dict)."""
    return _load(path, FISHER_FORMAT, prefix=_EXTRA)[0]


# ---- checkpoints ----------------------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                    meta: dict) -> Path:
    """Writes a checkpoint of a fit (tensors and JSON metadata) atomically."""
    return _save(path, tensors, CHECKPOINT_FORMAT, meta)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a checkpoint written by :func:`save_checkpoint`."""
    return _load(path, CHECKPOINT_FORMAT)


def load_inverse_fisher(path: str | os.PathLike, *, device=None,
                        dtype: torch.dtype | None = None
                        ) -> tuple[ssse_ext.BlockInverseFisher, dict]:
    """Loads an inverse Fisher written by :func:`save_inverse_fisher`; returns
    ``(inverse, metadata)``. The memory it needs is checked from the header before any tensor
    is read (:class:`ssse_ext.InsufficientMemoryError`)."""
    state = read_metadata(path)[1].get("state")
    if isinstance(state, dict):
        try:
            ssse_ext.BlockInverseFisher.check_load_memory(state, device=device, dtype=dtype)
        except (ValueError, TypeError, KeyError) as exc:
            raise FileFormatError(f"{path}: {exc}") from None
    tensors, meta = _load(path, FISHER_FORMAT)
    try:
        inv = ssse_ext.BlockInverseFisher.from_state(tensors, meta["state"])
    except (KeyError, ValueError, TypeError) as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    if device is not None or dtype is not None:
        inv = inv.to(device=device, dtype=dtype)
    return inv, meta
