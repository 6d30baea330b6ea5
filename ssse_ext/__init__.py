"""ssse_ext: C++/CUDA kernels for the block inverse of the damped empirical Fisher.

The kernel-level API of ssse (Single-Step Sample Erasure, Peste, Alistarh & Lampert 2021):
:func:`build_inverse_fisher` streams per-sample gradients into a :class:`BlockInverseFisher`,
which supports ``inv @ v``, :meth:`~BlockInverseFisher.update`,
:meth:`~BlockInverseFisher.downdate` and the fused SSSE step
:meth:`~BlockInverseFisher.apply_update`. :mod:`ssse_ext.reference` is the pure-PyTorch
specification used by the tests.
"""

from __future__ import annotations

from importlib import metadata as _metadata

import torch as _torch  # noqa: F401  (torch must be imported before the extension's ops register)

from . import _C, reference
from ._ops import CUDA_KERNEL_SETS, cuda_kernels, set_cuda_kernels, use_cuda_kernels
from .fisher import (BUILD_METHODS, UPDATE_METHODS, BlockInverseFisher, FisherConfig,
                     NotPositiveDefiniteError, build_inverse_fisher)
from .layout import BlockLayout

try:
    __version__ = _metadata.version("ssse")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "BUILD_METHODS",
    "CUDA_KERNEL_SETS",
    "UPDATE_METHODS",
    "BlockInverseFisher",
    "BlockLayout",
    "FisherConfig",
    "NotPositiveDefiniteError",
    "build_info",
    "build_inverse_fisher",
    "cuda_kernels",
    "reference",
    "set_cuda_kernels",
    "use_cuda_kernels",
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
