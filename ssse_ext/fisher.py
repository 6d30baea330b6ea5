"""The block-diagonal inverse of the damped empirical Fisher: build, update, downdate, apply."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from . import _C, _ops
from .budget import AVAILABLE_MEMORY_ENV, check_memory, format_bytes, memory_limit
from .dual import DualBlocks, choose_representation, dual_nbytes
from .errors import InsufficientMemoryError, NotPositiveDefiniteError
from .health import (DEFAULT_COLUMNS, FisherProbe, Health, HealthWarning, ill_conditioned_blocks,
                     warn_ill_conditioned)
from .layout import BlockLayout, check_build_args
from .validation import (FLOAT_DTYPES, all_finite, check_choice, check_dtype, check_finite_float,
                         check_nonneg_int, check_positive_float, check_positive_int, check_vector,
                         matrix_chunks)

__all__ = [
    "BlockInverseFisher",
    "FisherConfig",
    "GramAccumulator",
    "InsufficientMemoryError",
    "LowRankChange",
    "NotPositiveDefiniteError",
    "build_inverse_fisher",
    "build_peak_bytes",
    "BUILD_METHODS",
    "CURVATURES",
    "DEFAULT_BLOCK_SIZE",
    "REPRESENTATIONS",
    "UPDATE_METHODS",
]

#: ``auto`` = ``cholesky``: streamed float64 Gram matrix, then a Cholesky-based inverse (stable);
#: ``sherman_morrison``: the literal rank-1 recurrence of paper eq. 7 in the input dtype;
#: ``woodbury``: the same recurrence in rank-64 steps in float64 arithmetic.
BUILD_METHODS = ("auto", "cholesky", "sherman_morrison", "woodbury")
#: What the rows of the stored Fisher are (recorded in :class:`FisherConfig`).
CURVATURES = ("empirical", "ggn", "mc")
#: How blocks are stored: dense inverses, the low-rank (dual) form, or the smaller per block.
REPRESENTATIONS = ("dense", "dual", "auto")
#: Methods of :meth:`BlockInverseFisher.update` and :meth:`BlockInverseFisher.downdate`.
UPDATE_METHODS = ("woodbury", "sherman_morrison")

#: Largest block size ``B`` when neither ``block_size`` nor a layout is given.
DEFAULT_BLOCK_SIZE = 1024
# Elements of float64 scratch per batch of blocks when the Woodbury form is checked or applied
# on the fly with torch (32 MiB): a request's extra memory stays small next to the inverse.
_WOODBURY_ELEMENTS = 1 << 22
#: Smallest Cholesky pivot of the normalised Woodbury matrix accepted by an update, a downdate
#: or a leave-k-out apply: far above the rounding of its float64 computation (~1e-15), so the
#: kernels that then write the blocks cannot disagree with the check.
_PD_MARGIN = 1e-10
# The stable build keeps its float64 accumulators in about this many groups of blocks (and
# inverts them one group at a time); groups smaller than _MIN_GROUP_NUMEL are not split further.
_GROUPS = 8
_MIN_GROUP_NUMEL = 1 << 22
# Rows gathered per Gram call from a stream of smaller chunks, memory allowing: the row buffer
# takes at most an eighth of the result, or _MIN_GATHER_BYTES.
_GATHER_ROWS = 256
_MIN_GATHER_BYTES = 64 << 20
# Rows per kernel call of the Woodbury form; both kernels split a call into rank-64 steps (the
# CUDA one fusing consecutive steps into one pass over F^{-1}), so larger calls only save
# conversions and passes.
_DEFAULT_WOODBURY_CHUNK = 1024
_ELEMENT_SIZE = {torch.float32: 4, torch.float64: 8}
# Before inverting, the stable build checks its float64 accumulators a run of blocks at a time
# (the condition estimate, then the health probe), at most _RUN_ELEMENTS elements unless a
# single block is larger (ssse_ext.health): measured, two float64 copies of the run at once in
# a build and three for the condition estimate alone (the copy, its damped form, the factor).
_CHECK_COPIES = 3
_RUN_ELEMENTS = 1 << 22
# float64 (d, columns) tensors of a health probe alive while it checks a result: the sketch,
# the random vectors, F X in float64 and in two parts of the inverse's dtype, the products.
_PROBE_COPIES = 10
# float64 copies of a run of blocks that a Woodbury check holds at once when it factors the
# blocks themselves (more rows than parameters, or a shift): the block, its Cholesky factor,
# the inner matrix and its factor, and one temporary.
_WOODBURY_COPIES = 5
# What makes a copy of an existing inverse fit.
_COPY_REMEDIES = ("free memory on the device (e.g. drop other copies of the inverse)",
                  "pass max_memory=<bytes> if more memory may be used than is free now")


@dataclass(frozen=True)
class FisherConfig:
    r"""What defines the Fisher :math:`F_b = \lambda I + \frac{1}{N}\sum_i g_i g_i^\top` of every block.

    Attributes:
        damping: :math:`\lambda > 0`.
        normalizer: :math:`N > 0` (the number of samples or mini-batches by default); fixed for
            the life of the inverse, so later updates and downdates use the same :math:`N`.
        layout: the block layout of the flat parameter vector.
        curvature: what the rows were: ``"empirical"`` (gradients), ``"ggn"`` (Gauss–Newton
            rows) or ``"mc"`` (sampled-label gradients); see :mod:`ssse.curvature`.
    """

    damping: float
    normalizer: float
    layout: BlockLayout
    curvature: str = "empirical"

    def __post_init__(self):
        object.__setattr__(self, "damping", check_positive_float(self.damping, "damping"))
        object.__setattr__(self, "normalizer",
                           check_positive_float(self.normalizer, "normalizer"))
        if not isinstance(self.layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(self.layout).__name__}")
        check_choice(self.curvature, "curvature", CURVATURES)


# ---- validation ---------------------------------------------------------------------------

def _chunks(grads, chunk_size: int | None, name: str = "grads", *, dim: int | None = None,
            dtype=None, device=None) -> Iterator[torch.Tensor]:
    return matrix_chunks(grads, chunk_size, name, dim=dim, dtype=dtype, device=device)


def _raise_if_failed(info: torch.Tensor, what: str, layout: BlockLayout, rows: str):
    bad = torch.nonzero(info).flatten().tolist()
    if bad:
        b = bad[0]
        raise NotPositiveDefiniteError(
            f"{what}: block {b} (parameters {layout.starts[b]}..{layout.starts[b] + layout.sizes[b]})"
            f" is no longer positive definite at {rows} {int(info[b])}"
            + (f" (and {len(bad) - 1} other blocks)" if len(bad) > 1 else ""))


def _check_overflow(m: torch.Tensor, what: str, layout: BlockLayout, b0: int):
    """Non-finite entries in the ``(n, k, k)`` Woodbury matrices of blocks ``b0 ..`` mean that
    the rows' products overflowed float64 (finite rows: the inputs are checked)."""
    if bool(torch.isfinite(m).all()):
        return
    b = b0 + int(torch.nonzero(~torch.isfinite(m).flatten(1).all(1))[0])
    raise FloatingPointError(
        f"{what}: the products of the rows with block {b} (parameters {layout.starts[b]}.."
        f"{layout.starts[b] + layout.sizes[b]}) overflowed float64 (1.8e308): the rows are too "
        f"large (norm about 1e154 or more); scale the loss or the inputs down. Nothing was "
        f"changed")


# ---- the inverse ----------------------------------------------------------------------------

