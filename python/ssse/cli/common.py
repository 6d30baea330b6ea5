"""What the commands share: the usage error, the set-up of a run (threads, device, torchrun),
and the files and training set a command opens from its arguments (the model and the data
built by the factories given, the parameters selected)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

import ssse.comm
import ssse.sharding
from ssse.files import (COMPUTE_DTYPES, InputNames, check_file, check_training_set,
                        load_factory, load_factory_data, load_inverse_file, load_model_file,
                        parameter_selection, trainable_size)
from ssse_ext import validation

__all__ = ["BUILT_IN_NAMES", "DTYPES", "FACTORY_OPTIONS", "NAMES", "UsageError",
           "choose_parameters", "data_overrides", "distributed", "dtype", "factory",
           "load_fisher", "load_model", "load_sharded_fisher", "out_path", "setup",
           "task_from_meta"]

DTYPES = COMPUTE_DTYPES
#: How the library's messages name the inputs: by the options that give them.
NAMES = InputNames(model="--model", fisher="--fisher", ledger="--ledger", epsilon="--epsilon",
                   data="--data/--train-limit", dtype="--dtype", model_factory="--model-factory",
                   data_factory="--data-factory", params="--params")
#: The names of the commands that take no --model-factory (their messages suggest none).
BUILT_IN_NAMES = dataclasses.replace(NAMES, model_factory=None)
#: The options that build the model or its data, or select its parameters (attribute: option).
FACTORY_OPTIONS = {"model_factory": NAMES.model_factory, "data_factory": NAMES.data_factory,
                   "params": NAMES.params}


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2, one line)."""


def setup(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "device", None):
        try:
            dev = validation.check_device(args.device, "--device")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        args.device = dev
    if distributed(args):
        # torchrun: one process per device (NCCL between GPUs, gloo on CPUs)
        args.comm = ssse.comm.init(device=args.device, timeout=args.timeout,
                                   exchange=getattr(args, "exchange", "auto"))
        if args.device.type == "cuda":
            args.device = torch.device("cuda", torch.cuda.current_device())


def distributed(args) -> bool:
    """Whether this command runs sharded: ``fisher`` and ``erase`` under torchrun."""
    return args.command in ("fisher", "erase") and ssse.comm.launched()


def dtype(args, default: torch.dtype | None = None) -> torch.dtype | None:
    return DTYPES[args.dtype] if getattr(args, "dtype", None) else default


def out_path(args, name: str) -> Path:
    if getattr(args, "output", None):
        return Path(args.output)
    return Path(args.out) / name


def data_overrides(args) -> dict:
    """The data set options given, which override what the model file records."""
    return {"name": getattr(args, "data", None), "data_dir": getattr(args, "data_dir", None),
            "train_limit": getattr(args, "train_limit", None)}


def factory(spec: str, name: str):
    """The callable of a ``MODULE:FUNCTION`` option, its module found on ``sys.path`` or, as
    ``python -m`` does, in the current directory."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return load_factory(spec, name)


def load_model(args):
    """The model of ``--model`` (built by ``--model-factory`` when the command takes it and it
    is given) and the file's header."""
    spec = getattr(args, "model_factory", None)
    names = NAMES if hasattr(args, "model_factory") else BUILT_IN_NAMES
    return load_model_file(args.model, device=args.device, dtype=dtype(args), names=names,
                           factory=factory(spec, NAMES.model_factory) if spec else None)


def choose_parameters(args, model, inv=None) -> list[str] | None:
    """The parameters the command fits on or erases: those ``--params`` selects, or by default
    those the inverse ``inv`` records (checked: :func:`ssse.files.parameter_selection`;
    ``None``: every trainable one). The others are frozen (``requires_grad`` off), so that the
    model's trainable parameters are the selection everywhere (θ*, the checks of the origin)."""
    chosen = parameter_selection(model, inv, getattr(args, "params", None), NAMES)
    if chosen is not None:
        keep = set(chosen)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
    return chosen


def task_from_meta(args, model, meta):
    """The training set of the model file: the experiments' task of its data set (with the
    data set options given), or what ``--data-factory`` gives; checked against the model."""
    from ssse.experiments.tasks import task_from_metadata

    if getattr(args, "data_factory", None):
        return _factory_task(args, model, meta)
    recorded = meta.get("data", {})
    if getattr(args, "model_factory", None) and not recorded.get("name") and not args.data:
        raise UsageError(f"{args.model} records no built-in data set: give "
                         f"{NAMES.data_factory} (or --data)")
    data = {**recorded, **{k: v for k, v in data_overrides(args).items() if v}}
    # a plain safetensors file records no spec (only retraining, no command here, reads it)
    task = task_from_metadata({"spec": None, **meta}, data, dtype=next(model.parameters()).dtype,
                              device=args.device)
    check_training_set(model, meta, task.ds, device=args.device, names=NAMES)
    return task


def _factory_task(args, model, meta):
    """The training set ``--data-factory`` gives, called with the header's ``data`` object
    (``--data-dir`` replacing its ``data_dir``; ``None``: there is none)."""
    given = [o for o, v in (("--data", args.data), ("--train-limit", args.train_limit)) if v]
    if given:
        raise UsageError(f"{given[0]} chooses a built-in data set; {NAMES.data_factory} gives "
                         "the training set: give one or the other")
    config = meta.get("data")
    config = None if config is None else dict(config)
    if args.data_dir is not None:
        config = {**(config or {}), "data_dir": str(args.data_dir)}
    return load_factory_data(factory(args.data_factory, NAMES.data_factory), config, model,
                             meta, device=args.device, names=NAMES)


def load_fisher(args, model):
    """The inverse of ``--fisher`` and its header; the model's parameters are then those it
    was fitted on (:func:`choose_parameters`, whose result becomes ``args.params``)."""
    path = check_file(args.fisher, "--fisher")
    dtype_ = next(model.parameters()).dtype
    if ssse.sharding.is_index(path) or distributed(args):
        return load_sharded_fisher(args, path, model, dtype_)
    inv, meta = load_inverse_file(path, model, device=args.device, names=NAMES)
    args.params = choose_parameters(args, model, inv)
    return inv, meta


def load_sharded_fisher(args, path, model, dtype):
    """Under torchrun on several ranks: this rank's blocks (of an index, re-sharded to this
    world size, or of a single file). Otherwise: the whole inverse of an index."""
    from ssse.io import load_inverse_fisher
    from ssse.sharding import ShardedInverseFisher, is_index, load_sharded

    comm = args.comm if distributed(args) and args.comm.size > 1 else None
    if is_index(path):
        try:
            inv, meta = load_sharded(path, comm=comm, device=args.device, dtype=dtype)
        except ValueError as exc:
            raise UsageError(f"--fisher: {exc}") from None
        if comm is None:
            inv = inv.gather()
    else:
        inv, meta = load_inverse_fisher(path, device=args.device, dtype=dtype)
    args.params = choose_parameters(args, model, inv)
    if comm is not None and not is_index(path):
        try:
            inv = ShardedInverseFisher.from_full(inv, comm=comm)
        except ValueError as exc:
            raise UsageError(f"--fisher: {exc}") from None
    d = trainable_size(model)
    if inv.dim != d:
        raise UsageError(f"--fisher has dim {inv.dim}, the model has {d} parameters")
    return inv, meta
