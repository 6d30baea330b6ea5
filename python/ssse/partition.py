r"""Which rank owns which blocks of a sharded inverse (:class:`Sharding`): rank :math:`r` of
:math:`P` owns consecutive blocks of the layout, chosen so that the ranks' costs
:math:`\sum_b s_b^2` (the Gram's flops per row, and the memory) are balanced
(:meth:`Sharding.balanced`)."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import ssse_ext
from ssse_ext.blocks import get_store
from ssse_ext.validation import check_int, check_positive_int

__all__ = ["Sharding"]


@dataclass(frozen=True)
class Sharding:
    r"""Which rank owns which blocks: rank ``r`` owns blocks ``bounds[r] .. bounds[r+1] - 1``
    of ``layout``, i.e. the parameters ``columns(r)``.

    Use :meth:`balanced` (the partition that minimises the largest
    :math:`\sum_{b \in r} s_b^2`, or the largest sum of the blocks' costs given).
    """

    layout: ssse_ext.BlockLayout
    bounds: tuple[int, ...]

    def __post_init__(self):
        if not isinstance(self.layout, ssse_ext.BlockLayout):
            raise TypeError(f"layout must be a ssse_ext.BlockLayout, got "
                            f"{type(self.layout).__name__}")
        bounds = tuple(int(b) for b in self.bounds)
        nb = self.layout.num_blocks
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != nb or \
                any(b > c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"bounds must rise from 0 to the layout's {nb} blocks with at least "
                             f"one rank, got {list(self.bounds)}")
        object.__setattr__(self, "bounds", bounds)
        # the first parameter of every range (asked for per chunk of rows, so kept)
        starts = [self.layout.starts[b] if b < nb else self.layout.dim for b in bounds]
        object.__setattr__(self, "_starts", tuple(starts))

    @classmethod
    def by_store_bytes(cls, layout: ssse_ext.BlockLayout, world_size: int, names,
                       dtype) -> "Sharding":
        """:meth:`balanced` with each block's bytes in its store (``names``: per block, the
        store that holds it; ``dtype``: the inverse's): a Kronecker-factored block of s
        parameters holds O(s) numbers, not s²."""
        return cls.balanced(layout, world_size,
                            [math.ceil(get_store(name).nbytes_for(size, None, dtype))
                             for name, size in zip(names, layout.sizes)])

    @classmethod
    def balanced(cls, layout: ssse_ext.BlockLayout, world_size: int,
                 costs=None) -> "Sharding":
        r"""Consecutive ranges of blocks for ``world_size`` ranks with the smallest possible
        largest cost; every rank gets at least one block when there are enough blocks.
        ``costs``: per block, a non-negative integer (e.g. its store's bytes); default
        :math:`s_b^2`, a dense block's elements (its Gram's work per row, and its memory)."""
        if not isinstance(layout, ssse_ext.BlockLayout):
            raise TypeError(f"layout must be a ssse_ext.BlockLayout, got {type(layout).__name__}")
        world_size = check_positive_int(world_size, "world_size")
        if costs is None:
            costs = [s * s for s in layout.sizes]
        else:
            costs = [check_int(c, "costs[i]") for c in costs]
            if len(costs) != layout.num_blocks or any(c < 0 for c in costs):
                raise ValueError(f"costs must give the layout's {layout.num_blocks} blocks a "
                                 f"non-negative integer each, got {len(costs)} values")
        prefix = [0]
        for c in costs:
            prefix.append(prefix[-1] + c)
        nb = len(costs)
        if nb == 0:
            return cls(layout, (0,) * (world_size + 1))

        def cuts(cap: int) -> list[int] | None:
            """Greedy ranges of cost <= cap (None: more than world_size needed)."""
            out, pos = [0], 0
            while pos < nb:
                pos = bisect.bisect_right(prefix, prefix[pos] + cap) - 1
                out.append(pos)
                if len(out) - 1 > world_size:
                    return None
            return out

        lo, hi = max(costs), prefix[-1]
        while lo < hi:
            mid = (lo + hi) // 2
            if cuts(mid) is None:
                lo = mid + 1
            else:
                hi = mid
        bounds = cuts(lo)
        # fewer ranges than ranks: split the costliest range that has two blocks or more
        while len(bounds) - 1 < world_size:
            spans = [(prefix[b] - prefix[a], j) for j, (a, b) in
                     enumerate(zip(bounds, bounds[1:])) if b - a >= 2]
            if not spans:
                break
            _, j = max(spans)
            a, b = bounds[j], bounds[j + 1]
            half = (prefix[a] + prefix[b]) / 2
            c = min(max(bisect.bisect_left(prefix, half, a, b), a + 1), b - 1)
            if c + 1 < b and abs(prefix[c + 1] - half) < abs(prefix[c] - half):
                c += 1
            bounds.insert(j + 1, c)
        bounds += [nb] * (world_size + 1 - len(bounds))
        return cls(layout, tuple(bounds))

    @property
    def world_size(self) -> int:
        return len(self.bounds) - 1

    def _rank(self, rank: int) -> int:
        rank = check_int(rank, "rank")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return rank

    def blocks(self, rank: int) -> tuple[int, int]:
        """``(first, last)``: rank ``rank`` owns blocks ``first .. last - 1``."""
        rank = self._rank(rank)
        return self.bounds[rank], self.bounds[rank + 1]

    def columns(self, rank: int) -> slice:
        """The parameters covered by the blocks of rank ``rank``."""
        rank = self._rank(rank)
        return slice(self._starts[rank], self._starts[rank + 1])

    def width(self, rank: int) -> int:
        c = self.columns(rank)
        return c.stop - c.start

    def numel(self, rank: int) -> int:
        """Elements of rank ``rank``'s part of the packed inverse (its cost)."""
        return self.layout.numel_of(*self.blocks(rank))

    def sub_layout(self, rank: int) -> ssse_ext.BlockLayout:
        """Rank ``rank``'s blocks as a layout of their own (over its columns)."""
        first, last = self.blocks(rank)
        sizes = list(self.layout.sizes[first:last])
        return ssse_ext.BlockLayout.from_dict({"dim": sum(sizes), "sizes": sizes})

    def owner(self, block: int) -> int:
        """The rank that owns block ``block``."""
        block = check_int(block, "block")
        if not 0 <= block < self.layout.num_blocks:
            raise ValueError(f"block must be in [0, {self.layout.num_blocks}), got {block}")
        return bisect.bisect_right(self.bounds, block) - 1

    def __repr__(self) -> str:
        costs = [self.numel(r) for r in range(self.world_size)]
        return (f"Sharding({self.layout!r}, world_size={self.world_size}, "
                f"bounds={list(self.bounds)}, costs={costs})")
