"""The files a command or a served request opens: a model file in a compute dtype (a built-in
architecture, or the model a factory builds), the inverse-Fisher file that belongs to it (a
single file, or the index of a sharded fit read whole), the parameters that inverse was fitted
at and on, and the training set the model file records (or that a data factory gives).

Every check here refuses before anything is computed or written. Messages name the inputs by
:class:`InputNames`, so that a library call reads ``fisher_path ...`` and the command reads
``--fisher ...``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import sharding
from .batches import (batch_cat, batch_len, batch_slice, batch_to, check_reiterable,
                      iter_batches, run_model)
from .data import Dataset, load_recorded
from .io import (load_extra_tensors, load_inverse_fisher, load_model, load_weights,
                 read_model_header)
from .model import select_parameters
from .models import ARCHITECTURES, LOSS_LIKELIHOODS, loss_function

__all__ = ["COMPUTE_DTYPES", "FACTORY_SPEC", "InputNames", "TrainingData", "check_factory_spec",
           "check_file", "check_fitted_on", "check_training_set", "fitted_at",
           "load_factory", "load_factory_data", "load_inverse_file", "load_model_file",
           "load_training_set", "parameter_selection", "trainable_size"]

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
    #: How the model factory is given (``None``: the caller takes none, and a model file of no
    #: built-in architecture is refused without suggesting one).
    model_factory: str | None = None
    data_factory: str = "data_factory"
    params: str = "params"


def check_file(path: str | os.PathLike, name: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`; ``FileNotFoundError`` naming ``name`` when it is
    not a file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name}: no such file: {path}")
    return p


def trainable_size(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- factories: a model or a training set built by the caller's code ------------------------

#: ``package.module:function`` (after the colon a dotted attribute path, ``module:Class.build``).
FACTORY_SPEC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:"
                          r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def check_factory_spec(spec: str, name: str = "factory") -> str:
    """``spec`` when it has the form ``package.module:function`` (:data:`FACTORY_SPEC`);
    ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(spec, str) or FACTORY_SPEC.fullmatch(spec) is None:
        raise ValueError(f"{name} must be package.module:function (Python identifiers), got "
                         f"{spec!r}")
    return spec


def load_factory(spec: str, name: str = "factory") -> Callable:
    """The callable ``spec`` (``package.module:function``) names: the module is imported with
    :func:`importlib.import_module` (found on ``sys.path``), the attribute read from it.
    Refuses (``ValueError`` naming ``name``) another form, a module that cannot be imported,
    a missing attribute and one that is not callable."""
    module_name, attribute = check_factory_spec(spec, name).split(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # whatever the module raises while it is imported
        raise ValueError(f"{name} {spec}: cannot import module {module_name!r} "
                         f"({type(exc).__name__}: {_one_line(exc)})") from exc
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{name} {spec}: {getattr(obj, '__name__', module_name)!r} has no "
                             f"attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{name} {spec}: {attribute} is not callable (it is a "
                         f"{type(obj).__name__})")
    return obj


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _called(factory: Callable, config, name: str):
    """``factory(config)``; what it raises is refused in one line naming ``name``."""
    try:
        return factory(config)
    except Exception as exc:
        what = getattr(factory, "__qualname__", type(factory).__name__)
        raise ValueError(f"{name}: {what}() raised {type(exc).__name__}: "
                         f"{_one_line(exc)}") from exc


def _factory_model(path: Path, factory: Callable, names: InputNames) -> tuple[nn.Module, dict]:
    """The model ``factory`` builds from the file's recorded ``spec`` (``None`` when it records
    none), with the file's tensors loaded into it strictly."""
    name = names.model_factory or "factory"
    state, meta = load_weights(path)
    meta = meta or {}
    model = _called(factory, meta.get("spec"), name)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} must return a torch.nn.Module, got {type(model).__name__}")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    wrong = [f"{k} {have[k]} (the model's {want[k]})" for k in want
             if k in have and have[k] != want[k]]
    found = [f"{len(keys)} tensors {what}, e.g. {', '.join(keys[:3])}" for what, keys in (
        ("missing in the file", [k for k in want if k not in have]),
        ("not in the model", [k for k in have if k not in want]),
        ("of other shapes", wrong)) if keys]
    if found:
        raise ValueError(f"{name}: the model it returns does not match "
                         f"{names.model} {path}: {'; '.join(found)}")
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floats) == 1:  # the file's dtype, as load_model gives it
        model = model.to(dtype=floats.pop())
    model.load_state_dict(state, strict=True)
    return model, meta


