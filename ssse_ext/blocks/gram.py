r"""Dense inverses that keep their float64 Gram matrices, so that requests never drift
(``name = "gram"``; DESIGN §2, "Requests that do not drift").

Per block the store holds :math:`S_b = \sum_r u_{r,b} u_{r,b}^\top` in float64 (what the stable
build accumulates anyway, :mod:`~ssse_ext.blocks.dense_gram`) and
:math:`F_b^{-1} = (\lambda I + S_b / N)^{-1}` in the inverse's dtype for the applies, which run
in the dense kernels. A change updates :math:`S_b \leftarrow S_b + \mathrm{sign}\,R_b^\top R_b`
exactly in float64 and inverts the changed blocks again from it (float64 Cholesky, rounded
once), so after any sequence of updates and downdates the inverse equals a fresh fit on the
rows that remain, to the build's accuracy. A dense store instead rewrites its rounded inverse
by Woodbury steps, which amplify that rounding by the block's condition number: in float32 at
small :math:`\lambda` on blocks fitted from about as many rows as parameters (rank-deficient up
to :math:`\lambda`), a few requests move it far from the fit (benchmarks/bench_requests.py).

When to use it: a float32 inverse at small damping that serves many deletion requests. It
takes :math:`8 + 4` bytes per element of a block instead of 4 (float64: 16 instead of 8), and a
request costs a Cholesky inverse of every changed block (:math:`O(s^3)`) instead of
:math:`O(k s^2)`; applies cost the same. It is never chosen by bytes: ask for it by name
(``representation="gram"``), or with ``requests=True`` in
:func:`~ssse_ext.build_inverse_fisher` (:func:`representation_for_requests`). In float64 the
dense store drifts too, by about :math:`\kappa\,u_{64}` per request, which this store also
removes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _ops
from ..budget import COPY_REMEDIES, check_memory, format_bytes
from ..layout import BlockLayout
from ..lowrank import WOODBURY_ELEMENTS, checked_cholesky, shifted_factor, solve_kept
from ..validation import check_dtype
from .base import BlockStore, copied_to, element_size
from .dense import DenseFactors, DenseStore, GramBuilder
from .dense64 import Dense64Store
from .dense_gram import check_kept_build, kept_build_cost, raise_if_failed

__all__ = ["REQUEST_TOLERANCE", "GramStore", "condition_bounds", "downdates_hold",
           "representation_for_requests", "request_store", "requests_stores",
           "store_from_gram"]

# float64 (s, s) tensors a batch of blocks holds at once when the change is checked in the
# factor form (more rows than parameters, or a shift): the Fisher, its Cholesky factor, the
# inverse of its transpose, the normalised changed Fisher and its factor, one temporary.
_FACTOR_COPIES = 6
# ... and in the correction form, next to the (s, k) and (k, k) terms: the larger of the check
# (the Fisher, its factor) and the write (the update R^T R and its symmetrised copy, then the
# copy the kernel factors; the Gram itself is changed in place).
_CORRECTION_COPIES = 3


def _run_budget(k: int):
    return lambda s: max(1, WOODBURY_ELEMENTS // (s * (s + 2 * k)))


#: The relative error against a fresh fit on the remaining rows that an inverse built to
#: serve requests (``representation="requests"``) keeps, per dtype.
REQUEST_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def condition_bounds(gram: torch.Tensor, damping: float, normalizer: float) -> torch.Tensor:
    r"""Bounds :math:`B_b = 1 + \lVert S_b\rVert_F / (N\lambda)` of a run of ``(n, s, s)``
    float64 Grams whose lower triangles hold :math:`S_b` (as the build accumulates them; the
    upper triangles are not read), one per block: :math:`B_b \ge \lambda_{\max}(F_b)/\lambda
    \ge \kappa(F_b)`, and it stays a bound after any downdate of the block."""
    low = torch.tril(gram)
    fro = (2 * low.square().sum((1, 2)) -
           low.diagonal(dim1=1, dim2=2).square().sum(1)).clamp(min=0).sqrt()
    return 1 + fro / (normalizer * damping)


def request_store(bound: torch.Tensor, dtype: torch.dtype) -> list[str]:
    """Per bound (:func:`condition_bounds`), the store a block of ``dtype`` serves requests
    from: ``"dense"`` where its own Woodbury downdates hold (:func:`downdates_hold`),
    ``"dense64"`` where float64 ones hold the tolerance of ``dtype``, else ``"gram"``."""
    own = downdates_hold(bound, dtype).tolist()
    wide = downdates_hold(bound, dtype, torch.float64).tolist()
    return ["dense" if a else "dense64" if w else "gram" for a, w in zip(own, wide)]


def downdates_hold(bound: torch.Tensor, dtype: torch.dtype,
                   arithmetic: torch.dtype | None = None) -> torch.Tensor:
    r"""Whether a dense block with bound ``bound`` (:func:`condition_bounds`) keeps Woodbury
    downdates within :data:`REQUEST_TOLERANCE` of ``dtype`` when they run on blocks held in
    ``arithmetic`` (default ``dtype``): :math:`B^2 u \le \tau`. A rounding :math:`E` of the
    stored inverse (:math:`\lVert E\rVert \approx u \lVert F^{-1}\rVert`) is the inverse of
    a Fisher off by :math:`F E F`, which the downdated inverse :math:`F'^{-1}` amplifies: to
    first order its relative error is up to :math:`\lVert F'^{-1} F\rVert^2 u`, and
    :math:`\lVert F'^{-1} F\rVert \le \lambda_{\max}(F)/\lambda \le B` (a downdate only lowers
    :math:`F`, never below :math:`\lambda I`). Each request rounds the block again, so
    :math:`m` requests may add up to :math:`m B^2 u`. Measured: :math:`0.05\,\kappa^2 u` after 20
    requests removing 80 % of the rows, float32 and float64 alike
    (benchmarks/bench_requests.py)."""
    u = torch.finfo(arithmetic or dtype).eps / 2
    return bound.square() * u <= REQUEST_TOLERANCE[dtype]


def representation_for_requests(representation):
    r"""The stores ``representation="requests"`` (``build_inverse_fisher(requests=True)``)
    plans with: those of ``"auto"``, with ``"dense64"`` for ``"dense"`` (the dual form,
    exact under requests too, is taken where it holds fewer bytes than a float64 dense
    block); a dense64 build then holds each block in ``"dense"``, ``"dense64"`` or ``"gram"``
    by its condition bound (:func:`requests_stores`).

    Raises ``ValueError`` for any other ``representation``: an explicit choice of stores is
    not rewritten.
    """
    from . import AUTO, resolve_representation  # the registry imports this module
    if representation != AUTO:
        raise ValueError(f"requests=True chooses among the stores of representation={AUTO!r} "
                         f"by accuracy; got representation={representation!r}: pass one or "
                         f"the other")
    return tuple("dense64" if n == "dense" else n for n in resolve_representation(AUTO))


class GramStore(BlockStore):
    r"""Dense inverses of the blocks ``block_ids`` of ``layout``, with their float64 Gram
    matrices.

    Args:
        layout, block_ids: the blocks held (increasing ids).
        grams: 1-D float64 tensors (one, or a sequence), the packed
            :math:`S_b = \sum_r u_{r,b} u_{r,b}^\top` of the blocks in order (full symmetric
            :math:`s_b \times s_b` matrices), segment by segment.
        segments: the packed inverses in float32 or float64, segments of the same lengths as
            ``grams`` (see :class:`~ssse_ext.blocks.DenseStore`).
        damping, normalizer: :math:`\lambda` and :math:`N`.
    """

    name = "gram"
    methods = ("cholesky",)
    auto = False  # more bytes than dense by construction: chosen by name or by policy only

    def __init__(self, layout: BlockLayout, block_ids: Sequence[int], grams, segments, *,
                 damping: float, normalizer: float):
        super().__init__(layout, block_ids, damping=damping, normalizer=normalizer)
        self._inverse = DenseStore(layout, self.block_ids, segments, damping=damping,
                                   normalizer=normalizer)
        grams = [grams] if isinstance(grams, torch.Tensor) else list(grams)
        inverse = self._inverse.segments
        if len(grams) != len(inverse) or any(
                not isinstance(g, torch.Tensor) or g.dim() != 1 or g.dtype != torch.float64 or
                g.numel() != t.numel() or g.device != t.device for g, t in zip(grams, inverse)):
            raise ValueError(f"grams must be {len(inverse)} 1-D float64 tensors on "
                             f"{self._inverse.device} of {[t.numel() for t in inverse]} "
                             f"elements, like the inverse's segments")
        self._grams = [g.contiguous() for g in grams]
        # per block: its segment and offset; per segment: its blocks
        self._where: dict[int, tuple[int, int]] = {}
        self._segment_ids: list[tuple[int, ...]] = []
        pos = 0
        for j, g in enumerate(self._grams):
            ids, o = [], 0
            while pos < len(self.block_ids) and o < g.numel():
                b = self.block_ids[pos]
                self._where[b] = (j, o)
                ids.append(b)
                o += layout.sizes[b] ** 2
                pos += 1
            self._segment_ids.append(tuple(ids))

    # ---- what is held ----
    dtype = property(lambda self: self._inverse.dtype)
    device = property(lambda self: self._inverse.device)

    @property
    def nbytes(self) -> int:
        return self._inverse.nbytes + sum(8 * g.numel() for g in self._grams)

    @property
    def segments(self) -> tuple[torch.Tensor, ...]:
        """The packed inverses, one 1-D tensor per range of blocks."""
        return self._inverse.segments

    @property
    def grams(self) -> tuple[torch.Tensor, ...]:
        """The packed float64 Gram matrices, laid out like :attr:`segments`."""
        return tuple(self._grams)

    def gram_block(self, b: int) -> torch.Tensor:
        r"""A copy of block ``b``'s ``(s_b, s_b)`` float64 :math:`S_b`."""
        b = self.block_ids[self.position(b)]
        j, o = self._where[b]
        s = self.layout.sizes[b]
        return self._grams[j][o:o + s * s].view(s, s).clone()

    def dense_block(self, b: int) -> torch.Tensor:
        return self._inverse.dense_block(self.block_ids[self.position(b)])

    def apply_into(self, v, base, scale, out) -> None:
        self._inverse.apply_into(v, base, scale, out)

    # ---- batches of blocks ----
    def _batches(self, k: int, blocks=None):
        """``(segment, first block, count, size, offset)`` for runs of equal-size blocks of
        each segment (among ``blocks``, default all), a bounded float64 work each."""
        keep = None if blocks is None else set(blocks)
        for j, ids in enumerate(self._segment_ids):
            if keep is not None:
                ids = tuple(b for b in ids if b in keep)
            if ids:
                for b0, n, s in self.layout.runs(_run_budget(k), blocks=ids):
                    yield j, b0, n, s, self._where[b0][1]

    def _gram_run(self, j: int, b0: int, n: int, s: int, o: int) -> torch.Tensor:
        return self._grams[j][o:o + n * s * s].view(n, s, s)

    def _rows_run(self, rows: torch.Tensor, b0: int, n: int, s: int) -> torch.Tensor:
        """``(n, k, s)`` float64 rows of a run."""
        st = self.layout.starts[b0]
        return rows[:, st:st + n * s].reshape(rows.shape[0], n, s).transpose(0, 1).to(
            torch.float64)

    def _fisher(self, g: torch.Tensor) -> torch.Tensor:
        f = g / self.normalizer
        f.diagonal(dim1=1, dim2=2).add_(self.damping)
        return f

    # ---- the change, checked against the exact Fisher ----
    def woodbury(self, rows: torch.Tensor, sign: int, what: str, *, keep: bool = False,
                 shift: float = 0.0, rhs: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> tuple[list, list[int]]:
        r"""Checks, for every block, that :math:`M_b = F_b + \mathrm{sign}\,R_b^\top R_b / N
        - \mathrm{shift}\,I` stays positive definite with the margin, :math:`F_b` computed
        from the float64 Gram (:math:`F_b = L L^\top`, :math:`W = L^{-1} R_b^\top`); writes
        nothing to the store. Batches of equal-size blocks, float64:

        - :math:`k \le s` and no shift: :math:`C = N I_k + \mathrm{sign}\,W^\top W`, kept
          :math:`U = F_b^{-1} R_b^\top = L^{-\top} W` and the factor of :math:`C`;
        - otherwise: :math:`A = I_s + \mathrm{sign}\,W W^\top / N - \mathrm{shift}\,
          L^{-1} L^{-\top}`, :math:`M_b^{-1} = L^{-\top} A^{-1} L^{-1}`, kept
          :math:`L^{-\top}` and the factor of :math:`A`

        (the parts of :class:`~ssse_ext.blocks.dense.DenseFactors`). With ``rhs`` (``(d, r)``
        float64), writes :math:`M^{-1}\,\mathrm{rhs}` into ``out``.

        Returns:
            the kept parts (with ``keep``) and the ids of the blocks the rows touch (a
            non-zero entry).
        """
        k, N = rows.shape[0], self.normalizer
        factors, touched = [], []
        for j, b0, n, s, o in self._batches(k):
            ids = range(b0, b0 + n)
            st = self.layout.starts[b0]
            r = self._rows_run(rows, b0, n, s)                                  # (n, k, s)
            touched += [b0 + i for i in
                        torch.nonzero(r.flatten(1).ne(0).any(1)).flatten().tolist()]
            lf, info = torch.linalg.cholesky_ex(self._fisher(self._gram_run(j, b0, n, s, o)))
            w = torch.linalg.solve_triangular(lf, r.transpose(1, 2), upper=False)  # (n, s, k)
            if k <= s and shift == 0:
                c = sign * (w.transpose(1, 2) @ w)
                c.diagonal(dim1=1, dim2=2).add_(N)
                chol = checked_cholesky(c, what, self.layout, ids, scale=N, info=info)
                if not keep and rhs is None:
                    continue
                kept = (st, n, s, "correction",
                        torch.linalg.solve_triangular(lf.transpose(1, 2), w, upper=True), chol)
            else:
                eye = torch.eye(s, dtype=torch.float64, device=lf.device).expand(n, s, s)
                left = torch.linalg.solve_triangular(lf.transpose(1, 2), eye, upper=True)
                chol = shifted_factor(left, w, sign, N, shift, what, self.layout, ids,
                                      info=info)
                kept = (st, n, s, "factor", left, chol)
            if keep:
                factors.append(kept)
            if rhs is not None:
                vb = rhs[st:st + n * s].reshape(n, s, -1)
                res = solve_kept(kept, vb, sign, lambda v: torch.cholesky_solve(v, lf))
                out[st:st + n * s] = res.reshape(n * s, -1)
        return factors, touched

    def change_nbytes(self, k, *, method="woodbury", keep=False, shift=0.0):
        elem = element_size(self.dtype)
        work = kept = 0
        for _, n, s in self.layout.runs(_run_budget(k), blocks=self.block_ids):
            if k <= s and shift == 0:
                w = 8 * n * (_CORRECTION_COPIES * s * s + 3 * s * k + 3 * k * k)
                kept += 8 * n * (s * k + k * k)
            else:
                w = 8 * n * (_FACTOR_COPIES * s * s + 2 * k * s)
                kept += 16 * n * s * s
            work = max(work, w + elem * n * s * s)  # and the rounded result of a write
        return work, kept

    def without(self, rows, sign, *, what):
        return DenseFactors(self.woodbury(rows, sign, what, keep=True)[0], sign)

    def solve_changed(self, rows, rhs, out, *, sign, shift, what):
        self.woodbury(rows, sign, what, shift=shift, rhs=rhs, out=out)

    # ---- changes in place ----
    def check_change(self, rows, sign, *, method, chunk_size, what):
        # the Gram is exact, so there is nothing to choose between: method is not used
        _, touched = self.woodbury(rows, sign, what)
        return rows, sign, tuple(touched), what

    def write(self, plan) -> None:
        rows, sign, touched, what = plan
        k = rows.shape[0]
        for j, b0, n, s, o in self._batches(k, touched):
            r = self._rows_run(rows, b0, n, s)
            change = r.transpose(1, 2) @ r
            change = 0.5 * (change + change.transpose(1, 2))  # keeps S_b exactly symmetric
            g = self._gram_run(j, b0, n, s, o)
            if sign > 0:
                g.add_(change)
            else:
                g.sub_(change)
            del change
            self._invert_run(j, b0, n, s, o, self._inverse.segments[j], what)

    def _invert_run(self, j, b0, n, s, o, into: torch.Tensor, what: str) -> None:
        """Writes the inverses of a run's Fishers, from its Grams, into ``into`` at
        ``o`` (the stable build's kernel, on a copy: it factors its input in place)."""
        host = self.layout.table(blocks=range(b0, b0 + n))
        dev = host if self.device.type == "cpu" else host.to(self.device)
        work = self._grams[j][o:o + n * s * s].clone()
        packed, info = _ops.call(_ops.inverse_from_gram, work, host, dev, self.damping,
                                 self.normalizer, into.dtype)
        # cannot fail after the check: every changed Fisher has relative pivots >= PD_MARGIN
        raise_if_failed(info, what, self.layout, "pivot", tuple(range(b0, b0 + n)))
        into[o:o + n * s * s] = packed

    # ---- copies and files ----
    def copy_nbytes(self, dtype=None):
        numel = sum(g.numel() for g in self._grams)
        return numel * (8 + element_size(dtype or self.dtype))

    def to(self, device=None, dtype=None, *, max_memory=None):
        check_dtype(dtype)
        check_memory("GramStore.to", self.copy_nbytes(dtype),
                     self.device if device is None else device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} gram blocks",
                     remedies=COPY_REMEDIES)
        grams = [copied_to(g, device) for g in self._grams]
        if dtype is None or dtype == self.dtype:
            return self._like(grams, [copied_to(t, device) for t in self._inverse.segments])
        # another dtype: inverted again from the exact Grams, not rounded from this dtype
        moved = self._like(grams, [torch.zeros(g.numel(), dtype=dtype, device=g.device)
                                   for g in grams])
        for j, b0, n, s, o in moved._batches(0):
            moved._invert_run(j, b0, n, s, o, moved._inverse.segments[j], "GramStore.to")
        return moved

    def clone(self, *, max_memory=None):
        check_memory("GramStore.clone", self.nbytes, self.device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} gram blocks",
                     remedies=COPY_REMEDIES)
        return self._like([g.clone() for g in self._grams],
                          [t.clone() for t in self._inverse.segments])

    def _like(self, grams, segments) -> "GramStore":
        return GramStore(self.layout, self.block_ids, grams, segments, damping=self.damping,
                         normalizer=self.normalizer)

    def state(self):
        tensors = {f"inverse.{j}": t for j, t in enumerate(self._inverse.segments)}
        tensors.update({f"s.{j}": g for j, g in enumerate(self._grams)})
        return tensors, {"segments": len(self._grams)}

    @classmethod
    def from_state(cls, tensors, meta, *, layout, block_ids, damping, normalizer, dtype=None):
        try:
            count = int(meta["segments"])
            segments = [tensors[f"inverse.{j}"] for j in range(count)]
            grams = [tensors[f"s.{j}"] for j in range(count)]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid gram-blocks state: missing or bad {exc}") from None
        if dtype is not None and any(t.dtype != dtype for t in segments):
            raise ValueError(f"the gram blocks' inverses are not {dtype}")
        return cls(layout, block_ids, grams, segments, damping=damping, normalizer=normalizer)

    # ---- costs ----
    @classmethod
    def nbytes_for(cls, size, rows, dtype):
        return size * size * (8 + element_size(dtype))

    @classmethod
    def state_nbytes(cls, sizes, meta, dtype):
        return sum(s * s for s in sizes) * (8 + element_size(dtype))

    @classmethod
    def build_cost(cls, layout, block_ids, *, rows, dtype, device, method):
        # the Grams are kept: all of them, every inverse and the copy of one group at the end
        elem = element_size(dtype)
        return kept_build_cost(cls.name, layout, block_ids, dtype, device, stored=8 + elem,
                               held=8 + elem, spare=8, what="float64 Grams and inverses")

    @classmethod
    def builder(cls, layout, block_ids, *, dtype, device, method, damping, normalizer, rows,
                probe=None, max_memory=None):
        check_kept_build(cls, layout, block_ids, dtype=dtype, device=device, method=method,
                         rows=rows, max_memory=max_memory)
        return _Builder(layout, block_ids, dtype, device, damping=damping, probe=probe,
                        max_memory=max_memory)

    def __repr__(self) -> str:
        return (f"GramStore(blocks={self.num_blocks}, segments={len(self._grams)}, "
                f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})")


