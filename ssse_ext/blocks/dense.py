r"""Dense blocks: every :math:`F_b^{-1}` held in full (``name = "dense"``).

The blocks are held in packed storage (see :class:`~ssse_ext.BlockLayout`: one
:math:`s_b \times s_b` matrix after another) as one or more *segments*, 1-D tensors covering
consecutive blocks of the store, so that a build never needs one allocation of the whole
inverse next to its accumulators. Apply, update and downdate run in the kernels
(:mod:`ssse_ext._ops`); the checks of a change, :meth:`DenseStore.without` and
:meth:`DenseStore.solve_changed` run the Woodbury form in float64 with torch, a bounded batch
of equal-size blocks at a time, and on the CPU a change of a few rows is then written from the
factors of its check (a batched GEMM per batch) instead of the kernel, which would compute them
again.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .. import _ops
from ..budget import COPY_REMEDIES, check_memory, format_bytes
from ..layout import BlockLayout
from ..lowrank import (WOODBURY_ELEMENTS, check_pivots, checked_cholesky, inner_matrix,
                       overflow_error, shifted_factor, solve_kept)
from ..validation import FLOAT_DTYPES, check_dtype
from .base import (BlockStore, BuildCost, ChangeFactors, StoreBuilder, copied_to,
                   element_size)
from .dense_gram import (DenseGram, cuda_workspace, dense_build_nbytes, gram_build_workspace,
                         raise_if_failed)

__all__ = ["DenseStore"]

# float64 copies of a run of blocks that a Woodbury check holds at once when it factors the
# blocks themselves (more rows than parameters, or a shift): the block, its Cholesky factor,
# the inner matrix and its factor, and one temporary.
_WOODBURY_COPIES = 5
# The factors a checked change keeps for its write take at most this share of the store's
# bytes (k <= 64 rows on float32 blocks of 256); a larger change is written by the kernel.
_KEPT_SHARE = 0.5


def _run_budget(k: int):
    return lambda s: WOODBURY_ELEMENTS // (s * (s + 2 * k))


class _KernelFactors(NamedTuple):
    r"""What :meth:`DenseStore._kernel_check` keeps of a segment for its write: the segment,
    the rows' count, the kernel's :math:`W_b^\top` of its blocks and the layout table of
    those blocks (the segment's blocks at least ``k`` wide)."""

    segment: int
    k: int
    wt: torch.Tensor
    table: torch.Tensor


class DenseFactors(ChangeFactors):
    """Per batch of blocks ``(start, count, size, kind, left, chol)``: ``kind`` is
    ``"correction"`` (``left`` = U, ``chol`` of C) or ``"factor"`` (``left`` = L, ``chol`` of
    A); see :meth:`DenseStore.woodbury`."""

    def __init__(self, parts: list, sign: int):
        self.parts, self.sign = parts, sign

    def solve(self, v: torch.Tensor, out: torch.Tensor) -> None:
        for st, n, s, kind, left, chol in self.parts:
            vb = v[st:st + n * s].reshape(n, s, -1)
            inner = torch.cholesky_solve(left.transpose(1, 2) @ vb, chol)
            if kind == "correction":
                res = out[st:st + n * s].reshape(n, s, -1) - self.sign * (left @ inner)
            else:
                res = left @ inner
            out[st:st + n * s] = res.reshape(n * s, -1)


class DenseStore(BlockStore):
    """Dense inverses of the blocks ``block_ids`` of ``layout``.

    Args:
        layout, block_ids: the blocks held (increasing ids).
        segments: 1-D float32 or float64 tensors (one, or a sequence) whose concatenation is
            the packed storage of the blocks in order, each ending on a block boundary; at
            least one (a store without blocks holds an empty one, for its dtype and device).
        damping, normalizer: :math:`\\lambda` and :math:`N`.
    """

    name = "dense"
    prefix = "packed"
    methods = ("cholesky", "sherman_morrison", "woodbury")

    def __init__(self, layout: BlockLayout, block_ids: Sequence[int], segments, *,
                 damping: float, normalizer: float):
        super().__init__(layout, block_ids, damping=damping, normalizer=normalizer)
        segments = [segments] if isinstance(segments, torch.Tensor) else list(segments)
        if not segments or not all(isinstance(t, torch.Tensor) for t in segments):
            raise TypeError("packed must be a 1-D tensor or a non-empty sequence of them")
        ids = self.block_ids
        self._bounds, self._where = [0], {}
        pos = 0
        for j, t in enumerate(segments):
            if t.dim() != 1 or t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"packed[{j}] must be a 1-D float32 or float64 tensor, got "
                                f"{t.dtype} of shape {tuple(t.shape)}")
            if t.dtype != segments[0].dtype or t.device != segments[0].device:
                raise ValueError(f"packed[{j}] is {t.dtype} on {t.device}, the inverse is "
                                 f"{segments[0].dtype} on {segments[0].device}")
            numel = 0
            while pos < len(ids) and numel < t.numel():
                self._where[ids[pos]] = (j, numel)
                numel += layout.sizes[ids[pos]] ** 2
                pos += 1
            if numel != t.numel():
                raise ValueError(f"packed[{j}] has {t.numel()} elements, which do not end on a "
                                 f"block boundary of the layout")
            self._bounds.append(pos)
        if pos != len(ids):
            raise ValueError(f"packed has {sum(t.numel() for t in segments)} elements, the "
                             f"dense blocks of the layout need "
                             f"{sum(layout.sizes[b] ** 2 for b in ids)}")
        self._segments = [t.contiguous() for t in segments]
        self._tables: dict = {}

    # ---- what is held ----
    dtype = property(lambda self: self._segments[0].dtype)
    device = property(lambda self: self._segments[0].device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._segments)

    @property
    def segments(self) -> tuple[torch.Tensor, ...]:
        """The packed storage, one 1-D tensor per range of blocks."""
        return tuple(self._segments)

    @property
    def packed(self) -> torch.Tensor:
        """The packed storage as one 1-D tensor (a copy when held in several segments)."""
        if len(self._segments) == 1:
            return self._segments[0]
        check_memory("BlockInverseFisher.packed", self.nbytes, self.device,
                     detail="one tensor of the dense blocks' segments",
                     remedies=("read the segments (BlockInverseFisher.segments) instead",))
        return torch.cat(self._segments)

    def _segment_ids(self, j: int) -> tuple[int, ...]:
        return self.block_ids[self._bounds[j]:self._bounds[j + 1]]

    def _segment_tables(self) -> list:
        """Per segment: (storage, host table, device table), offsets within the segment."""
        key = self.device
        tables = self._tables.get(key)
        if tables is None:
            tables = []
            for j in range(len(self._segments)):
                host = self.layout.table(blocks=self._segment_ids(j))
                tables.append((host, host if key.type == "cpu" else host.to(key)))
            self._tables = {key: tables}
        return [(seg, host, dev) for seg, (host, dev) in zip(self._segments, tables)]

    def block(self, b: int) -> torch.Tensor:
        b = self.block_ids[self.position(b)]
        j, o = self._where[b]
        s = self.layout.sizes[b]
        return self._segments[j][o:o + s * s].view(s, s)

    def dense_block(self, b: int) -> torch.Tensor:
        return self.block(b).clone()

    def apply_into(self, v, base, scale, out) -> None:
        for seg, host, dev in self._segment_tables():
            if seg.numel():
                _ops.call(_ops.apply_inverse, seg, host, dev, v, base, float(scale), out)

    # ---- the Woodbury form in float64 ----
    def _float64_batches(self, k: int, below: int | None = None):
        """``(segment, offset, first block, count, size, blocks)`` per batch of equal-size
        blocks (:func:`_run_budget`), ``blocks`` the batch's ``(count, size, size)`` blocks in
        float64: a view of the storage for a float64 store, else the batch converted into one
        scratch buffer reused by every batch (nothing of the store's size is converted at
        once, and nothing is allocated per batch). The view or buffer is valid until the next
        batch. ``below``: only the blocks narrower than that."""
        budget = _run_budget(k)
        plan = [(j, b0, n, s) for j in range(len(self._segments))
                for b0, n, s in self.layout.runs(budget, blocks=self._segment_ids(j))
                if below is None or s < below]
        scratch = None
        if self.dtype != torch.float64 and plan:
            numel = max(n * s * s for _, _, n, s in plan)
            scratch = torch.empty(numel, dtype=torch.float64, device=self.device)
        for j, b0, n, s in plan:
            o = self._where[b0][1]
            view = self._segments[j][o:o + n * s * s].view(n, s, s)
            if scratch is None:
                yield j, o, b0, n, s, view
            else:
                yield j, o, b0, n, s, scratch[:n * s * s].view(n, s, s).copy_(view)

    def woodbury(self, rows: torch.Tensor, sign: int, what: str, *, keep: bool = False,
                 shift: float = 0.0, rhs: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, write: bool = False,
                 applied: tuple | None = None) -> list:
        r"""Checks, for every block, that :math:`M_b = F_b + \mathrm{sign}\,R_b^\top R_b / N
        - \mathrm{shift}\,I` stays positive definite with the margin; writes nothing to the
        store. With ``keep``, returns the factors of every batch of blocks (for
        :class:`DenseFactors`); with ``write``, the factors :meth:`write` rewrites the blocks
        from (:meth:`check_change`); with ``rhs`` (``(d, r)`` float64), writes
        :math:`M^{-1}\,\mathrm{rhs}` into ``out``. Batches of equal-size blocks, float64
        (:meth:`_float64_batches`), each a few batched operations:

        - :math:`k \le s` and no shift: :math:`U = F_b^{-1} R_b^\top`,
          :math:`C = N I_k + \mathrm{sign}\,R_b U = L_C L_C^\top`, :math:`M^{-1} = F_b^{-1} -
          \mathrm{sign}\,U C^{-1} U^\top` (kept: :math:`U` and :math:`L_C`; for the write:
          :math:`W^\top = L_C^{-1} U^\top`, :math:`M^{-1} = F_b^{-1} - \mathrm{sign}\,W W^\top`);
        - otherwise: :math:`F_b^{-1} = L L^\top`,
          :math:`A = I_s + \mathrm{sign}\,(R_b L)^\top (R_b L) / N - \mathrm{shift}\,L^\top L
          = L_A L_A^\top`, :math:`M^{-1} = L A^{-1} L^\top` (kept: :math:`L` and :math:`L_A`;
          for the write: :math:`Z = L_A^{-1} L^\top`, :math:`M^{-1} = Z^\top Z`).

        :math:`C / N` and :math:`A` have the same spectrum up to eigenvalues 1 (without a
        shift), so the margin means the same in both. The inverse of a triangular factor is
        taken once (:math:`k \times k` or :math:`s \times s`) and applied by a batched
        product: a batched triangular solve with many right-hand sides runs block by block.
        With ``write`` on the CPU, the kernels check the blocks at least ``k`` wide instead
        (:meth:`_kernel_check`), and the batches above the narrower ones. ``applied``:
        ``(v, out, changed)`` of :meth:`check_and_apply`, whose products are written into
        ``out`` from the same pass (:math:`F_b^{-1} v_b`, or with ``changed``
        :math:`M^{-1} v_b`).
        """
        k, N = rows.shape[0], self.normalizer
        factors, below = [], None
        if write and self._kernel_writes(k) and rhs is None and not keep and shift == 0:
            factors = self._kernel_check(rows, sign, what, applied)
            if min(self.sizes) >= k:
                return factors
            below = k  # the narrower blocks: the batches below
        v64 = None if applied is None else applied[0].to(torch.float64)
        for j, o, b0, n, s, f in self._float64_batches(k, below):
            st = self.layout.starts[b0]
            ids = range(b0, b0 + n)
            # the batch's rows in float64, (n, k, s): 8 k n s bytes, as change_nbytes counts
            r = rows[:, st:st + n * s].to(torch.float64).view(k, n, s).transpose(0, 1)
            fv = None
            if k <= s and shift == 0:
                if v64 is None:
                    u = f @ r.transpose(1, 2)                                   # (n, s, k)
                else:  # F_b^{-1} v_b from the same product
                    u = f @ torch.cat([r.transpose(1, 2),
                                       v64[st:st + n * s].view(n, s, -1)], dim=2)
                    u, fv = u[..., :k], u[..., k:]
                chol = checked_cholesky(inner_matrix(u, r, sign, N), what, self.layout, ids,
                                        scale=N)
                kept = (st, n, s, "correction", u, chol)
            else:
                lf, info_f = torch.linalg.cholesky_ex(f)
                rl = r @ lf                                                     # (n, k, s)
                chol = shifted_factor(lf, rl.transpose(1, 2), sign, N, shift, what,
                                      self.layout, ids, info=info_f)
                kept = (st, n, s, "factor", lf, chol)
            if keep:
                factors.append(kept)
            elif write:
                # U (n, s, k) -> W^T (n, k, s); L (n, s, s) -> Z (n, s, s)
                eye = torch.eye(chol.shape[-1], dtype=torch.float64, device=chol.device)
                inverse = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
                factors.append((j, o, n, s, kept[3], inverse @ kept[4].transpose(1, 2)))
            if rhs is not None or applied is not None:
                sl = slice(st, st + n * s)
                vb = (rhs if rhs is not None else v64)[sl].reshape(n, s, -1)
                if rhs is not None or applied[2]:  # the changed blocks
                    res = solve_kept(kept, vb, sign, lambda v: f @ v if fv is None else fv)
                else:
                    res = f @ vb if fv is None else fv
                (out if rhs is not None else applied[1])[sl] = res.reshape(n * s, -1)
        return factors

    def _kernel_writes(self, k: int) -> bool:
        """Whether a checked change of ``k`` rows runs in the CPU kernels, on its blocks at
        least ``k`` wide (narrower blocks take torch's batched float64 products, the
        Woodbury identity's other form)."""
        return self.device.type == "cpu" and k <= max(self.sizes, default=0)

    def _kernel_check(self, rows: torch.Tensor, sign: int, what: str,
                      applied: tuple | None = None) -> list:
        r""":meth:`woodbury`'s check with ``write`` in the CPU kernels, on the blocks at least
        ``k`` wide (one pass reads each block in its own dtype for the check, one more writes
        it; no float64 copy of any block): the factors :math:`W_b^\top` of those blocks of
        every segment, after every one's pivots passed; with ``applied`` ``(v, out,
        changed)``, their products of :meth:`check_and_apply` added into ``out`` from the same
        pass."""
        v, out, changed = applied if applied is not None else (None, None, False)
        k = rows.shape[0]
        kept, infos, pivots, ids = [], [], [], []
        for j, (seg, host, _) in enumerate(self._segment_tables()):
            wide = host[:, 1] >= k  # the table's rows: start, size, offset
            if not seg.numel() or not bool(wide.any()):
                continue
            table = host if bool(wide.all()) else host[wide].contiguous()
            wt, piv, info, part = _ops.call(_ops.woodbury_check, seg, table, rows,
                                            float(self.normalizer), int(sign), v, changed)
            if v is not None:
                lo, hi = _ops.check_rows(table)
                out[lo:hi] += part  # zeros outside these blocks' rows
            kept.append(_KernelFactors(j, k, wt, table))
            infos.append(info)
            pivots.append(piv)
            ids += [b for b, w in zip(self._segment_ids(j), wide.tolist()) if w]
        if infos:
            info, piv = torch.cat(infos), torch.cat(pivots)
            if bool((info == -1).any()):
                raise overflow_error(what, self.layout, ids[int(torch.nonzero(info == -1)[0])])
            check_pivots(info, piv, what, self.layout, ids)
        return kept

    def _bounded(self, rows: torch.Tensor) -> bool:
        r"""Whether every product of an update by ``rows`` stays far inside float64: with
        :math:`F_b^{-1} \preceq I / \lambda`, the entries of :math:`R_b F_b^{-1} R_b^\top` are at
        most :math:`\max_i \lVert r_i\rVert^2 / \lambda`."""
        if rows.dtype == torch.float32:  # a float32 row's squared norm is below d * 3.4e38^2
            top = rows.shape[1] * float(torch.finfo(torch.float32).max) ** 2
        else:
            top = 0.0
            for i in range(0, rows.shape[0], 64):  # an overflow to inf only refuses
                top = max(top, float(rows[i:i + 64].pow(2).sum(1).max()))
        return top / self.damping + self.normalizer <= 1e290

    def _writes_factors(self, k: int) -> bool:
        """Whether a change of ``k`` rows rewrites the blocks from the factors of its check
        (on the CPU, when they take at most :data:`_KEPT_SHARE` of the store) rather than in
        the kernel, which computes them again."""
        return self.device.type == "cpu" and \
            self._kept_bytes(k) <= _KEPT_SHARE * self.nbytes

    def _kept_bytes(self, k: int) -> int:
        """Bytes of the factors a checked change of ``k`` rows keeps for its write: per block
        :math:`W^\top` (``k x s``) or, for blocks smaller than ``k``, :math:`Z` (``s x s``)."""
        return sum(8 * s * min(s, k) for s in self.sizes)

    def change_nbytes(self, k, *, method="woodbury", keep=False, shift=0.0):
        if method == "sherman_morrison" and not keep and not shift:
            return 0, 0  # no float64 check: check_change refuses its copy itself
        converted = 0 if self.dtype == torch.float64 else 1  # float32 blocks are converted
        factors = method == "woodbury" and not keep and not shift and self._writes_factors(k)
        work = kept = 0
        for _, n, s in self.layout.runs(_run_budget(k), blocks=self.block_ids):
            if k <= s and shift == 0:
                # the converted batch, U, R and C (and their factors); a write from the
                # factors holds less: the converted batch
                work = max(work, 8 * n * (converted * s * s + 3 * s * k + 3 * k * k))
                kept += 8 * n * (s * k + k * k)
            else:
                work = max(work, 8 * n * (_WOODBURY_COPIES * s * s + 2 * k * s))
                kept += 16 * n * s * s
        if factors:
            work += self._kept_bytes(k)  # held from the check to the write
        return work, kept

    def without(self, rows, sign, *, what):
        return DenseFactors(self.woodbury(rows, sign, what, keep=True), sign)

    def solve_changed(self, rows, rhs, out, *, sign, shift, what):
        self.woodbury(rows, sign, what, shift=shift, rhs=rhs, out=out)

    # ---- changes in place ----
    def check_change(self, rows, sign, *, method, chunk_size, what):
        if method == "woodbury":
            factors = self._writes_factors(rows.shape[0])
            if sign > 0 and not factors and self._bounded(rows):
                # F + R^T R / N >= F stays positive definite and no product can overflow: the
                # kernel's write cannot fail, so there is nothing to check first
                return rows, sign, method, chunk_size, what, None, None
            # every block is checked first: the writes cannot then fail, so no copy of the
            # store is needed for atomicity
            kept = self.woodbury(rows, sign, what, write=factors)
            return rows, sign, method, chunk_size, what, None, kept if factors else None
        # The literal recurrence can fail part-way in float32 where the result is still
        # positive definite (its intermediate inverses are worse conditioned): it runs on
        # copies, swapped in by write().
        check_memory(what, self.nbytes, self.device,
                     detail=f'a copy of the dense blocks for method="{method}"',
                     remedies=('use method="woodbury" (the default), which checks '
                               'every block first and then works in place',))
        work = [seg.clone() for seg in self._segments]
        self._recur(work, rows, sign, method, chunk_size, what)
        return rows, sign, method, chunk_size, what, work, None

    def check_and_apply(self, rows, sign, v, out, *, changed, method, chunk_size, what):
        if method != "woodbury" or not self._writes_factors(rows.shape[0]):
            return super().check_and_apply(rows, sign, v, out, changed=changed, method=method,
                                           chunk_size=chunk_size, what=what)
        # one pass over the blocks: the check's factors and the products of v
        kept = self.woodbury(rows, sign, what, write=True, applied=(v.contiguous(), out, changed))
        return rows, sign, method, chunk_size, what, None, kept

    def write(self, plan) -> None:
        rows, sign, method, chunk_size, what, work, kept = plan
        if kept is not None:
            self._write_factors(kept, sign)
        elif work is None:
            self._recur(self._segments, rows, sign, method, chunk_size, what)
        else:
            self._segments = work

    def _write_factors(self, kept: list, sign: int) -> None:
        r"""Rewrites every block from the factors of its check (:meth:`woodbury` with
        ``write``), a batch at a time, in float64 rounded once to the store's dtype:
        :math:`F_b^{-1} - \mathrm{sign}\,W W^\top` in one batched GEMM onto the converted
        blocks (as the kernel adds its rank-k term), or :math:`Z^\top Z`. A GEMM gives the
        product of a matrix with its own transpose bitwise symmetric (the same products summed
        in the same order), so the blocks stay so: that is checked on the first block, and a
        GEMM that does not is followed by a symmetrisation from the lower triangle, as the
        kernel keeps its blocks."""
        for j, k, wt, table in (f for f in kept if isinstance(f, _KernelFactors)):
            _ops.call(_ops.woodbury_write_, self._segments[j], table, wt, k, int(sign))
        kept = [f for f in kept if not isinstance(f, _KernelFactors)]  # the narrower blocks
        if not kept:
            return
        scratch = None
        if self.dtype != torch.float64:
            numel = max(n * s * s for _, _, n, s, _, _ in kept)
            scratch = torch.empty(numel, dtype=torch.float64, device=self.device)
        symmetric = None
        for j, o, n, s, kind, m in kept:
            view = self._segments[j][o:o + n * s * s].view(n, s, s)
            f = view if scratch is None else scratch[:n * s * s].view(n, s, s)
            if kind == "correction":
                if scratch is not None:
                    f.copy_(view)
                f.baddbmm_(m.transpose(1, 2), m, alpha=-sign)
            else:
                torch.bmm(m.transpose(1, 2), m, out=f)
            if symmetric is None:
                symmetric = torch.equal(f[0], f[0].T)
            if not symmetric:
                lower = torch.ones(s, s, dtype=torch.bool, device=f.device).tril()
                f.copy_(torch.where(lower, f, f.transpose(1, 2)))
            if f is not view:
                view.copy_(f)

    def _recur(self, segments, rows, sign, method, chunk_size, what) -> None:
        """Paper eq. 7 (or its rank-64 Woodbury steps) on ``segments``, laid out like the
        store's own."""
        step = chunk_size or rows.shape[0]
        for j, (seg, (_, host, dev)) in enumerate(zip(segments, self._segment_tables())):
            if not seg.numel():
                continue
            for i in range(0, rows.shape[0], step):
                info = _ops.call(_ops.sherman_morrison_, seg, host, dev, rows[i:i + step],
                                 self.normalizer, sign, method == "woodbury")
                raise_if_failed(info, what, self.layout, "row", self._segment_ids(j))

    # ---- copies and files ----
    def copy_nbytes(self, dtype=None):
        return sum(t.numel() for t in self._segments) * element_size(dtype or self.dtype)

    def _like(self, segments) -> "DenseStore":
        return DenseStore(self.layout, self.block_ids, segments, damping=self.damping,
                          normalizer=self.normalizer)

    def to(self, device=None, dtype=None, *, max_memory=None):
        check_dtype(dtype)
        check_memory("DenseStore.to", self.copy_nbytes(dtype),
                     self.device if device is None else device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} dense blocks",
                     remedies=COPY_REMEDIES)
        return self._like([copied_to(t, device, dtype) for t in self._segments])

    def clone(self, *, max_memory=None):
        check_memory("DenseStore.clone", self.nbytes, self.device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} dense blocks",
                     remedies=COPY_REMEDIES)
        return self._like([t.clone() for t in self._segments])

    def state(self):
        return {str(j): t for j, t in enumerate(self._segments)}, \
            {"segments": len(self._segments)}

    @classmethod
    def regrouped(cls, pieces, *, layout, block_ids):
        first = cls.regrouped_stores(pieces)[0]
        packed = torch.cat([st.dense_block(b).reshape(-1) for st, b in pieces])
        return cls(layout, block_ids, packed, damping=first.damping,
                   normalizer=first.normalizer)

    @classmethod
    def from_state(cls, tensors, meta, *, layout, block_ids, damping, normalizer, dtype=None):
        try:
            segments = [tensors[str(j)] for j in range(int(meta["segments"]))]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid dense-blocks state: missing or bad {exc}") from None
        return cls(layout, block_ids, segments, damping=damping, normalizer=normalizer)

    # ---- costs ----
    @classmethod
    def nbytes_for(cls, size, rows, dtype):
        return size * size * element_size(dtype)

    @classmethod
    def state_nbytes(cls, sizes, meta, dtype):
        return sum(s * s for s in sizes) * element_size(dtype)

    @classmethod
    def build_cost(cls, layout, block_ids, *, rows, dtype, device, method):
        sizes = [layout.sizes[b] for b in block_ids]
        numel = sum(s * s for s in sizes)
        stored = element_size(dtype) * numel
        head = f"{len(sizes)} dense blocks of up to {max(sizes, default=0)}: " \
               f"{format_bytes(stored)} stored"
        if method in ("sherman_morrison", "woodbury"):
            scratch = _recurrence_scratch(layout, block_ids, dtype, device, method)
            return BuildCost(stored + scratch, stored + scratch, stored,
                             f"{head}, {format_bytes(scratch)} scratch")
        workspace = gram_build_workspace(layout, block_ids, device)
        return BuildCost(8 * numel + workspace, dense_build_nbytes(sizes, dtype) + workspace,
                         stored, f"{head} and {format_bytes(8 * numel)} of float64 Gram "
                                 f"accumulators")

    @classmethod
    def builder(cls, layout, block_ids, *, dtype, device, method, damping, normalizer, rows,
                probe=None, max_memory=None):
        if method in ("sherman_morrison", "woodbury"):
            return _RecurrenceBuilder(layout, block_ids, dtype, device, damping=damping,
                                      normalizer=normalizer, chunked=method == "woodbury",
                                      probe=probe)
        return GramBuilder(layout, block_ids, dtype, device, damping=damping, probe=probe,
                            max_memory=max_memory)

    def __repr__(self) -> str:
        return (f"DenseStore(blocks={self.num_blocks}, segments={len(self._segments)}, "
                f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})")