def _check_architecture(path: Path, names: InputNames) -> None:
    """Refuses a model file that records no built-in architecture, suggesting a factory."""
    meta = read_model_header(path)
    spec = None if meta is None else meta.get("spec")
    arch = spec.get("arch") if isinstance(spec, dict) else None
    if isinstance(arch, str) and arch in ARCHITECTURES:
        return
    what = "is a plain safetensors file" if meta is None else \
        "records no architecture" if spec is None else f"records the model spec {spec}"
    hint = f": give {names.model_factory} to build its model" if names.model_factory else ""
    raise ValueError(f"{names.model}: {path} {what}, none of the built-in architectures "
                     f"({', '.join(ARCHITECTURES)}){hint}")


def load_model_file(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
                    names: InputNames = InputNames(),
                    factory: Callable | None = None) -> tuple[nn.Module, dict]:
    """The model of a model file in eval mode, cast to ``dtype`` when given; refuses
    (``ValueError``) one whose parameters are in a dtype the erasure does not compute in.

    Without ``factory``, the file is an ssse model file of a built-in architecture
    (:func:`ssse.io.load_model`, :data:`ssse.models.ARCHITECTURES`). With one, the model is
    ``factory(spec)``: ``spec`` the JSON object the file records as its ``spec``
    (``save_model(spec=...)``), or ``None`` when it records none (a plain safetensors file of a
    state dict, whose header is then ``{}``); it must return an ``nn.Module`` whose state dict
    has exactly the file's tensor names and shapes (refused otherwise), into which they are
    loaded. Nothing is unpickled: tensors come from safetensors only."""
    path = check_file(path, names.model)
    if factory is None:
        _check_architecture(path, names)
        model, meta = load_model(path, device=device, dtype=dtype)
    else:
        model, meta = _factory_model(path, factory, names)
        model = model.to(device=device, dtype=dtype)
    dtypes = {p.dtype for p in model.parameters()}
    if not dtypes <= set(COMPUTE_DTYPES.values()):
        held = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ValueError(f"{names.model}: {path} holds {held} parameters; the computations run "
                         f"in float32 or float64: give {names.dtype}")
    return model.eval(), meta


def parameter_selection(model: nn.Module, inv, params=None,
                        names: InputNames = InputNames()) -> list[str] | None:
    """The names of the parameters of ``model`` an erasure with the inverse ``inv`` takes:
    those ``params`` selects (:func:`ssse.model.select_parameters`), which must be the ones the
    inverse records (``inv.params``), or by default the ones it records (``None``: it records
    none, and ``params`` is not given: every trainable parameter). Refuses (``ValueError``
    naming ``names.params``) a selection other than the recorded one, and recorded names that
    ``model`` lacks."""
    chosen = None if params is None else select_parameters(model, params, names.params)
    recorded = None if inv is None else getattr(inv, "params", None)
    if recorded is None:
        return chosen
    recorded = list(recorded)
    have = {k for k, _ in model.named_parameters()}
    missing = [k for k in recorded if k not in have]
    if missing:
        raise ValueError(f"{names.fisher} was fitted on parameters the model does not have "
                         f"({len(missing)} of {len(recorded)}, e.g. {missing[:3]}): it belongs "
                         f"to another model; fit one for this model (with {names.params} to "
                         "select its parameters)")
    if chosen is not None and chosen != recorded:
        raise ValueError(f"{names.params} selects {len(chosen)} parameters ({chosen[:3]}...), "
                         f"{names.fisher} was fitted on {len(recorded)} ({recorded[:3]}...): "
                         f"give the {names.params} it was fitted with, or none")
    return recorded


def _selected_size(model: nn.Module, selection: list[str] | None) -> int:
    if selection is None:
        return trainable_size(model)
    chosen = set(selection)
    return sum(p.numel() for k, p in model.named_parameters() if k in chosen)


def load_inverse_file(path: str | os.PathLike, model: nn.Module, *, device=None,
                      names: InputNames = InputNames()):
    """The inverse Fisher of a file (a single file, or the index of a sharded fit, gathered
    whole) in ``model``'s dtype, and the file's metadata; refuses (``ValueError``) one of
    another dimension than ``model``'s trainable parameters (those it was fitted on when it
    records them: :func:`parameter_selection`)."""
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
    d = _selected_size(model, parameter_selection(model, inv, names=names))
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
    except (RuntimeError, TypeError):  # a shape that does not fit, or a model of other inputs
        spec = meta.get("spec")
        raise ValueError(f"the model{f' ({spec})' if spec else ''} does not take the inputs of "
                         f"data set {ds.name!r} (shape {tuple(x.shape[1:])})") from None


