r"""Dense inverses that keep a float64 copy for their requests (``name = "dense64"``).

A float32 dense block downdated by Woodbury steps rewrites its own rounded inverse: the rounding
:math:`u_{32}` comes back amplified by up to :math:`\kappa^2` after every request
(:func:`~ssse_ext.blocks.gram.downdates_hold`). This store holds each block's inverse twice: in
float64, which the requests change (the dense store's Woodbury check and write, in float64:
a drift of up to :math:`\kappa^2 u_{64}`), and rounded once from it into the inverse's dtype,
which the applies read (the dense kernels, at the dtype's speed). A request costs what a dense
one does plus one rounding pass over the blocks; it holds :math:`8 + 4` bytes per element in
float32, like :class:`~ssse_ext.GramStore`, whose requests cost a Cholesky inverse of every
changed block instead.

It is never chosen by bytes: ``representation="requests"`` takes it for float32 blocks whose
condition bound keeps :math:`\kappa^2 u_{64}` within the float32 request tolerance but not
:math:`\kappa^2 u_{32}` (:meth:`~ssse_ext.GramStore.for_requests`), or ask for it by name.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..budget import COPY_REMEDIES, check_memory, format_bytes
from ..layout import BlockLayout
from ..validation import check_dtype
from .base import BlockStore, BuildCost, StoreBuilder, copied_to, element_size
from .dense import DenseStore

__all__ = ["Dense64Store"]


class Dense64Store(BlockStore):
    """Dense inverses of the blocks ``block_ids`` of ``layout`` in float64, with their copies
    in the inverse's dtype.

    Args:
        layout, block_ids: the blocks held (increasing ids).
        exact: the packed float64 inverses (one 1-D tensor, or a sequence of segments; see
            :class:`~ssse_ext.blocks.DenseStore`).
        segments: the same blocks in float32 or float64, segments of the same lengths, on the
            same device.
        damping, normalizer: :math:`\\lambda` and :math:`N`.
    """

    name = "dense64"
    methods = ("cholesky",)
    auto = False  # more bytes than dense by construction: chosen by name or by policy only

    def __init__(self, layout: BlockLayout, block_ids: Sequence[int], exact, segments, *,
                 damping: float, normalizer: float):
        super().__init__(layout, block_ids, damping=damping, normalizer=normalizer)
        self._exact = DenseStore(layout, self.block_ids, exact, damping=damping,
                                 normalizer=normalizer)
        self._inverse = DenseStore(layout, self.block_ids, segments, damping=damping,
                                   normalizer=normalizer)
        ours, theirs = self._exact.segments, self._inverse.segments
        if self._exact.dtype != torch.float64 or self._exact.device != self._inverse.device or \
                [t.numel() for t in ours] != [t.numel() for t in theirs]:
            raise ValueError(f"exact must be float64 segments on {self._inverse.device} of "
                             f"{[t.numel() for t in theirs]} elements, like segments; got "
                             f"{self._exact.dtype} on {self._exact.device} of "
                             f"{[t.numel() for t in ours]}")

    # ---- what is held ----
    dtype = property(lambda self: self._inverse.dtype)
    device = property(lambda self: self._inverse.device)

    @property
    def nbytes(self) -> int:
        return self._inverse.nbytes + self._exact.nbytes

    @property
    def segments(self) -> tuple[torch.Tensor, ...]:
        """The packed inverses in the inverse's dtype, one 1-D tensor per range of blocks."""
        return self._inverse.segments

    @property
    def exact(self) -> tuple[torch.Tensor, ...]:
        """The packed float64 inverses, laid out like :attr:`segments`."""
        return self._exact.segments

    def dense_block(self, b: int) -> torch.Tensor:
        return self._inverse.dense_block(self.block_ids[self.position(b)])

    def apply_into(self, v, base, scale, out) -> None:
        self._inverse.apply_into(v, base, scale, out)

    # ---- changes: on the float64 copy, then rounded ----
    def check_change(self, rows, sign, *, method, chunk_size, what):
        return self._exact.check_change(rows.to(torch.float64), sign, method=method,
                                        chunk_size=chunk_size, what=what)

    def write(self, plan) -> None:
        self._exact.write(plan)
        for into, exact in zip(self._inverse.segments, self._exact.segments):
            into.copy_(exact)  # one rounding from float64

    def change_nbytes(self, k, *, method="woodbury", keep=False, shift=0.0):
        work, kept = self._exact.change_nbytes(k, method=method, keep=keep, shift=shift)
        return work + 8 * k * self.dim, kept  # and the rows in float64

    def without(self, rows, sign, *, what):
        return self._exact.without(rows.to(torch.float64), sign, what=what)

    def solve_changed(self, rows, rhs, out, *, sign, shift, what):
        self._exact.solve_changed(rows.to(torch.float64), rhs, out, sign=sign, shift=shift,
                                  what=what)

    # ---- copies and files ----
    def copy_nbytes(self, dtype=None):
        numel = sum(t.numel() for t in self._exact.segments)
        return numel * (8 + element_size(dtype or self.dtype))

    def _like(self, exact, segments) -> "Dense64Store":
        return Dense64Store(self.layout, self.block_ids, exact, segments, damping=self.damping,
                            normalizer=self.normalizer)

    def to(self, device=None, dtype=None, *, max_memory=None):
        check_dtype(dtype)
        check_memory("Dense64Store.to", self.copy_nbytes(dtype),
                     self.device if device is None else device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} dense64 blocks",
                     remedies=COPY_REMEDIES)
        exact = [copied_to(t, device) for t in self._exact.segments]
        # another dtype is rounded from the float64 copy, not from this dtype
        return self._like(exact, [copied_to(t, dtype=dtype or self.dtype) for t in exact])

    def clone(self, *, max_memory=None):
        check_memory("Dense64Store.clone", self.nbytes, self.device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} dense64 blocks",
                     remedies=COPY_REMEDIES)
        return self._like([t.clone() for t in self._exact.segments],
                          [t.clone() for t in self._inverse.segments])

    def state(self):
        tensors = {f"inverse.{j}": t for j, t in enumerate(self._inverse.segments)}
        tensors.update({f"exact.{j}": t for j, t in enumerate(self._exact.segments)})
        return tensors, {"segments": len(self._exact.segments)}

    @classmethod
    def from_state(cls, tensors, meta, *, layout, block_ids, damping, normalizer, dtype=None):
        try:
            count = int(meta["segments"])
            segments = [tensors[f"inverse.{j}"] for j in range(count)]
            exact = [tensors[f"exact.{j}"] for j in range(count)]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid dense64-blocks state: missing or bad {exc}") from None
        if dtype is not None and any(t.dtype != dtype for t in segments):
            raise ValueError(f"the dense64 blocks' inverses are not {dtype}")
        return cls(layout, block_ids, exact, segments, damping=damping, normalizer=normalizer)

    # ---- costs ----
    @classmethod
    def nbytes_for(cls, size, rows, dtype):
        return size * size * (8 + element_size(dtype))

    @classmethod
    def state_nbytes(cls, sizes, meta, dtype):
        return sum(s * s for s in sizes) * (8 + element_size(dtype))

    @classmethod
    def build_cost(cls, layout, block_ids, *, rows, dtype, device, method):
        from .gram import GramStore  # built as gram blocks, then inverted again in float64
        cost = GramStore.build_cost(layout, block_ids, rows=rows, dtype=dtype, device=device,
                                    method=method)
        numel = sum(layout.sizes[b] ** 2 for b in block_ids)
        return BuildCost(cost.streaming, cost.peak + 8 * numel, cost.stored,
                         f"{len(block_ids)} dense64 blocks: {format_bytes(cost.stored)} stored "
                         f"(float64 inverses and their copies)")

    @classmethod
    def builder(cls, layout, block_ids, *, dtype, device, method, damping, normalizer, rows,
                probe=None, max_memory=None):
        from .gram import GramStore
        return _Builder(GramStore.builder(layout, block_ids, dtype=dtype, device=device,
                                          method=method, damping=damping,
                                          normalizer=normalizer, rows=rows, probe=probe,
                                          max_memory=max_memory))

    def __repr__(self) -> str:
        return (f"Dense64Store(blocks={self.num_blocks}, "
                f"segments={len(self._exact.segments)}, dtype={self.dtype}, "
                f"device={self.device}, nbytes={self.nbytes})")


class _Builder(StoreBuilder):
    """The gram blocks' build, every block then handed to a :class:`Dense64Store`."""

    def __init__(self, inner: StoreBuilder):
        self.inner = inner

    def add(self, rows):
        self.inner.add(rows)

    def finish(self, normalizer):
        return self.inner.finish(normalizer).as_dense64()
