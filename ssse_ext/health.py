r"""Numerical health of a stored inverse (docs/maths.md, "Numerical health").

Two checks, both cheap next to the work they watch:

- **Condition estimate at the build.** The stable build inverts
  :math:`F_b = \lambda I + G_b / N` in float64, so its relative error is about
  :math:`\kappa(F_b)\,u_{64}` (:math:`u_{64} = 1.1\cdot10^{-16}`) whatever the result's dtype.
  From the float64 Gram accumulators, :func:`ill_conditioned_blocks` bounds
  :math:`\kappa(F_b) \le 1 + \mathrm{tr}(G_b)/(N\lambda)` for free and, only for blocks where that
  bound is too large, computes the Cholesky factor :math:`F_b = LL^\top`, whose pivots give
  :math:`\kappa(F_b) \ge \max_i l_{ii}^2 / \min_i l_{ii}^2`.
- **Probe.** :class:`FisherProbe` keeps :math:`F`'s action on a few fixed random vectors per
  block, exactly in float64 (:math:`S_b = \sum_r u_{r,b} u_{r,b}^\top X_b`, updated with every
  row added or removed), so that :math:`\lVert F^{-1}_{\mathrm{stored}} (F X) - X\rVert /
  \lVert X \rVert` measures how far the stored inverse is from the exact inverse of the Fisher
  it stands for: the rounding of its dtype, the error of the build and the drift of many
  updates and downdates. (Inverting the stored block to get :math:`F` would measure only the
  rounding of that inversion: the probe must know :math:`F` independently.)

The condition warning fires when :math:`\kappa\,u_{64}` exceeds :math:`\sqrt{\epsilon}` of the
inverse's dtype (half its digits: 3.5e-4 for float32, 1.5e-8 for float64). The probe's residual
of a block cannot go below what rounding the block to its dtype leaves, about
:math:`c_b\,u` with :math:`c_b` between 1 and its condition number
(:meth:`FisherProbe.residuals`); it warns above :math:`\max(\sqrt{\epsilon}, 10\,c_b\,u)`, so
that it flags drift and unstable recurrences, not conditioning (the condition warning's job).

A full probe costs three products with the whole inverse (a third of a deletion request's work
on a dense inverse). :meth:`FisherProbe.check` can also probe a few blocks only
(:meth:`FisherProbe.sample`: the blocks worst against their threshold at the last full probe,
then blocks drawn at random with a seeded generator), from a float64 copy of each, at a cost
proportional to their size: what a request that is not written anywhere needs
(:class:`ssse.Eraser`); an inverse is probed in full before it is written
(:meth:`ssse_ext.BlockInverseFisher.to_state`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from . import _ops
from .layout import BlockLayout
from .validation import check_dtype, check_int, check_positive_int

__all__ = [
    "ConditionWarning",
    "FisherProbe",
    "Health",
    "HealthError",
    "HealthWarning",
    "device_clock",
    "ill_conditioned_blocks",
    "tolerance",
]

#: Unit roundoff of float64: the float64 inversion's relative error is about kappa times this.
U64 = torch.finfo(torch.float64).eps / 2
#: Random vectors per block of a probe.
DEFAULT_COLUMNS = 3
#: A residual up to this many times the rounding floor of its block is rounding, not drift.
FLOOR_FACTOR = 10
#: Blocks a full probe remembers as the worst against their threshold (:attr:`FisherProbe.watch`).
WATCH_BLOCKS = 64
# Elements of float64 scratch per batch of blocks (32 MiB): the checks' extra memory is bounded.
_ELEMENTS = 1 << 22


class ConditionWarning(RuntimeWarning):
    """A block of the build is so ill-conditioned that its inverse loses more than half the
    digits of its dtype."""


class HealthWarning(RuntimeWarning):
    """The probe finds the stored inverse further from the exact inverse than the tolerance."""


class HealthError(RuntimeError):
    """A request whose inverse fails its health probe, refused where it would be recorded as
    served (nothing was changed)."""


def tolerance(dtype: torch.dtype) -> float:
    r""":math:`\sqrt{\epsilon}` of ``dtype`` (float32: 3.5e-4, float64: 1.5e-8)."""
    check_dtype(dtype)
    return math.sqrt(torch.finfo(dtype).eps)


def _runs(layout: BlockLayout, blocks, width) -> Iterator[tuple[int, int, int, int]]:
    """``(position, first block, count, size)`` of runs of ``blocks`` (increasing block ids,
    packed one after the other) that are consecutive in the layout and of equal size: their
    packed storage is a ``(count, size, size)`` view and their parameters a ``count * size``
    slice; at most ``_ELEMENTS // (size * width(size))`` blocks per run."""
    ids = list(blocks)
    i = 0
    while i < len(ids):
        b0, s = ids[i], layout.sizes[ids[i]]
        cap = max(1, _ELEMENTS // (s * max(width(s), 1)))
        n = 1
        while i + n < len(ids) and n < cap and ids[i + n] == b0 + n and \
                layout.sizes[ids[i + n]] == s:
            n += 1
        yield i, b0, n, s
        i += n


def device_clock(device) -> float:
    """Seconds of a monotonic clock, read after the work queued on ``device`` (CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _blocks_of(inv, ids) -> list[torch.Tensor]:
    """The ``(s, s)`` blocks ``ids`` of ``inv``: the stores' own blocks (views where a store
    holds them as such), else ``inv.dense_block``."""
    stores = getattr(inv, "stores", None)
    if stores is None:
        return [inv.dense_block(b) for b in ids]
    holder = {}
    for store in stores:
        held = set(store.block_ids)
        holder.update((b, store) for b in ids if b in held)
    return [holder[b].block(b) for b in ids]


def _mixed_seed(seed: int, draw: int) -> int:
    """One seed of a generator from a probe's seed and a draw's number (distinct pairs give
    distinct seeds while both are below 2**31)."""
    return ((seed % (1 << 31)) << 31 | (draw % (1 << 31))) % (1 << 63)


# ---- condition estimate ---------------------------------------------------------------------

def ill_conditioned_blocks(gram: torch.Tensor, layout: BlockLayout, blocks, *,
                           damping: float, normalizer: float,
                           dtype: torch.dtype) -> list[tuple[int, float]]:
    r"""``(block, condition estimate)`` of the ``blocks`` whose expected relative error
    :math:`\kappa\,u_{64}` exceeds :func:`tolerance` of ``dtype``.

    Args:
        gram: the packed float64 Gram accumulators :math:`G_b` of ``blocks``, one after the
            other (lower triangles, as :class:`~ssse_ext.GramAccumulator` holds them); not
            modified.
        layout, blocks: the layout and the increasing ids of the accumulated blocks.
        damping, normalizer: :math:`\lambda` and :math:`N` of :math:`F_b = \lambda I + G_b/N`.
        dtype: the result's dtype (its tolerance).

    The estimate is a lower bound from the Cholesky pivots (a factor of a few to ten below
    the true :math:`\kappa` on rank-deficient blocks), computed only for blocks whose free upper
    bound :math:`1 + \mathrm{tr}(G_b)/(N\lambda)` is above the threshold, a batch of equal-size
    blocks at a time in bounded memory. A block whose float64 Cholesky fails is left to the
    build, which reports it.
    """
    limit = tolerance(dtype) / U64
    out: list[tuple[int, float]] = []
    o = 0
    for _, b0, n, s in _runs(layout, blocks, lambda s: s):
        g = gram[o:o + n * s * s].view(n, s, s)
        o += n * s * s
        trace = g.diagonal(dim1=1, dim2=2).sum(1)
        bound = 1 + trace / (normalizer * damping)
        suspects = torch.nonzero(~(bound <= limit)).flatten()  # NaN counts as a suspect
        if suspects.numel() == 0:
            continue
        f = torch.tril(g[suspects]) / normalizer
        f.diagonal(dim1=1, dim2=2).add_(damping)
        chol, info = torch.linalg.cholesky_ex(f)
        pivots = chol.diagonal(dim1=1, dim2=2) ** 2
        cond = pivots.max(1).values / pivots.min(1).values
        for j, i in enumerate(suspects.tolist()):
            if int(info[j]) == 0 and not float(cond[j]) <= limit:
                out.append((b0 + i, float(cond[j])))
    return out


def warn_ill_conditioned(blocks: list[tuple[int, float]], layout: BlockLayout, *,
                         damping: float, rows: int, dtype: torch.dtype,
                         stacklevel: int = 4) -> None:
    """One :class:`ConditionWarning` for the worst of ``blocks`` (see
    :func:`ill_conditioned_blocks`), with the advice that applies, attributed to the frame
    ``stacklevel`` levels up (1: the caller)."""
    if not blocks:
        return
    b, cond = max(blocks, key=lambda t: t[1])
    s = layout.sizes[b]
    advice = f"increase the damping (now {damping:g}; the error scales like 1/damping)"
    if rows < s:
        advice += (f", or store it in the low-rank (dual) form, exact for blocks with fewer "
                   f"rows ({rows}) than parameters ({s}): representation=\"dual\" or "
                   f"\"auto\"")
    more = f" (and {len(blocks) - 1} other blocks)" if len(blocks) > 1 else ""
    warnings.warn(
        f"build: block {b} (parameters {layout.starts[b]}..{layout.starts[b] + s}) is "
        f"ill-conditioned{more}: condition number >= {cond:.1e}, so its inverse has a relative "
        f"error of about {cond * U64:.0e} or more (tolerance {tolerance(dtype):.1e} for "
        f"{str(dtype).removeprefix('torch.')}); {advice}. A float64 result does not help: the "
        f"inverse is already computed in float64", ConditionWarning, stacklevel=stacklevel + 1)


# ---- probe ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Health:
    r"""A probe's verdict on the block ``block`` whose residual
    :math:`\lVert F^{-1}_{\mathrm{stored}} (F X_b) - X_b\rVert / \lVert X_b\rVert` is largest
    against its threshold ``tolerance``; ``floor`` is the residual that rounding the block to
    its dtype explains (:meth:`FisherProbe.residuals`); ``ok`` when ``residual <= tolerance``."""

    residual: float
    block: int
    tolerance: float
    columns: int
    floor: float = 0.0
    #: The number of blocks probed when only some were (:meth:`FisherProbe.sample`); ``None``
    #: for a full probe.
    blocks: int | None = None

    @property
    def ok(self) -> bool:
        return self.residual <= self.tolerance

    def as_dict(self) -> dict:
        out = {"residual": self.residual, "block": self.block, "floor": self.floor,
               "tolerance": self.tolerance, "vectors": self.columns}
        if self.blocks is not None:
            out["blocks"] = self.blocks
        return out

    def __str__(self) -> str:
        where = "per block" if self.blocks is None else f"per block, {self.blocks} blocks"
        return (f"|F(F^-1 x) - x|/|x| = {self.residual:.1e} (block {self.block}, "
                f"{self.columns} random x {where}; rounding floor {self.floor:.0e}, "
                f"threshold {self.tolerance:.1e})")


def _cpu_contiguous(*tensors: torch.Tensor) -> bool:
    """Whether the CPU kernels can take ``tensors`` as they are."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


