r"""Kronecker-factored blocks: K-FAC (``name = "kfac"``) and EK-FAC (``name = "ekfac"``).

A block is one weight :math:`W` (``out x in``) of a linear layer, applied at positions
:math:`t` to inputs :math:`a_{i,t}` with output gradients :math:`g_{i,t}`; its flat rows are
the per-sample gradients :math:`G_i = \sum_t g_{i,t} a_{i,t}^\top`. The store keeps the float64
sums :math:`\bar A = \sum_{i,t} a a^\top` and :math:`\bar S = \sum_{i,t} g g^\top` (a side
payload of the rows, :class:`KroneckerFactors`) as their eigenbases :math:`Q_A, Q_S` and
float64 eigenvalues, and a float64 grid :math:`\bar\Lambda` (``out x in``) with
:math:`F_W = (Q_S \otimes Q_A)\,\mathrm{diag}(\bar\Lambda / N + \lambda)\,
(Q_S \otimes Q_A)^\top` in PyTorch's row-major flattening
(:math:`\mathrm{vec}(g a^\top) = g \otimes a`):

- K-FAC: :math:`F_W = S \otimes A + \lambda I` with :math:`A = \bar A / N`, :math:`S = \bar S / N`,
  so :math:`\bar\Lambda_{jk} = s_j a_k / N` from the eigenvalues of :math:`\bar S, \bar A`;
- EK-FAC: :math:`\bar\Lambda = \sum_i (Q_S^\top G_i Q_A)^{\circ 2}`, the exact second moments
  of the per-sample gradients in the Kronecker eigenbasis.

The apply is :math:`F_W^{-1} V = Q_S \big((Q_S^\top V Q_A) \oslash (\bar\Lambda/N + \lambda)\big)
Q_A^\top`: the damping is exact. The inverse grid is formed in the store's dtype at each
apply, not stored (:math:`in\,out` divisions against the :math:`2\,in\,out\,(in + out)`
products of the bases per vector: 7 ms against 0.7 s for a 3072 x 768 float32 block and one
vector on one CPU thread). A weight stored ``(in, out)`` (GPT-2's ``Conv1D``) is the same
with :math:`V` transposed.

``storage`` (:data:`STORAGE_MODES`) says how the bases are kept. ``"exact"`` (default): in
float64, with copies in the store's dtype for the applies when that is float32; the sums are
:math:`Q\,\mathrm{diag}(e)\,Q^\top` to float64 rounding, so they are not stored but rebuilt
when a change needs them (except after an EK-FAC ``"basis-kept"`` change that keeps the basis:
the block then holds the changed float64 sums until its basis is replaced). ``"compact"``:
only in the store's dtype; a change rebuilds each sum in float64 from the rounded basis and
the float64 eigenvalues, downdates it in float64, decomposes it in float64 and rounds the new
basis once (docs/maths.md: the accuracy); a kept basis keeps the diagonal of the changed sums
in it (the off-diagonal mass dropped counts against ``tolerance``). Bytes per block
(:func:`~ssse_ext.blocks.kronecker_factors.kronecker_nbytes`), with :math:`w` the dtype's
size: :math:`8(in^2 + out^2) + w(in^2 + out^2) + 8(in + out + in\,out)` exact (:math:`w = 0`
in float64), :math:`w(in^2 + out^2) + 8(in + out + in\,out)` compact, against
:math:`(in\,out)^2` numbers dense. In float64 both are the same store.

**Changes are downdates of sums** (float64), then both factors are decomposed again: K-FAC is
then the fit on the remaining samples (to float64 rounding when ``"exact"``). EK-FAC's grid
needs the remaining gradients in the new basis; ``refresh`` chooses (docs/maths.md):
``"basis-kept"`` (default) downdates :math:`\bar\Lambda` in the *kept* basis (exact there) and
keeps the basis while it moved by at most ``tolerance`` (the off-diagonal mass :func:`moved`
of a changed factor in it), else takes the new bases and projects the grid,
:math:`P_S \bar\Lambda P_A^\top` with :math:`P = (Q'^\top Q)^{\circ 2}` (counted in
:attr:`EKFACStore.rebased`); ``"exact"`` keeps the rows of its blocks (the memory of a dual
block) and recomputes the grid from the remaining rows (removed rows found by
:func:`~ssse_ext.blocks.matching.match_rows`), equal to a fresh fit.
The EK-FAC build reads the rows twice (the bases, then the grid in them) when its source can
be read again (:meth:`~ssse_ext.blocks.StoreBuilder.another_pass`), else holds them. A
removal that would leave a sum with an eigenvalue below :math:`-10^{-8}` of its scale (samples
never added) raises :class:`~ssse_ext.errors.NotPositiveDefiniteError`, nothing changed.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import torch

from ..budget import COPY_REMEDIES, check_memory, format_bytes
from ..errors import NotPositiveDefiniteError
from ..layout import BlockLayout
from ..lowrank import PD_MARGIN
from ..validation import check_choice, check_dtype, check_nonneg_float
from .base import BlockStore, BuildCost, ChangeFactors, StoreBuilder, element_size
from .kronecker_factors import (DEFAULT_STORAGE, DEFAULT_TOLERANCE, KRONECKER_KEY,
                                REFRESH_MODES, STORAGE_MODES, KronBlock, KroneckerFactors,
                                block_from_state, checked_psd, diagonal_in, eigh,
                                from_matrices, grid, kron_times, kronecker_nbytes, moved,
                                to_matrices)
from .matching import MATCH_RTOL, match_rows

#: The stages of a change in :attr:`KroneckerStore.last_timings`: the downdate (or update) of
#: the factor sums, their eigendecompositions, and the grid's change (the rows in the basis, the
#: basis-movement test, a projection).
CHANGE_STAGES = ("sums", "eigh", "grid")
#: The version of :meth:`KroneckerStore.state`'s layout: 2 stores no factor sums (version 1,
#: without the key, saved ``a`` and ``g``; such states still load).
STATE_FORMAT = 2

__all__ = ["CHANGE_STAGES", "DEFAULT_STORAGE", "DEFAULT_TOLERANCE", "EKFACStore",
           "KRONECKER_KEY", "KroneckerFactors", "KroneckerStore", "REFRESH_MODES",
           "STATE_FORMAT", "STORAGE_MODES"]


class _Changed(ChangeFactors):
    """The changed blocks of a store, applied in float64 (:meth:`BlockStore.without`)."""

    def __init__(self, store: "KroneckerStore", changed: list):
        self.store, self.changed = store, changed

    def solve(self, v, out) -> None:
        st = self.store
        for i, blk in self.changed:
            sl = st.layout.slice(st.block_ids[i])
            out[sl] = kron_times(blk, v[sl], 1.0 / (blk.lam / st.normalizer + st.damping))


class KroneckerStore(BlockStore):
    r"""K-FAC blocks (see the module): :math:`\bar\Lambda_{jk} = \bar s_j \bar a_k / N`.

    Args:
        layout, block_ids: the blocks held (increasing ids), each one whole weight.
        blocks: their :class:`KronBlock` statistics, in order, on one device.
        damping, normalizer: :math:`\lambda` and :math:`N`.
        dtype: of the vectors and rows it takes.
        refresh, tolerance: the EK-FAC options (recorded; K-FAC downdates are exact).
        storage: how the bases are kept, one of :data:`STORAGE_MODES` (blocks given with
            other bases are converted).

    Attributes:
        last_timings: the seconds of the last change checked (an update, a downdate, a
            ``without``), by stage of :data:`CHANGE_STAGES`, summed over its blocks.
    """

    name = "kfac"
    methods = ("cholesky",)
    auto = False  # its blocks need a side payload: pinned by the curvature, never chosen
    takes_side = True
    probe_by_products = True  # a dense block is (in out)^2 numbers
    holds_rows = False  # whether the build needs the rows of its blocks (EK-FAC's grid)

    def __init__(self, layout: BlockLayout, block_ids: Sequence[int], blocks: Sequence[KronBlock],
                 *, damping: float, normalizer: float, dtype: torch.dtype,
                 refresh: str = "basis-kept", tolerance: float = DEFAULT_TOLERANCE,
                 storage: str = DEFAULT_STORAGE):
        super().__init__(layout, block_ids, damping=damping, normalizer=normalizer)
        if dtype is None:
            raise TypeError("dtype must be torch.float32 or torch.float64, got None")
        self._dtype = check_dtype(dtype)
        self.refresh = check_choice(refresh, "refresh", REFRESH_MODES)
        self.tolerance = check_nonneg_float(tolerance, "tolerance")
        self.storage = check_choice(storage, "storage", STORAGE_MODES)
        blocks = list(blocks)
        if len(blocks) != len(self.block_ids):
            raise ValueError(f"blocks must hold one KronBlock per block id "
                             f"({len(self.block_ids)}), got {len(blocks)}")
        for b, blk in zip(self.block_ids, blocks):
            if not isinstance(blk, KronBlock) or blk.out * blk.inn != layout.sizes[b]:
                raise ValueError(f"block {b} has {layout.sizes[b]} parameters, its Kronecker "
                                 f"statistics describe {getattr(blk, 'out', '?')} x "
                                 f"{getattr(blk, 'inn', '?')}")
        self._blocks = [self._stored(blk) for blk in blocks]
        self._device = blocks[0].qa.device if blocks else torch.device("cpu")
        self.rebased = 0  # basis changes of "basis-kept" downdates (EK-FAC)
        self.last_moved = 0.0
        self.last_timings = dict.fromkeys(CHANGE_STAGES, 0.0)  # seconds of the last change
        self._parts = [self._apply_parts(blk) for blk in self._blocks]

    @property
    def basis_dtype(self) -> torch.dtype:
        """The dtype of the stored bases: float64 (``"exact"``) or :attr:`dtype`."""
        return torch.float64 if self.storage == "exact" else self._dtype

    def _stored(self, blk: KronBlock) -> KronBlock:
        """``blk`` with its bases in :attr:`basis_dtype` (rounded once when compact)."""
        dt = self.basis_dtype
        if blk.qa.dtype == dt and blk.qg.dtype == dt:
            return blk
        return replace(blk, qa=blk.qa.to(dt), qg=blk.qg.to(dt))

    def _apply_parts(self, blk: KronBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """The bases in :attr:`dtype` (the stored ones themselves where they are so)."""
        return blk.qa.to(self._dtype), blk.qg.to(self._dtype)

    # ---- what is held ----
    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._device)

    @property
    def blocks(self) -> tuple[KronBlock, ...]:
        """The :class:`KronBlock` statistics of the blocks held, in :attr:`block_ids` order."""
        return tuple(self._blocks)

    @property
    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for blk in self._blocks
                  for t in blk.tensors().values())
        return own + sum(t.numel() * t.element_size()
                         for blk, parts in zip(self._blocks, self._parts)
                         for t, kept in zip(parts, (blk.qa, blk.qg)) if t is not kept)

    def apply_into(self, v, base, scale, out) -> None:
        for b, blk, (qa, qg) in zip(self.block_ids, self._blocks, self._parts):
            sl = self.layout.slice(b)
            inv = blk.lam.to(self._dtype, copy=True).div_(self.normalizer).add_(
                self.damping).reciprocal_()
            m = to_matrices(v[sl], blk.out, blk.inn, blk.transposed)
            y = from_matrices(qg @ ((qg.T @ m @ qa) * inv) @ qa.T, blk.transposed)
            out[sl] = y * scale if base is None else base[sl] + y * scale

    def dense_block(self, b: int) -> torch.Tensor:
        blk = self._blocks[self.position(b)]
        s = blk.out * blk.inn
        eye = torch.eye(s, dtype=torch.float64, device=self.device)
        return kron_times(blk, eye, 1.0 / (blk.lam / self.normalizer + self.damping)).to(
            self._dtype)

    def write_sketch(self, probe) -> None:
        x = probe.x
        for b, blk in zip(self.block_ids, self._blocks):
            sl = self.layout.slice(b)
            probe.sketch[sl] = kron_times(blk, x[sl], blk.lam)

    # ---- changes ----
    def _payload(self, side, what: str) -> KroneckerFactors:
        payload = None if side is None else side.get(KRONECKER_KEY)
        if not isinstance(payload, KroneckerFactors):
            raise ValueError(
                f"{what}: the {self.name} blocks {list(self.block_ids)[:5]} need the Kronecker "
                f"factors of the rows (ssse_ext.side.Rows with a {KRONECKER_KEY!r} payload, as "
                f"the {self.name} curvature's rows carry), got rows without them")
        return payload

    def fit_grid(self, blk: KronBlock, rows: torch.Tensor | None) -> torch.Tensor:
        """The unnormalised grid of ``blk`` in its current basis (K-FAC: from the
        eigenvalues; ``rows`` unused)."""
        return torch.outer(blk.eg, blk.ea) / self.normalizer

    def changed_grid(self, old: KronBlock, new: KronBlock, rows: torch.Tensor, sign: int,
                     what: str, b: int, sums: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[KronBlock, bool]:
        """``new`` (changed bases, stored as :attr:`storage` says) with its grid for the
        change of ``rows``, and whether a kept basis was replaced by an approximation;
        ``sums`` are the changed float64 factor sums ``(a, g)``."""
        return replace(new, lam=self.fit_grid(new, None)), False

    def _change_block(self, i: int, entry, rows: torch.Tensor, sign: int, what: str
                      ) -> tuple[KronBlock, bool]:
        blk, b = self._blocks[i], self.block_ids[i]
        a_r, g_r, tr = entry
        if a_r.shape != blk.qa.shape or g_r.shape != blk.qg.shape or tr != blk.transposed:
            raise ValueError(f"{what}: the Kronecker factors of block {b} are "
                             f"{tuple(g_r.shape)} and {tuple(a_r.shape)}, the block holds "
                             f"({blk.out}, {blk.out}) and ({blk.inn}, {blk.inn})")
        clock, seconds = self._clock, self.last_timings
        t0 = clock()
        # the sums, rebuilt in float64 from the stored bases and eigenvalues
        a, g = blk.a + sign * a_r, blk.g + sign * g_r
        t1 = clock()
        ea, qa = eigh(a)
        eg, qg = eigh(g)
        scale_a = float(torch.linalg.vector_norm(blk.ea) + torch.linalg.matrix_norm(a_r))
        scale_g = float(torch.linalg.vector_norm(blk.eg) + torch.linalg.matrix_norm(g_r))
        ea = checked_psd(ea, scale_a, what, b, "input factor eigenvalue")
        eg = checked_psd(eg, scale_g, what, b, "output factor eigenvalue")
        new = self._stored(replace(blk, qa=qa, ea=ea, qg=qg, eg=eg, sums=None, drift=0.0))
        t2 = clock()
        changed = self.changed_grid(blk, new, rows, sign, what, b, (a, g))
        t3 = clock()
        for stage, s in zip(CHANGE_STAGES, (t1 - t0, t2 - t1, t3 - t2)):
            seconds[stage] += s
        return changed

    def _clock(self) -> float:
        """Seconds of a monotonic clock, after the work queued on the store's device."""
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def _changed(self, rows: torch.Tensor, side, sign: int, what: str) -> list:
        """``[(position, changed KronBlock, rebased)]`` of the blocks the change touches;
        checks everything, changes nothing."""
        payload = self._payload(side, what)
        self.last_moved, out = 0.0, []
        self.last_timings = dict.fromkeys(CHANGE_STAGES, 0.0)
        for i, b in enumerate(self.block_ids):
            sl = self.layout.slice(b)
            entry = payload.factors.get(self.layout.starts[b])
            if entry is None:
                if bool(rows[:, sl].ne(0).any()):
                    raise ValueError(f"{what}: the rows change Kronecker block {b}, its "
                                     f"factors are not in the side payload")
                continue
            out.append((i, *self._change_block(i, entry, rows[:, sl], sign, what)))
        return out

    def check_change(self, rows, sign, *, method, chunk_size, what, side=None):
        return self._changed(rows, side, sign, what)

    def check_and_apply(self, rows, sign, v, out, *, changed, method, chunk_size, what,
                        side=None):
        plan = self._changed(rows, side, sign, what)  # the changed blocks serve the products
        new = {i: blk for i, blk, _ in plan} if changed else {}
        for i, b in enumerate(self.block_ids):
            blk, sl = new.get(i, self._blocks[i]), self.layout.slice(b)
            denom = blk.lam / self.normalizer + self.damping
            out[sl] = kron_times(blk, v[sl].to(torch.float64), 1.0 / denom)
        return plan

    def write(self, plan) -> None:
        for i, blk, rebased in plan:
            self._blocks[i] = blk
            self._parts[i] = self._apply_parts(blk)
            self.rebased += bool(rebased)

    def change_nbytes(self, k, *, method="woodbury", keep=False, shift=0.0):
        # per block: the rebuilt and changed sums, eigh's workspace and the grid's, float64;
        # the changed block is kept (its bases, eigenvalues, grid and rows)
        work = kept = 0
        for blk in self._blocks:
            square = blk.out ** 2 + blk.inn ** 2
            rows = 0 if blk.rows is None else blk.rows.shape[0]
            per = kronecker_nbytes(blk.out, blk.inn, self._dtype, rows, self.storage,
                                   self.refresh == "basis-kept" and self.storage == "exact")
            work = max(work, per + 8 * (4 * square + (3 + k) * blk.out * blk.inn))
            kept += per
        return work, kept

    def without(self, rows, sign, *, what, side=None):
        return _Changed(self, [(i, blk) for i, blk, _ in self._changed(rows, side, sign, what)])

    def solve_changed(self, rows, rhs, out, *, sign, shift, what, side=None):
        changed = {i: blk for i, blk, _ in self._changed(rows, side, sign, what)}
        for i, b in enumerate(self.block_ids):
            blk = changed.get(i, self._blocks[i])
            denom = blk.lam / self.normalizer + (self.damping - shift)
            low, high = float(denom.min()), float(denom.max())
            if not low > PD_MARGIN * high:
                raise NotPositiveDefiniteError(
                    f"{what}: Kronecker block {b} minus shift={shift:g} is not positive "
                    f"definite (smallest eigenvalue {low:.3e}); nothing was changed")
            sl = self.layout.slice(b)
            out[sl] = kron_times(blk, rhs[sl], 1.0 / denom)

    # ---- copies and files ----
    def copy_nbytes(self, dtype=None):
        return sum(kronecker_nbytes(blk.out, blk.inn, dtype or self._dtype,
                                    0 if blk.rows is None else blk.rows.shape[0],
                                    self.storage, blk.sums is not None)
                   for blk in self._blocks)

    def _like(self, blocks, dtype) -> "KroneckerStore":
        store = type(self)(self.layout, self.block_ids, blocks, damping=self.damping,
                           normalizer=self.normalizer, dtype=dtype, refresh=self.refresh,
                           tolerance=self.tolerance, storage=self.storage)
        store.rebased = self.rebased
        return store

    def to(self, device=None, dtype=None, *, max_memory=None):
        check_dtype(dtype)
        check_memory(f"{type(self).__name__}.to", self.copy_nbytes(dtype),
                     self.device if device is None else device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} {self.name} blocks",
                     remedies=COPY_REMEDIES)
        dtype = dtype or self._dtype
        # compact bases become the new dtype (from float32, only float32-accurate)
        bases = dtype if self.storage == "compact" else None
        return self._like([blk.to(device, dtype, bases) for blk in self._blocks], dtype)

    def clone(self, *, max_memory=None):
        check_memory(f"{type(self).__name__}.clone", self.nbytes, self.device,
                     max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} {self.name} blocks",
                     remedies=COPY_REMEDIES)
        return self._like([blk.clone() for blk in self._blocks], self._dtype)

    def state(self):
        tensors = {f"{j}.{k}": t for j, blk in enumerate(self._blocks)
                   for k, t in blk.tensors().items()}
        shapes = [[blk.out, blk.inn, bool(blk.transposed)] for blk in self._blocks]
        rows = [0 if blk.rows is None else int(blk.rows.shape[0]) for blk in self._blocks]
        return tensors, {"format": STATE_FORMAT, "shapes": shapes, "rows": rows,
                         "refresh": self.refresh, "tolerance": self.tolerance,
                         "storage": self.storage, "rebased": self.rebased,
                         "sums": [blk.sums is not None for blk in self._blocks],
                         "drift": [float(blk.drift) for blk in self._blocks]}

    @classmethod
    def regrouped(cls, pieces, *, layout, block_ids):
        """:meth:`BlockStore.regrouped`; a store's ``rebased`` goes with its first block."""
        first, *_ = stores = cls.regrouped_stores(pieces)
        if len({(st.refresh, st.tolerance, st.storage) for st in stores}) > 1:
            raise ValueError(f"the {cls.name} blocks to regroup differ in refresh, tolerance or "
                             f"storage")
        store = cls(layout, block_ids, [st.blocks[st.position(b)] for st, b in pieces],
                    damping=first.damping, normalizer=first.normalizer, dtype=first.dtype,
                    refresh=first.refresh, tolerance=first.tolerance, storage=first.storage)
        firsts = {(id(st), b) for st, b in pieces}
        store.rebased = sum(st.rebased for st in stores if (id(st), st.block_ids[0]) in firsts)
        return store

    @classmethod
    def from_state(cls, tensors, meta, *, layout, block_ids, damping, normalizer, dtype=None):
        """Inverse of :meth:`state`; also reads format 1 (the factor sums ``a`` and ``g``
        saved for every block, no ``storage``: ``"exact"``), whose sums are dropped where the
        basis is their eigenbasis."""
        try:
            version = int(meta.get("format", 1))
            if not 1 <= version <= STATE_FORMAT:
                raise ValueError(f"format {version}")
            storage = check_choice(str(meta.get("storage", DEFAULT_STORAGE)), "storage",
                                   STORAGE_MODES)
            shapes = [(int(o), int(i), bool(t)) for o, i, t in meta["shapes"]]
            drift = [float(x) for x in meta.get("drift", [0.0] * len(shapes))]
            if len(drift) != len(shapes):
                raise ValueError("drift")
            blocks = [block_from_state(tensors, j, shape, version, storage, d)
                      for j, (shape, d) in enumerate(zip(shapes, drift))]
            store = cls(layout, block_ids, blocks, damping=damping, normalizer=normalizer,
                        dtype=dtype or torch.float32, refresh=str(meta["refresh"]),
                        tolerance=float(meta["tolerance"]), storage=storage)
            store.rebased = int(meta.get("rebased", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid {cls.name}-blocks state: missing or bad "
                             f"{exc}") from None
        return store

    # ---- costs ----
    @classmethod
    def nbytes_for(cls, size, rows, dtype):
        # the shape is not known from the size: a square weight, 2 * size in the bases; the
        # storage is not known either: "exact", the larger
        return size * 3 * 8 + (0 if element_size(dtype) == 8 else 2 * size * element_size(dtype))

    @classmethod
    def state_nbytes(cls, sizes, meta, dtype):
        # format 1 holds the float64 sums of every block (read, then mostly dropped)
        storage = str(meta.get("storage", DEFAULT_STORAGE))
        n = len(meta["shapes"])
        sums = meta.get("sums", [int(meta.get("format", 1)) < 2] * n)
        return sum(kronecker_nbytes(int(o), int(i), dtype, int(r), storage, bool(s))
                   for (o, i, _), r, s in zip(meta["shapes"], meta.get("rows", [0] * n), sums))

    @classmethod
    def build_cost(cls, layout, block_ids, *, rows, dtype, device, method):
        # the rows of EK-FAC blocks are read twice, not held (a one-shot stream's builder
        # checks the rows it holds as they come)
        sizes = [layout.sizes[b] for b in block_ids]
        stored = sum(cls.nbytes_for(s, rows, dtype) for s in sizes)
        return BuildCost(0, stored, stored,
                         f"{len(sizes)} {cls.name} blocks of up to {max(sizes, default=0)} "
                         f"parameters: about {format_bytes(stored)} stored")

    @classmethod
    def builder(cls, layout, block_ids, *, dtype, device, method, damping, normalizer, rows,
                probe=None, max_memory=None):
        cost = cls.build_cost(layout, tuple(block_ids), rows=rows or 0, dtype=dtype,
                              device=torch.device(device), method=method)
        check_memory(f"{cls.__name__}.builder", cost.peak, device, max_memory=max_memory,
                     detail=cost.detail,
                     remedies=("pass max_memory=<bytes> if more memory may be used than is "
                               "free now",))
        return _KronBuilder(cls, layout, block_ids, dtype=dtype, device=torch.device(device),
                            damping=damping, probe=probe, max_memory=max_memory,
                            held=cost.peak)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(blocks={self.num_blocks}, refresh={self.refresh!r}, "
                f"storage={self.storage!r}, dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes})")


class EKFACStore(KroneckerStore):
    r"""EK-FAC blocks (see the module): :math:`\bar\Lambda = \sum_i (Q_S^\top G_i
    Q_A)^{\circ 2}`, changed as ``refresh`` says.

    Attributes:
        rebased: how often a ``"basis-kept"`` change moved a basis beyond ``tolerance`` and
            projected the grid onto the new one (each an approximation).
        last_moved: the largest basis movement of the last change checked.
    """

    name = "ekfac"
    holds_rows = True

    def fit_grid(self, blk, rows):
        if rows is None:
            raise ValueError("an EK-FAC grid needs the block's rows")
        return grid(rows, blk)

    def changed_grid(self, old, new, rows, sign, what, b, sums):
        if self.refresh == "exact":
            kept = self._kept_rows(old, rows, sign, b)
            return replace(new, rows=kept, lam=grid(kept, new)), False
        lam = old.lam + sign * grid(rows, old)
        scale = float(old.lam.abs().sum()) + float(rows.to(torch.float64).square().sum())
        lam = checked_psd(lam.flatten(), scale, what, b, "EK-FAC eigenvalue").view_as(lam)
        # compact: the sums are rebuilt from the kept basis and their diagonal in it, so a
        # change sees only its own off-diagonal mass; the dropped mass adds up in drift
        compact = self.storage == "compact"
        moved_by = max(moved(old.qa, sums[0]), moved(old.qg, sums[1])) + \
            (old.drift if compact else 0.0)
        self.last_moved = max(self.last_moved, moved_by)
        if moved_by <= self.tolerance:
            return replace(new, qa=old.qa, qg=old.qg, ea=diagonal_in(old.qa, sums[0]),
                           eg=diagonal_in(old.qg, sums[1]), lam=lam,
                           sums=None if compact else sums,
                           drift=moved_by if compact else 0.0), False
        f64 = torch.float64
        pg = (new.qg.to(f64).T @ old.qg.to(f64)).square()
        pa = (new.qa.to(f64).T @ old.qa.to(f64)).square()
        return replace(new, lam=pg @ lam @ pa.T), True

    def _kept_rows(self, old: KronBlock, rows: torch.Tensor, sign: int, b: int
                   ) -> torch.Tensor:
        stored = old.rows
        if sign > 0:
            return torch.cat([stored, rows.to(stored.dtype)])
        rows = rows.to(stored.dtype)
        picked = match_rows(stored, rows, MATCH_RTOL[stored.dtype], b, self.layout)
        keep = torch.ones(stored.shape[0], dtype=torch.bool, device=stored.device)
        keep[torch.tensor(picked, dtype=torch.int64, device=stored.device)] = False
        return stored[keep]


class _KronBuilder(StoreBuilder):
    """Collects the factor sums (side payload) and, for EK-FAC, the rows of its blocks: held
    through the one pass of a one-shot stream, else read again once the bases are known (the
    grid summed chunk by chunk; ``"exact"`` keeps them)."""

    def __init__(self, cls, layout, block_ids, *, dtype, device, damping, probe, max_memory,
                 held):
        self.cls, self.layout, self.block_ids = cls, layout, tuple(block_ids)
        self.dtype, self.device, self.damping, self.probe = dtype, device, damping, probe
        self.max_memory, self.held = max_memory, held  # bytes: the store's, then the rows
        self.rows: list[list[torch.Tensor]] = [[] for _ in self.block_ids]
        self.payload: KroneckerFactors | None = None
        self.reread = False
        self.bases: list[KronBlock] | None = None  # known after the first of two passes
        self.lam: list[torch.Tensor] | None = None  # the grids summed in the second

    def can_reread(self):
        self.reread = True

    def add(self, rows):
        if not self.cls.holds_rows or (self.reread and self.bases is None):
            return  # K-FAC, or the first of EK-FAC's two passes: the factors suffice
        if self.lam is not None:
            for lam, blk, b in zip(self.lam, self.bases, self.block_ids):
                lam += grid(rows[:, self.layout.slice(b)], blk)
            return
        size = rows.shape[0] * sum(self.layout.sizes[b] for b in self.block_ids) * \
            element_size(self.dtype)
        check_memory(f"{self.cls.__name__}.builder", self.held + size, self.device,
                     max_memory=self.max_memory,
                     detail=f"the rows of {len(self.block_ids)} {self.cls.name} blocks",
                     remedies=("pass data that can be read twice (a batch or a list of "
                               "batches, not a one-shot iterator): the build then holds none",))
        self.held += size
        for held, b in zip(self.rows, self.block_ids):
            held.append(rows[:, self.layout.slice(b)].clone())

    def add_side(self, side):
        payload = side.get(KRONECKER_KEY)
        if payload is not None:
            self.payload = payload

    def another_pass(self):
        if not (self.cls.holds_rows and self.reread):
            return False
        self._prepare()
        if self.payload.refresh != "exact":
            self.lam = [torch.zeros_like(blk.lam) for blk in self.bases]
        return True

    def _prepare(self) -> None:
        """The bases of every block from its factors (checked), the grids zero."""
        what = f"build of the {self.cls.name} blocks"
        self.bases = []
        for b in self.block_ids:
            entry = None if self.payload is None else \
                self.payload.factors.get(self.layout.starts[b])
            if entry is None:
                raise ValueError(f"{what}: block {b} has no Kronecker factors (the rows must "
                                 f"come as ssse_ext.side.Rows with a {KRONECKER_KEY!r} "
                                 f"payload, as the {self.cls.name} curvature's rows do)")
            a, g, tr = (entry[0].to(self.device), entry[1].to(self.device), bool(entry[2]))
            if a.shape[0] * g.shape[0] != self.layout.sizes[b]:
                raise ValueError(f"{what}: block {b} has {self.layout.sizes[b]} parameters, "
                                 f"its factors are {tuple(g.shape)} and {tuple(a.shape)}")
            ea, qa = eigh(a)
            eg, qg = eigh(g)
            ea = checked_psd(ea, float(torch.linalg.matrix_norm(a)), what, b, "eigenvalue")
            eg = checked_psd(eg, float(torch.linalg.matrix_norm(g)), what, b, "eigenvalue")
            # compact: the bases rounded at once (the grid is then fitted in them)
            dt = self.dtype if self.payload.storage == "compact" else torch.float64
            self.bases.append(KronBlock(g.shape[0], a.shape[0], tr, qa.to(dt), ea, qg.to(dt), eg,
                                        torch.zeros(g.shape[0], a.shape[0], dtype=torch.float64,
                                                    device=self.device)))

    def finish(self, normalizer):
        if self.bases is None:
            self._prepare()
        options = self.payload.options() if self.payload is not None else {}
        store = self.cls(self.layout, self.block_ids, self.bases, damping=self.damping,
                         normalizer=normalizer, dtype=self.dtype, **options)
        for i, (blk, b) in enumerate(zip(self.bases, self.block_ids)):
            rows = torch.cat(self.rows[i]) if self.rows[i] else \
                torch.zeros(0, self.layout.sizes[b], dtype=self.dtype, device=self.device)
            self.rows[i] = []
            lam = store.fit_grid(blk, rows) if self.lam is None else self.lam[i]
            keep = self.cls.holds_rows and store.refresh == "exact"
            store.write([(i, replace(blk, lam=lam, rows=rows if keep else None), False)])
        if self.probe is not None:
            store.write_sketch(self.probe)
        return store