class BlockInverseFisher:
    r"""The inverse of a block-diagonal damped Fisher (docs/maths.md).

    Block ``b`` holds :math:`F_b^{-1} = (\lambda I + \frac{1}{N}\sum_i g_{i,b} g_{i,b}^\top)^{-1}`
    in one of two representations:

    - *dense*: full and symmetric, in packed storage (see :class:`BlockLayout`) held as one or
      more *segments*, 1-D tensors covering consecutive dense blocks, so that a build never
      needs one allocation of the whole inverse next to its accumulators;
    - *dual* (low-rank, for blocks larger than their number of rows): the rows :math:`G_b` and
      the Cholesky factor of :math:`\lambda N I + G_b G_b^\top` (:class:`DualBlocks`), exact.

    ``inv @ v`` multiplies a ``(d,)`` or ``(d, r)`` tensor; :meth:`update` and :meth:`downdate`
    add or remove gradients in place, atomically and without a copy of the inverse (the
    result's positive definiteness is checked for every block before any block is written);
    :meth:`apply_update` is the SSSE step of paper eq. 8, optionally with the Fisher downdated
    on the fly.
    """

    def __init__(self, packed, config: FisherConfig, num_samples: int, *,
                 dual: DualBlocks | None = None, probe: FisherProbe | None = None):
        segments = [packed] if isinstance(packed, torch.Tensor) else list(packed)
        if not all(isinstance(t, torch.Tensor) for t in segments):
            raise TypeError("packed must be a 1-D tensor or a sequence of them")
        if not isinstance(config, FisherConfig):
            raise TypeError(f"config must be a FisherConfig, got {type(config).__name__}")
        layout = config.layout
        if dual is not None:
            if not isinstance(dual, DualBlocks):
                raise TypeError(f"dual must be DualBlocks, got {type(dual).__name__}")
            if dual.layout != layout or dual.damping != config.damping or \
                    dual.normalizer != config.normalizer:
                raise ValueError("dual must have the inverse's layout, damping and normaliser")
            if dual.num_blocks == 0:
                dual = None
        dual_ids = set(dual.block_ids) if dual is not None else set()
        self._dense = tuple(b for b in range(layout.num_blocks) if b not in dual_ids)
        if not segments:
            if self._dense:
                raise ValueError(f"packed is empty, the layout has {len(self._dense)} dense "
                                 "blocks")
            ref = dual.g
            segments = [torch.zeros(0, dtype=ref.dtype, device=ref.device)]
        first = segments[0] if dual is None else dual.g
        self._bounds, self._where = [0], {}
        pos = 0
        for j, t in enumerate(segments):
            if t.dim() != 1 or t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"packed[{j}] must be a 1-D float32 or float64 tensor, got "
                                f"{t.dtype} of shape {tuple(t.shape)}")
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(f"packed[{j}] is {t.dtype} on {t.device}, the inverse is "
                                 f"{first.dtype} on {first.device}")
            numel = 0
            while pos < len(self._dense) and numel < t.numel():
                b = self._dense[pos]
                self._where[b] = (j, numel)
                numel += layout.sizes[b] ** 2
                pos += 1
            if numel != t.numel():
                raise ValueError(f"packed[{j}] has {t.numel()} elements, which do not end on a "
                                 f"block boundary of the layout")
            self._bounds.append(pos)
        if pos != len(self._dense):
            raise ValueError(f"packed has {sum(t.numel() for t in segments)} elements, the "
                             f"dense blocks of the layout need "
                             f"{sum(layout.sizes[b] ** 2 for b in self._dense)}")
        self._segments = [t.contiguous() for t in segments]
        self._dual = dual
        self.config = config
        self.num_samples = int(num_samples)
        self._tables: dict = {}
        if probe is not None and (not isinstance(probe, FisherProbe) or
                                  probe.layout != config.layout):
            raise ValueError("probe must be a FisherProbe of the same layout")
        #: The :class:`~ssse_ext.health.FisherProbe` that follows every update and downdate
        #: (``None`` when the inverse was made without one); see :meth:`health`.
        self.probe = probe

    # ---- properties ----
    layout = property(lambda self: self.config.layout, doc="The block layout.")
    damping = property(lambda self: self.config.damping, doc=r"The damping :math:`\lambda`.")
    normalizer = property(lambda self: self.config.normalizer, doc="The normaliser :math:`N`.")
    curvature = property(lambda self: self.config.curvature, doc="What the rows were.")
    dim = property(lambda self: self.config.layout.dim, doc="The parameters covered, d.")

    @property
    def dtype(self) -> torch.dtype:
        return self._segments[0].dtype

    @property
    def device(self) -> torch.device:
        return self._segments[0].device

    @property
    def segments(self) -> tuple[torch.Tensor, ...]:
        """The packed storage of the dense blocks, one 1-D tensor per range of them."""
        return tuple(self._segments)

    @property
    def dual(self) -> DualBlocks | None:
        """The dual (low-rank) blocks, or ``None``."""
        return self._dual

    @property
    def representation(self) -> tuple[str, ...]:
        """Per block, ``"dense"`` or ``"dual"``."""
        dense = set(self._dense)
        return tuple("dense" if b in dense else "dual" for b in range(self.layout.num_blocks))

    @property
    def packed(self) -> torch.Tensor:
        """The dense blocks' packed storage as one 1-D tensor (a copy when held in several
        segments)."""
        if len(self._segments) == 1:
            return self._segments[0]
        check_memory("BlockInverseFisher.packed", self._dense_nbytes(), self.device,
                     detail="one tensor of the dense blocks' segments",
                     remedies=("read the segments (BlockInverseFisher.segments) instead",))
        return torch.cat(self._segments)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored inverse."""
        return sum(t.numel() * t.element_size() for t in self._segments) + \
            (self._dual.nbytes if self._dual is not None else 0)

    @property
    def blocks(self) -> list[torch.Tensor]:
        """The ``(s_b, s_b)`` blocks: views for dense blocks (writing to them changes the
        inverse), computed copies for dual ones."""
        out = []
        for b, s in enumerate(self.layout.sizes):
            if b in self._where:
                j, o = self._where[b]
                out.append(self._segments[j][o:o + s * s].view(s, s))
            else:
                out.append(self._dual.dense_block(b))
        return out

    def dense_block(self, i: int) -> torch.Tensor:
        """A copy of block ``i`` as an ``(s_i, s_i)`` tensor."""
        nb = self.layout.num_blocks
        if not -nb <= i < nb:
            raise IndexError(f"block index {i} out of range for {nb} blocks")
        i %= nb
        if i not in self._where:
            return self._dual.dense_block(i)
        j, o = self._where[i]
        s = self.layout.sizes[i]
        return self._segments[j][o:o + s * s].view(s, s).clone()

    def dense(self) -> torch.Tensor:
        """The whole ``(d, d)`` block-diagonal matrix (for tests and small models)."""
        check_memory("BlockInverseFisher.dense", self.dim ** 2 * _ELEMENT_SIZE[self.dtype],
                     self.device, detail=f"a {self.dim} x {self.dim} matrix",
                     remedies=("use dense_block(i) or blocks for one block at a time",))
        return torch.block_diag(*self.blocks) if self.layout.num_blocks else \
            torch.zeros(0, 0, dtype=self.dtype, device=self.device)

    def _segment_ids(self, j: int) -> tuple[int, ...]:
        return self._dense[self._bounds[j]:self._bounds[j + 1]]

    def _segment_tables(self):
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

    # ---- products ----
    def _vector(self, v, name: str) -> tuple[torch.Tensor, bool]:
        return check_vector(v, name, dim=self.dim, dtype=self.dtype, device=self.device)

    def _rows(self, grads, name: str = "grads") -> torch.Tensor:
        """All rows of ``grads`` (a tensor or an iterable of chunks) as one validated tensor."""
        chunks = [c for c in _chunks(grads, None, name, dim=self.dim, dtype=self.dtype,
                                     device=self.device) if c.shape[0]]
        if not chunks:
            return torch.zeros(0, self.dim, dtype=self.dtype, device=self.device)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def apply_update(self, theta: torch.Tensor, v: torch.Tensor, scale: float = 1.0, *,
                     without=None) -> torch.Tensor:
        r"""``theta + scale * F^{-1} v`` in one pass: paper eq. 8 with
        ``scale = epsilon / (n - k)`` and ``v`` the summed gradient of the removed samples.

        Args:
            theta, v: ``(d,)`` or ``(d, r)``, the inverse's dtype and device.
            scale: a finite number.
            without: optional ``(k, d)`` rows :math:`R` (or an iterable of chunks) to remove
                from the Fisher on the fly: then ``F`` is the leave-k-out
                :math:`F - R^\top R / N` (see :meth:`without`); the inverse is not modified.

        Returns a new tensor; ``theta`` and the inverse are not modified.

        Raises:
            NotPositiveDefiniteError: ``without`` would leave a block not positive definite.
        """
        if without is not None:
            return self.without(without).apply_update(theta, v, scale)
        scale = check_finite_float(scale, "scale")
        vv, vec = self._vector(v, "v")
        base, _ = self._vector(theta, "theta")
        if base.shape != vv.shape:
            raise ValueError(f"theta and v must have the same shape, got {tuple(theta.shape)} "
                             f"and {tuple(v.shape)}")
        out = self._apply(vv, base, scale)
        return out.view(-1) if vec else out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``F^{-1} v`` for ``v`` of shape ``(d,)`` or ``(d, r)``."""
        vv, vec = self._vector(v, "v")
        out = self._apply(vv, None, 1.0)
        return out.view(-1) if vec else out

    def _apply(self, vv: torch.Tensor, base: torch.Tensor | None, scale: float) -> torch.Tensor:
        out = torch.empty_like(vv)
        for seg, host, dev in self._segment_tables():
            if seg.numel():
                _ops.call(_ops.apply_inverse, seg, host, dev, vv, base, float(scale), out)
        if self._dual is not None:
            self._dual.apply(vv, base=base, scale=scale, out=out)
        return out

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def without(self, rows, *, sign: int = -1) -> "LowRankChange":
        r"""This inverse with the rows :math:`R` removed from the Fisher (``sign=-1``, the
        leave-k-out Fisher :math:`F - R^\top R / N`) or added (``sign=+1``), applied on the
        fly by the Woodbury identity in float64: the inverse is not modified and nothing of
        its size is copied (the extra memory is :math:`O(k\,d)`; for blocks smaller than
        ``k`` it is their size in float64).

        Raises:
            NotPositiveDefiniteError: a block would not stay positive definite (the rows were
                never added, say).
        """
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign!r}")
        return LowRankChange(self, self._rows(rows, "rows"), sign)

    # ---- updates ----
    def solve_changed(self, rows, rhs: torch.Tensor, *, sign: int = -1,
                      shift: float = 0.0) -> torch.Tensor:
        r""":math:`(F + \mathrm{sign}\,R^\top R / N - \mathrm{shift}\cdot I)^{-1}\,\mathrm{rhs}`
        in float64, for the ``(k, d)`` rows :math:`R` (or an iterable of chunks) and ``rhs`` of
        shape ``(d,)`` or ``(d, r)``, computed batch of blocks by batch of blocks without
        modifying the inverse (extra memory bounded, independent of its size). Every block is
        checked first (:class:`NotPositiveDefiniteError`: nothing is returned).
        """
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign!r}")
        shift = check_finite_float(shift, "shift")
        rhs_, vec = self._vector(rhs.to(self.dtype), "rhs")
        out = torch.empty(rhs_.shape, dtype=torch.float64, device=self.device)
        rhs64 = rhs.to(torch.float64).reshape(rhs_.shape)
        self._woodbury(self._rows(rows, "rows"), sign, "solve with changed rows", shift=shift,
                       rhs=rhs64, out=out)
        return out.view(-1) if vec else out

    def _woodbury(self, rows: torch.Tensor, sign: int, what: str, *, keep: bool = False,
                  shift: float = 0.0, rhs: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> list:
        r"""Checks, for every block, that :math:`M_b = F_b + \mathrm{sign}\,R_b^\top R_b / N
        - \mathrm{shift}\,I` stays positive definite with a margin; writes nothing to the
        inverse. With ``keep``, returns the factors of every batch of blocks for
        :class:`LowRankChange`; with ``rhs``, writes :math:`M^{-1}\,\mathrm{rhs}` into ``out``.
        Works through runs of equal-size blocks with batched float64 torch operations, a
        bounded amount of memory at a time:

        - :math:`k \le s` and no shift: :math:`U = F_b^{-1} R_b^\top`,
          :math:`C = N I_k + \mathrm{sign}\,R_b U`, :math:`M^{-1} = F_b^{-1} - \mathrm{sign}\,U
          C^{-1} U^\top` (kept: :math:`U` and the Cholesky factor of :math:`C`);
        - otherwise: :math:`F_b^{-1} = L L^\top`,
          :math:`A = I_s + \mathrm{sign}\,(R_b L)^\top (R_b L) / N - \mathrm{shift}\,L^\top L`,
          :math:`M^{-1} = L A^{-1} L^\top` (kept: :math:`L` and the Cholesky factor of
          :math:`A`).

        :math:`C / N` and :math:`A` have the same spectrum up to eigenvalues 1 (without a
        shift), so the margin means the same in both: every Cholesky pivot of ``C / N`` (or
        ``A``) at least :data:`_PD_MARGIN`, a factor far above the rounding of either
        computation.
        """
        k, N = rows.shape[0], self.normalizer
        check_memory(what, self._woodbury_nbytes(k, keep, shift), self.device,
                     detail=f"float64 work on {k} rows" + (", kept for every block" if keep
                                                          else ""),
                     remedies=(f"set {AVAILABLE_MEMORY_ENV}=<bytes> if more memory may be "
                               f"used than is free now",))
        factors = []
        for j, (seg, _, _) in enumerate(self._segment_tables()):
            budget = lambda s: _WOODBURY_ELEMENTS // (s * (s + 2 * k))  # noqa: E731
            for b0, n, s in self.layout.runs(budget, blocks=self._segment_ids(j)):
                o = self._where[b0][1]
                st = self.layout.starts[b0]
                f = seg[o:o + n * s * s].view(n, s, s).to(torch.float64)
                r = rows[:, st:st + n * s].reshape(k, n, s).transpose(0, 1).to(torch.float64)
                vb = None if rhs is None else rhs[st:st + n * s].reshape(n, s, -1)
                if k <= s and shift == 0:
                    u = f @ r.transpose(1, 2)                                   # (n, s, k)
                    c = sign * (r @ u)
                    c = 0.5 * (c + c.transpose(1, 2))
                    c.diagonal(dim1=1, dim2=2).add_(N)
                    _check_overflow(c, what, self.layout, b0)
                    chol, info = torch.linalg.cholesky_ex(c)
                    pivots = chol.diagonal(dim1=1, dim2=2) ** 2 / N
                    kept = (st, n, s, "correction", u, chol)
                    if vb is not None and int(info.abs().sum()) == 0:
                        res = f @ vb - sign * (u @ torch.cholesky_solve(u.transpose(1, 2) @ vb,
                                                                        chol))
                else:
                    lf, info_f = torch.linalg.cholesky_ex(f)
                    rl = r @ lf                                                 # (n, k, s)
                    a = sign * (rl.transpose(1, 2) @ rl) / N
                    if shift:
                        a = a - shift * (lf.transpose(1, 2) @ lf)
                    a = 0.5 * (a + a.transpose(1, 2))
                    a.diagonal(dim1=1, dim2=2).add_(1.0)
                    _check_overflow(a, what, self.layout, b0)
                    chol, info = torch.linalg.cholesky_ex(a)
                    info = torch.where(info_f != 0, info_f, info)
                    pivots = chol.diagonal(dim1=1, dim2=2) ** 2
                    kept = (st, n, s, "factor", lf, chol)
                    if vb is not None and int(info.abs().sum()) == 0:
                        res = lf @ torch.cholesky_solve(lf.transpose(1, 2) @ vb, chol)
                bad = (info != 0) | ~(pivots.min(dim=1).values >= _PD_MARGIN)
                if bool(bad.any()):
                    i = int(torch.nonzero(bad)[0])
                    b = b0 + i
                    worst = float(pivots[i].min()) if int(info[i]) == 0 else float("-inf")
                    raise NotPositiveDefiniteError(
                        f"{what}: block {b} (parameters {self.layout.starts[b]}.."
                        f"{self.layout.starts[b] + s}) would not stay positive definite "
                        f"(smallest relative pivot {worst:.2e}, needed >= {_PD_MARGIN:g}): "
                        "were these rows ever added? Nothing was changed")
                if keep:
                    factors.append(kept)
                if vb is not None:
                    out[st:st + n * s] = res.reshape(n * s, -1)
        if self._dual is not None:
            factors += self._woodbury_dual(rows, sign, what, shift=shift, rhs=rhs, out=out)
        return factors

    def _woodbury_nbytes(self, k: int, keep: bool, shift: float) -> int:
        r"""Bytes :meth:`_woodbury` allocates for ``k`` rows: the float64 work of its largest
        batch of blocks, and with ``keep`` the factors of every block (:math:`O(k\,s)` per
        block for blocks larger than ``k``, two :math:`s \times s` factors for the others)."""
        if not k:
            return 0
        converted = 0 if self.dtype == torch.float64 else 1  # float32 blocks are converted
        work = kept = 0
        for _, n, s in self.layout.runs(lambda s: _WOODBURY_ELEMENTS // (s * (s + 2 * k)),
                                        blocks=self._dense):
            if k <= s and shift == 0:
                work = max(work, 8 * n * (converted * s * s + 3 * s * k + 3 * k * k))
                kept += 8 * n * (s * k + k * k)
            else:
                work = max(work, 8 * n * (_WOODBURY_COPIES * s * s + 2 * k * s))
                kept += 16 * n * s * s
        if self._dual is not None:
            kept += sum(8 * (s * k + k * k) for s in self._dual.sizes)
        return work + (kept if keep else 0) + 8 * k * self.dim

    def _woodbury_dual(self, rows: torch.Tensor, sign: int, what: str, *, shift: float,
                       rhs: torch.Tensor | None, out: torch.Tensor | None) -> list:
        r""":meth:`_woodbury` on the dual blocks, one block at a time in float64 (the rows
        :math:`G_b` read in column chunks, never copied whole): with
        :math:`\lambda' = \lambda - \mathrm{shift}` and :math:`K' = \lambda' N I + G_b G_b^\top
        = L' L'^\top` (:math:`L' = L_b` without a shift, else refactored),
        :math:`F'^{-1} x = (x - G_b^\top K'^{-1} G_b x) / \lambda'`; then the rows :math:`R_b` by
        the :math:`k \times k` form, :math:`U = F'^{-1} R_b^\top`,
        :math:`C = N I_k + \mathrm{sign}\,R_b U`. Returns the kept factors."""
        dual, N = self._dual, self.normalizer
        lam = self.damping - shift
        factors = []
        for b in dual.block_ids:
            st, s = self.layout.starts[b], self.layout.sizes[b]
            if not lam > 0:
                raise NotPositiveDefiniteError(
                    f"{what}: dual block {b} (parameters {st}..{st + s}) would not stay "
                    f"positive definite: the shift {shift:g} is not below the damping "
                    f"{self.damping:g}. Nothing was changed")
            g = dual.rows_of(b)
            chol_k = dual.factor_of(b).tril()
            if shift:
                kk = chol_k @ chol_k.T - shift * N * torch.eye(g.shape[0], dtype=torch.float64,
                                                               device=g.device)
                chol_k, info_k = torch.linalg.cholesky_ex(kk)
                if int(info_k):
                    raise NotPositiveDefiniteError(
                        f"{what}: the kernel of dual block {b} (parameters {st}..{st + s}) is "
                        f"not positive definite after the shift {shift:g}. Nothing was changed")

            def solve(x, g=g, chol_k=chol_k):  # F'^{-1} x for x of shape (s, r), float64
                return (x - _gt_times(g, torch.cholesky_solve(_g_times(g, x), chol_k))) / lam

            r = rows[:, st:st + s].T.to(torch.float64)                      # (s, k)
            u = solve(r)
            c = sign * (r.T @ u)
            c = 0.5 * (c + c.T)
            c.diagonal().add_(N)
            chol, info = torch.linalg.cholesky_ex(c)
            pivots = chol.diagonal() ** 2 / N
            if int(info) or not float(pivots.min()) >= _PD_MARGIN:
                worst = float(pivots.min()) if not int(info) else float("-inf")
                raise NotPositiveDefiniteError(
                    f"{what}: dual block {b} (parameters {st}..{st + s}) would not stay positive "
                    f"definite (smallest relative pivot {worst:.2e}, needed >= "
                    f"{_PD_MARGIN:g}): were these rows ever added? Nothing was changed")
            factors.append((st, 1, s, "dual", (solve, u), chol))
            if rhs is not None:
                vb = rhs[st:st + s]
                out[st:st + s] = solve(vb) - sign * (u @ torch.cholesky_solve(u.T @ vb, chol))
        return factors

    def _change(self, grads, sign: int, method: str, chunk_size: int | None) -> "BlockInverseFisher":
        check_choice(method, "method", UPDATE_METHODS)
        chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
        if method == "woodbury" and chunk_size is None:
            chunk_size = _DEFAULT_WOODBURY_CHUNK
        what = "update" if sign > 0 else "downdate"
        rows = self._rows(grads)
        if rows.shape[0] == 0:
            return self
        tables = self._segment_tables()
        dual, self._dual = self._dual, None  # the dense blocks first: they are checked alone
        try:
            if method == "woodbury":
                # Every block is checked first: the writes below cannot then fail, so no copy of
                # the inverse is needed for atomicity (the extra memory is O(k d)).
                self._woodbury(rows, sign, what)
                work = [seg for seg, _, _ in tables]
            else:
                # The literal recurrence can fail part-way in float32 where the result is still
                # positive definite (its intermediate inverses are worse conditioned): it works
                # on copies, swapped in on success.
                check_memory(what, self._dense_nbytes(), self.device,
                             detail=f'a copy of the dense blocks for method="{method}"',
                             remedies=('use method="woodbury" (the default), which checks '
                                       'every block first and then works in place',))
                work = [seg.clone() for seg, _, _ in tables]
            if dual is not None:
                # atomic by itself (an append, or rows found then removed): done before the
                # dense writes, which cannot fail
                dual.update(rows) if sign > 0 else dual.downdate(rows)
        finally:
            self._dual = dual
        for seg, (_, host, dev) in zip(work, tables):
            if not seg.numel():
                continue
            for i in range(0, rows.shape[0], chunk_size or rows.shape[0]):
                chunk = rows[i:i + (chunk_size or rows.shape[0])]
                info = _ops.call(_ops.sherman_morrison_, seg, host, dev, chunk, self.normalizer,
                                 sign, method == "woodbury")
                _raise_if_failed(info, what, self.layout, "row")
        self._segments = work
        self.num_samples += sign * rows.shape[0]
        if self.probe is not None:
            self.probe.add(rows, sign)
        return self
    def update(self, grads, *, method: str = "woodbury",
               chunk_size: int | None = None) -> "BlockInverseFisher":
        r"""Adds gradients: every block becomes :math:`(F_b + \frac{1}{N}\sum_j g_j g_j^\top)^{-1}`.

        Args:
            grads: ``(m, d)`` tensor or iterable of such chunks, same dtype and device.
            method: ``"woodbury"`` (chunked rank-m form, float64 arithmetic) or
                ``"sherman_morrison"`` (literal rank-1 recurrence of paper eq. 7).
            chunk_size: rows per kernel call (default 1024; the kernels work through them in
                rank-64 steps).

        Raises:
            NotPositiveDefiniteError: a denominator lost positivity (the inverse is unchanged).
        """
        return self._change(grads, +1, method, chunk_size)

    def downdate(self, grads, *, method: str = "woodbury",
                 chunk_size: int | None = None) -> "BlockInverseFisher":
        r"""Removes gradients that were added: with the normaliser :math:`N` fixed, the blocks
        become :math:`(\lambda I + \frac{1}{N}\sum_{i \notin R} g_i g_i^\top)^{-1}` (the
        leave-k-out Fisher) using only the removed rows :math:`R`.

        Raises:
            NotPositiveDefiniteError: the result would not be positive definite, e.g. the rows
                were never added (the inverse is unchanged).
        """
        return self._change(grads, -1, method, chunk_size)

    def health(self, *, what: str = "", warn: bool = True) -> Health | None:
        r"""How far this inverse is from the exact inverse of its Fisher:
        :math:`\max_b \lVert F^{-1}_{\mathrm{stored}} (F X_b) - X_b\rVert / \lVert X_b\rVert` on
        the probe's random vectors (:class:`~ssse_ext.health.FisherProbe`, kept exact in float64
        through every update and downdate); ``None`` without a probe. With ``warn``, a
        :class:`~ssse_ext.health.HealthWarning` when a block's residual is above
        :math:`\max(\sqrt{\epsilon}, 10\times` what rounding it to its dtype explains)
        (:meth:`~ssse_ext.health.FisherProbe.check`). Costs three products with the inverse."""
        if self.probe is None:
            return None
        return self.probe.check(self, what=what, warn=warn)

    # ---- copies and moves ----
    def _probe_nbytes(self) -> int:
        return 0 if self.probe is None else self.probe.sketch.numel() * 8

    def _dense_nbytes(self, dtype: torch.dtype | None = None) -> int:
        elem = _ELEMENT_SIZE[dtype or self.dtype]
        return sum(t.numel() for t in self._segments) * elem

    def clone(self, *, max_memory: int | None = None) -> "BlockInverseFisher":
        """A copy on the same device. ``max_memory``: the bytes the copy may take (default
        what the device has free, :mod:`ssse_ext.budget`); a copy that does not fit is refused
        with :class:`~ssse_ext.errors.InsufficientMemoryError` before anything is copied."""
        need = self.nbytes + self._probe_nbytes()
        check_memory("BlockInverseFisher.clone", need, self.device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} inverse",
                     remedies=_COPY_REMEDIES)
        return BlockInverseFisher([t.clone() for t in self._segments], self.config,
                                  self.num_samples,
                                  dual=None if self._dual is None else self._dual.clone(),
                                  probe=None if self.probe is None else self.probe.clone())

    def to(self, device=None, dtype: torch.dtype | None = None, *,
           max_memory: int | None = None) -> "BlockInverseFisher":
        """A copy on ``device`` and/or in ``dtype`` (float32 or float64); this inverse is
        unchanged. ``max_memory``: the bytes the copy may take on ``device`` (default what that
        device has free, :mod:`ssse_ext.budget`); a copy that does not fit is refused with
        :class:`~ssse_ext.errors.InsufficientMemoryError` before anything is copied."""
        check_dtype(dtype)
        target = self.device if device is None else torch.device(device)
        dense = self._dense_nbytes(dtype)
        dual = 0 if self._dual is None else self._dual.packed_nbytes(dtype)
        check_memory("BlockInverseFisher.to", dense + dual + self._probe_nbytes(), target,
                     max_memory=max_memory,
                     detail=f"a {str(dtype or self.dtype).removeprefix('torch.')} copy of the "
                            f"{format_bytes(self.nbytes)} inverse",
                     remedies=_COPY_REMEDIES)
        moved = []
        for t in self._segments:
            m = t.to(device=device, dtype=dtype)
            moved.append(m.clone() if m.data_ptr() == t.data_ptr() and m.numel() else m)
        # the dense copies are made: the dual blocks get what is left of the same budget
        dual = None if self._dual is None else self._dual.to(
            device=device, dtype=dtype, max_memory=None if max_memory is None else
            max(max_memory - dense, 0))
        probe = None if self.probe is None else self.probe.to(device or self.device)
        return BlockInverseFisher(moved, self.config, self.num_samples, dual=dual, probe=probe)

    @staticmethod
    def state_nbytes(meta: dict, dtype: torch.dtype | None = None) -> int:
        """Bytes of the inverse described by :meth:`to_state`'s metadata (in ``dtype``, default
        its own), computed from the metadata alone, before any tensor is read; ``ValueError``
        for metadata that does not describe an inverse."""
        try:
            layout = BlockLayout.from_dict(meta["layout"])
            own = getattr(torch, str(meta["dtype"]), None)
            if own not in FLOAT_DTYPES:
                raise TypeError(f"dtype {meta['dtype']!r}")
            elem = _ELEMENT_SIZE[dtype or own]
            low = meta.get("dual")
            ids = set() if low is None else {int(b) for b in low["blocks"]}
            rows = 0 if low is None else int(low["num_rows"])
            columns = int(meta["probe"]["columns"]) if meta.get("probe") else 0
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid inverse-Fisher state: missing or bad {exc}") from None
        dense = sum(s * s for b, s in enumerate(layout.sizes) if b not in ids)
        dual = sum(layout.sizes[b] for b in ids) * rows * elem + len(ids) * rows * rows * 8
        return dense * elem + dual + columns * layout.dim * 8

    @classmethod
    def check_load_memory(cls, meta: dict, *, device=None, dtype: torch.dtype | None = None,
                          max_memory: int | None = None) -> None:
        """Refuses (:class:`~ssse_ext.errors.InsufficientMemoryError`) to load the inverse
        that :meth:`to_state`'s metadata ``meta`` describes when it does not fit, before
        anything is read: its tensors are read into CPU memory, then (when ``device`` or
        ``dtype`` is given) copied by :meth:`to`, the read copy still held. ``max_memory``
        caps the CPU bytes (default what is free, :mod:`ssse_ext.budget`); the copy on
        another device is checked against what that device has free."""
        check_dtype(dtype)
        read = cls.state_nbytes(meta)
        target = torch.device("cpu") if device is None else torch.device(device)
        copy = 0 if device is None and dtype is None else cls.state_nbytes(meta, dtype)
        remedies = ("load it on a machine or device with more memory",
                    f"set {AVAILABLE_MEMORY_ENV}=<bytes> if more memory may be used than is "
                    f"free now")
        cpu = read + (copy if target.type == "cpu" else 0)
        check_memory("loading the inverse Fisher", cpu, "cpu", max_memory=max_memory,
                     detail=f"{format_bytes(read)} read" + (
                         f" and a {format_bytes(copy)} copy" if cpu > read else ""),
                     remedies=remedies)
        if target.type != "cpu":
            check_memory("loading the inverse Fisher", copy, target,
                         detail=f"the {format_bytes(copy)} copy on {target}",
                         remedies=remedies)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (``packed.0``, ``packed.1``, ...: the segments) and plain metadata
        describing this inverse (for safetensors files)."""
        meta = {"damping": self.damping, "normalizer": self.normalizer,
                "num_samples": self.num_samples, "layout": self.layout.to_dict(),
                "dtype": str(self.dtype).removeprefix("torch."),
                "segments": len(self._segments), "curvature": self.curvature}
        tensors = {f"packed.{j}": t for j, t in enumerate(self._segments)}
        if self._dual is not None:
            dual_tensors, meta["dual"] = self._dual.to_state()
            tensors.update({f"dual.{k}": v for k, v in dual_tensors.items()})
        if self.probe is not None:  # the probe's sketch travels with the inverse it checks
            probe_tensors, meta["probe"] = self.probe.state()
            tensors.update(probe_tensors)
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "BlockInverseFisher":
        """Inverse of :meth:`to_state` (also reads a single ``packed`` tensor); validates the
        metadata."""
        try:
            layout = BlockLayout.from_dict(meta["layout"])
            config = FisherConfig(float(meta["damping"]), float(meta["normalizer"]), layout,
                                  str(meta.get("curvature", "empirical")))
            if "packed" in tensors:
                packed = tensors["packed"]
            else:
                packed = [tensors[f"packed.{j}"] for j in range(int(meta["segments"]))]
            num_samples = int(meta["num_samples"])
            dual = None
            if meta.get("dual") is not None:
                dual = DualBlocks.from_state({k[5:]: v for k, v in tensors.items()
                                              if k.startswith("dual.")}, meta["dual"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a valid inverse-Fisher state: missing or bad {exc}") from None
        probe = None
        if "probe" in meta:
            probe = FisherProbe.from_state(layout, tensors, meta["probe"])
        inv = cls(packed, config, num_samples, dual=dual)
        inv.probe = None if probe is None else probe.to(inv.device)
        return inv

    def __repr__(self) -> str:
        dual = f", dual={self._dual.num_blocks}" if self._dual is not None else ""
        return (f"BlockInverseFisher(dim={self.dim}, blocks={self.layout.num_blocks}{dual}, "
                f"max_block={self.layout.max_block_size}, damping={self.damping:g}, "
                f"normalizer={self.normalizer:g}, num_samples={self.num_samples}, "
                f"dtype={self.dtype}, device={self.device})")


def _column_chunks(s: int, r: int) -> int:
    return max(1, _WOODBURY_ELEMENTS // max(r, 1)) if s else 1


def _g_times(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g @ x`` in float64 for ``g`` of shape ``(R, s)`` in any float dtype, ``x`` float64
    ``(s, r)``, reading ``g`` in column chunks (no float64 copy of it)."""
    out = torch.zeros(g.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    step = _column_chunks(g.shape[1], g.shape[0])
    for c in range(0, g.shape[1], step):
        out += g[:, c:c + step].to(torch.float64) @ x[c:c + step]
    return out


def _gt_times(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``g.T @ z`` in float64, ``g`` read in column chunks."""
    out = torch.empty(g.shape[1], z.shape[1], dtype=torch.float64, device=z.device)
    step = _column_chunks(g.shape[1], g.shape[0])
    for c in range(0, g.shape[1], step):
        out[c:c + step] = g[:, c:c + step].to(torch.float64).T @ z
    return out


class LowRankChange:
    r"""A :class:`BlockInverseFisher` with rows removed from (or added to) its Fisher, applied
    on the fly: ``change @ v`` is :math:`(F + \mathrm{sign}\,R^\top R / N)^{-1} v`. Made by
    :meth:`BlockInverseFisher.without`; the factors are computed (and every block checked)
    once, so repeated products cost one pass over the inverse plus :math:`O(k\,d)` each."""

    def __init__(self, inv: BlockInverseFisher, rows: torch.Tensor, sign: int):
        self.inverse, self.sign, self.k = inv, sign, rows.shape[0]
        what = "leave-k-out apply" if sign < 0 else "low-rank update"
        self._factors = inv._woodbury(rows, sign, what, keep=True) if self.k else []

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """The product with ``v`` (``(d,)`` or ``(d, r)``), in float64."""
        inv = self.inverse
        vv, vec = inv._vector(v.to(inv.dtype), "v")
        v64 = v.to(torch.float64).reshape(vv.shape)
        out = inv.matvec(vv).to(torch.float64)
        for st, n, s, kind, left, chol in self._factors:
            vb = v64[st:st + n * s].reshape(n, s, -1)
            if kind == "correction":
                res = out[st:st + n * s].reshape(n, s, -1) - self.sign * (
                    left @ torch.cholesky_solve(left.transpose(1, 2) @ vb, chol))
            elif kind == "dual":
                solve, u = left
                vb = vb[0]
                res = solve(vb) - self.sign * (u @ torch.cholesky_solve(u.T @ vb, chol))
            else:
                res = left @ torch.cholesky_solve(left.transpose(1, 2) @ vb, chol)
            out[st:st + n * s] = res.reshape(n * s, -1)
        return out.view(-1) if vec else out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The product with ``v``, in the inverse's dtype."""
        return self.solve(v).to(self.inverse.dtype)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def apply_update(self, theta: torch.Tensor, v: torch.Tensor, scale: float = 1.0
                     ) -> torch.Tensor:
        """``theta + scale * (this inverse) v``, in the inverse's dtype."""
        scale = check_finite_float(scale, "scale")
        inv = self.inverse
        base, vec = inv._vector(theta, "theta")
        vv, _ = inv._vector(v, "v")
        if base.shape != vv.shape:
            raise ValueError(f"theta and v must have the same shape, got {tuple(theta.shape)} "
                             f"and {tuple(v.shape)}")
        out = (base.to(torch.float64) + scale * self.solve(vv)).to(inv.dtype)
        return out.view(-1) if vec else out


# ---- build ----------------------------------------------------------------------------------

def build_inverse_fisher(grads, *, damping: float, block_size: int | None = None,
                         layout: BlockLayout | None = None, normalizer: float | None = None,
                         chunk_size: int | None = None, method: str = "auto",
                         rows_per_sample: int = 1, curvature: str = "empirical",
                         representation: str = "auto", num_rows: int | None = None,
                         probe_vectors: int = DEFAULT_COLUMNS,
                         max_memory: int | None = None) -> BlockInverseFisher:
    r"""Builds the block inverse of the damped empirical Fisher from a stream of gradients.

    .. math:: F_b^{-1} = \Big(\lambda I + \frac{1}{N} \sum_{i=1}^{n} g_{i,b}\, g_{i,b}^\top\Big)^{-1}

    Args:
        grads: an ``(n, d)`` tensor, or an iterable of ``(m, d)`` chunks consumed one at a time
            (the ``(n, d)`` matrix is never formed). float32 or float64, CPU or CUDA; the
            result has the gradients' dtype and device.
        damping: :math:`\lambda > 0`.
        block_size: ``B`` for ``BlockLayout.fixed(d, B)`` when ``layout`` is not given
            (default ``min(d, 1024)``).
        layout: an explicit :class:`BlockLayout` (its ``dim`` must equal ``d``).
        normalizer: :math:`N`; default the number of rows consumed divided by
            ``rows_per_sample``. The ``auto``/``cholesky``
            build needs it only at the end, so a single pass over an iterable suffices; the
            recurrences use :math:`N` at every step, so they need it up front when ``grads`` is
            an iterable (a ``ValueError`` otherwise — no second pass is made).
        chunk_size: rows per kernel call (``woodbury``: default 1024, worked through in rank-64
            steps by the kernels).
        rows_per_sample: rows each sample contributes (e.g. ``c`` Gauss–Newton rows), for the
            default normaliser.
        curvature: what the rows are, recorded in the result's :class:`FisherConfig`.
        representation: ``"auto"`` (default) picks per block whichever of the two forms
            below takes fewer bytes for the number of rows (:func:`choose_representation`):
            known for a tensor, from ``num_rows`` for an iterable (all dense when not given).
            Both are exact, so this changes only the memory: a block of ``s`` parameters from
            ``R < s`` rows keeps ``R s`` numbers and a float64 ``R x R`` factor instead of
            ``s^2`` numbers (1000 float32 rows of 120000 parameters in blocks of 40000: 0.5 GB
            instead of 19 GB, plus 38 GB of float64 accumulators while it is built).
            ``"dense"`` stores every block as a dense inverse; ``"dual"`` every block in the
            low-rank form (its rows and the Cholesky factor of
            :math:`\lambda N I + G_b G_b^\top`; :class:`DualBlocks`). The dual form
            needs the stable build: the recurrences (``method="sherman_morrison"`` or
            ``"woodbury"``) build dense blocks, and ``"auto"`` means ``"dense"`` for them.
        num_rows: the number of rows an iterable will yield, for ``representation="auto"``.
        max_memory: the bytes the build may allocate (the blocks, the float64 accumulators,
            the row buffer, the probe and scratch, as :func:`build_peak_bytes` estimates them;
            the gradients are the caller's). Default: what the gradients' device has free
            (:func:`ssse_ext.budget.available_memory`). A build that would need more is refused
            with :class:`~ssse_ext.errors.InsufficientMemoryError` (a ``MemoryError``) before it
            allocates anything of that size (of an iterable, only the first chunk is read).
        probe_vectors: random vectors per block of the result's health probe
            (:meth:`BlockInverseFisher.health`; 0: none). The recurrences always check their
            result with one and warn when it fails (:class:`~ssse_ext.health.HealthWarning`).
        method: ``"auto"``/``"cholesky"`` (default): float64 Gram accumulation then a
            Cholesky-based inverse in float64, whatever the result's dtype: relative error about
            :math:`\kappa(F_b)\,u_{64}` (:math:`u_{64} = 1.1\cdot10^{-16}`) plus the final
            rounding (float32: ~3e-8 up to :math:`\kappa \approx 10^8`), so it stays
            accurate for any gradient scale as long as :math:`\lambda` keeps :math:`\kappa`
            moderate; a :class:`~ssse_ext.health.ConditionWarning` names the blocks where
            :math:`\kappa\,u_{64}` exceeds :math:`\sqrt{\epsilon}` of the dtype (measured:
            2.7e-2 at :math:`\kappa = 5.8\cdot10^{14}`, benchmarks/bench_accuracy.py).
            ``"sherman_morrison"``: the paper's literal recurrence (eq. 7) from
            :math:`F_0^{-1} = I/\lambda`, one row at a time in the input dtype. It passes
            through inverses far worse conditioned than the result: in float32 with
            :math:`\lambda = 10^{-4}` its error is 4e-4 for unit-scale gradients and 4e-3 for
            gradients of scale 3 — kept for fidelity and cross-checks. ``"woodbury"``: the same
            recurrence in rank-64 steps with float64 arithmetic, the blocks rounded to the input
            dtype once per ``chunk_size`` rows (float32: ~4e-8 on the same cases).

    Returns:
        The :class:`BlockInverseFisher`, with ``num_samples`` the number of rows consumed.
    """
    damping, normalizer, block_size = check_build_args(damping, normalizer, layout, block_size)
    check_choice(method, "method", BUILD_METHODS)
    rows_per_sample = check_positive_int(rows_per_sample, "rows_per_sample")
    check_choice(curvature, "curvature", CURVATURES)
    check_choice(representation, "representation", REPRESENTATIONS)
    num_rows = check_positive_int(num_rows, "num_rows", allow_none=True)
    probe_vectors = check_nonneg_int(probe_vectors, "probe_vectors")
    chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if max_memory is not None:
        max_memory = check_nonneg_int(max_memory, "max_memory")
    recurrence = method in ("sherman_morrison", "woodbury")
    if recurrence and representation == "auto":
        representation = "dense"  # the recurrences update dense inverses
    if recurrence and representation != "dense":
        raise ValueError(f"representation={representation!r} needs the stable build "
                         f"(method='auto' or 'cholesky'), got method={method!r}")
    if recurrence and not isinstance(grads, torch.Tensor) and normalizer is None:
        raise ValueError(f"normalizer must be given when grads is an iterable and "
                         f"method={method!r} (the recurrence uses N at every step)")
    if method == "woodbury" and chunk_size is None:
        chunk_size = _DEFAULT_WOODBURY_CHUNK

    chunks = _chunks(grads, chunk_size)
    first = next(chunks, None)
    if first is None:
        raise ValueError("grads is empty: at least one (m, d) chunk is needed to know d")
    d = first.shape[1]
    if layout is None:
        layout = BlockLayout.fixed(d, block_size or max(1, min(d, DEFAULT_BLOCK_SIZE)))
    elif layout.dim != d:
        raise ValueError(f"layout.dim={layout.dim} does not match the gradients' d={d}")
    stream = itertools.chain([first], chunks)
    rows = grads.shape[0] if isinstance(grads, torch.Tensor) else num_rows
    _check_build_memory(layout, first, rows, representation, method, probe_vectors,
                        max_memory)
    if recurrence:
        if normalizer is None:
            normalizer = max(grads.shape[0], 1) / rows_per_sample
        inv = _build_by_recurrence(stream, layout, damping, normalizer, first.dtype,
                                   first.device, chunked=method == "woodbury",
                                   probe_columns=probe_vectors)
    else:
        dual = _dual_mask(layout, representation, rows, first.dtype)
        inv = _build_by_gram(stream, layout, damping, normalizer, first.dtype, first.device,
                             rows_per_sample, dual=dual, capacity=rows,
                             probe_columns=probe_vectors, max_memory=max_memory)
    if curvature != "empirical":
        inv.config = dataclasses.replace(inv.config, curvature=curvature)
    return inv


def _check_build_memory(layout: BlockLayout, first: torch.Tensor, rows: int | None,
                        representation: str, method: str, probe_vectors: int,
                        max_memory: int | None) -> None:
    """Refuses a build whose estimated peak exceeds what it may use, naming the changes that
    would make it fit."""
    dtype, device = first.dtype, first.device
    # dual blocks fed by an iterable of unknown length hold at least its first chunk
    plan_rows = first.shape[0] if rows is None and representation == "dual" else rows
    peak, what = _build_plan(layout, dtype, plan_rows, representation, method, device,
                             probe_vectors)
    limit, _ = memory_limit(device, max_memory)
    if peak <= limit:
        return
    remedies = []
    if representation != "auto" and rows is not None:
        auto = _build_plan(layout, dtype, rows, "auto", "auto", device, probe_vectors)[0]
        if auto < peak:
            prefix = 'method="auto", ' if method in ("sherman_morrison", "woodbury") else ""
            remedies.append(f'pass {prefix}representation="auto" (exact as well: about '
                            f'{format_bytes(auto)} here)')
    elif representation == "auto" and rows is None:
        remedies.append('pass num_rows= (the rows the iterable yields) so that '
                        'representation="auto" can store blocks in the low-rank form')
    if layout.num_blocks and representation != "dual":
        remedies.append(f"pass a smaller block_size or layout (the largest block has "
                        f"{layout.max_block_size} parameters)")
    remedies.append("pass max_memory=<bytes> if more memory may be used than is free now")
    check_memory("build_inverse_fisher", peak, device, max_memory=max_memory, detail=what,
                 remedies=remedies)


def _dual_mask(layout: BlockLayout, representation: str, rows: int | None,
               dtype: torch.dtype) -> list[bool]:
    """Per block, whether the build stores it in the dual form."""
    if representation == "dual":
        return [True] * layout.num_blocks
    if representation == "auto" and rows is not None:
        return choose_representation(layout.sizes, rows, dtype)
    return [False] * layout.num_blocks


def _gather_rows(dim: int, dense_numel: int, dtype: torch.dtype) -> int:
    elem = _ELEMENT_SIZE[dtype]
    row_bytes = max(dim * elem, 1)
    return min(_GATHER_ROWS, max(1, dense_numel * elem // _GROUPS // row_bytes,
                                 _MIN_GATHER_BYTES // row_bytes))


def _check_run_numel(sizes: list[int], cap: int) -> int:
    """Largest run of blocks (of one group) the health checks copy at once."""
    return max((min(cap, max(_RUN_ELEMENTS, s * s)) for s in sizes), default=0)


def _dense_build_nbytes(sizes: list[int], dtype: torch.dtype) -> int:
    """Peak bytes of a :class:`GramAccumulator` of blocks of these sizes, from its float64
    accumulators to the finished inverse (without the row buffer and CUDA workspace)."""
    elem = _ELEMENT_SIZE[dtype]
    numel = sum(s * s for s in sizes)
    cap = max(numel // _GROUPS, _MIN_GROUP_NUMEL)
    groups = [sum(s * s for s in sizes[g0:g1]) for g0, g1 in _groups(sizes, cap)]
    # the checks before the inversion copy a run of blocks at a time, all accumulators held
    check = 8 * numel + _CHECK_COPIES * 8 * _check_run_numel(sizes, max(groups, default=0))
    # while a group is inverted, the results of the earlier groups and of this one sit next
    # to the float64 accumulators of this group and the later ones
    invert = max((8 * sum(groups[g:]) + elem * sum(groups[:g + 1])
                  for g in range(len(groups))), default=0)
    return max(check, invert)


def _cuda_workspace(name: str, *args) -> int:
    """The workspace a CUDA kernel asks for (0 when the extension was built without CUDA)."""
    fn = getattr(_C, name, None)
    return int(fn(*args)) if fn is not None else 0


def build_peak_bytes(layout: BlockLayout, dtype: torch.dtype = torch.float32, *,
                     rows: int | None = None, representation: str = "auto",
                     method: str = "auto", device="cpu",
                     probe_vectors: int = DEFAULT_COLUMNS) -> int:
    """Estimated peak bytes :func:`build_inverse_fisher` allocates on ``device`` for this
    layout and ``rows`` gradient rows (``None``: unknown, which makes ``"auto"`` all dense):
    the stored blocks, the float64 Gram accumulators of the dense blocks (all of them while
    rows stream in; then each group's inverse is made while the later groups' accumulators
    are still held), the dual blocks' rows and float64 factors, the row buffer, the health
    probe and the largest scratch. The gradients themselves are not counted."""
    check_dtype(dtype)
    check_choice(representation, "representation", REPRESENTATIONS)
    check_choice(method, "method", BUILD_METHODS)
    return _build_plan(layout, dtype, rows, representation, method, torch.device(device),
                       probe_vectors)[0]


def _build_plan(layout: BlockLayout, dtype: torch.dtype, rows: int | None, representation: str,
                method: str, device: torch.device, probe_vectors: int) -> tuple[int, str]:
    """The peak of :func:`build_peak_bytes` and what it is made of, in words."""
    elem = _ELEMENT_SIZE[dtype]
    d = layout.dim
    cuda = device.type == "cuda"
    if method in ("sherman_morrison", "woodbury"):
        chunked = method == "woodbury"
        numel = layout.numel
        if cuda:
            code = 0 if dtype == torch.float32 else 1  # the extension's dtype codes
            host = layout.table()  # held: the extension reads it through a raw pointer
            scratch = _cuda_workspace("sherman_morrison_workspace_bytes", code, chunked,
                                      host.data_ptr(), layout.num_blocks)
        elif chunked and dtype == torch.float32:
            # every thread converts the block it works on to float64 for the whole call
            largest = sorted(layout.sizes, reverse=True)[:max(1, torch.get_num_threads())]
            scratch = sum(8 * s * s for s in largest)
        else:
            scratch = 0
        scratch += _WOODBURY_ELEMENTS * 8
        probe = _PROBE_COPIES * 8 * d * max(probe_vectors, 1)
        peak = elem * numel + probe + scratch
        return peak, (f"{layout.num_blocks} dense blocks of up to {layout.max_block_size}: "
                      f"{format_bytes(elem * numel)} stored, {format_bytes(probe + scratch)} "
                      f"probe and scratch")
    mask = _dual_mask(layout, representation, rows, dtype)
    dense = [s for s, low in zip(layout.sizes, mask) if not low]
    dual = [s for s, low in zip(layout.sizes, mask) if low]
    numel = sum(s * s for s in dense)
    cap = max(numel // _GROUPS, _MIN_GROUP_NUMEL)
    gather = _gather_rows(d, numel, dtype) * d * elem
    workspace = 0
    if cuda and dense:
        for g0, g1 in _groups(dense, cap):
            ids = [b for b, low in enumerate(mask) if not low][g0:g1]
            host = layout.table(blocks=ids)
            workspace = max(workspace, _cuda_workspace("inverse_from_gram_workspace_bytes",
                                                       host.data_ptr(), len(ids)),
                            _cuda_workspace("gram_accumulate_workspace_bytes",
                                            host.data_ptr(), len(ids)))
    r = rows or 0
    low = sum(dual_nbytes(s, r, dtype) for s in dual)
    probe = _PROBE_COPIES * 8 * d * probe_vectors
    dense_peak = max(_dense_build_nbytes(dense, dtype), 8 * numel + gather) + workspace \
        if dense else gather
    peak = dense_peak + low + probe
    what = []
    if dense:
        what.append(f"{len(dense)} dense blocks of up to {max(dense)}: "
                    f"{format_bytes(elem * numel)} stored and {format_bytes(8 * numel)} of "
                    f"float64 Gram accumulators")
    if dual:
        what.append(f"{len(dual)} dual blocks of {r} rows: {format_bytes(low)}")
    largest_group = max((sum(s * s for s in dense[g0:g1]) for g0, g1 in _groups(dense, cap)),
                        default=0)
    scratch = gather + probe + workspace + \
        _CHECK_COPIES * 8 * _check_run_numel(dense, largest_group)
    what.append(f"scratch (row buffer, checks, probe) up to {format_bytes(scratch)}")
    return peak, "; ".join(what)


def _build_by_recurrence(chunks, layout: BlockLayout, damping: float, normalizer: float,
                         dtype: torch.dtype, device: torch.device, *,
                         chunked: bool, probe_columns: int = 0) -> BlockInverseFisher:
    r"""Paper eq. 7 from :math:`F_0^{-1} = I/\lambda`: rank-1 steps, or Woodbury steps.

    The rows also feed a :class:`~ssse_ext.health.FisherProbe`, which checks the result's
    accuracy at the end (a :class:`~ssse_ext.health.HealthWarning` when it fails): the
    recurrence passes through inverses far worse conditioned than the result."""
    method = "woodbury" if chunked else "sherman_morrison"
    host = layout.table()
    dev = host if device.type == "cpu" else host.to(device)
    packed = torch.zeros(layout.numel, dtype=dtype, device=device)
    for o, s in zip(layout.offsets, layout.sizes):
        packed[o:o + s * s].view(s, s).diagonal().fill_(1.0 / damping)
    probe = FisherProbe(layout, columns=max(probe_columns, 1), device=device)
    rows, largest = 0, 0.0
    for chunk in chunks:
        if chunk.shape[0] == 0:
            continue
        step = max(1, _WOODBURY_ELEMENTS // max(chunk.shape[1], 1))  # no float64 copy of all
        norms = torch.cat([c.to(torch.float64).pow(2).sum(1) for c in chunk.split(step)])
        largest = max(largest, float(norms.max()))
        if not math.isfinite(largest):
            raise FloatingPointError(
                "build: the squared norm of a row overflowed float64 (1.8e308, rows of norm "
                "about 1e154 or more); scale the loss or the inputs down")
        info = _ops.call(_ops.sherman_morrison_, packed, host, dev, chunk, normalizer, 1, chunked)
        try:
            _raise_if_failed(info, "build", layout, "row")
        except NotPositiveDefiniteError as exc:
            raise NotPositiveDefiniteError(
                f"{exc}: the recurrence (method={method!r}) is unstable at this damping "
                f"({damping:g}) and gradient scale (rows of norm up to {math.sqrt(largest):.1e})"
                f": its intermediate inverses are far worse conditioned than the result. Use the"
                f" default build (method=\"auto\"), which computes the same matrix stably"
            ) from None
        probe.add(chunk)
        rows += chunk.shape[0]
    inv = BlockInverseFisher(packed, FisherConfig(damping, normalizer, layout), rows,
                             probe=probe)
    health = probe.check(inv, warn=False)
    if not health.ok:
        warnings.warn(
            f"build (method={method!r}): the accuracy check failed: |F(F^-1 x) - x|/|x| = "
            f"{health.residual:.1e} in block {health.block} (threshold {health.tolerance:.1e}; "
            f"rounding to {str(dtype).removeprefix('torch.')} explains {health.floor:.0e}): "
            f"the recurrence is unstable at this "
            f"damping ({damping:g}) and gradient scale (rows of norm up to "
            f"{math.sqrt(largest):.1e}); the default build (method=\"auto\") computes the same "
            f"matrix stably", HealthWarning, stacklevel=3)
    if not probe_columns:
        inv.probe = None
    return inv


def _groups(sizes, max_numel: int) -> list[tuple[int, int]]:
    """Consecutive ranges ``(first, last)`` of positions in ``sizes`` holding at most
    ``max_numel`` packed elements (a larger block gets a range of its own)."""
    out, first, numel = [], 0, 0
    for b, s in enumerate(sizes):
        if numel and numel + s * s > max_numel:
            out.append((first, b))
            first, numel = b, 0
        numel += s * s
    if first < len(sizes):
        out.append((first, len(sizes)))
    return out


def _gathered(chunks: Iterable[torch.Tensor], rows: int) -> Iterator[torch.Tensor]:
    """The rows of ``chunks`` in order, chunks of fewer than ``rows`` rows gathered in one
    reused buffer (a kernel call on few rows is inefficient); larger chunks pass through."""
    buf, filled = None, 0
    for chunk in chunks:
        m = chunk.shape[0]
        if m == 0:
            continue
        if m >= rows:
            if filled:
                yield buf[:filled]
                filled = 0
            yield chunk
            continue
        if buf is None:
            buf = torch.empty(rows, chunk.shape[1], dtype=chunk.dtype, device=chunk.device)
        if filled + m > rows:
            yield buf[:filled]
            filled = 0
        buf[filled:filled + m] = chunk
        filled += m
    if filled:
        yield buf[:filled]


class GramAccumulator:
    r"""The stable build's state: the float64 Gram accumulators
    :math:`\sum_r u_{r,b} u_{r,b}^\top` of blocks ``first .. last - 1`` of a layout (all by
    default), fed row chunks with :meth:`add` and turned into the inverse by :meth:`finish`.

    The accumulators are held in groups of consecutive blocks; :meth:`finish` inverts each group
    into a segment of the result and frees it before the next, so the float64 accumulators and
    the whole result never coexist: the peak is the accumulators plus one group's result (for a
    float32 result, about 2.1 times its size). :meth:`state` and :meth:`load_state` save and
    restore the accumulators (a resumable fit); several accumulators of the same blocks over
    different rows add up exactly (``gram`` tensors, e.g. reduced across processes).

    Args:
        layout: the block layout; its ``dim`` is the rows' width.
        dtype: float32 or float64, the result's dtype (the rows' too).
        device: where the accumulators live.
        first, last: the range of blocks accumulated (a shard of the layout).
        blocks: the increasing block ids accumulated, instead of ``first`` and ``last``.
        max_memory: the bytes the accumulators and the result may take together (default
            what ``device`` has free, :mod:`ssse_ext.budget`): more is refused with
            :class:`~ssse_ext.errors.InsufficientMemoryError` before anything is allocated.
    """

    def __init__(self, layout: BlockLayout, dtype: torch.dtype, device, *, first: int = 0,
                 last: int | None = None, blocks=None, max_memory: int | None = None):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        check_dtype(dtype)
        last = layout.num_blocks if last is None else last
        if not 0 <= first <= last <= layout.num_blocks:
            raise ValueError(f"first and last must satisfy 0 <= first <= last <= "
                             f"{layout.num_blocks}, got {first} and {last}")
        ids = list(range(first, last)) if blocks is None else [int(b) for b in blocks]
        if any(not 0 <= b < layout.num_blocks for b in ids) or ids != sorted(set(ids)):
            raise ValueError(f"blocks must be increasing block indices of the layout, got "
                             f"{list(blocks)[:5]}...")
        self.layout, self.dtype, self.device = layout, dtype, torch.device(device)
        self.first, self.last, self.blocks = first, last, tuple(ids)
        sizes = [layout.sizes[b] for b in ids]
        numel = sum(s * s for s in sizes)
        cap = max(numel // _GROUPS, _MIN_GROUP_NUMEL)
        self.groups = _groups(sizes, cap)
        check_memory("GramAccumulator", _dense_build_nbytes(sizes, dtype), self.device,
                     max_memory=max_memory,
                     detail=f"{len(ids)} blocks of up to {max(sizes, default=0)}: "
                            f"{format_bytes(8 * numel)} of float64 accumulators, then "
                            f"{format_bytes(_ELEMENT_SIZE[dtype] * numel)} of inverses",
                     remedies=("accumulate fewer or smaller blocks (a smaller block_size, or a "
                               "shard of the layout)",
                               "pass max_memory=<bytes> if more memory may be used than is "
                               "free now"))
        self._tables = []
        for g0, g1 in self.groups:
            host = layout.table(blocks=ids[g0:g1])
            self._tables.append((host, host if self.device.type == "cpu"
                                 else host.to(self.device)))
        self.grams = [torch.zeros(sum(layout.sizes[b] ** 2 for b in ids[g0:g1]),
                                  dtype=torch.float64, device=self.device)
                      for g0, g1 in self.groups]
        self.rows = 0

    @property
    def gather_rows(self) -> int:
        """Rows worth gathering before a call: up to 256, the row buffer within an eighth of
        the result (or 64 MiB)."""
        numel = sum(self.layout.sizes[b] ** 2 for b in self.blocks)
        return _gather_rows(self.layout.dim, numel, self.dtype)

    def add(self, rows: torch.Tensor) -> None:
        """Accumulates a validated ``(m, dim)`` chunk of rows (the accumulators' device, the
        result's dtype)."""
        if rows.shape[0] == 0:
            return
        for gram, (host, dev) in zip(self.grams, self._tables):
            _ops.call(_ops.gram_accumulate_, rows, host, dev, gram)
        self.rows += rows.shape[0]

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (``gram.0``, ...) and metadata of the accumulation so far."""
        meta = {"rows": self.rows, "blocks": list(self.blocks),
                "groups": [list(g) for g in self.groups],
                "dtype": str(self.dtype).removeprefix("torch.")}
        return {f"gram.{j}": g for j, g in enumerate(self.grams)}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> "GramAccumulator":
        """Restores :meth:`state` (of an accumulator of the same layout and blocks)."""
        if [list(g) for g in self.groups] != meta.get("groups") or \
                list(self.blocks) != meta.get("blocks"):
            raise ValueError("the saved accumulators are for other blocks of the layout")
        for j, g in enumerate(self.grams):
            saved = tensors[f"gram.{j}"]
            if saved.shape != g.shape:
                raise ValueError(f"gram.{j} has shape {tuple(saved.shape)}, expected "
                                 f"{tuple(g.shape)}")
            g.copy_(saved)
        self.rows = int(meta["rows"])
        return self

    def finish(self, damping: float, normalizer: float, *, curvature: str = "empirical",
               probe: FisherProbe | None = None) -> BlockInverseFisher | list[torch.Tensor]:
        """Inverts every group (freeing it) into the segments of the result: a
        :class:`BlockInverseFisher` when all blocks were accumulated, else the list of
        segments of the accumulated blocks. The accumulator is spent.

        Before anything is inverted, every group is checked: accumulators that overflowed
        float64 raise ``FloatingPointError``; blocks so ill-conditioned that their inverse
        loses more than half the digits of the result's dtype get a
        :class:`~ssse_ext.health.ConditionWarning`
        (:func:`~ssse_ext.health.ill_conditioned_blocks`); ``probe`` (a
        :class:`~ssse_ext.health.FisherProbe` of the layout) receives the accumulated Fisher
        of these blocks (and travels with the result when it is a :class:`BlockInverseFisher`).
        """
        damping = check_positive_float(damping, "damping")
        normalizer = check_positive_float(normalizer, "normalizer")
        if probe is not None and (not isinstance(probe, FisherProbe) or
                                  probe.layout != self.layout):
            raise ValueError("probe must be a FisherProbe of the accumulator's layout")
        bad: list[tuple[int, float]] = []
        for gram, (g0, g1) in zip(self.grams, self.groups):
            ids = self.blocks[g0:g1]
            if not all_finite(gram):
                self._raise_overflow(gram, ids)
            bad += ill_conditioned_blocks(gram, self.layout, ids, damping=damping,
                                          normalizer=normalizer, dtype=self.dtype)
            if probe is not None:
                probe.add_gram(gram, ids)
        warn_ill_conditioned(bad, self.layout, damping=damping, rows=self.rows,
                             dtype=self.dtype)
        segments = []
        for g, ((g0, g1), (host, dev)) in enumerate(zip(self.groups, self._tables)):
            packed, info = _ops.call(_ops.inverse_from_gram, self.grams[g], host, dev, damping,
                                     normalizer, self.dtype)
            self.grams[g] = None  # freed before the next group's result is allocated
            if bool(info.any()):
                full = torch.zeros(self.layout.num_blocks, dtype=info.dtype, device=info.device)
                full[list(self.blocks[g0:g1])] = info
                _raise_if_failed(full, "build", self.layout, "pivot")
            segments.append(packed)
        if len(self.blocks) != self.layout.num_blocks:
            return segments
        if not segments:  # a layout without blocks
            segments = [torch.zeros(0, dtype=self.dtype, device=self.device)]
        return BlockInverseFisher(segments, FisherConfig(damping, normalizer, self.layout,
                                                         curvature), self.rows, probe=probe)

    def _raise_overflow(self, gram: torch.Tensor, ids) -> None:
        o = 0
        for b in ids:
            s = self.layout.sizes[b]
            if not all_finite(gram[o:o + s * s]):
                break
            o += s * s
        raise FloatingPointError(
            f"build: the float64 Gram matrix of block {b} (parameters {self.layout.starts[b]}.."
            f"{self.layout.starts[b] + self.layout.sizes[b]}) overflowed: the squares of the "
            f"rows exceed the float64 range (1.8e308, rows of norm about 1e154 or more); scale "
            f"the loss or the inputs down")


def _build_by_gram(chunks, layout: BlockLayout, damping: float, normalizer: float | None,
                   dtype: torch.dtype, device: torch.device, rows_per_sample: int = 1, *,
                   dual: list[bool] | None = None, capacity: int | None = None,
                   probe_columns: int = 0, max_memory: int | None = None
                   ) -> BlockInverseFisher:
    """The stable build: the dense blocks through a :class:`GramAccumulator` (float64 Gram
    accumulation, then a Cholesky-based inverse, group of blocks by group); the blocks marked
    ``dual`` through :class:`DualBlocks` (rows kept, kernel Gram accumulated, factorised at the
    end), fed the same chunks."""
    dual = dual or [False] * layout.num_blocks
    acc = GramAccumulator(layout, dtype, device, max_memory=max_memory,
                          blocks=[b for b, low in enumerate(dual) if not low])
    ids = [b for b, low in enumerate(dual) if low]
    low = None
    if ids:
        cap = capacity or 1
        total = sum(layout.sizes[b] for b in ids)
        low = DualBlocks(layout, ids, torch.zeros(cap * total, dtype=dtype, device=device),
                         torch.zeros(len(ids) * cap * cap, dtype=torch.float64, device=device),
                         num_rows=0, capacity=cap, damping=damping, normalizer=1.0)
    rows = 0
    probe = FisherProbe(layout, columns=probe_columns, device=device) if probe_columns else None

    def feed():  # every chunk into the dense accumulators, then on to the dual blocks
        nonlocal rows
        for chunk in _gathered(chunks, acc.gather_rows):
            acc.add(chunk)
            if probe is not None and ids:  # the dense blocks' probe is filled from the Grams
                probe.add(chunk, blocks=ids)
            rows += chunk.shape[0]
            yield chunk

    if low is not None:
        low._append(feed(), capacity)
    else:
        for _ in feed():
            pass
    if normalizer is None:
        normalizer = max(rows, 1) / rows_per_sample
    segments = acc.finish(damping, normalizer, probe=probe)
    if low is None:
        return segments
    low.normalizer = normalizer
    low._factor(0, rows, "build")
    low.num_rows = rows
    if capacity is None:
        low.compact()
    return BlockInverseFisher(segments, FisherConfig(damping, normalizer, layout), rows,
                              dual=low, probe=probe)
