"""``python -m ssse.cli``, the same as ``ssse`` and ``python -m ssse``."""

import sys

from .entry import main

if __name__ == "__main__":
    sys.exit(main())
