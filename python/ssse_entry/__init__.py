"""The ``ssse`` console script's entry point.

It imports nothing heavy itself, so that Ctrl-C while ``ssse`` (and torch) are being imported —
a second or more — prints one line and exits with 130 like a Ctrl-C during the work, instead of
a traceback through the import machinery.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Imports :mod:`ssse.cli` and runs :func:`ssse.cli.main`."""
    try:
        cli = importlib.import_module("ssse.cli")
    except KeyboardInterrupt:
        print("ssse: interrupted", file=sys.stderr)
        return 130
    return cli.main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
