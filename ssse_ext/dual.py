"""The names of the dual (low-rank) blocks as this module held them before the stores had a
package of their own (:mod:`ssse_ext.blocks.dual`); kept so that imports keep working."""

from __future__ import annotations

from typing import Sequence

import torch

from .blocks import choose_stores
from .blocks.dual import MATCH_RTOL, DualBlocks, dual_nbytes
from .build import build_dual_blocks
from .errors import RowNotFoundError

__all__ = [
    "DualBlocks",
    "MATCH_RTOL",
    "RowNotFoundError",
    "build_dual_blocks",
    "choose_representation",
    "dual_nbytes",
]


def choose_representation(sizes: Sequence[int], rows: int, dtype: torch.dtype) -> list[bool]:
    r"""Per block, whether the dual form takes fewer bytes than the dense inverse (ties go
    dense): :math:`R\, s_b\, e + 8 R^2 < s_b^2\, e` with :math:`R` = ``rows``, :math:`e` the
    element size of ``dtype``. :func:`ssse_ext.blocks.choose_stores` chooses among every
    registered store."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be a non-negative integer, got {rows!r}")
    names = choose_stores(sizes, rows, dtype, representation=("dense", "dual"))
    return [name == "dual" for name in names]
