"""``python -m ssse``: the ``ssse`` command, also as ``torchrun --nproc-per-node=K -m ssse``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
