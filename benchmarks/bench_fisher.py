"""Benchmark of the block inverse Fisher kernels; see ``ssse_ext.bench`` (also ``ssse bench``)."""

import sys

from ssse_ext.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