class _Parts:
    """The blocks of an inverse being sorted into the stores that serve its requests, a
    segment at a time (:func:`requests_stores`)."""

    def __init__(self, layout: BlockLayout, where: dict, dtype: torch.dtype, damping: float,
                 normalizer: float):
        self.layout, self.where, self.dtype = layout, where, dtype
        self.kw = {"damping": damping, "normalizer": normalizer}
        self.parts = {name: ([], [], []) for name in ("gram", "dense", Dense64Store.name)}

    def add(self, ids, inv: torch.Tensor, gram: torch.Tensor | None) -> None:
        """A segment: the packed float64 inverses ``inv`` of the blocks ``ids`` (and their
        full float64 Grams, where a block keeps it)."""
        o, spans = 0, {}
        for b in ids:
            spans[b] = (o, self.layout.sizes[b] ** 2)
            o += spans[b][1]
        for name, (blocks, first, second) in self.parts.items():
            mine = [b for b in ids if self.where[b] == name]
            if not mine:
                continue
            blocks += mine
            wanted = torch.float64 if name == Dense64Store.name else self.dtype
            whole = len(mine) == len(ids) and inv.dtype == wanted
            first.append(inv if whole else torch.cat([inv[a:a + m] for a, m in
                                                      (spans[b] for b in mine)]).to(wanted))
            if name == "gram":
                second.append(gram if len(mine) == len(ids) else
                              torch.cat([gram[a:a + m] for a, m in (spans[b] for b in mine)]))

    def stores(self) -> list[BlockStore]:
        out = []
        blocks, inverses, grams = self.parts["gram"]
        if blocks:
            out.append(GramStore(self.layout, blocks, grams, inverses, **self.kw))
        blocks, segments, _ = self.parts["dense"]
        if blocks:
            out.append(DenseStore(self.layout, blocks, segments, **self.kw))
        blocks, exact, _ = self.parts[Dense64Store.name]
        if blocks:
            out.append(Dense64Store(self.layout, blocks, exact, dtype=self.dtype, **self.kw))
        return out


