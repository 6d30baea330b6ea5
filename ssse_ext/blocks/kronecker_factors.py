r"""The statistics of a Kronecker-factored block and their algebra (the stores:
:mod:`ssse_ext.blocks.kronecker`).

A weight ``out x in`` (stored so, or ``in x out`` when ``transposed``) keeps the float64 factor
sums :math:`\bar A` (``in x in``) and :math:`\bar S` (``out x out``), their eigenbases and
eigenvalues, and a grid :math:`\bar\Lambda` (``out x in``) with
:math:`N(F_W - \lambda I) = (Q_S \otimes Q_A)\,\mathrm{diag}(\bar\Lambda)\,
(Q_S \otimes Q_A)^\top` (:class:`KronBlock`); the factor sums of some samples travel with
their rows as the side payload :class:`KroneckerFactors`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import NotPositiveDefiniteError
from ..side import SidePayload
from ..validation import check_choice, check_nonneg_float
from .base import element_size

__all__ = ["DEFAULT_TOLERANCE", "KRONECKER_KEY", "KronBlock", "KroneckerFactors",
           "REFRESH_MODES", "checked_psd", "eigh", "from_matrices", "grid", "kron_times",
           "kronecker_nbytes", "moved", "to_matrices"]

#: The side-payload key of :class:`KroneckerFactors`.
KRONECKER_KEY = "kronecker"
#: What an EK-FAC store does with its grid when samples are removed (see the module).
REFRESH_MODES = ("basis-kept", "exact")
#: Off-diagonal mass of a changed factor in the kept basis up to which ``"basis-kept"``
#: keeps it.
DEFAULT_TOLERANCE = 1e-2
# A factor sum may go this far below zero (relative to its scale) by rounding; further is a
# removal of samples that were not added.
PSD_RTOL = 1e-8
# Rows turned into float64 (R, out, in) gradients at once for an EK-FAC grid.
_GRID_ELEMENTS = 1 << 22


class KroneckerFactors(SidePayload):
    r"""The side payload of the Kronecker-factored stores: per weight, keyed by the flat start
    of its block, the float64 sums :math:`\sum a a^\top` (``(in, in)``) and
    :math:`\sum g g^\top` (``(out, out)``) of some samples, and whether the weight is stored
    ``(in, out)``; with the EK-FAC store's ``refresh`` and ``tolerance``.

    Args:
        factors: ``{start: (a, g, transposed)}``.
        refresh: one of :data:`REFRESH_MODES`.
        tolerance: the basis movement ``"basis-kept"`` tolerates (>= 0).
    """

    def __init__(self, factors: dict, *, refresh: str = "basis-kept",
                 tolerance: float = DEFAULT_TOLERANCE):
        self.refresh = check_choice(refresh, "refresh", REFRESH_MODES)
        self.tolerance = check_nonneg_float(tolerance, "tolerance")
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
        if (other.refresh, other.tolerance) != (self.refresh, self.tolerance):
            raise ValueError("Kronecker factors with different refresh or tolerance cannot be "
                             "added")
        out = dict(self.factors)
        for start, (a, g, tr) in other.factors.items():
            if start in out:
                a0, g0, tr0 = out[start]
                if a0.shape != a.shape or g0.shape != g.shape or tr0 != tr:
                    raise ValueError(f"the factors of the weight at {start} disagree in shape")
                out[start] = (a0 + a, g0 + g, tr)
            else:
                out[start] = (a, g, tr)
        return KroneckerFactors(out, refresh=self.refresh, tolerance=self.tolerance)

    def to(self, device) -> "KroneckerFactors":
        on = {s: (a.to(device), g.to(device), tr) for s, (a, g, tr) in self.factors.items()}
        return KroneckerFactors(on, refresh=self.refresh, tolerance=self.tolerance)


@dataclass
class KronBlock:
    """One block's exact statistics (float64): the factor sums, their eigenbases and
    eigenvalues, the unnormalised grid, and (EK-FAC, ``"exact"``) the block's rows."""

    out: int
    inn: int
    transposed: bool
    a: torch.Tensor
    g: torch.Tensor
    qa: torch.Tensor
    ea: torch.Tensor
    qg: torch.Tensor
    eg: torch.Tensor
    lam: torch.Tensor
    rows: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "KronBlock":
        on = {k: getattr(self, k).to(device) for k in ("a", "g", "qa", "ea", "qg", "eg", "lam")}
        rows = None if self.rows is None else self.rows.to(device=device, dtype=dtype)
        return replace(self, rows=rows, **on)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in ("a", "g", "qa", "ea", "qg", "eg", "lam")}
        if self.rows is not None:
            out["rows"] = self.rows
        return out


def kronecker_nbytes(out: int, inn: int, dtype: torch.dtype, rows: int = 0) -> int:
    """Bytes of one Kronecker block of an ``out x in`` weight, with ``rows`` kept rows."""
    return 8 * (2 * out * out + 2 * inn * inn + out + inn + out * inn) + \
        element_size(dtype) * (out * out + inn * inn + out * inn + rows * out * inn)


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
    r""":math:`\sum_r (Q_S^\top G_r Q_A)^{\circ 2}` of the ``(R, s)`` rows, float64."""
    out = torch.zeros(blk.out, blk.inn, dtype=torch.float64, device=blk.qa.device)
    step = max(1, _GRID_ELEMENTS // max(blk.out * blk.inn, 1))
    for i in range(0, rows.shape[0], step):
        g = to_matrices(rows[i:i + step].to(torch.float64).T, blk.out, blk.inn, blk.transposed)
        out += (blk.qg.T @ g @ blk.qa).square().sum(0)
    return out


def kron_times(blk: KronBlock, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Q_S ((Q_S^T V Q_A) * weights) Q_A^T`` of ``(s, r)`` columns, in ``v``'s dtype."""
    qa, qg = blk.qa.to(v.device, v.dtype), blk.qg.to(v.device, v.dtype)
    m = to_matrices(v, blk.out, blk.inn, blk.transposed)
    w = weights.to(v.device, v.dtype)
    return from_matrices(qg @ ((qg.T @ m @ qa) * w) @ qa.T, blk.transposed)