def _recurrence_scratch(layout, block_ids, dtype, device, method) -> int:
    """The kernels' scratch of the recurrence, and the float64 row norms of the build."""
    chunked = method == "woodbury"
    if device.type == "cuda":
        code = 0 if dtype == torch.float32 else 1  # the extension's dtype codes
        host = layout.table(blocks=block_ids)  # held: the extension reads it by raw pointer
        scratch = cuda_workspace("sherman_morrison_workspace_bytes", code, chunked,
                                 host.data_ptr(), len(block_ids))
    elif chunked and dtype == torch.float32:
        # every thread converts the block it works on to float64 for the whole call
        sizes = sorted((layout.sizes[b] for b in block_ids), reverse=True)
        scratch = sum(8 * s * s for s in sizes[:max(1, torch.get_num_threads())])
    else:
        scratch = 0
    return scratch + WOODBURY_ELEMENTS * 8


class GramBuilder(StoreBuilder):
    """The stable build: :class:`DenseGram`, then its inverse."""

    def __init__(self, layout, block_ids, dtype, device, *, damping, probe, max_memory):
        self.gram = DenseGram(layout, dtype, device, blocks=block_ids, max_memory=max_memory)
        self.damping, self.probe = damping, probe

    def add(self, rows):
        self.gram.add(rows)

    def finish(self, normalizer):
        g = self.gram
        # the warnings name the caller of the build: through here, the build loop and
        # build_inverse_fisher
        segments = g.invert(self.damping, normalizer, probe=self.probe, stacklevel=4) or \
            [torch.zeros(0, dtype=g.dtype, device=g.device)]
        return DenseStore(g.layout, g.blocks, segments, damping=self.damping,
                          normalizer=normalizer)


