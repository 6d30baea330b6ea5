"""The samples a command erases: ``--indices``, ``--indices-file``, ``--remove-class`` or
``--remove-attribute`` (with ``--fraction`` and ``--seed``), chosen in the training set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ssse.data import Dataset
from ssse.files import check_file
from ssse.service import check_indices

from .common import UsageError

__all__ = ["choose_removal", "read_indices", "removal"]


def removal(args, ds: Dataset, erased=()) -> torch.Tensor:
    """The training-set indices to erase, sorted, none of them among ``erased`` and not all the
    samples left."""
    ids = check_indices(choose_removal(args, ds), ds.n_train, erased)
    return torch.tensor(ids, dtype=torch.int64)


def choose_removal(args, ds: Dataset) -> torch.Tensor:
    """The indices the arguments name, sorted, each once; ranges are checked against the
    training set before they are expanded."""
    from ssse.data import attribute_removal, class_removal

    chosen = [a for a in ("indices", "indices_file", "remove_class", "remove_attribute")
              if getattr(args, a) is not None]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --indices, --indices-file, --remove-class, "
                         "--remove-attribute")
    n = ds.n_train
    if args.indices is not None or args.indices_file is not None:
        if args.indices is not None:
            bad = args.indices.outside(n)
            idx = [] if bad else args.indices.expand()
        else:
            idx = read_indices(check_file(args.indices_file, "--indices-file"))
            bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise UsageError(f"indices out of range [0, {n}): {bad[:5]}")
        if len(set(idx)) >= n:
            raise UsageError("cannot erase the whole training set")
        return torch.tensor(sorted(set(idx)), dtype=torch.int64)
    y = ds.y_train
    if args.remove_attribute is not None:
        if ds.task != "multilabel" or not 0 <= args.remove_attribute < y.shape[1]:
            raise UsageError(f"--remove-attribute {args.remove_attribute}: the data set has no "
                             "such attribute")
        return attribute_removal(y, args.remove_attribute, args.fraction, seed=args.seed)
    if ds.task == "multilabel":
        raise UsageError("--remove-class needs a multiclass data set; use --remove-attribute")
    if ds.task not in ("multiclass", "binary"):
        raise UsageError("--remove-class needs class indices (1-D integer targets) as targets; "
                         "give --indices")
    bad = args.remove_class.outside(ds.num_classes)
    if bad:
        raise UsageError(f"--remove-class {bad[0]}: classes are 0..{ds.num_classes - 1}")
    return class_removal(y, args.remove_class.in_order(), args.fraction, seed=args.seed)


def read_indices(path: Path) -> list[int]:
    """A JSON list of integers, or integers separated by whitespace or commas: nothing else
    (no 1.9, no true)."""
    text = path.read_text()
    bad = None
    if text.lstrip().startswith("["):
        try:
            idx = json.loads(text)
        except ValueError:
            idx = None
        if not isinstance(idx, list):
            raise UsageError(f"--indices-file: {path} is not a JSON list of integers")
        bad = next((i for i in idx if type(i) is not int), None)  # bool is not an index
        if bad is None:
            return idx
    else:
        tokens = text.replace(",", " ").split()
        bad = next((t for t in tokens if not re.fullmatch(r"[+-]?\d+", t)), None)
        if bad is None:
            return [int(t) for t in tokens]
    raise UsageError(f"--indices-file: {path} must hold integers only, got {bad!r}")
