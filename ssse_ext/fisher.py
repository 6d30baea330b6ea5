"""The names this module held before the inverse, its builds and its stores had modules of
their own (:mod:`ssse_ext.inverse`, :mod:`ssse_ext.build`, :mod:`ssse_ext.lowrank`,
:mod:`ssse_ext.blocks`); kept so that imports from ``ssse_ext.fisher`` keep working."""

from __future__ import annotations

import warnings

from .build import (BUILD_METHODS, DEFAULT_BLOCK_SIZE, REPRESENTATIONS, GramAccumulator,
                    build_inverse_fisher, build_peak_bytes)
from .errors import InsufficientMemoryError, NotPositiveDefiniteError
from .inverse import UPDATE_METHODS, BlockInverseFisher, FisherConfig
from .lowrank import LowRankChange

__all__ = [
    "BlockInverseFisher",
    "FisherConfig",
    "GramAccumulator",
    "InsufficientMemoryError",
    "LowRankChange",
    "NotPositiveDefiniteError",
    "build_inverse_fisher",
    "build_peak_bytes",
    "BUILD_METHODS",
    "DEFAULT_BLOCK_SIZE",
    "REPRESENTATIONS",
    "UPDATE_METHODS",
]

# The curvature is a label to the kernels; the model-level library owns the list.
_CURVATURES = ("empirical", "ggn", "mc")


def __getattr__(name: str):
    if name == "CURVATURES":
        warnings.warn("ssse_ext.fisher.CURVATURES is deprecated: the curvatures are the "
                      "model-level library's (ssse.curvature); FisherConfig.curvature is a "
                      "label", DeprecationWarning, stacklevel=2)
        return _CURVATURES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