class _RecurrenceBuilder(StoreBuilder):
    r"""Paper eq. 7 from :math:`F_0^{-1} = I/\lambda`: rank-1 steps, or (``chunked``) Woodbury
    steps of up to 64 rows, in the rows' dtype."""

    def __init__(self, layout, block_ids, dtype, device, *, damping, normalizer, chunked,
                 probe):
        if normalizer is None:
            raise ValueError("the recurrence needs the normalizer up front")
        self.layout, self.block_ids = layout, tuple(block_ids)
        self.damping, self.normalizer, self.chunked, self.probe = \
            damping, normalizer, chunked, probe
        self.host = layout.table(blocks=self.block_ids)
        self.dev = self.host if device.type == "cpu" else self.host.to(device)
        sizes = [layout.sizes[b] for b in self.block_ids]
        self.packed = torch.zeros(sum(s * s for s in sizes), dtype=dtype, device=device)
        o = 0
        for s in sizes:
            self.packed[o:o + s * s].view(s, s).diagonal().fill_(1.0 / damping)
            o += s * s

    def add(self, rows):
        info = _ops.call(_ops.sherman_morrison_, self.packed, self.host, self.dev, rows,
                         self.normalizer, 1, self.chunked)
        raise_if_failed(info, "build", self.layout, "row", self.block_ids)
        if self.probe is not None:
            self.probe.add(rows, blocks=self.block_ids)

    def finish(self, normalizer):
        return DenseStore(self.layout, self.block_ids, [self.packed], damping=self.damping,
                          normalizer=self.normalizer)
