r"""The statistics of a Kronecker-factored block and their algebra (the stores:
:mod:`ssse_ext.blocks.kronecker`).

A weight ``out x in`` (stored so, or ``in x out`` when ``transposed``) keeps the eigenbases
:math:`Q_A` (``in x in``), :math:`Q_S` (``out x out``) and the float64 eigenvalues of its
factor sums :math:`\bar A = Q_A \mathrm{diag}(e_A) Q_A^\top` and :math:`\bar S`, and a float64
grid :math:`\bar\Lambda` (``out x in``) with :math:`N(F_W - \lambda I) = (Q_S \otimes Q_A)\,
\mathrm{diag}(\bar\Lambda)\,(Q_S \otimes Q_A)^\top` (:class:`KronBlock`). The sums are not
stored: a change rebuilds them in float64 from the bases and eigenvalues (:attr:`KronBlock.a`,
:attr:`KronBlock.g`). ``storage`` (:data:`STORAGE_MODES`) says in which dtype the bases are
kept: ``"exact"`` in float64 (the sums come back to float64 rounding), ``"compact"`` only in
the store's dtype (docs/maths.md bounds what that costs in accuracy). The factor sums of some
samples travel with their rows as the side payload :class:`KroneckerFactors`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import NotPositiveDefiniteError
from ..side import SidePayload, register_side
from ..validation import check_choice, check_nonneg_float
from .base import element_size

__all__ = ["DEFAULT_STORAGE", "DEFAULT_TOLERANCE", "KRONECKER_KEY", "KronBlock",
           "KroneckerFactors", "REFRESH_MODES", "STORAGE_MODES", "block_from_state",
           "checked_psd", "diagonal_in", "eigh", "factor", "from_matrices", "grid",
           "kron_times", "kronecker_nbytes", "moved", "to_matrices"]

#: The side-payload key of :class:`KroneckerFactors`.
KRONECKER_KEY = "kronecker"
#: What an EK-FAC store does with its grid when samples are removed (see the module).
REFRESH_MODES = ("basis-kept", "exact")
#: How a store keeps its eigenbases: ``"exact"`` in float64 (with copies in the store's dtype
#: for the applies when that is float32), ``"compact"`` only in the store's dtype.
STORAGE_MODES = ("exact", "compact")
DEFAULT_STORAGE = "exact"
#: Off-diagonal mass of a changed factor in the kept basis up to which ``"basis-kept"``
#: keeps it.
DEFAULT_TOLERANCE = 1e-2
# A factor sum may go this far below zero (relative to its scale) by rounding; further is a
# removal of samples that were not added.
PSD_RTOL = 1e-8
# The off-diagonal mass up to which a saved basis is its saved sums' eigenbasis.
_EIGENBASIS = 1e-10
# Rows turned into float64 (R, out, in) gradients at once for an EK-FAC grid.
_GRID_ELEMENTS = 1 << 22


class KroneckerFactors(SidePayload):
    r"""The side payload of the Kronecker-factored stores: per weight, keyed by the flat start
    of its block, the float64 sums :math:`\sum a a^\top` (``(in, in)``) and
    :math:`\sum g g^\top` (``(out, out)``) of some samples, and whether the weight is stored
    ``(in, out)``; with the stores' options: EK-FAC's ``refresh`` and ``tolerance``, and the
    ``storage`` of the bases.

    Args:
        factors: ``{start: (a, g, transposed)}``.
        refresh: one of :data:`REFRESH_MODES`.
        tolerance: the basis movement ``"basis-kept"`` tolerates (>= 0).
        storage: one of :data:`STORAGE_MODES`.
    """

    def __init__(self, factors: dict, *, refresh: str = "basis-kept",
                 tolerance: float = DEFAULT_TOLERANCE, storage: str = DEFAULT_STORAGE):
        self.refresh = check_choice(refresh, "refresh", REFRESH_MODES)
        self.tolerance = check_nonneg_float(tolerance, "tolerance")
        self.storage = check_choice(storage, "storage", STORAGE_MODES)
        if not isinstance(factors, dict):
            raise TypeError(f"factors must be a dict, got {type(factors).__name__}")
        for start, entry in factors.items():
            ok = isinstance(start, int) and isinstance(entry, tuple) and len(entry) == 3
            a, g, _ = entry if ok else (None, None, None)
            if not ok or not all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 and
                                 t.dim() == 2 and t.shape[0] == t.shape[1] for t in (a, g)):
                raise ValueError(f"factors[{start!r}] must be (a, g, transposed) with square "
                                 f"float64 a and g")
            if not bool(torch.isfinite(a).all() and torch.isfinite(g).all()):
                raise ValueError(f"factors[{start!r}] contains NaN or Inf")
        self.factors = dict(factors)

    def __add__(self, other: "KroneckerFactors") -> "KroneckerFactors":
        if not isinstance(other, KroneckerFactors):
            return NotImplemented
        if self.options() != other.options():
            raise ValueError("Kronecker factors with different refresh, tolerance or storage "
                             "cannot be added")
        out = dict(self.factors)
        for start, (a, g, tr) in other.factors.items():
            if start in out:
                a0, g0, tr0 = out[start]
                if a0.shape != a.shape or g0.shape != g.shape or tr0 != tr:
                    raise ValueError(f"the factors of the weight at {start} disagree in shape")
                out[start] = (a0 + a, g0 + g, tr)
            else:
                out[start] = (a, g, tr)
        return KroneckerFactors(out, **self.options())

    def options(self) -> dict:
        """The stores' options: ``{"refresh": ..., "tolerance": ..., "storage": ...}``."""
        return {"refresh": self.refresh, "tolerance": self.tolerance, "storage": self.storage}

    def to(self, device) -> "KroneckerFactors":
        on = {s: (a.to(device), g.to(device), tr) for s, (a, g, tr) in self.factors.items()}
        return KroneckerFactors(on, **self.options())

    def skeleton(self) -> dict:
        return {"options": self.options(),
                "factors": [[start, a.shape[0], g.shape[0], bool(tr)]
                            for start, (a, g, tr) in sorted(self.factors.items())]}

    @classmethod
    def zeros(cls, skeleton: dict, device) -> "KroneckerFactors":
        def square(n: int) -> torch.Tensor:
            return torch.zeros(n, n, dtype=torch.float64, device=device)

        return cls({int(start): (square(int(inn)), square(int(out)), bool(tr))
                    for start, inn, out, tr in skeleton["factors"]}, **skeleton["options"])

    def parts(self) -> list[tuple[int, torch.Tensor]]:
        return [(start, t) for start, (a, g, _) in sorted(self.factors.items()) for t in (a, g)]

    def restricted(self, lo: int, hi: int) -> "KroneckerFactors":
        return KroneckerFactors({start - lo: entry for start, entry in self.factors.items()
                                 if lo <= start < hi}, **self.options())


