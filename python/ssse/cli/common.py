"""What the commands share: the usage error, the set-up of a run (threads, device, torchrun),
and the files and training set a command opens from its arguments."""

from __future__ import annotations

from pathlib import Path

import torch

import ssse.comm
import ssse.sharding
from ssse.files import (COMPUTE_DTYPES, InputNames, check_file, check_training_set,
                        load_inverse_file, load_model_file, trainable_size)
from ssse_ext import validation

__all__ = ["DTYPES", "NAMES", "UsageError", "data_overrides", "distributed", "dtype",
           "load_fisher", "load_model", "load_sharded_fisher", "out_path", "setup",
           "task_from_meta"]

DTYPES = COMPUTE_DTYPES
#: How the library's messages name the inputs: by the options that give them.
NAMES = InputNames(model="--model", fisher="--fisher", ledger="--ledger", epsilon="--epsilon",
                   data="--data/--train-limit", dtype="--dtype")


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


def load_model(args):
    return load_model_file(args.model, device=args.device, dtype=dtype(args), names=NAMES)


def task_from_meta(args, model, meta):
    """The experiments' task of the model file's training set (with the data set options
    given), checked against the model."""
    from ssse.experiments.tasks import task_from_metadata

    data = {**meta.get("data", {}), **{k: v for k, v in data_overrides(args).items() if v}}
    task = task_from_metadata(meta, data, dtype=next(model.parameters()).dtype,
                              device=args.device)
    check_training_set(model, meta, task.ds, device=args.device, names=NAMES)
    return task


def load_fisher(args, model):
    path = check_file(args.fisher, "--fisher")
    dtype_ = next(model.parameters()).dtype
    if ssse.sharding.is_index(path) or distributed(args):
        return load_sharded_fisher(args, path, model, dtype_)
    return load_inverse_file(path, model, device=args.device, names=NAMES)


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
        if comm is not None:
            inv = ShardedInverseFisher.from_full(inv, comm=comm)
    d = trainable_size(model)
    if inv.dim != d:
        raise UsageError(f"--fisher has dim {inv.dim}, the model has {d} parameters")
    return inv, meta
