"""The command's entry point: parse, set up, run the command, and turn the errors that end it
into one line and an exit code (2: what was asked, 1: the machine or another process, 130: an
interrupt)."""

from __future__ import annotations

import os
import sys

import torch

import ssse.comm

from .commands import bench
from .common import UsageError, distributed, setup
from .destinations import check_destinations
from .parser import build_parser, rejoin_signed

__all__ = ["main"]

#: OS errors that mean a bad path or permission (exit 2), not a failure of the machine.
PATH_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
               FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(f"ssse{' ' + command if command else ''}: interrupted (no partial files were "
              "written)", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # forwarded untouched, --help included
        return bench.run(argv[1:])
    args = build_parser().parse_args(rejoin_signed(argv))
    if ssse.comm.launched() and not distributed(args) and \
            os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only fisher and erase are sharded: rank 0 runs the others
    try:
        setup(args)
        check_destinations(args)
        return args.func(args)
    except Exception as exc:
        failure = _failure(exc)
        if failure is None:
            raise
        code, message = failure
        print(f"ssse {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        if distributed(args) and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _failure(exc: Exception) -> tuple[int, str] | None:
    """The exit code and the message of an error that ends a command (``None``: a bug, shown
    with its traceback)."""
    from ssse_ext import NotPositiveDefiniteError

    from ssse.data import DataUnavailableError
    from ssse.comm import DistributedError
    from ssse.ledger import LedgerBusyError

    if isinstance(exc, DistributedError):  # another rank failed or was lost: this one stops too
        return 1, _one_line(exc)
    if isinstance(exc, (UsageError, DataUnavailableError)):
        return 2, str(exc)
    if isinstance(exc, (FloatingPointError, NotPositiveDefiniteError, LedgerBusyError)):
        return 1, _one_line(exc)  # not the arguments' fault
    if isinstance(exc, ValueError):  # the library's and the data sets' checks of what was asked
        return 2, _one_line(exc)
    if isinstance(exc, MemoryError):
        # a refusal before allocating (it carries the bytes it needed) answers what was
        # asked; an allocation that failed midway is the machine's
        return (2 if hasattr(exc, "needed") else 1), _one_line(exc)
    if isinstance(exc, OSError):  # a destination that changed under us, a full disk
        where = f": {exc.filename}" if exc.filename else ""
        return (2 if isinstance(exc, PATH_ERRORS) else 1), \
            f"{exc.strerror or _one_line(exc)}{where}"
    return None