class FisherProbe:
    r"""The Fisher's action on ``columns`` fixed random vectors per block, exact in float64.

    Holds :math:`S = \sum_r u_r u_r^\top X` block by block (``(d, columns)``, unnormalised:
    :math:`F X = \lambda X + S / N`), with :math:`X` drawn from ``seed`` (regenerated, never
    stored). :meth:`add` follows every row added or removed; :meth:`check` compares with a
    stored inverse. Memory: ``8 * columns * d`` bytes, plus as much again while checking.

    Args:
        layout: the inverse's block layout.
        columns: random vectors per block.
        seed: the seed of :math:`X` (drawn on the CPU, so the same on every device).
        device: where :math:`S` lives.
    """

    def __init__(self, layout: BlockLayout, *, columns: int = DEFAULT_COLUMNS, seed: int = 0,
                 device=None, sketch: torch.Tensor | None = None):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        self.layout = layout
        self.columns = check_positive_int(columns, "columns")
        self.seed = check_int(seed, "seed")
        if sketch is None:
            sketch = torch.zeros(layout.dim, self.columns, dtype=torch.float64, device=device)
        elif not isinstance(sketch, torch.Tensor) or sketch.dtype != torch.float64 or \
                tuple(sketch.shape) != (layout.dim, self.columns):
            raise ValueError(f"sketch must be a float64 tensor of shape ({layout.dim}, "
                             f"{self.columns}), got {getattr(sketch, 'dtype', type(sketch))} "
                             f"{tuple(getattr(sketch, 'shape', ()))}")
        self.sketch = sketch
        self._x: torch.Tensor | None = None
        #: The blocks worst against their threshold at the last full :meth:`check`, worst first
        #: (at most :data:`WATCH_BLOCKS`; empty before the first).
        self.watch: tuple[int, ...] = ()
        #: Changes of the inverse followed (:meth:`follow`): the draw of a sampled probe.
        self.changes = 0
        # The verdict of the last full check since the last change (None: none since), and
        # whether the inverse changed since the probe was made or loaded.
        self.verdict: Health | None = None
        self.changed = False

    @property
    def device(self) -> torch.device:
        return self.sketch.device

    @property
    def x(self) -> torch.Tensor:
        """The ``(d, columns)`` float64 random vectors."""
        if self._x is None or self._x.device != self.device:
            gen = torch.Generator().manual_seed(self.seed)
            self._x = torch.randn(self.layout.dim, self.columns, dtype=torch.float64,
                                  generator=gen).to(self.device)
        return self._x

    def add(self, rows: torch.Tensor, sign: int = 1, *, blocks=None) -> "FisherProbe":
        r""":math:`S_b \mathrel{+}= \mathrm{sign}\; R_b^\top (R_b X_b)` for the ``(m, d)`` rows
        :math:`R` (validated by the caller), in float64, for ``blocks`` (increasing ids; all by
        default)."""
        if rows.shape[0] == 0:
            return self
        x = self.x
        m = rows.shape[0]
        ids = range(self.layout.num_blocks) if blocks is None else blocks
        if _cpu_contiguous(rows, x, self.sketch):
            # the rows read in their own dtype by the kernel (no float64 copy of them)
            _ops.call(_ops.rows_product_, rows, self.layout.table(blocks=list(ids)), x,
                      float(sign), self.sketch)
            return self
        for _, b0, n, s in _runs(self.layout, ids, lambda s: m):
            st = self.layout.starts[b0]
            r = rows[:, st:st + n * s].to(device=self.device,
                                          dtype=torch.float64).reshape(m, n, s)
            xb = x[st:st + n * s].reshape(n, s, -1)
            rx = torch.einsum("mns,nsc->nmc", r, xb)
            self.sketch[st:st + n * s] += sign * torch.einsum("mns,nmc->nsc", r, rx).reshape(
                n * s, -1)
        return self

    def follow(self, rows: torch.Tensor, sign: int) -> "FisherProbe":
        """:meth:`add` for a change of the inverse (an update or downdate of the rows):
        counted, and the inverse is probed in full before it is written
        (:meth:`check_before_writing`)."""
        self.add(rows, sign)
        self.changes += 1
        self.verdict, self.changed = None, True
        return self

    def check_before_writing(self, inv) -> None:
        """Refuses (:class:`HealthError`) ``inv`` when it changed (:meth:`follow`) since the
        probe was made or loaded and fails a full probe: the last one made since its last
        change, else one made now. Requests may probe a few blocks only
        (:class:`ssse.Eraser`); what is written is probed in full."""
        if not self.changed:
            return
        verdict = self.verdict or self.check(inv, warn=False)
        if not verdict.ok:
            raise HealthError(
                f"the inverse fails its health probe ({verdict}) after {self.changes} updates "
                f"and downdates: it is not written (its downdates drifted, or a block was "
                f"damaged); refit it on the remaining data")

    def add_gram(self, gram: torch.Tensor, blocks) -> "FisherProbe":
        r""":math:`S_b \mathrel{+}= G_b X_b` for ``blocks`` (increasing ids) from their packed
        float64 Gram accumulators, one after the other (lower triangles)."""
        x = self.x
        if _cpu_contiguous(gram, x, self.sketch):
            # the kernel reads the lower triangles in place (no triangular copies)
            _ops.call(_ops.gram_product_, gram, self.layout.table(blocks=list(blocks)), x,
                      self.sketch)
            return self
        o = 0
        for _, b0, n, s in _runs(self.layout, blocks, lambda s: s):
            st = self.layout.starts[b0]
            g = torch.tril(gram[o:o + n * s * s].view(n, s, s).to(self.device))
            o += n * s * s
            xb = x[st:st + n * s].reshape(n, s, -1)
            sb = g @ xb + torch.tril(g, -1).transpose(1, 2) @ xb
            self.sketch[st:st + n * s] += sb.reshape(n * s, -1)
        return self

    def fisher_x(self, damping: float, normalizer: float) -> torch.Tensor:
        r""":math:`F X = \lambda X + S / N`, ``(d, columns)`` float64."""
        return damping * self.x + self.sketch / normalizer

    def residuals(self, inv) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Per block, the residual :math:`\rho_b = \lVert A_b (F X)_b - X_b\rVert_F /
        \lVert X_b\rVert_F` with :math:`A` = ``inv`` (anything with ``layout``, ``damping``,
        ``normalizer``, ``dtype`` and ``matvec``), and the scale
        :math:`c_b = \frac{\lVert (F X)_b\rVert}{\lVert X_b\rVert}
        \frac{\lVert (A X)_b\rVert}{\lVert X_b\rVert}` (between 1 and the condition number:
        :math:`c_b\,u` is the residual that rounding every entry of :math:`A` to the unit
        roundoff :math:`u` leaves), as CPU float64 tensors. :math:`F X` is passed in two parts
        rounded to the inverse's dtype (high and low), so a float32 inverse is not charged for
        the rounding of its input; the products accumulate in float64."""
        if inv.layout != self.layout:
            raise ValueError("the probe was made for another block layout")
        x = self.x.to(inv.device)
        fx = self.fisher_x(inv.damping, inv.normalizer).to(inv.device)
        hi = fx.to(inv.dtype)
        lo = (fx - hi.to(torch.float64)).to(inv.dtype)
        y = inv.matvec(hi).to(torch.float64) + inv.matvec(lo).to(torch.float64)
        ax = inv.matvec(x.to(inv.dtype)).to(torch.float64)
        sums = torch.stack([(y - x).pow(2).sum(1), x.pow(2).sum(1), fx.pow(2).sum(1),
                            ax.pow(2).sum(1)])
        res = torch.empty(self.layout.num_blocks, dtype=torch.float64)
        scale = torch.empty_like(res)
        for b0, n, s in self.layout.runs():
            st = self.layout.starts[b0]
            diff, xx, ff, aa = sums[:, st:st + n * s].reshape(4, n, s).sum(2).cpu()
            res[b0:b0 + n] = (diff / xx).sqrt()
            scale[b0:b0 + n] = (ff * aa).sqrt() / xx
        return res, scale

    def block_residuals(self, inv, blocks) -> tuple[torch.Tensor, torch.Tensor]:
        r""":meth:`residuals` of the blocks ``blocks`` only, in that order, from float64 copies
        of those blocks (gathered by size, a few batched operations each) with their products
        rounded to the inverse's dtype as :meth:`residuals` rounds them: the same verdicts, at
        a cost proportional to the sizes of the blocks probed."""
        if inv.layout != self.layout:
            raise ValueError("the probe was made for another block layout")
        res = torch.empty(len(blocks), dtype=torch.float64)
        scale = torch.empty_like(res)
        mats = _blocks_of(inv, blocks)
        by_size: dict[int, list[int]] = {}
        for i, b in enumerate(blocks):
            by_size.setdefault(self.layout.sizes[b], []).append(i)
        for s, pos in by_size.items():
            index = torch.cat([torch.arange(self.layout.starts[blocks[i]],
                                            self.layout.starts[blocks[i]] + s) for i in pos])
            index = index.to(self.device)
            x = self.x[index].view(len(pos), s, -1).to(inv.device)
            fx = (inv.damping * self.x[index] + self.sketch[index] / inv.normalizer).view(
                len(pos), s, -1).to(inv.device)
            a = torch.stack([mats[i] for i in pos]).to(torch.float64)

            def product(v):  # as the kernels: float64 sums, the result in the inverse's dtype
                return torch.bmm(a, v.to(torch.float64)).to(inv.dtype).to(torch.float64)
            hi = fx.to(inv.dtype)
            y = product(hi) + product((fx - hi.to(torch.float64)).to(inv.dtype))
            ax = product(x.to(inv.dtype))
            sums = torch.stack([t.pow(2).sum((1, 2)) for t in (y - x, x, fx, ax)]).cpu()
            res[pos] = (sums[0] / sums[1]).sqrt()
            scale[pos] = (sums[2] * sums[3]).sqrt() / sums[1]
        return res, scale

    def _block_ids(self, blocks) -> list[int]:
        """The blocks of ``check(blocks=...)``: :meth:`sample` of an int, else distinct ids of
        the layout."""
        if isinstance(blocks, int) and not isinstance(blocks, bool):
            return list(self.sample(check_positive_int(blocks, "blocks"), self.changes))
        ids = list(blocks)
        nb = self.layout.num_blocks
        if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < nb
                   for b in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"blocks must be distinct block indices in [0, {nb}), got "
                             f"{ids[:8]}")
        return ids

    def sample(self, count: int, draw: int) -> tuple[int, ...]:
        """``count`` blocks to probe (all when the layout has no more), increasing: the
        blocks worst at the last full :meth:`check` (:attr:`watch`, up to half of ``count``),
        then blocks drawn uniformly from the others by a generator seeded with the probe's
        seed and ``draw`` (e.g. the number of the request): the same draws on every run."""
        count = check_positive_int(count, "count")
        draw = check_int(draw, "draw")
        nb = self.layout.num_blocks
        if count >= nb:
            return tuple(range(nb))
        chosen = list(self.watch[:count // 2])
        rest = torch.ones(nb, dtype=torch.bool)
        rest[chosen] = False
        others = torch.nonzero(rest).flatten()
        gen = torch.Generator().manual_seed(_mixed_seed(self.seed, draw))
        pick = torch.randperm(others.numel(), generator=gen)[:count - len(chosen)]
        return tuple(sorted(chosen + others[pick].tolist()))

    def check(self, inv, *, what: str = "", warn: bool = True, blocks=None) -> Health:
        r"""The :class:`Health` of ``inv``: the block whose residual is largest against its
        threshold, :math:`\max(\sqrt{\epsilon}, 10\,c_b\,u)` (:meth:`residuals`); with
        ``warn``, a :class:`HealthWarning` with advice when it is above.

        ``blocks``: ``None`` probes every block (and records :attr:`watch` and the verdict
        :meth:`check_before_writing` reads); an int ``m`` probes the ``m`` blocks of
        :meth:`sample` (drawn with :attr:`changes`); a sequence probes those block ids
        (:meth:`block_residuals`; :attr:`Health.blocks` says how many)."""
        ids = None if blocks is None else self._block_ids(blocks)
        if ids is not None and len(ids) == self.layout.num_blocks:
            ids = None  # a sample of every block is the full probe, cheaper
        res, scale = self.residuals(inv) if ids is None else self.block_residuals(inv, ids)
        tol = tolerance(inv.dtype)
        count = None if ids is None else len(ids)
        if res.numel() == 0:
            return Health(0.0, 0, tol, self.columns, blocks=count)
        u = torch.finfo(inv.dtype).eps / 2
        limit = torch.clamp(FLOOR_FACTOR * u * scale, min=tol)
        ratio = torch.nan_to_num(res / limit, nan=math.inf)
        i = int(ratio.argmax())
        b = i if ids is None else ids[i]
        health = Health(float(res[i]), b, float(limit[i]), self.columns, float(u * scale[i]),
                        count)
        if ids is None:
            self.watch = tuple(torch.argsort(ratio, descending=True)[:WATCH_BLOCKS].tolist())
            self.verdict = health
        if warn and not health.ok:
            fix = "rebuild it (fit the inverse again on the remaining data)"
            if "dense" in getattr(inv, "representation", ()):
                fix += (", with representation=\"requests\" if it has to serve many more "
                        "requests (its blocks then keep what exact downdates need)")
            warnings.warn(f"health probe{' after ' + what if what else ''}: the stored inverse "
                          f"is off by {health.residual:.1e} in block {b} (|F(F^-1 x) - x|/|x|; "
                          f"its rounding to {str(inv.dtype).removeprefix('torch.')} explains "
                          f"{health.floor:.0e}, threshold {health.tolerance:.1e}); {fix}",
                          HealthWarning, stacklevel=3)
        return health

    # ---- copies and files ----
    def _carried(self, out: "FisherProbe", verdict: Health | None) -> "FisherProbe":
        """``out`` with what this probe knows of the inverse's changes (a copy of an inverse
        changed since its last full probe is probed before it is written too)."""
        out.watch, out.changes, out.changed, out.verdict = \
            self.watch, self.changes, self.changed, verdict
        return out

    def clone(self) -> "FisherProbe":
        return self._carried(FisherProbe(self.layout, columns=self.columns, seed=self.seed,
                                         sketch=self.sketch.clone()), self.verdict)

    def to(self, device) -> "FisherProbe":
        """A copy on ``device`` (for the copy of an inverse on another device or in another
        dtype, whose verdict is to be found anew)."""
        moved = self.sketch.to(device)
        return self._carried(FisherProbe(
            self.layout, columns=self.columns, seed=self.seed,
            sketch=moved.clone() if moved.data_ptr() == self.sketch.data_ptr() else moved),
            None)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (``probe.sketch``) and metadata (``columns``, ``seed``)."""
        return {"probe.sketch": self.sketch}, {"columns": self.columns, "seed": self.seed}

    @classmethod
    def from_state(cls, layout: BlockLayout, tensors: dict, meta: dict) -> "FisherProbe":
        try:
            sketch = tensors["probe.sketch"]
            columns, seed = int(meta["columns"]), int(meta["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid probe state: missing or bad {exc}") from None
        return cls(layout, columns=columns, seed=seed, sketch=sketch.to(torch.float64))