def check_fitted_on(fisher_meta: dict, n: int, names: InputNames = InputNames()) -> None:
    """Refuses (``ValueError``) an inverse fitted on another number of samples than ``n``."""
    fitted_on = fisher_meta.get("n_train")
    if fitted_on is not None and int(fitted_on) != n:
        raise ValueError(f"{names.fisher} was fitted on {fitted_on} samples, the training set "
                         f"has {n}")


# ---- a training set given as data ------------------------------------------------------------

class TrainingData:
    """A training set given as data (one batch or a re-iterable collection of batches:
    ``(inputs, targets)`` pairs or mappings with ``"labels"``, :mod:`ssse.batches`), with the
    loss and L2 coefficient its model file records: what the commands need of a training set
    (the experiments' tasks give the same for the built-in data sets).

    The data is read once when this is made (to count the samples and hold their targets). A
    fit reads it as it is; an erasure reads the samples it names by their index in the order of
    the data (:meth:`data`). Classes and attributes are those of the targets: 1-D
    integer targets are class indices, 2-D floating ones a 0/1 matrix of attributes.
    """

    def __init__(self, data, meta: dict | None = None, *, name: str = "data"):
        meta = meta or {}
        self.name = name
        self.loss = meta.get("loss", "cross_entropy")
        self.loss_fn = loss_function(self.loss)
        self.likelihood = LOSS_LIKELIHOODS[self.loss]
        self.weight_decay = float(meta.get("weight_decay", 0.0))
        self._data = check_reiterable(data, name)
        targets = [y for _, y in iter_batches(data, name)]
        if not targets:
            raise ValueError(f"{name} holds no batch")
        self.y_train = batch_cat(targets).cpu()
        self.n_train = batch_len(self.y_train)

    @property
    def n(self) -> int:
        return self.n_train

    @property
    def ds(self) -> "TrainingData":
        """Itself: what samples to erase are chosen in (the experiments' ``Task.ds``)."""
        return self

    @property
    def task(self) -> str:
        """``"multiclass"``, ``"multilabel"`` or ``"other"`` (no classes), by the targets."""
        y = self.y_train
        if y.dim() == 1 and not y.is_floating_point() and not y.is_complex():
            return "multiclass"
        if y.dim() == 2 and y.is_floating_point():
            return "multilabel"
        return "other"

    @property
    def num_classes(self) -> int:
        """Classes (multiclass: the largest index + 1) or attributes (multilabel); 0 else."""
        task, y = self.task, self.y_train
        if task == "multiclass":
            return int(y.max()) + 1 if y.numel() else 0
        return int(y.shape[1]) if task == "multilabel" else 0

    def data(self, idx: torch.Tensor | None = None):
        """All the data as given, or the samples ``idx`` (indices in the order of the data) as
        one ``(inputs, targets)`` batch in a list (an empty list when ``idx`` is empty)."""
        if idx is None:
            return self._data
        idx = torch.as_tensor(idx, dtype=torch.int64).flatten()
        xs, ys, at = [], [], 0
        for x, y in iter_batches(self._data, self.name):
            m = batch_len(y)
            local = idx[(idx >= at) & (idx < at + m)] - at
            if local.numel():
                xs.append(batch_slice(x, local))
                ys.append(batch_slice(y, local))
            at += m
        return [(batch_cat(xs), batch_cat(ys))] if xs else []


def load_factory_data(factory: Callable, config: dict | None, model: nn.Module, meta: dict,
                      *, device=None, names: InputNames = InputNames()) -> TrainingData:
    """The training set ``factory(config)`` returns (one batch or a re-iterable collection of
    batches; ``config`` is what the caller passes, e.g. the ``data`` object a model file
    records), as :class:`TrainingData` with the loss and L2 coefficient of the model file's
    header ``meta``. Refuses (``ValueError`` naming ``names.data_factory``) anything else, a
    training set of another size than the model was trained on, and inputs the model does not
    take."""
    data = _called(factory, config, names.data_factory)
    label = f"what {names.data_factory} returns"
    try:
        training = TrainingData(data, meta, name=label)
    except (TypeError, ValueError) as exc:
        raise ValueError(_one_line(exc)) from None
    trained_on = meta.get("n_train")
    if trained_on is not None and int(trained_on) != training.n:
        raise ValueError(f"the model was trained on {trained_on} samples, but "
                         f"{names.data_factory} gives {training.n}: indices would point at "
                         "other samples")
    dtype = next(model.parameters()).dtype
    x = batch_to(training.data(torch.zeros(1, dtype=torch.int64))[0][0], device or "cpu", dtype)
    try:
        with torch.no_grad():
            run_model(model, x)
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"the model does not take the inputs {names.data_factory} gives "
                         f"({type(exc).__name__}: {_one_line(exc)})") from None
    return training


