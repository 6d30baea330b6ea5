"""The version of this source tree (the ``ssse`` distribution: ``ssse_ext`` and ``ssse``)."""

__version__ = "0.3.0"
