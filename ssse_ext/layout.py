"""Block layouts: how the flat parameter vector of length ``d`` is cut into diagonal blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .validation import check_nonneg_int, check_positive_float, check_positive_int

__all__ = ["BlockLayout"]


@dataclass(frozen=True)
class BlockLayout:
    """A partition of ``[0, dim)`` into contiguous blocks, block ``b`` covering
    ``[starts[b], starts[b] + sizes[b])``.

    Block ``b``'s ``sizes[b] x sizes[b]`` matrix is stored at element ``offsets[b]`` of the packed
    block storage used by the kernels (``numel`` elements in all).

    Use the constructors: :meth:`fixed` (the paper's consecutive chunks), :meth:`per_parameter`
    (no block crosses a parameter tensor) and :meth:`from_boundaries` (explicit cuts, e.g. one
    block per output row of a linear multi-attribute classifier).
    """

    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    dim: int

    def __post_init__(self):
        if len(self.starts) != len(self.sizes):
            raise ValueError("starts and sizes must have the same length")
        expected = 0
        for b, (start, size) in enumerate(zip(self.starts, self.sizes)):
            if start != expected:
                raise ValueError(f"block {b} starts at {start}, expected {expected}: blocks must be "
                                 "contiguous and cover [0, dim) in order")
            if size <= 0:
                raise ValueError(f"block {b} has size {size}, expected > 0")
            expected += size
        if expected != self.dim:
            raise ValueError(f"blocks cover {expected} parameters, expected dim={self.dim}")

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def fixed(cls, dim: int, block_size: int) -> "BlockLayout":
        """Consecutive chunks of ``block_size`` parameters; the last one may be smaller."""
        dim = check_nonneg_int(dim, "dim")
        block_size = check_positive_int(block_size, "block_size")
        starts = tuple(range(0, dim, block_size))
        sizes = tuple(min(block_size, dim - s) for s in starts)
        return cls(starts, sizes, dim)

    @classmethod
    def per_parameter(cls, shapes: Iterable, block_size: int) -> "BlockLayout":
        """Blocks of at most ``block_size`` that never cross a parameter tensor.

        Args:
            shapes: per parameter, in ``named_parameters()`` order: a shape (tuple or
                ``torch.Size``), a tensor, or a number of elements.
            block_size: the largest block size ``B``.
        """
        block_size = check_positive_int(block_size, "block_size")
        starts, sizes, pos = [], [], 0
        for k, shape in enumerate(shapes):
            if isinstance(shape, torch.Tensor):
                numel = shape.numel()
            elif isinstance(shape, int) and not isinstance(shape, bool):
                numel = shape
            elif isinstance(shape, (tuple, list, torch.Size)):
                numel = math.prod(int(s) for s in shape)
            else:
                raise ValueError(f"shapes[{k}] must be a shape, a tensor or an int, got {shape!r}")
            if numel < 0:
                raise ValueError(f"shapes[{k}] has a negative number of elements: {numel}")
            for off in range(0, numel, block_size):
                starts.append(pos + off)
                sizes.append(min(block_size, numel - off))
            pos += numel
        return cls(tuple(starts), tuple(sizes), pos)

    @classmethod
    def from_boundaries(cls, boundaries: Sequence[int], dim: int | None = None) -> "BlockLayout":
        """Blocks between consecutive cut points ``0 = c_0 < c_1 < ... < c_K = dim``.

        ``boundaries`` may omit the leading 0 and, when ``dim`` is given, the final ``dim``.
        """
        cuts = [int(c) for c in boundaries]
        if dim is not None:
            dim = int(dim)
            if not cuts or cuts[-1] != dim:
                cuts.append(dim)
        if not cuts or cuts[0] != 0:
            cuts.insert(0, 0)
        for a, b in zip(cuts, cuts[1:]):
            if b <= a:
                raise ValueError(f"boundaries must be strictly increasing, got {list(boundaries)!r}")
        return cls(tuple(cuts[:-1]), tuple(b - a for a, b in zip(cuts, cuts[1:])), cuts[-1])

    # ---- derived quantities ---------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.sizes)

    @property
    def max_block_size(self) -> int:
        return max(self.sizes, default=0)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, pos = [], 0
        for s in self.sizes:
            out.append(pos)
            pos += s * s
        return tuple(out)

    @property
    def numel(self) -> int:
        """Elements of the packed block storage: the sum of ``size_b ** 2``."""
        return sum(s * s for s in self.sizes)

    def table(self, device: torch.device | str | None = None, *, first: int = 0,
              last: int | None = None, blocks: Sequence[int] | None = None) -> torch.Tensor:
        """The ``[num_blocks, 3]`` int64 table (start, size, offset) passed to the kernels, for
        blocks ``first .. last - 1`` (all by default) or the given ``blocks``, offsets counted
        in their packed storage (one ``s x s`` matrix after another, in that order)."""
        ids = self._ids(first, last, blocks)
        rows, pos = [], 0
        for b in ids:
            rows.append((self.starts[b], self.sizes[b], pos))
            pos += self.sizes[b] ** 2
        return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 3)

    def _ids(self, first: int, last: int | None, blocks: Sequence[int] | None) -> list[int]:
        if blocks is not None:
            return list(blocks)
        return list(range(first, self.num_blocks if last is None else last))

    def numel_of(self, first: int, last: int) -> int:
        """Elements of the packed storage of blocks ``first .. last - 1``."""
        return sum(s * s for s in self.sizes[first:last])

    def runs(self, max_count=None, *, first: int = 0, last: int | None = None,
             blocks: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
        """Runs of consecutive blocks of equal size among blocks ``first .. last - 1`` (or the
        increasing ``blocks``), as ``(first block, count, size)``: consecutive in the layout and
        in a packed storage of those blocks, so a run's storage is a ``(count, size, size)``
        tensor and its parameters a ``(count, size)`` slice, and batched torch operations cover
        it without a copy. ``max_count`` (an int, or a function of the size) splits longer
        runs."""
        ids = self._ids(first, last, blocks)
        out: list[tuple[int, int, int]] = []
        i = 0
        while i < len(ids):
            s = self.sizes[ids[i]]
            j = i + 1
            while j < len(ids) and ids[j] == ids[j - 1] + 1 and self.sizes[ids[j]] == s:
                j += 1
            cap = max_count(s) if callable(max_count) else max_count
            step = j - i if cap is None else max(1, int(cap))
            for start in range(i, j, step):
                out.append((ids[start], min(step, j - start), s))
            i = j
        return out

    def slice(self, b: int) -> slice:
        """The parameters covered by block ``b``."""
        return slice(self.starts[b], self.starts[b] + self.sizes[b])

    def to_dict(self) -> dict:
        return {"dim": self.dim, "sizes": list(self.sizes)}

    @classmethod
    def from_dict(cls, data: dict) -> "BlockLayout":
        sizes = [int(s) for s in data["sizes"]]
        starts, pos = [], 0
        for s in sizes:
            starts.append(pos)
            pos += s
        return cls(tuple(starts), tuple(sizes), int(data["dim"]))

    def __repr__(self) -> str:
        return (f"BlockLayout(dim={self.dim}, num_blocks={self.num_blocks}, "
                f"max_block_size={self.max_block_size})")


def check_build_args(damping, normalizer, layout, block_size):
    """The arguments every build shares: ``(damping, normalizer, block_size)`` validated, and
    ``layout`` a :class:`BlockLayout` or ``None``, not given together with ``block_size``."""
    damping = check_positive_float(damping, "damping")
    if normalizer is not None:
        normalizer = check_positive_float(normalizer, "normalizer")
    block_size = check_positive_int(block_size, "block_size", allow_none=True)
    if layout is not None and not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if block_size is not None and layout is not None:
        raise ValueError("give block_size or layout, not both")
    return damping, normalizer, block_size
