"""The ``ssse`` command: ``demo``, ``train``, ``fisher``, ``erase``, ``ledger``, ``sweep``,
``experiment``, ``bench`` and ``info``. Run ``ssse SUBCOMMAND --help``.

:mod:`.parser` holds the arguments, :mod:`.commands` one module per command (parse, call the
library, print), :mod:`.entry` the exit codes; the library never imports this package.
"""

from ssse.io import atomic_folder as _staged  # noqa: F401  (a private name code imports)

from .common import UsageError
from .entry import main
from .parser import build_parser
from .parser import int_list as _int_list  # noqa: F401  (a private name code imports)

__all__ = ["UsageError", "build_parser", "main"]