register_side(KRONECKER_KEY, KroneckerFactors)


@dataclass
class KronBlock:
    """One block's statistics: the eigenbases (float64, or the store's dtype when
    ``"compact"``), the float64 eigenvalues of the factor sums, the float64 unnormalised grid,
    and (EK-FAC, ``"exact"`` refresh) the block's rows.

    A basis kept by an EK-FAC ``"basis-kept"`` change is no longer the eigenbasis of the
    changed sums: ``"exact"`` storage then keeps the float64 sums ``(a, g)`` in ``sums``
    until the basis is replaced; ``"compact"`` keeps their diagonal in the basis as ``ea``,
    ``eg`` and in ``drift`` a bound on the relative off-diagonal mass so dropped."""

    out: int
    inn: int
    transposed: bool
    qa: torch.Tensor
    ea: torch.Tensor
    qg: torch.Tensor
    eg: torch.Tensor
    lam: torch.Tensor
    rows: torch.Tensor | None = None
    sums: tuple[torch.Tensor, torch.Tensor] | None = None
    drift: float = 0.0

    @property
    def a(self) -> torch.Tensor:
        r"""The input factor sum, float64: :math:`Q_A \mathrm{diag}(e_A) Q_A^\top` (or the
        kept ``sums``)."""
        return factor(self.qa, self.ea) if self.sums is None else self.sums[0]

    @property
    def g(self) -> torch.Tensor:
        r"""The output factor sum, float64: :math:`Q_S \mathrm{diag}(e_S) Q_S^\top` (or the
        kept ``sums``)."""
        return factor(self.qg, self.eg) if self.sums is None else self.sums[1]

    def to(self, device=None, dtype=None, bases=None) -> "KronBlock":
        """On ``device``, the rows in ``dtype`` and the bases in ``bases`` (``None``: kept)."""
        on = {k: getattr(self, k).to(device) for k in ("ea", "eg", "lam")}
        on.update({k: getattr(self, k).to(device=device, dtype=bases) for k in ("qa", "qg")})
        rows = None if self.rows is None else self.rows.to(device=device, dtype=dtype)
        sums = None if self.sums is None else tuple(t.to(device) for t in self.sums)
        return replace(self, rows=rows, sums=sums, **on)

    def clone(self) -> "KronBlock":
        """A copy sharing no tensor."""
        on = {k: getattr(self, k).clone() for k in ("qa", "ea", "qg", "eg", "lam")}
        rows = None if self.rows is None else self.rows.clone()
        sums = None if self.sums is None else tuple(t.clone() for t in self.sums)
        return replace(self, rows=rows, sums=sums, **on)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in ("qa", "ea", "qg", "eg", "lam")}
        if self.rows is not None:
            out["rows"] = self.rows
        if self.sums is not None:
            out["a"], out["g"] = self.sums
        return out


