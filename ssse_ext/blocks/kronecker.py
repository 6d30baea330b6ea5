r"""Kronecker-factored blocks: K-FAC (``name = "kfac"``) and EK-FAC (``name = "ekfac"``).

A block is one weight :math:`W` (``out x in``) of a linear layer, applied at positions
:math:`t` to inputs :math:`a_{i,t}` with output gradients :math:`g_{i,t}`; its flat rows are
the per-sample gradients :math:`G_i = \sum_t g_{i,t} a_{i,t}^\top`. The store keeps the float64
sums :math:`\bar A = \sum_{i,t} a a^\top` and :math:`\bar S = \sum_{i,t} g g^\top` (a side
payload of the rows, :class:`KroneckerFactors`), their eigenbases :math:`Q_A, Q_S`, and a grid
:math:`\bar\Lambda` (``out x in``) with :math:`F_W = (Q_S \otimes Q_A)\,
\mathrm{diag}(\bar\Lambda / N + \lambda)\,(Q_S \otimes Q_A)^\top` in PyTorch's row-major
flattening (:math:`\mathrm{vec}(g a^\top) = g \otimes a`):

- K-FAC: :math:`F_W = S \otimes A + \lambda I` with :math:`A = \bar A / N`, :math:`S = \bar S / N`,
  so :math:`\bar\Lambda_{jk} = s_j a_k / N` from the eigenvalues of :math:`\bar S, \bar A`;
- EK-FAC: :math:`\bar\Lambda = \sum_i (Q_S^\top G_i Q_A)^{\circ 2}`, the exact second moments
  of the per-sample gradients in the Kronecker eigenbasis.

The apply is :math:`F_W^{-1} V = Q_S \big((Q_S^\top V Q_A) \oslash (\bar\Lambda/N + \lambda)\big)
Q_A^\top`: the damping is exact. A weight stored ``(in, out)`` (GPT-2's ``Conv1D``) is the
same with :math:`V` transposed. Memory per block: the float64 sums, bases and grid
(:math:`8 (2\,in^2 + 2\,out^2 + in + out + in\,out)` bytes) and copies of the bases and the
inverse grid in the rows' dtype for the applies, against :math:`(in\,out)^2` numbers dense.

**Changes are downdates of sums** (float64, exact), then both factors are decomposed again:
K-FAC is then exactly the fit on the remaining samples. EK-FAC's grid needs the remaining
gradients in the new basis; ``refresh`` chooses (docs/maths.md): ``"basis-kept"`` (default)
downdates :math:`\bar\Lambda` in the *kept* basis (exact there) and keeps the basis while it
moved by at most ``tolerance`` (the off-diagonal mass :func:`moved` of a changed factor in it),
else takes the new bases and projects the grid, :math:`P_S \bar\Lambda P_A^\top` with
:math:`P = (Q'^\top Q)^{\circ 2}` (counted in :attr:`EKFACStore.rebased`); ``"exact"`` keeps the
rows of its blocks (the memory of a dual block) and recomputes the grid from the remaining rows
(removed rows found by :func:`~ssse_ext.blocks.matching.match_rows`), equal to a fresh fit.
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
from .kronecker_factors import (DEFAULT_TOLERANCE, KRONECKER_KEY, REFRESH_MODES, KronBlock,
                                KroneckerFactors, checked_psd, eigh, from_matrices, grid,
                                kron_times, kronecker_nbytes, moved, to_matrices)
from .matching import MATCH_RTOL, match_rows

#: The stages of a change in :attr:`KroneckerStore.last_timings`: the downdate (or update) of
#: the factor sums, their eigendecompositions, and the grid's change (the rows in the basis, the
#: basis-movement test, a projection).
CHANGE_STAGES = ("sums", "eigh", "grid")

__all__ = ["CHANGE_STAGES", "DEFAULT_TOLERANCE", "EKFACStore", "KRONECKER_KEY",
           "KroneckerFactors", "KroneckerStore", "REFRESH_MODES"]


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
                 refresh: str = "basis-kept", tolerance: float = DEFAULT_TOLERANCE):
        super().__init__(layout, block_ids, damping=damping, normalizer=normalizer)
        self._dtype = check_dtype(dtype)
        self.refresh = check_choice(refresh, "refresh", REFRESH_MODES)
        self.tolerance = check_nonneg_float(tolerance, "tolerance")
        blocks = list(blocks)
        if len(blocks) != len(self.block_ids):
            raise ValueError(f"blocks must hold one KronBlock per block id "
                             f"({len(self.block_ids)}), got {len(blocks)}")
        for b, blk in zip(self.block_ids, blocks):
            if not isinstance(blk, KronBlock) or blk.out * blk.inn != layout.sizes[b]:
                raise ValueError(f"block {b} has {layout.sizes[b]} parameters, its Kronecker "
                                 f"statistics describe {getattr(blk, 'out', '?')} x "
                                 f"{getattr(blk, 'inn', '?')}")
        self._blocks = blocks
        self._device = blocks[0].a.device if blocks else torch.device("cpu")
        self.rebased = 0  # basis changes of "basis-kept" downdates (EK-FAC)
        self.last_moved = 0.0
        self.last_timings = dict.fromkeys(CHANGE_STAGES, 0.0)  # seconds of the last change
        self._parts = [self._apply_parts(blk) for blk in blocks]

    def _apply_parts(self, blk: KronBlock) -> tuple[torch.Tensor, ...]:
        dt = self._dtype
        return (blk.qa.to(dt), blk.qg.to(dt),
                (1.0 / (blk.lam / self.normalizer + self.damping)).to(dt))

    # ---- what is held ----
    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._device)

    @property
    def blocks(self) -> tuple[KronBlock, ...]:
        """The :class:`KronBlock` statistics of the blocks held, in :attr:`block_ids` order."""
        return tuple(self._blocks)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for blk in self._blocks
                   for t in blk.tensors().values()) + \
            sum(t.numel() * t.element_size() for parts in self._parts for t in parts)

    def apply_into(self, v, base, scale, out) -> None:
        for b, blk, (qa, qg, inv) in zip(self.block_ids, self._blocks, self._parts):
            sl = self.layout.slice(b)
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
                     what: str, b: int) -> tuple[KronBlock, bool]:
        """``new`` (changed sums and bases) with its grid for the change of ``rows``, and
        whether a kept basis was replaced by an approximation."""
        return replace(new, lam=self.fit_grid(new, None)), False

    def _change_block(self, i: int, entry, rows: torch.Tensor, sign: int, what: str
                      ) -> tuple[KronBlock, bool]:
        blk, b = self._blocks[i], self.block_ids[i]
        a_r, g_r, tr = entry
        if a_r.shape != blk.a.shape or g_r.shape != blk.g.shape or tr != blk.transposed:
            raise ValueError(f"{what}: the Kronecker factors of block {b} are "
                             f"{tuple(g_r.shape)} and {tuple(a_r.shape)}, the block holds "
                             f"({blk.out}, {blk.out}) and ({blk.inn}, {blk.inn})")
        clock, seconds = self._clock, self.last_timings
        t0 = clock()
        a, g = blk.a + sign * a_r, blk.g + sign * g_r
        t1 = clock()
        ea, qa = eigh(a)
        eg, qg = eigh(g)
        scale_a = float(torch.linalg.matrix_norm(blk.a) + torch.linalg.matrix_norm(a_r))
        scale_g = float(torch.linalg.matrix_norm(blk.g) + torch.linalg.matrix_norm(g_r))
        ea = checked_psd(ea, scale_a, what, b, "input factor eigenvalue")
        eg = checked_psd(eg, scale_g, what, b, "output factor eigenvalue")
        new = replace(blk, a=a, g=g, qa=qa, ea=ea, qg=qg, eg=eg)
        t2 = clock()
        changed = self.changed_grid(blk, new, rows, sign, what, b)
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

    def write(self, plan) -> None:
        for i, blk, rebased in plan:
            self._blocks[i] = blk
            self._parts[i] = self._apply_parts(blk)
            self.rebased += bool(rebased)

    def change_nbytes(self, k, *, method="woodbury", keep=False, shift=0.0):
        work = kept = 0
        for blk in self._blocks:
            square = blk.out ** 2 + blk.inn ** 2
            per = 8 * (6 * square + 3 * blk.out * blk.inn)
            if blk.rows is not None:
                per += blk.rows.numel() * blk.rows.element_size()
            work = max(work, per + 8 * k * blk.out * blk.inn)
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
                                    0 if blk.rows is None else blk.rows.shape[0])
                   for blk in self._blocks)

    def _like(self, blocks, dtype) -> "KroneckerStore":
        store = type(self)(self.layout, self.block_ids, blocks, damping=self.damping,
                           normalizer=self.normalizer, dtype=dtype, refresh=self.refresh,
                           tolerance=self.tolerance)
        store.rebased = self.rebased
        return store

    def to(self, device=None, dtype=None, *, max_memory=None):
        check_dtype(dtype)
        check_memory(f"{type(self).__name__}.to", self.copy_nbytes(dtype),
                     self.device if device is None else device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} {self.name} blocks",
                     remedies=COPY_REMEDIES)
        dtype = dtype or self._dtype
        return self._like([blk.to(device, dtype) for blk in self._blocks], dtype)

    def clone(self, *, max_memory=None):
        check_memory(f"{type(self).__name__}.clone", self.nbytes, self.device,
                     max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} {self.name} blocks",
                     remedies=COPY_REMEDIES)
        return self._like([replace(blk, **{k: t.clone() for k, t in blk.tensors().items()})
                           for blk in self._blocks], self._dtype)

    def state(self):
        tensors = {f"{j}.{k}": t for j, blk in enumerate(self._blocks)
                   for k, t in blk.tensors().items()}
        shapes = [[blk.out, blk.inn, bool(blk.transposed)] for blk in self._blocks]
        rows = [0 if blk.rows is None else int(blk.rows.shape[0]) for blk in self._blocks]
        return tensors, {"shapes": shapes, "rows": rows, "refresh": self.refresh,
                         "tolerance": self.tolerance, "rebased": self.rebased}

    @classmethod
    def from_state(cls, tensors, meta, *, layout, block_ids, damping, normalizer, dtype=None):
        try:
            shapes = [(int(o), int(i), bool(t)) for o, i, t in meta["shapes"]]
            blocks = []
            for j, (o, i, tr) in enumerate(shapes):
                parts = {k: tensors[f"{j}.{k}"] for k in ("a", "g", "qa", "ea", "qg", "eg",
                                                          "lam")}
                want = {"a": (i, i), "g": (o, o), "qa": (i, i), "ea": (i,), "qg": (o, o),
                        "eg": (o,), "lam": (o, i)}
                for k, shape in want.items():
                    if tuple(parts[k].shape) != shape or parts[k].dtype != torch.float64:
                        raise ValueError(f"tensor {j}.{k}")
                rows = tensors.get(f"{j}.rows")
                blocks.append(KronBlock(o, i, tr, rows=rows, **parts))
            store = cls(layout, block_ids, blocks, damping=damping, normalizer=normalizer,
                        dtype=dtype or torch.float32, refresh=str(meta["refresh"]),
                        tolerance=float(meta["tolerance"]))
            store.rebased = int(meta.get("rebased", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid {cls.name}-blocks state: missing or bad "
                             f"{exc}") from None
        return store

    # ---- costs ----
    @classmethod
    def nbytes_for(cls, size, rows, dtype):
        # the shape is not known from the size: a square weight, 2 * size in the factors
        return size * (5 * 8 + 3 * element_size(dtype))

    @classmethod
    def state_nbytes(cls, sizes, meta, dtype):
        return sum(kronecker_nbytes(int(o), int(i), dtype, int(r)) for (o, i, _), r in
                   zip(meta["shapes"], meta.get("rows", [0] * len(sizes))))

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
                f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})")


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

    def changed_grid(self, old, new, rows, sign, what, b):
        if self.refresh == "exact":
            kept = self._kept_rows(old, rows, sign, b)
            return replace(new, rows=kept, lam=grid(kept, new)), False
        lam = old.lam + sign * grid(rows, old)
        scale = float(old.lam.abs().sum()) + float(rows.to(torch.float64).square().sum())
        lam = checked_psd(lam.flatten(), scale, what, b, "EK-FAC eigenvalue").view_as(lam)
        moved_by = max(moved(old.qa, new.a), moved(old.qg, new.g))
        self.last_moved = max(self.last_moved, moved_by)
        if moved_by <= self.tolerance:
            return replace(new, qa=old.qa, ea=old.ea, qg=old.qg, eg=old.eg, lam=lam), False
        pg = (new.qg.T @ old.qg).square()
        pa = (new.qa.T @ old.qa).square()
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
            self.bases.append(KronBlock(g.shape[0], a.shape[0], tr, a, g, qa, ea, qg, eg,
                                        torch.zeros(g.shape[0], a.shape[0], dtype=torch.float64,
                                                    device=self.device)))

    def finish(self, normalizer):
        if self.bases is None:
            self._prepare()
        options = {"refresh": self.payload.refresh, "tolerance": self.payload.tolerance}
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
