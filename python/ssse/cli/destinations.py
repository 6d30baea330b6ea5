"""Every file or folder a command will write, checked before its work: a destination that
cannot be written, or that is also one of the command's inputs or outputs, is refused."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .common import UsageError, distributed, out_path

__all__ = ["OUT_FILES", "check_destinations", "check_folder", "same_file", "served_in_place"]


def check_folder(folder: Path, what: str) -> None:
    """Refuses, before any work, a destination folder that is a file or that cannot be created
    or written (tried, so that a read-only file system counts even for root)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what}: {folder} is a file, not a folder")
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{what}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UsageError(f"{what}: cannot write in {probe} ({exc.strerror or exc})") from None


def same_file(a, b) -> bool:
    """Whether two paths name one file: equal once resolved (symbolic links followed, also for
    files not created yet), or one inode (hard links)."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
        return os.path.samefile(a, b)
    except (OSError, RuntimeError):  # a missing file, a symbolic link loop
        return False


#: Files a command writes into --out, besides its --output.
OUT_FILES = {"sweep": re.compile(r"sweep(\.json|\.md|_.+\.png)")}


def served_in_place(args) -> bool:
    return args.command == "ledger" or args.command == "erase" and bool(args.ledger)


def _check_overwrites(args) -> None:
    """Refuses a destination that is also an input, or another destination, of the same
    command: writing it would destroy what the command reads (a trained model replaced by its
    inverse), or what it writes elsewhere (an inverse removed with the checkpoint)."""
    cmd = args.command
    inputs = [(f"--{o.replace('_', '-')}", getattr(args, o, None))
              for o in ("model", "fisher", "reference", "indices_file")]
    inputs = [(opt, path) for opt, path in inputs if path]
    if served_in_place(args):
        outputs = [("--ledger", args.ledger)] + [(o, p) for o, p in inputs
                                                 if o in ("--model", "--fisher")]
        inputs = [(o, p) for o, p in inputs if o not in ("--model", "--fisher")]
    elif cmd in ("train", "fisher", "erase"):
        name = {"train": "model.safetensors", "erase": "erased.safetensors",
                "fisher": "inverse_fisher.index.json" if distributed(args) else
                "inverse_fisher.safetensors"}[cmd]
        outputs = [("--output" if args.output else "--out", out_path(args, name))]
        if getattr(args, "checkpoint", None):
            outputs.append(("--checkpoint", args.checkpoint))
    elif cmd in OUT_FILES and getattr(args, "out", None):
        for opt, path in inputs:
            if OUT_FILES[cmd].fullmatch(Path(path).name) and \
                    same_file(Path(path).parent, args.out):
                raise UsageError(f"{opt}: {path} is in --out {args.out}, where this command "
                                 "writes a file of that name: move it, or give another --out")
        return
    else:
        return
    for i, (opt, path) in enumerate(outputs):
        for other, other_path in outputs[:i] + inputs:
            if same_file(path, other_path):
                same = "" if str(path) == str(other_path) else f" ({other_path})"
                raise UsageError(f"{opt}: {path} is also {other}{same}: the command would write "
                                 f"over it; give another file")


def check_destinations(args) -> None:
    """Every file or folder the command will write, checked before the work."""
    cmd = args.command
    _check_overwrites(args)
    if served_in_place(args):
        if getattr(args, "output", None):
            raise UsageError("--output: with --ledger the request replaces --model and --fisher "
                             "in place")
        for opt in ("model", "fisher", "ledger"):
            if getattr(args, opt) is None:
                continue
            path = Path(getattr(args, opt))
            if path.is_dir():
                raise UsageError(f"--{opt}: {path} is a folder, expected a file")
            check_folder(path.parent, f"--{opt}")
        return
    if getattr(args, "checkpoint", None):
        path = Path(args.checkpoint)
        if path.is_dir():
            raise UsageError(f"--checkpoint: {path} is a folder, expected a file")
        check_folder(path.parent, "--checkpoint")
    if getattr(args, "output", None):
        path = Path(args.output)
        if path.is_dir():
            raise UsageError(f"--output: {path} is a folder, expected a file")
        check_folder(path.parent, "--output")
    elif cmd in ("train", "fisher", "erase", "sweep") or \
            (cmd in ("experiment", "demo") and getattr(args, "out", None)):
        check_folder(Path(args.out or f"results/{args.name}"), "--out")
    elif cmd == "experiment":
        check_folder(Path(f"results/{args.name}"), "--out")

