"""The files a command or a served request opens: a model file in a compute dtype, the
inverse-Fisher file that belongs to it (a single file, or the index of a sharded fit read whole),
the parameters that inverse was fitted at, and the training set the model file records.

Every check here refuses before anything is computed or written. Messages name the inputs by
:class:`InputNames`, so that a library call reads ``fisher_path ...`` and the command reads
``--fisher ...``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from . import sharding
from .data import Dataset, load_recorded
from .io import load_extra_tensors, load_inverse_fisher, load_model

__all__ = ["COMPUTE_DTYPES", "InputNames", "check_file", "check_fitted_on", "check_training_set",
           "fitted_at", "load_inverse_file", "load_model_file", "load_training_set",
           "trainable_size"]

#: The dtypes the erasure computes in (a model file of another dtype needs one of these).
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass(frozen=True)
class InputNames:
    """How messages name the inputs of a request: by default the library's parameter names; a
    command passes the options that give them."""

    model: str = "model_path"
    fisher: str = "fisher_path"
    ledger: str = "ledger_path"
    epsilon: str = "epsilon"
    data: str = "data"
    dtype: str = "dtype"


def check_file(path: str | os.PathLike, name: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`; ``FileNotFoundError`` naming ``name`` when it is
    not a file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name}: no such file: {path}")
    return p


def trainable_size(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_model_file(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
                    names: InputNames = InputNames()) -> tuple[nn.Module, dict]:
    """The model of an ssse model file (:func:`ssse.io.load_model`) in eval mode, cast to
    ``dtype`` when given; refuses (``ValueError``) one whose parameters are in a dtype the
    erasure does not compute in."""
    path = check_file(path, names.model)
    model, meta = load_model(path, device=device, dtype=dtype)
    dtypes = {p.dtype for p in model.parameters()}
    if not dtypes <= set(COMPUTE_DTYPES.values()):
        held = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ValueError(f"{names.model}: {path} holds {held} parameters; the computations run "
                         f"in float32 or float64: give {names.dtype}")
    return model.eval(), meta


def load_inverse_file(path: str | os.PathLike, model: nn.Module, *, device=None,
                      names: InputNames = InputNames()):
    """The inverse Fisher of a file (a single file, or the index of a sharded fit, gathered
    whole) in ``model``'s dtype, and the file's metadata; refuses (``ValueError``) one of
    another dimension than ``model``'s trainable parameters."""
    path = check_file(path, names.fisher)
    dtype = next(model.parameters()).dtype
    if sharding.is_index(path):
        try:
            inv, meta = sharding.load_sharded(path, device=device, dtype=dtype)
        except ValueError as exc:
            raise ValueError(f"{names.fisher}: {exc}") from None
        inv = inv.gather()
    else:
        inv, meta = load_inverse_fisher(path, device=device, dtype=dtype)
    d = trainable_size(model)
    if inv.dim != d:
        raise ValueError(f"{names.fisher} has dim {inv.dim}, the model has {d} parameters")
    return inv, meta


def fitted_at(path: str | os.PathLike) -> torch.Tensor | None:
    """The ``(d,)`` parameters an inverse-Fisher file was fitted at (its ``theta_star``;
    ``None``: not recorded, as in the index of a sharded fit)."""
    if sharding.is_index(path):
        return None
    return load_extra_tensors(path).get("theta_star")


def load_training_set(model: nn.Module, meta: dict, data: dict | None = None, *, device=None,
                      names: InputNames = InputNames()) -> Dataset:
    """The training set a model file's header ``meta`` records, with ``data`` overriding its
    fields (``name``, ``data_dir``, ``train_limit``), in the model's dtype; checked
    (:func:`check_training_set`)."""
    recorded = {**meta.get("data", {}), **{k: v for k, v in (data or {}).items()
                                           if v is not None}}
    ds = load_recorded(recorded, dtype=next(model.parameters()).dtype)
    check_training_set(model, meta, ds, device=device, names=names)
    return ds


def check_training_set(model: nn.Module, meta: dict, ds: Dataset, *, device=None,
                       names: InputNames = InputNames()) -> None:
    """Refuses (``ValueError``) a training set of another size than the one the model was
    trained on (indices would point at other samples), or whose inputs the model does not
    take."""
    trained_on = meta.get("n_train")
    if trained_on is not None and int(trained_on) != ds.n_train:
        raise ValueError(f"the model was trained on {trained_on} samples, but {names.data} give "
                         f"{ds.n_train}: indices would point at other samples")
    x = ds.x_train[:1].to(device or "cpu")
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError:
        raise ValueError(f"the model ({meta['spec']}) does not take the inputs of data set "
                         f"{ds.name!r} (shape {tuple(x.shape[1:])})") from None


def check_fitted_on(fisher_meta: dict, n: int, names: InputNames = InputNames()) -> None:
    """Refuses (``ValueError``) an inverse fitted on another number of samples than ``n``."""
    fitted_on = fisher_meta.get("n_train")
    if fitted_on is not None and int(fitted_on) != n:
        raise ValueError(f"{names.fisher} was fitted on {fitted_on} samples, the training set "
                         f"has {n}")
