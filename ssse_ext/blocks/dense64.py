r"""Dense inverses held in float64 for the requests of a float32 inverse (``name = "dense64"``).

A float32 dense block downdated by Woodbury steps rewrites its own rounded inverse: the rounding
:math:`u_{32}` comes back amplified by up to :math:`\kappa^2` after every request
(:func:`~ssse_ext.blocks.gram.downdates_hold`). This store holds the blocks of an inverse of
any dtype in float64: requests run the dense store's Woodbury check and write on them (a drift
of up to :math:`\kappa^2 u_{64}`), and applies read them with vectors of the inverse's dtype,
whose results are rounded to it. It holds 8 bytes per element (twice a float32 dense block; a
:class:`~ssse_ext.GramStore` holds 12), a request costs what a dense one does on float64
blocks, and an apply reads twice the bytes.

It is never chosen by bytes: ``representation="requests"`` takes it for float32 blocks whose
condition bound keeps :math:`\kappa^2 u_{64}` within the float32 request tolerance but not
:math:`\kappa^2 u_{32}` (:func:`~ssse_ext.blocks.gram.requests_stores`), or ask for it by
name.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..budget import COPY_REMEDIES, check_memory, format_bytes
from ..layout import BlockLayout
from ..validation import check_dtype
from .base import BlockStore, StoreBuilder, copied_to
from .dense import DenseStore, GramBuilder
from .dense_gram import check_kept_build, kept_build_cost

__all__ = ["Dense64Store"]


class Dense64Store(BlockStore):
    """Dense inverses of the blocks ``block_ids`` of ``layout``, held in float64 for an inverse
    of ``dtype``.

    Args:
        layout, block_ids: the blocks held (increasing ids).
        exact: the packed float64 inverses (one 1-D tensor, or a sequence of segments; see
            :class:`~ssse_ext.blocks.DenseStore`).
        dtype: the inverse's dtype (of the vectors and rows it takes), float32 or float64.
        damping, normalizer: :math:`\\lambda` and :math:`N`.
    """

    name = "dense64"
    methods = ("cholesky",)
    auto = False  # more bytes than dense in float32: chosen by name or by policy only

    def __init__(self, layout: BlockLayout, block_ids: Sequence[int], exact, *,
                 dtype: torch.dtype, damping: float, normalizer: float):
        super().__init__(layout, block_ids, damping=damping, normalizer=normalizer)
        self._dtype = check_dtype(dtype)
        self._exact = DenseStore(layout, self.block_ids, exact, damping=damping,
                                 normalizer=normalizer)
        if self._exact.dtype != torch.float64:
            raise ValueError(f"exact must be float64 segments, got {self._exact.dtype}")
        self._runs = [(layout.starts[b0], n * s) for b0, n, s in
                      layout.runs(blocks=self.block_ids)]

    # ---- what is held ----
    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._exact.device)

    @property
    def nbytes(self) -> int:
        return self._exact.nbytes

    @property
    def exact(self) -> tuple[torch.Tensor, ...]:
        """The packed float64 inverses, one 1-D tensor per range of blocks."""
        return self._exact.segments

    def dense_block(self, b: int) -> torch.Tensor:
        return self._exact.dense_block(self.block_ids[self.position(b)]).to(self._dtype)

    def apply_into(self, v, base, scale, out) -> None:
        if self._dtype == torch.float64:
            self._exact.apply_into(v, base, scale, out)
            return
        wide = torch.zeros(out.shape, dtype=torch.float64, device=out.device)
        self._exact.apply_into(v.to(torch.float64), None if base is None else
                               base.to(torch.float64), scale, wide)
        for st, m in self._runs:  # only this store's parameters: the others are not its own
            out[st:st + m] = wide[st:st + m]

    # ---- changes: on the float64 blocks ----
    def _rows(self, rows: torch.Tensor, method: str) -> torch.Tensor:
        """The rows as the float64 blocks' change takes them: as they are where the CPU
        kernels check it (they convert each block's rows as they read them), else in
        float64."""
        return rows if self._kernel_rows(rows.shape[0], method) else rows.to(torch.float64)

    def _kernel_rows(self, k: int, method: str, keep: bool = False, shift: float = 0.0) -> bool:
        """Whether a change of ``k`` rows reaches the CPU kernels' check with its rows as given."""
        return method == "woodbury" and not keep and not shift and \
            self._exact._writes_factors(k)

    def check_change(self, rows, sign, *, method, chunk_size, what):
        return self._exact.check_change(self._rows(rows, method), sign, method=method,
                                        chunk_size=chunk_size, what=what)

    def check_and_apply(self, rows, sign, v, out, *, changed, method, chunk_size, what):
        return self._exact.check_and_apply(self._rows(rows, method), sign,
                                           v.to(torch.float64), out, changed=changed,
                                           method=method, chunk_size=chunk_size, what=what)

    def write(self, plan) -> None:
        self._exact.write(plan)

    def change_nbytes(self, k, *, method="woodbury", keep=False, shift=0.0):
        work, kept = self._exact.change_nbytes(k, method=method, keep=keep, shift=shift)
        if not self._kernel_rows(k, method, keep, shift):
            work += 8 * k * self.dim  # the rows in float64
        return work, kept

    def without(self, rows, sign, *, what):
        return self._exact.without(rows.to(torch.float64), sign, what=what)

    def solve_changed(self, rows, rhs, out, *, sign, shift, what):
        self._exact.solve_changed(rows.to(torch.float64), rhs, out, sign=sign, shift=shift,
                                  what=what)

    # ---- copies and files ----
    def copy_nbytes(self, dtype=None):
        return self._exact.copy_nbytes()

    def _like(self, exact, dtype) -> "Dense64Store":
        return Dense64Store(self.layout, self.block_ids, exact, dtype=dtype,
                            damping=self.damping, normalizer=self.normalizer)

    def to(self, device=None, dtype=None, *, max_memory=None):
        check_dtype(dtype)
        check_memory("Dense64Store.to", self.copy_nbytes(dtype),
                     self.device if device is None else device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} dense64 blocks",
                     remedies=COPY_REMEDIES)
        return self._like([copied_to(t, device) for t in self._exact.segments],
                          dtype or self._dtype)

    def clone(self, *, max_memory=None):
        check_memory("Dense64Store.clone", self.nbytes, self.device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} dense64 blocks",
                     remedies=COPY_REMEDIES)
        return self._like([t.clone() for t in self._exact.segments], self._dtype)

    def state(self):
        return {str(j): t for j, t in enumerate(self._exact.segments)}, \
            {"segments": len(self._exact.segments)}

    @classmethod
    def regrouped(cls, pieces, *, layout, block_ids):
        first = cls.regrouped_stores(pieces)[0]
        exact = torch.cat([st._exact.dense_block(b).reshape(-1) for st, b in pieces])
        return cls(layout, block_ids, exact, dtype=first.dtype, damping=first.damping,
                   normalizer=first.normalizer)

    @classmethod
    def from_state(cls, tensors, meta, *, layout, block_ids, damping, normalizer, dtype=None):
        try:
            exact = [tensors[str(j)] for j in range(int(meta["segments"]))]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid dense64-blocks state: missing or bad {exc}") from None
        if dtype is None:
            raise ValueError("the dense64 blocks need the inverse's dtype")
        return cls(layout, block_ids, exact, dtype=dtype, damping=damping,
                   normalizer=normalizer)

    # ---- costs ----
    @classmethod
    def nbytes_for(cls, size, rows, dtype):
        return 8 * size * size

    @classmethod
    def state_nbytes(cls, sizes, meta, dtype):
        return 8 * sum(s * s for s in sizes)

    @classmethod
    def build_cost(cls, layout, block_ids, *, rows, dtype, device, method):
        # the float64 Grams while the rows stream in; at the end, a group at a time: its
        # float64 inverse, a copy of its Gram and the rounded copies next to the stores made
        # so far, which hold at most 12 bytes per element (the blocks that keep their Gram to
        # serve requests, requests_stores)
        return kept_build_cost(cls.name, layout, block_ids, dtype, device, stored=8, held=12,
                               spare=28, what="float64 inverses, built from float64 Grams")

    @classmethod
    def builder(cls, layout, block_ids, *, dtype, device, method, damping, normalizer, rows,
                probe=None, max_memory=None):
        check_kept_build(cls, layout, block_ids, dtype=dtype, device=device, method=method,
                         rows=rows, max_memory=max_memory)
        return _Builder(GramBuilder(layout, block_ids, dtype, device, damping=damping,
                                    probe=probe, max_memory=max_memory))

    def __repr__(self) -> str:
        return (f"Dense64Store(blocks={self.num_blocks}, "
                f"segments={len(self._exact.segments)}, dtype={self.dtype}, "
                f"device={self.device}, nbytes={self.nbytes})")


class _Builder(StoreBuilder):
    """The stable build's float64 Grams (:class:`~ssse_ext.blocks.dense_gram.DenseGram`),
    inverted once in float64 into dense64 blocks, or into the stores that serve requests."""

    def __init__(self, inner: StoreBuilder):
        self.inner = inner

    def add(self, rows):
        self.inner.add(rows)

    def _stores(self, normalizer, store):
        from .gram import requests_stores
        inner = self.inner
        # the warnings name the caller of build_inverse_fisher (through the build loop)
        return requests_stores(inner.gram, inner.damping, normalizer, probe=inner.probe,
                               stacklevel=5, store=store)

    def finish(self, normalizer):
        return self._stores(normalizer, Dense64Store.name)[0]

    def finish_for_requests(self, normalizer, *, max_memory=None):
        return self._stores(normalizer, None)