def factor(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    r""":math:`Q \mathrm{diag}(e) Q^\top` computed in float64 (``q`` of any float dtype)."""
    q = q.to(torch.float64)
    return (q * e.to(torch.float64)) @ q.T


def kronecker_nbytes(out: int, inn: int, dtype: torch.dtype, rows: int = 0,
                     storage: str = DEFAULT_STORAGE, sums: bool = False) -> int:
    """Bytes of one Kronecker block of an ``out x in`` weight, with ``rows`` kept rows, for a
    store of ``dtype`` keeping its bases as ``storage`` says: float64 eigenvalues and grid,
    the bases in float64 and (when ``dtype`` is not float64) a copy in ``dtype`` for
    ``"exact"``, only in ``dtype`` for ``"compact"``; with ``sums``, also the float64 factor
    sums of a kept basis."""
    check_choice(storage, "storage", STORAGE_MODES)
    size = element_size(dtype)
    square = out * out + inn * inn
    if storage == "compact":
        bases = size * square
    else:
        bases = 8 * square + (0 if size == 8 else size * square)
    return bases + 8 * (out + inn + out * inn) + size * rows * out * inn + \
        (8 * square if sums else 0)


def eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of the symmetric part of ``m``."""
    return torch.linalg.eigh(0.5 * (m + m.T))


def checked_psd(values: torch.Tensor, scale: float, what: str, b: int, which: str
                 ) -> torch.Tensor:
    """``values`` clamped at zero, after checking none is below ``-PSD_RTOL * scale``."""
    low = float(values.min()) if values.numel() else 0.0
    if low < -PSD_RTOL * max(scale, 1e-300):
        raise NotPositiveDefiniteError(
            f"{what}: Kronecker block {b} would get a negative {which} ({low:.3e}, scale "
            f"{scale:.3e}): the samples removed were not part of it; nothing was changed")
    return values.clamp(min=0)


def moved(q: torch.Tensor, m: torch.Tensor) -> float:
    r"""How far ``m`` is from diagonal in the basis ``q``: :math:`\lVert \mathrm{off}(Q^\top M
    Q)\rVert_F / \lVert M\rVert_F` (0 for an empty or zero matrix)."""
    q = q.to(m.dtype)
    t = q.T @ m @ q
    total = float(torch.linalg.matrix_norm(t))
    off = t - torch.diag_embed(torch.diagonal(t))
    return float(torch.linalg.matrix_norm(off)) / total if total > 0 else 0.0


def to_matrices(v: torch.Tensor, out: int, inn: int, transposed: bool) -> torch.Tensor:
    """``(s, r)`` block columns as ``(r, out, in)`` matrices."""
    r = v.shape[1]
    if transposed:
        return v.T.reshape(r, inn, out).transpose(1, 2)
    return v.T.reshape(r, out, inn)


def from_matrices(m: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Inverse of :func:`to_matrices`: ``(r, out, in)`` as ``(s, r)``."""
    r = m.shape[0]
    return (m.transpose(1, 2) if transposed else m).reshape(r, -1).T


def grid(rows: torch.Tensor, blk: KronBlock) -> torch.Tensor:
    r""":math:`\sum_r (Q_S^\top G_r Q_A)^{\circ 2}` of the ``(R, s)`` rows, float64 (in the
    bases as stored, converted to float64)."""
    out = torch.zeros(blk.out, blk.inn, dtype=torch.float64, device=blk.qa.device)
    qa, qg = blk.qa.to(torch.float64), blk.qg.to(torch.float64)
    step = max(1, _GRID_ELEMENTS // max(blk.out * blk.inn, 1))
    for i in range(0, rows.shape[0], step):
        g = to_matrices(rows[i:i + step].to(torch.float64).T, blk.out, blk.inn, blk.transposed)
        out += (qg.T @ g @ qa).square().sum(0)
    return out


def kron_times(blk: KronBlock, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Q_S ((Q_S^T V Q_A) * weights) Q_A^T`` of ``(s, r)`` columns, in ``v``'s dtype."""
    qa, qg = blk.qa.to(v.device, v.dtype), blk.qg.to(v.device, v.dtype)
    m = to_matrices(v, blk.out, blk.inn, blk.transposed)
    w = weights.to(v.device, v.dtype)
    return from_matrices(qg @ ((qg.T @ m @ qa) * w) @ qa.T, blk.transposed)


def diagonal_in(q: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    r"""The diagonal of :math:`Q^\top M Q` (float64, clamped at zero)."""
    q = q.to(m.dtype)
    return ((m @ q) * q).sum(0).clamp(min=0)


def block_from_state(tensors: dict, j: int, shape: tuple, version: int, storage: str,
                      drift: float) -> KronBlock:
    """Block ``j`` of a Kronecker store's state (format ``version``): float64 eigenvalues and
    grid, float64 bases (``"exact"``) or float ones (``"compact"``), the sums of a kept basis;
    format 1's sums (always saved) are kept only where the basis is not their eigenbasis."""
    o, i, tr = shape
    want = {"qa": (i, i), "ea": (i,), "qg": (o, o), "eg": (o,), "lam": (o, i)}
    if version == 1 or f"{j}.a" in tensors:
        want.update({"a": (i, i), "g": (o, o)})
    parts = {k: tensors[f"{j}.{k}"] for k in want}
    for k, size in want.items():
        t = parts[k]
        ok = t.dtype == torch.float64 or (storage == "compact" and k in ("qa", "qg") and
                                          t.dtype == torch.float32)
        if tuple(t.shape) != size or not ok:
            raise ValueError(f"tensor {j}.{k}")
    sums = (parts.pop("a"), parts.pop("g")) if "a" in parts else None
    if sums is not None and version == 1 and \
            max(moved(parts["qa"], sums[0]), moved(parts["qg"], sums[1])) <= _EIGENBASIS:
        sums = None
    return KronBlock(o, i, tr, rows=tensors.get(f"{j}.rows"), sums=sums, drift=drift, **parts)