def _full(gram: torch.Tensor, layout: BlockLayout, ids) -> torch.Tensor:
    """A packed accumulator's lower triangles made full symmetric matrices, in place."""
    o = 0
    for b0, n, s in layout.runs(blocks=ids):
        run = gram[o:o + n * s * s].view(n, s, s)
        run.copy_(torch.tril(run) + torch.tril(run, -1).transpose(1, 2))
        o += n * s * s
    return gram


def requests_stores(gram, damping: float, normalizer: float, *, probe=None,
                    stacklevel: int = 1, store: str | None = None) -> list[BlockStore]:
    r"""The stores that serve the requests of the inverse of a
    :class:`~ssse_ext.blocks.dense_gram.DenseGram`'s blocks (the accumulator is spent): per
    block, the one :func:`request_store` names from its condition bound (or ``store`` for
    every block). Each group is inverted once, in float64, and sorted at once: a group with no
    block that keeps its Gram is inverted in place, so the build holds about as much as the
    stores it makes. ``probe`` and ``stacklevel`` as in :meth:`DenseGram.invert` (1: the
    caller's frame)."""
    layout, where = gram.layout, {}
    for (g0, g1), acc in zip(gram.groups, gram.grams):
        o = 0
        for b0, n, s in layout.runs(blocks=gram.blocks[g0:g1]):
            bound = condition_bounds(acc[o:o + n * s * s].view(n, s, s), damping, normalizer)
            o += n * s * s
            names = request_store(bound, gram.dtype) if store is None else [store] * n
            where.update(zip(range(b0, b0 + n), names))
    parts = _Parts(layout, where, gram.dtype, damping, normalizer)

    def keeps(g):
        g0, g1 = gram.groups[g]
        return any(where[b] == "gram" for b in gram.blocks[g0:g1])

    def consume(g, packed):
        ids = gram.blocks[slice(*gram.groups[g])]
        kept = _full(gram.grams[g], layout, ids) if keeps(g) else None
        parts.add(ids, packed, kept)
        gram.grams[g] = None

    gram.invert(damping, normalizer, probe=probe, stacklevel=stacklevel + 1, keep=keeps,
                dtype=torch.float64, consume=consume)
    return parts.stores() or [Dense64Store(layout, (), torch.zeros(0, dtype=torch.float64,
                                                                   device=gram.device),
                                           dtype=gram.dtype, damping=damping,
                                           normalizer=normalizer)]


