r"""Low-rank ("dual") blocks (docs/maths.md, "Low-rank (dual) blocks"; ``name = "dual"``).

A block of size :math:`s` whose Fisher comes from :math:`R < s` rows :math:`G_b` (``R x s``)
has the exact inverse (the Woodbury identity)

.. math::
    F_b^{-1} = \Big(\lambda I + \tfrac{1}{N} G_b^\top G_b\Big)^{-1}
             = \tfrac{1}{\lambda}\Big[I - G_b^\top K_b^{-1} G_b\Big],\qquad
    K_b = \lambda N I_R + G_b G_b^\top = L_b L_b^\top ,

with :math:`N` the normaliser, fixed for the life of the inverse (not necessarily :math:`R`).
:class:`DualBlocks` stores :math:`G_b` in the rows' dtype and the lower Cholesky factor
:math:`L_b` in float64: :math:`R s + R^2` numbers instead of :math:`s^2`. It is exact, and it is
the accurate form where :math:`F_b` is ill-conditioned (rank-deficient with a tiny
:math:`\lambda`), since only the well-conditioned :math:`K_b` is factorised.

Storage (see ``DualSpec`` in ``csrc/common.h``): with row capacity :math:`C \ge R`, dual block
``i`` keeps ``G_i`` as ``[C, s_i]`` at element ``C * (s_0 + ... + s_{i-1})`` of the packed ``g``
tensor and ``L_i`` as ``[C, C]`` at element ``i * C * C`` of the packed float64 ``l`` tensor.
Spare capacity lets the streaming build and :meth:`DualBlocks.update` append rows in place.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from .. import _ops
from ..budget import COPY_REMEDIES, check_memory, format_bytes
from ..errors import NotPositiveDefiniteError, RowNotFoundError
from ..layout import BlockLayout
from ..lowrank import checked_cholesky, inner_matrix, rows_t_times, rows_times
from ..validation import FLOAT_DTYPES, check_dtype, matrix_chunks
from .base import (BlockStore, BuildCost, ChangeFactors, StoreBuilder, block_ids_of,
                   element_size)
from .matching import MATCH_RTOL, match_rows, match_run

__all__ = ["DualBlocks", "DualBuilder", "MATCH_RTOL", "dual_nbytes"]

# Bytes of float64 distances and rows a batched match of a run of blocks may take.
_MATCH_BYTES = 16 << 20


def dual_nbytes(size: int, rows: int, dtype: torch.dtype) -> int:
    """Bytes of one dual block: ``rows * size`` elements of ``dtype`` plus a float64
    ``rows x rows`` factor."""
    return rows * size * element_size(dtype) + rows * rows * 8


def _chunks(grads, name: str, chunk_size: int | None = None, *, dim=None, dtype=None,
            device=None) -> Iterator[torch.Tensor]:
    """Validated ``(m, d)`` chunks of a tensor or an iterable of tensors (all like the first)."""
    return matrix_chunks(grads, chunk_size, name, dim=dim, dtype=dtype, device=device,
                         like="the dual blocks")


class _DualSolve:
    r""":math:`F'^{-1} x = (x - G_b^\top K'^{-1} G_b x) / \lambda'` in float64 for ``x`` of shape
    ``(s, r)``, with :math:`K' = L' L'^\top` (``G_b`` read in column chunks, never copied)."""

    def __init__(self, g: torch.Tensor, chol: torch.Tensor, lam: float):
        self.g, self.chol, self.lam = g, chol, lam

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cholesky_solve(rows_times(self.g, x), self.chol)
        return (x - rows_t_times(self.g, z)) / self.lam


class DualFactors(ChangeFactors):
    """Per block ``(start, size, solve, U, chol)`` of :meth:`DualBlocks.woodbury`."""

    def __init__(self, parts: list, sign: int):
        self.parts, self.sign = parts, sign

    def solve(self, v: torch.Tensor, out: torch.Tensor) -> None:
        for st, s, solve, u, chol in self.parts:
            vb = v[st:st + s]
            out[st:st + s] = solve(vb) - self.sign * (u @ torch.cholesky_solve(u.T @ vb, chol))


class DualBlocks(BlockStore):
    r"""A set of dual blocks of a :class:`BlockLayout`, sharing their ``num_rows`` rows.

    Block ``b`` (one of :attr:`block_ids`) holds
    :math:`F_b^{-1} = \frac{1}{\lambda}[I - G_b^\top K_b^{-1} G_b]` as its rows ``G_b``
    (:meth:`rows_of`) and the float64 factor ``L_b`` of :math:`K_b` (:meth:`factor_of`).

    ``blocks @ v`` and :meth:`apply` multiply the dual part of a ``(d,)`` or ``(d, r)`` vector;
    :meth:`update` appends rows and :meth:`downdate` removes stored rows (both atomic: on error
    nothing changes); :meth:`to`, :meth:`to_state`/:meth:`from_state` copy, move and save.
    Build with :func:`~ssse_ext.build_dual_blocks`.

    Args:
        layout: the layout; ``block_ids``: increasing ids or a mask with one bool per block.
        g: 1-D, ``capacity * sum(sizes)`` elements of the rows' dtype.
        l: 1-D float64, ``num_blocks * capacity**2`` elements.
        num_rows, capacity: the rows stored and the rows ``g`` and ``l`` have room for.
    """

    name = "dual"
    prefix = "dual"

    def __init__(self, layout: BlockLayout, block_ids: Sequence[int], g: torch.Tensor,
                 l: torch.Tensor, *, num_rows: int, capacity: int, damping: float,
                 normalizer: float):
        super().__init__(layout, block_ids, damping=damping,
                         normalizer=normalizer)
        self._sizes = tuple(layout.sizes[b] for b in self.block_ids)
        self._prefix = [0]  # rows-before offset of every block in g, per row of capacity
        for size in self._sizes:
            self._prefix.append(self._prefix[-1] + size)
        if not 0 <= num_rows <= capacity:
            raise ValueError(f"num_rows must be in [0, capacity={capacity}], got {num_rows}")
        total = self._prefix[-1]
        if not isinstance(g, torch.Tensor) or g.dim() != 1 or g.dtype not in FLOAT_DTYPES:
            raise TypeError("g must be a 1-D float32 or float64 tensor")
        if g.numel() != capacity * total:
            raise ValueError(f"g must have capacity * sum(sizes) = {capacity * total} elements, "
                             f"got {g.numel()}")
        if not isinstance(l, torch.Tensor) or l.dim() != 1 or l.dtype != torch.float64:
            raise TypeError("l must be a 1-D float64 tensor")
        if l.numel() != self.num_blocks * capacity * capacity:
            raise ValueError(f"l must have num_blocks * capacity**2 = "
                             f"{self.num_blocks * capacity * capacity} elements, got "
                             f"{l.numel()}")
        if l.device != g.device:
            raise ValueError(f"g and l must be on the same device, got {g.device} and {l.device}")
        self.g, self.l = g.contiguous(), l.contiguous()
        self.num_rows, self.capacity = int(num_rows), int(capacity)
        self._tables: dict[torch.device, torch.Tensor] = {}

    # ---- what is held ----
    sizes = property(lambda self: self._sizes)
    dtype = property(lambda self: self.g.dtype)
    device = property(lambda self: self.g.device)

    @property
    def nbytes(self) -> int:
        """Bytes held (spare capacity included; :meth:`compact` drops it)."""
        return self.g.numel() * self.g.element_size() + self.l.numel() * 8

    @property
    def shift(self) -> float:
        r""":math:`\lambda N`, the shift of every kernel :math:`K_b`."""
        return self.damping * self.normalizer

    def _g_offsets(self, capacity: int) -> list[int]:
        return [capacity * p for p in self._prefix[:-1]]

    def table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``[num_blocks, 4]`` int64 table (start, size, g_offset, l_offset) of the kernels."""
        c = self.capacity
        rows = [(self.layout.starts[b], self.layout.sizes[b], go, i * c * c)
                for i, (b, go) in enumerate(zip(self.block_ids, self._g_offsets(c)))]
        return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 4)

    def _layout_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        cpu = torch.device("cpu")
        if cpu not in self._tables:
            self._tables[cpu] = self.table()
        if self.device not in self._tables:
            self._tables[self.device] = self._tables[cpu].to(self.device)
        return self._tables[cpu], self._tables[self.device]

    def rows_of(self, b: int) -> torch.Tensor:
        """A view of the ``(num_rows, s_b)`` stored rows ``G_b`` of layout block ``b``."""
        i = self.position(b)
        s, go = self._sizes[i], self.capacity * self._prefix[i]
        return self.g[go:go + self.capacity * s].view(self.capacity, s)[:self.num_rows]

    def factor_of(self, b: int) -> torch.Tensor:
        """A view of the ``(num_rows, num_rows)`` float64 factor storage ``L_b`` of layout block
        ``b`` (its lower triangle is the factor; nothing above it is meaningful)."""
        i, c = self.position(b), self.capacity
        return self.l[i * c * c:(i + 1) * c * c].view(c, c)[:self.num_rows, :self.num_rows]

    # ---- capacity ----
    def _reserve(self, needed: int, valid: int, exact: bool = False):
        """Grows the row capacity to at least ``needed`` (doubling unless ``exact``), keeping rows
        ``[0, valid)`` of G and of the factor storage (which may hold a pending Gram strip)."""
        if needed > self.capacity:
            self._recapacitate(needed if exact else max(needed, 2 * self.capacity), valid)

    def _recapacitate(self, cap: int, valid: int):
        old_c = self.capacity
        # the new storage is filled from the old one, so both are held at once
        check_memory("DualBlocks: reserving rows", self._nbytes(cap, self.dtype), self.device,
                     detail=f"{cap} rows of {self.num_blocks} dual blocks next to the "
                            f"{format_bytes(self.nbytes)} held now",
                     remedies=("give the number of rows up front (num_rows= or capacity=), "
                               "so that they are reserved once, exactly",))
        g = torch.zeros(cap * sum(self.sizes), dtype=self.dtype, device=self.device)
        l = torch.zeros(self.num_blocks * cap * cap, dtype=torch.float64, device=self.device)
        for i, (s, go_old, go_new) in enumerate(zip(self.sizes, self._g_offsets(old_c),
                                                    self._g_offsets(cap))):
            g[go_new:go_new + valid * s] = self.g[go_old:go_old + valid * s]
            src = self.l[i * old_c * old_c:(i + 1) * old_c * old_c].view(old_c, old_c)
            l[i * cap * cap:(i + 1) * cap * cap].view(cap, cap)[:valid, :valid] = \
                src[:valid, :valid]
        self.g, self.l, self.capacity = g, l, cap
        self._tables.clear()

    def compact(self) -> "DualBlocks":
        """Drops spare row capacity (a copy of the storage); returns ``self``."""
        if self.capacity != self.num_rows:
            self._recapacitate(self.num_rows, self.num_rows)
        return self

    # ---- products ----
    def apply_into(self, v, base, scale, out) -> None:
        r""":math:`F_b^{-1} v_b = \tfrac{1}{\lambda}\big(v_b - G_b^\top L_b^{-\top} L_b^{-1}
        G_b v_b\big)` in the kernels (float64 arithmetic)."""
        host, dev = self._layout_tables()
        _ops.call(_ops.dual_apply_, self.g, self.l, host, dev, self.num_rows, self.capacity,
                  self.damping, v, base, float(scale), out)

    def dense_block(self, b: int) -> torch.Tensor:
        """Layout block ``b``'s ``(s_b, s_b)`` inverse (for tests): the apply kernel on the
        identity."""
        i, c = self.position(b), self.capacity
        s = self._sizes[i]
        host = torch.tensor([[0, s, c * self._prefix[i], i * c * c]], dtype=torch.int64)
        eye = torch.eye(s, dtype=self.dtype, device=self.device)
        out = torch.empty_like(eye)
        _ops.call(_ops.dual_apply_, self.g, self.l, host, host.to(self.device), self.num_rows,
                  c, self.damping, eye, None, 1.0, out)
        return out

    # ---- adding rows ----
    def _append(self, chunk: torch.Tensor, at: int, total: int | None = None) -> None:
        """Copies ``chunk`` to rows ``[at, at + m)`` of every ``G_b`` and writes the new rows of
        every raw kernel Gram matrix into the factor storage; rows before ``at`` are untouched.
        ``total``: the rows there will be in all (reserved exactly), else capacity doubles."""
        m = chunk.shape[0]
        if at + m > self.capacity:
            if total is not None:
                self._reserve(max(total, at + m), at, exact=True)
            else:
                self._reserve(at + m, at)
        host, dev = self._layout_tables()
        _ops.call(_ops.dual_gram_, chunk, host, dev, at, self.g, self.l, self.capacity)

    def _factor(self, r0: int, r1: int, what: str):
        r"""Extends every factor from rows ``[0, r0)`` to ``[0, r1)`` in float64:
        :math:`L_{21} = K_{21} L_{11}^{-\top}`, :math:`L_{22} = \mathrm{chol}(K_{22} - L_{21}
        L_{21}^\top)`."""
        host, dev = self._layout_tables()
        info = _ops.call(_ops.dual_cholesky_, self.l, host, dev, r0, r1, self.capacity,
                         self.shift, False)
        bad = torch.nonzero(info).flatten().tolist()
        if bad:
            b = self.block_ids[bad[0]]
            raise NotPositiveDefiniteError(
                f"{what}: the kernel of dual block {b} (parameters {self.layout.starts[b]}.."
                f"{self.layout.starts[b] + self.layout.sizes[b]}) is not positive definite at "
                f"row {int(info[bad[0]])}" + (f" (and {len(bad) - 1} other blocks)"
                                              if len(bad) > 1 else ""))

    def update(self, grads, *, chunk_size: int | None = None) -> "DualBlocks":
        r"""Appends rows: every block becomes the inverse of
        :math:`F_b + \frac{1}{N}\sum_j g_{j,b} g_{j,b}^\top` (same :math:`N`), its factor
        extended in float64 (:meth:`_factor`).

        Args:
            grads: ``(m, d)`` tensor or an iterable of such chunks, the blocks' dtype and device.
            chunk_size: rows per kernel call (default: each chunk at once).

        Raises:
            NotPositiveDefiniteError: a kernel lost positive definiteness (only through overflow
                or NaN; nothing is changed).
        """
        total = grads.shape[0] if isinstance(grads, torch.Tensor) and grads.dim() == 2 else None
        r0 = at = self.num_rows
        for chunk in _chunks(grads, "grads", chunk_size, dim=self.dim, dtype=self.dtype,
                             device=self.device):
            if chunk.shape[0]:  # written only beyond the stored rows
                self._append(chunk, at, None if total is None else r0 + total)
                at += chunk.shape[0]
        if at > r0:
            self._factor(r0, at, "update")
            self.num_rows = at
        return self

    # ---- removing rows ----
    def _runs(self, k: int):
        """``(first, count)`` runs of blocks of one size next to each other in the layout,
        ``count`` bounded so that matching ``k`` rows takes about :data:`_MATCH_BYTES`."""
        i = 0
        while i < self.num_blocks:
            s = self._sizes[i]
            most = max(1, _MATCH_BYTES // (8 * k * (self.num_rows + 2 * s) + 1))
            j = i + 1
            while j < self.num_blocks and j - i < most and self._sizes[j] == s and \
                    self.block_ids[j] == self.block_ids[j - 1] + 1:
                j += 1
            yield i, j - i
            i = j

    def _match(self, rows: torch.Tensor, rtol: float) -> tuple:
        """The plan of a removal: per block the stored rows that ``rows`` name
        (:mod:`~ssse_ext.blocks.matching`); ``RowNotFoundError`` when one is missing."""
        k, R, c = rows.shape[0], self.num_rows, self.capacity
        if k > R:
            raise RowNotFoundError(f"cannot remove {k} rows: the dual blocks hold {R}")
        removed = torch.empty(self.num_blocks, k, dtype=torch.int64)
        for i0, nb in self._runs(k):
            s, st = self._sizes[i0], self.layout.starts[self.block_ids[i0]]
            stored = self.g[c * self._prefix[i0]:c * self._prefix[i0 + nb]].view(nb, c, s)[:, :R]
            found = match_run(stored, rows[:, st:st + nb * s].reshape(k, nb, s).transpose(0, 1),
                              float(rtol))
            for j in range(nb):
                idx = found[j]
                if idx is None:  # not confirmed at once: the exact search, block by block
                    b = self.block_ids[i0 + j]
                    idx = match_rows(self.rows_of(b), rows[:, self.layout.slice(b)],
                                     float(rtol), b, self.layout)
                removed[i0 + j] = torch.tensor(sorted(idx), dtype=torch.int64)
        mask = torch.ones(self.num_blocks, R, dtype=torch.bool)
        mask.scatter_(1, removed, False)
        keep = torch.arange(R).expand(self.num_blocks, R)[mask].view(self.num_blocks, R - k)
        first = int(removed[:, 0].min()) if self.num_blocks else 0
        return "remove", keep, removed, first

    def _remove(self, keep: torch.Tensor, removed: torch.Tensor, first: int) -> None:
        """Deletes the matched rows; the factors of the smaller kernels are computed in float64
        (CPU: stable Cholesky updates, :math:`O(k R^2)`; CUDA: a refactor of the trailing
        part)."""
        host, dev = self._layout_tables()
        info = _ops.call(_ops.dual_remove_rows_, self.g, self.l, host, dev, self.num_rows,
                         self.capacity, keep.contiguous().to(self.device),
                         removed.to(self.device), first)
        if bool(info.any()):  # not reachable for finite rows: the updates keep K_b positive
            raise NotPositiveDefiniteError("downdate: a refactored kernel is not positive "
                                           f"definite (info {info.tolist()})")
        self.num_rows -= removed.shape[1]

    def downdate(self, grads, *, rtol: float | None = None) -> "DualBlocks":
        r"""Removes stored rows: every block becomes the dual form built from the remaining rows
        (same :math:`N`), the leave-k-out Fisher's inverse.

        Each row is looked up among the stored rows of *each* block
        (:mod:`~ssse_ext.blocks.matching`): the closest unclaimed stored row within ``rtol``
        is taken, and a stored row is removed at most once (a row added twice is removed
        twice). Matched rows are deleted from ``G_b`` in order.

        Args:
            grads: ``(k, d)`` tensor or iterable of chunks, the blocks' dtype and device.
            rtol: matching tolerance, default :data:`MATCH_RTOL` of the dtype (float32 3.5e-4,
                float64 1.5e-8).

        Raises:
            RowNotFoundError: a row is not among the stored rows of some block (a membership
                check the dense form cannot do); nothing is changed.
        """
        if rtol is None:
            rtol = MATCH_RTOL[self.dtype]
        elif isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or \
                not (0 <= float(rtol) < 1):
            raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}")
        chunks = [c for c in _chunks(grads, "grads", dim=self.dim, dtype=self.dtype,
                                     device=self.device) if c.shape[0]]
        if chunks:
            self.write(self._match(torch.cat(chunks) if len(chunks) > 1 else chunks[0], rtol))
        return self

    def check_change(self, rows, sign, *, method, chunk_size, what):
        # Exact whatever the method: an added row extends the factors in the spare capacity
        # (nothing stored changes until write), a removed row must be found.
        if sign < 0:
            return self._match(rows, MATCH_RTOL[self.dtype])
        r0 = self.num_rows
        for i in range(0, rows.shape[0], chunk_size or rows.shape[0]):
            self._append(rows[i:i + (chunk_size or rows.shape[0])], r0 + i, r0 + rows.shape[0])
        self._factor(r0, r0 + rows.shape[0], what)
        return "add", r0 + rows.shape[0]

    def write(self, plan) -> None:
        if plan[0] == "add":
            self.num_rows = plan[1]
        else:
            self._remove(*plan[1:])

    # ---- the Woodbury form in float64 ----
    def woodbury(self, rows: torch.Tensor, sign: int, what: str, *, shift: float = 0.0,
                 keep: bool = False, rhs: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> list:
        r"""Checks every block, one at a time in float64, like
        :meth:`~ssse_ext.blocks.DenseStore.woodbury`: with :math:`\lambda' = \lambda - \mathrm{
        shift}` and :math:`K' = \lambda' N I + G_b G_b^\top = L' L'^\top` (:math:`L' = L_b`
        without a shift, else refactored), :math:`F'^{-1}` is :class:`_DualSolve`; then the
        rows :math:`R_b` by the :math:`k \times k` form, :math:`U = F'^{-1} R_b^\top`,
        :math:`C = N I_k + \mathrm{sign}\,R_b U`. Returns the kept factors."""
        N, lam = self.normalizer, self.damping - shift
        parts = []
        for b in self.block_ids:
            st, s = self.layout.starts[b], self.layout.sizes[b]
            if not lam > 0:
                raise NotPositiveDefiniteError(
                    f"{what}: dual block {b} (parameters {st}..{st + s}) would not stay "
                    f"positive definite: the shift {shift:g} is not below the damping "
                    f"{self.damping:g}. Nothing was changed")
            g, chol_k = self.rows_of(b), self.factor_of(b).tril()
            if shift:
                kk = chol_k @ chol_k.T - shift * N * torch.eye(g.shape[0], dtype=torch.float64,
                                                               device=g.device)
                chol_k, info_k = torch.linalg.cholesky_ex(kk)
                if int(info_k):
                    raise NotPositiveDefiniteError(
                        f"{what}: the kernel of dual block {b} (parameters {st}..{st + s}) is "
                        f"not positive definite after the shift {shift:g}. Nothing was changed")
            solve = _DualSolve(g, chol_k, lam)
            r = rows[:, st:st + s].T.to(torch.float64)                      # (s, k)
            u = solve(r)
            chol = checked_cholesky(inner_matrix(u[None], r.T[None], sign, N), what,
                                    self.layout, (b,), scale=N, kind="dual ")[0]
            if keep:
                parts.append((st, s, solve, u, chol))
            if rhs is not None:
                DualFactors([(st, s, solve, u, chol)], sign).solve(rhs, out)
        return parts

    def change_nbytes(self, k, *, method="woodbury", keep=False, shift=0.0):
        R = self.num_rows
        work = max((8 * (3 * s * k + 2 * R * k + k * k) for s in self._sizes), default=0)
        if shift:
            work += 16 * R * R * (1 if self.num_blocks else 0)
        return work, sum(8 * (s * k + k * k) for s in self._sizes)

    def without(self, rows, sign, *, what):
        return DualFactors(self.woodbury(rows, sign, what, keep=True), sign)

    def solve_changed(self, rows, rhs, out, *, sign, shift, what):
        self.woodbury(rows, sign, what, shift=shift, rhs=rhs, out=out)

    # ---- copies and files ----
    def _nbytes(self, capacity: int, dtype: torch.dtype) -> int:
        return sum(dual_nbytes(s, capacity, dtype) for s in self._sizes)

    def packed_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of a compact copy (no spare capacity, ``G`` in ``dtype``, default its own):
        what :meth:`to` and :meth:`to_state` allocate."""
        return self._nbytes(self.num_rows, dtype or self.dtype)

    copy_nbytes = packed_nbytes

    def _like(self, g: torch.Tensor, l: torch.Tensor, capacity: int) -> "DualBlocks":
        return DualBlocks(self.layout, self.block_ids, g, l, num_rows=self.num_rows,
                          capacity=capacity, damping=self.damping, normalizer=self.normalizer)

    def clone(self, *, max_memory: int | None = None) -> "DualBlocks":
        """A copy (spare capacity included); refused with
        :class:`~ssse_ext.errors.InsufficientMemoryError` when it does not fit in
        ``max_memory`` bytes (default what the device has free, :mod:`ssse_ext.budget`)."""
        check_memory("DualBlocks.clone", self.nbytes, self.device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} dual blocks",
                     remedies=COPY_REMEDIES)
        return self._like(self.g.clone(), self.l.clone(), self.capacity)

    def _packed(self, dtype=None, device=None, *, rows: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """G (``None`` without ``rows``) and L without spare capacity (new tensors), each block
        copied straight into place: a concatenation would hold a second copy of the whole."""
        R, c = self.num_rows, self.capacity
        device = self.device if device is None else device
        g = torch.empty(R * sum(self.sizes) if rows else 0, dtype=dtype or self.dtype,
                        device=device)
        l = torch.empty(self.num_blocks * R * R, dtype=torch.float64, device=device)
        o = 0
        for s, go in zip(self.sizes, self._g_offsets(c)) if rows else ():
            g[o:o + R * s].view(R, s).copy_(self.g[go:go + c * s].view(c, s)[:R])
            o += R * s
        for i in range(self.num_blocks):
            l[i * R * R:(i + 1) * R * R].view(R, R).copy_(
                self.l[i * c * c:(i + 1) * c * c].view(c, c)[:R, :R].tril())
        return (g if rows else None), l

    def to(self, device=None, dtype: torch.dtype | None = None, *,
           max_memory: int | None = None) -> "DualBlocks":
        """A compact copy on ``device`` and/or with ``G`` in ``dtype`` (the factor stays
        float64); refused with :class:`~ssse_ext.errors.InsufficientMemoryError` when it does
        not fit in ``max_memory`` bytes (default what ``device`` has free)."""
        check_dtype(dtype)
        check_memory("DualBlocks.to", self.packed_nbytes(dtype),
                     self.device if device is None else device, max_memory=max_memory,
                     detail=f"a compact copy of the {format_bytes(self.nbytes)} dual blocks",
                     remedies=COPY_REMEDIES)
        g, l = self._packed(dtype, device)
        return self._like(g, l, self.num_rows)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors ``g`` (the rows) and ``l`` (the factors), without spare capacity, and the
        number of rows."""
        if self.capacity == self.num_rows:  # G is compact already: no copy of the largest part
            g, l = self.g, self._packed(rows=False)[1]
        else:
            g, l = self._packed()
        return {"g": g, "l": l}, {"num_rows": self.num_rows}

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """:meth:`state` with everything else the blocks need in the metadata (a file of
        dual blocks alone)."""
        tensors, meta = self.state()
        meta.update(damping=self.damping, normalizer=self.normalizer,
                    layout=self.layout.to_dict(), blocks=list(self.block_ids),
                    dtype=str(self.dtype).removeprefix("torch."))
        return tensors, meta

    @classmethod
    def from_state(cls, tensors, meta, *, layout=None, block_ids=None, damping=None,
                   normalizer=None, dtype=None) -> "DualBlocks":
        """Inverse of :meth:`to_state` (or of :meth:`state`, given what the inverse records);
        validates the metadata and the tensors' sizes."""
        try:
            layout = BlockLayout.from_dict(meta["layout"]) if layout is None else layout
            rows = int(meta["num_rows"])
            ids = [int(b) for b in meta["blocks"]] if block_ids is None else block_ids
            return cls(layout, ids, tensors["g"], tensors["l"], num_rows=rows, capacity=rows,
                       damping=float(meta["damping"] if damping is None else damping),
                       normalizer=float(meta["normalizer"] if normalizer is None
                                        else normalizer))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a valid dual-blocks state: missing or bad {exc}") from None

    # ---- costs ----
    @classmethod
    def nbytes_for(cls, size, rows, dtype):
        return math.inf if rows is None else dual_nbytes(size, rows, dtype)

    @classmethod
    def state_nbytes(cls, sizes, meta, dtype):
        rows = int(meta["num_rows"])
        return sum(dual_nbytes(s, rows, dtype) for s in sizes)

    @classmethod
    def build_cost(cls, layout, block_ids, *, rows, dtype, device, method):
        held = sum(dual_nbytes(layout.sizes[b], rows, dtype) for b in block_ids)
        return BuildCost(held, held, held,
                         f"{len(block_ids)} dual blocks of {rows} rows: {format_bytes(held)}")

    @classmethod
    def builder(cls, layout, block_ids, *, dtype, device, method, damping, normalizer, rows,
                probe=None, max_memory=None):
        return DualBuilder(layout, block_ids, dtype, device, damping=damping,
                           capacity=rows or 1, exact=rows is not None, compact=rows is None,
                           probe=probe)

    def __repr__(self) -> str:
        return (f"DualBlocks(dim={self.dim}, blocks={list(self.block_ids)}, "
                f"num_rows={self.num_rows}, damping={self.damping:g}, "
                f"normalizer={self.normalizer:g}, dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes})")


class DualBuilder(StoreBuilder):
    """Streams rows into :class:`DualBlocks`: each chunk is copied into ``G`` and the new rows
    of every kernel Gram matrix are accumulated in float64 against all rows so far; at the end
    every kernel is factorised (:math:`N` is then known).

    Args:
        capacity: rows reserved up front.
        exact: whether ``capacity`` is the number of rows (reserved once), else it doubles.
        compact: whether to drop the spare capacity at the end.
        probe: a :class:`~ssse_ext.health.FisherProbe` fed every chunk, or ``None``.
    """

    def __init__(self, layout, block_ids, dtype, device, *, damping, capacity: int,
                 exact: bool, compact: bool, probe=None):
        block_ids = block_ids_of(layout, block_ids)
        total = sum(layout.sizes[b] for b in block_ids)
        self.blocks = DualBlocks(
            layout, block_ids, torch.zeros(capacity * total, dtype=dtype, device=device),
            torch.zeros(len(block_ids) * capacity * capacity, dtype=torch.float64,
                        device=device),
            num_rows=0, capacity=capacity, damping=damping, normalizer=1.0)
        self.total = capacity if exact else None
        self.compact, self.probe, self.rows = compact, probe, 0

    def add(self, rows):
        if not rows.shape[0]:
            return
        self.blocks._append(rows, self.rows, self.total)
        if self.probe is not None:
            self.probe.add(rows, blocks=self.blocks.block_ids)
        self.rows += rows.shape[0]

    def finish(self, normalizer):
        out = self.blocks
        out.normalizer = normalizer
        out._factor(0, self.rows, "build")
        out.num_rows = self.rows
        return out.compact() if self.compact else out
