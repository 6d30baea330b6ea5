"""ssse_ext: C++/CUDA kernels for the block inverse of the damped empirical Fisher.

The kernel-level API of ssse (Single-Step Sample Erasure, Peste, Alistarh & Lampert 2021):
:func:`build_inverse_fisher` streams per-sample gradients into a :class:`BlockInverseFisher`,
which supports ``inv @ v``, :meth:`~BlockInverseFisher.update`,
:meth:`~BlockInverseFisher.downdate` and the fused SSSE step
:meth:`~BlockInverseFisher.apply_update`. Its blocks live in block stores (:mod:`ssse_ext.blocks`:
:class:`DenseStore`; :class:`DualBlocks`, the low-rank form of blocks larger than their number
of gradient rows; :class:`GramStore`, dense inverses that keep their float64 Gram so that
requests never drift; :class:`Dense64Store`, a float32 inverse's dense blocks held in float64 for
its requests; and any store registered with :func:`register_store`).
:mod:`ssse_ext.reference` is the pure-PyTorch specification used by the tests.
"""

from __future__ import annotations

# torch first: the extension's OpenMP runtime must bind to the libgomp that torch loads (torch's
# copy lacks OpenMP 5.1 symbols; loading a second libgomp first would make two thread pools).
import torch as _torch  # noqa: F401

from . import _C, blocks, budget, fisher, health, reference, side, validation
from ._ops import CUDA_KERNEL_SETS, cuda_kernels, set_cuda_kernels, use_cuda_kernels
from .blocks import (STORES, BlockStore, Dense64Store, DenseStore, DualBlocks, GramStore,
                     choose_stores, get_store, register_store)
from .change import PendingChange
from .build import (BUILD_METHODS, DEFAULT_BLOCK_SIZE, REPRESENTATIONS, GramAccumulator,
                    build_dual_blocks, build_inverse_fisher, build_peak_bytes)
from .dual import choose_representation
from .errors import InsufficientMemoryError, NotPositiveDefiniteError, RowNotFoundError
from .health import ConditionWarning, FisherProbe, HealthError, HealthWarning
from .inverse import UPDATE_METHODS, BlockInverseFisher, FisherConfig
from .layout import BlockLayout
from .lowrank import LowRankChange
from .side import Rows

# the source's own version, not whatever copy of the distribution is installed
from ._version import __version__

__all__ = [
    "BUILD_METHODS",
    "CUDA_KERNEL_SETS",
    "DEFAULT_BLOCK_SIZE",
    "REPRESENTATIONS",
    "STORES",
    "UPDATE_METHODS",
    "BlockInverseFisher",
    "BlockLayout",
    "BlockStore",
    "ConditionWarning",
    "DenseStore",
    "DualBlocks",
    "FisherConfig",
    "FisherProbe",
    "GramAccumulator",
    "GramStore",
    "Dense64Store",
    "HealthError",
    "HealthWarning",
    "InsufficientMemoryError",
    "LowRankChange",
    "NotPositiveDefiniteError",
    "PendingChange",
    "RowNotFoundError",
    "Rows",
    "blocks",
    "budget",
    "build_dual_blocks",
    "build_info",
    "build_inverse_fisher",
    "build_peak_bytes",
    "choose_representation",
    "choose_stores",
    "cuda_kernels",
    "get_store",
    "health",
    "reference",
    "register_store",
    "set_cuda_kernels",
    "side",
    "use_cuda_kernels",
    "validation",
]


def build_info() -> dict:
    """How the extension was built and what it sees at run time.

    Returns a dict with ``version``, ``cuda_compiled`` (bool), ``cuda_architectures`` (e.g.
    ``"90"``), ``cuda_runtime_version``, ``cuda_device_count`` (0 without a driver or GPU) and
    ``cpu_isa`` (the CPU micro-kernel chosen for this machine: avx512, avx2 or generic) and
    ``cuda_kernels`` (the CUDA kernel set in use, see :func:`set_cuda_kernels`).
    """
    info = dict(_C.build_info())
    info["version"] = __version__
    return info