def store_from_gram(gram, damping: float, normalizer: float, *, probe=None,
                    stacklevel: int = 1) -> GramStore:
    """The :class:`GramStore` of a :class:`~ssse_ext.blocks.dense_gram.DenseGram`'s blocks,
    inverted from copies of its accumulators, which it keeps (the accumulator is spent);
    ``probe`` and ``stacklevel`` as in :meth:`DenseGram.invert` (1: the caller's frame)."""
    segments = gram.invert(damping, normalizer, probe=probe, stacklevel=stacklevel + 1,
                           keep=True)
    grams = [t for t in gram.grams if t is not None]
    if not segments:
        segments = [torch.zeros(0, dtype=gram.dtype, device=gram.device)]
        grams = [torch.zeros(0, dtype=torch.float64, device=gram.device)]
    for t, (g0, g1) in zip(grams, gram.groups):
        _full(t, gram.layout, gram.blocks[g0:g1])  # so that S_b +- R^T R stays exact
    return GramStore(gram.layout, gram.blocks, grams, segments, damping=damping,
                     normalizer=normalizer)


class _Builder(GramBuilder):
    """The stable build (:class:`DenseGram`), inverting from copies and keeping the Grams."""

    def finish(self, normalizer):
        # the warnings name the caller of build_inverse_fisher (through the build loop)
        return store_from_gram(self.gram, self.damping, normalizer, probe=self.probe,
                               stacklevel=4)

