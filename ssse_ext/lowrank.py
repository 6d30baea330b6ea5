r"""Low-rank changes of a block inverse by the Woodbury identity, in float64 (docs/maths.md).

With rows :math:`R` (``k x d``) added (``sign = +1``) or removed (``-1``) and the normaliser
:math:`N` fixed, every block changes to :math:`M_b = F_b + \mathrm{sign}\,R_b^\top R_b / N`:

.. math:: M_b^{-1} = F_b^{-1} - \mathrm{sign}\;U \big(N I_k + \mathrm{sign}\,R_b U\big)^{-1}
          U^\top,\qquad U = F_b^{-1} R_b^\top .

The stores compute their factors (:meth:`~ssse_ext.blocks.BlockStore.without`); this module
holds what they share — the positive-definiteness margin, the refusals, the memory check of a
change across stores — and :class:`LowRankChange`, the changed inverse applied on the fly. It
knows tensors and the store protocol only, not the inverse's class.
"""

from __future__ import annotations

import torch

from .budget import AVAILABLE_MEMORY_ENV, check_memory
from .errors import NotPositiveDefiniteError
from .layout import BlockLayout
from .side import side_kwargs
from .validation import check_finite_float, check_update_operands, check_vector

__all__ = ["LowRankChange", "PD_MARGIN", "WOODBURY_ELEMENTS", "change_nbytes",
           "check_change_memory", "check_overflow", "check_pivots", "checked_cholesky",
           "inner_matrix", "overflow_error", "rows_t_times", "rows_times"]

#: Smallest Cholesky pivot of the normalised Woodbury matrix accepted by an update, a downdate
#: or a leave-k-out apply: far above the rounding of its float64 computation (~1e-15), so the
#: kernels that then write the blocks cannot disagree with the check.
PD_MARGIN = 1e-10
#: Elements of float64 scratch per batch of blocks when the Woodbury form is checked or applied
#: with torch (32 MiB): a request's extra memory stays small next to the inverse.
WOODBURY_ELEMENTS = 1 << 22


def _where(layout: BlockLayout, b: int) -> str:
    return f"(parameters {layout.starts[b]}..{layout.starts[b] + layout.sizes[b]})"


def check_overflow(m: torch.Tensor, what: str, layout: BlockLayout, block_ids) -> None:
    """Non-finite entries in the ``(n, k, k)`` Woodbury matrices of the blocks ``block_ids``
    mean that the rows' products overflowed float64 (finite rows: the inputs are checked)."""
    if bool(torch.isfinite(m).all()):
        return
    raise overflow_error(what, layout,
                         block_ids[int(torch.nonzero(~torch.isfinite(m).flatten(1).all(1))[0])])


def overflow_error(what: str, layout: BlockLayout, b: int) -> FloatingPointError:
    """The error of a change whose rows' products with block ``b`` overflowed float64."""
    return FloatingPointError(
        f"{what}: the products of the rows with block {b} {_where(layout, b)} overflowed "
        f"float64 (1.8e308): the rows are too large (norm about 1e154 or more); scale the loss "
        f"or the inputs down. Nothing was changed")


def check_pivots(info: torch.Tensor, pivots: torch.Tensor, what: str, layout: BlockLayout,
                 block_ids, *, kind: str = "") -> None:
    """Refuses a batch of Cholesky factorisations unless every one succeeded (``info`` 0) with
    every pivot at least :data:`PD_MARGIN`.

    Args:
        info: ``(n,)`` the factorisations' info.
        pivots: ``(n, m)`` their (normalised) squared diagonals.
        block_ids: the ``n`` layout blocks they belong to.
        kind: the representation, for the message (e.g. ``"dual "``).
    """
    bad = info != 0
    if pivots.shape[1]:
        bad |= ~(pivots.min(dim=1).values >= PD_MARGIN)
    if not bool(bad.any()):
        return
    i = int(torch.nonzero(bad)[0])
    b = block_ids[i]
    worst = float(pivots[i].min()) if int(info[i]) == 0 and pivots.shape[1] else float("-inf")
    raise NotPositiveDefiniteError(
        f"{what}: {kind}block {b} {_where(layout, b)} would not stay positive definite "
        f"(smallest relative pivot {worst:.2e}, needed >= {PD_MARGIN:g}): were these rows "
        "ever added? Nothing was changed")


def inner_matrix(u: torch.Tensor, r: torch.Tensor, sign: int, normalizer: float
                 ) -> torch.Tensor:
    r""":math:`C = N I_k + \mathrm{sign}\,R_b U` for a batch of blocks, symmetrised.

    Args:
        u: ``(n, s, k)`` float64, :math:`U = F_b^{-1} R_b^\top`.
        r: ``(n, k, s)`` float64, :math:`R_b`.

    Returns:
        ``(n, k, k)``; :math:`C / N` has the spectrum of :math:`F_b^{-1} M_b` up to ones.
    """
    c = sign * (r @ u)
    c = 0.5 * (c + c.transpose(1, 2))
    c.diagonal(dim1=1, dim2=2).add_(normalizer)
    return c


def shifted_factor(left: torch.Tensor, m: torch.Tensor, sign: int, normalizer: float,
                   shift: float, what: str, layout: BlockLayout, block_ids,
                   info: torch.Tensor | None = None) -> torch.Tensor:
    r"""The Cholesky factor of :math:`A = I + \mathrm{sign}\,M M^\top / N -
    \mathrm{shift}\,L^\top L` for blocks whose inverse is :math:`L L^\top` (``left``,
    ``(n, s, s)``) and :math:`M = (R L)^\top` (``m``, ``(n, s, k)``): the changed block's inverse
    is :math:`L A^{-1} L^\top`. Refuses (:func:`checked_cholesky`) an :math:`A` that is not
    positive definite with the margin."""
    a = sign * (m @ m.transpose(1, 2)) / normalizer
    if shift:
        a = a - shift * (left.transpose(1, 2) @ left)
    a = 0.5 * (a + a.transpose(1, 2))
    a.diagonal(dim1=1, dim2=2).add_(1.0)
    return checked_cholesky(a, what, layout, block_ids, info=info)


def solve_kept(kept: tuple, vb: torch.Tensor, sign: int, base_solve) -> torch.Tensor:
    """The changed blocks' inverse applied to ``vb`` (``(n, s, r)``) from the factors ``kept``
    of a check: ``L A^{-1} L^T vb`` for a ``"factor"``, ``base_solve(vb) - sign U C^{-1} U^T vb``
    for a ``"correction"`` (``base_solve``: the unchanged blocks' inverse applied)."""
    left, chol = kept[4], kept[5]
    res = left @ torch.cholesky_solve(left.transpose(1, 2) @ vb, chol)
    if kept[3] == "correction":
        res = base_solve(vb) - sign * res
    return res


def checked_cholesky(m: torch.Tensor, what: str, layout: BlockLayout, block_ids, *,
                     scale: float = 1.0, info: torch.Tensor | None = None, kind: str = ""
                     ) -> torch.Tensor:
    """The Cholesky factors of the symmetric ``(n, k, k)`` matrices ``m`` of the blocks
    ``block_ids``, refused unless ``m`` is finite (``FloatingPointError``) and every pivot of
    ``m / scale`` is at least :data:`PD_MARGIN` (:class:`NotPositiveDefiniteError`).
    ``info``: earlier factorisations of the same blocks; a non-zero entry refuses its block."""
    check_overflow(m, what, layout, block_ids)
    chol, fail = torch.linalg.cholesky_ex(m)
    if info is not None:
        fail = torch.where(info != 0, info, fail)
    check_pivots(fail, chol.diagonal(dim1=1, dim2=2) ** 2 / scale, what, layout, block_ids,
                 kind=kind)
    return chol


def _column_step(s: int, r: int) -> int:
    return max(1, WOODBURY_ELEMENTS // max(r, 1)) if s else 1


def rows_times(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g @ x`` in float64 for ``g`` ``(R, s)`` of any float dtype and ``x`` float64
    ``(s, r)``, reading ``g`` in column chunks (no float64 copy of it)."""
    out = torch.zeros(g.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    step = _column_step(g.shape[1], g.shape[0])
    for c in range(0, g.shape[1], step):
        out += g[:, c:c + step].to(torch.float64) @ x[c:c + step]
    return out


def rows_t_times(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``g.T @ z`` in float64, ``g`` ``(R, s)`` read in column chunks, ``z`` ``(R, r)``."""
    out = torch.empty(g.shape[1], z.shape[1], dtype=torch.float64, device=z.device)
    step = _column_step(g.shape[1], g.shape[0])
    for c in range(0, g.shape[1], step):
        out[c:c + step] = g[:, c:c + step].to(torch.float64).T @ z
    return out


def change_nbytes(stores, k: int, dim: int, *, method: str = "woodbury", keep: bool = False,
                  shift: float = 0.0) -> int:
    """Bytes a change of ``k`` rows allocates across ``stores`` (their
    :meth:`~ssse_ext.blocks.BlockStore.change_nbytes`): the largest work of one store (they
    run one after the other), the factors of all of them when kept, and the float64 rows."""
    if not k:
        return 0
    costs = [s.change_nbytes(k, method=method, keep=keep, shift=shift) for s in stores]
    work = max((w for w, _ in costs), default=0)
    kept = sum(kk for _, kk in costs) if keep else 0
    return work + kept + 8 * k * dim


def check_change_memory(stores, k: int, dim: int, device, what: str, *,
                        method: str = "woodbury", keep: bool = False, shift: float = 0.0
                        ) -> None:
    """Refuses (:class:`~ssse_ext.errors.InsufficientMemoryError`) a change of ``k`` rows
    whose float64 work (:func:`change_nbytes`) does not fit."""
    check_memory(what, change_nbytes(stores, k, dim, method=method, keep=keep, shift=shift),
                 device,
                 detail=f"float64 work on {k} rows" + (", kept for every block" if keep
                                                      else ""),
                 remedies=(f"set {AVAILABLE_MEMORY_ENV}=<bytes> if more memory may be used "
                           f"than is free now",))


class LowRankChange:
    r"""A :class:`~ssse_ext.BlockInverseFisher` with rows removed from (or added to) its
    Fisher, applied on the fly: ``change @ v`` is :math:`(F + \mathrm{sign}\,R^\top R / N)^{-1}
    v`. Made by :meth:`~ssse_ext.BlockInverseFisher.without`; the factors are computed (and
    every block checked) once, so repeated products cost one pass over the inverse plus
    :math:`O(k\,d)` each.

    Args:
        inv: the inverse (anything with ``stores``, ``matvec``, ``dim``, ``dtype``, ``device``).
        rows: validated ``(k, d)`` rows :math:`R`.
        sign: ``+1`` or ``-1``.
        side: the rows' side payload (:mod:`ssse_ext.side`), for the stores that read one.
    """

    def __init__(self, inv, rows: torch.Tensor, sign: int, *, side=None):
        self.inverse, self.sign, self.k = inv, sign, rows.shape[0]
        what = "leave-k-out apply" if sign < 0 else "low-rank update"
        self._factors = []
        if self.k:
            check_change_memory(inv.stores, self.k, inv.dim, inv.device, what, keep=True)
            self._factors = [s.without(rows, sign, what=what, **side_kwargs(s, side))
                             for s in inv.stores]

    def _vector(self, v, name: str) -> tuple[torch.Tensor, bool]:
        inv = self.inverse
        return check_vector(v, name, dim=inv.dim, dtype=inv.dtype, device=inv.device)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """The product with ``v`` (``(d,)`` or ``(d, r)``), in float64."""
        vv, vec = self._vector(v.to(self.inverse.dtype), "v")
        v64 = v.to(torch.float64).reshape(vv.shape)
        out = self.inverse.matvec(vv).to(torch.float64)
        for factors in self._factors:
            factors.solve(v64, out)
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
        base, vv, vec = check_update_operands(theta, v, dim=inv.dim, dtype=inv.dtype,
                                              device=inv.device)
        out = (base.to(torch.float64) + scale * self.solve(vv)).to(self.inverse.dtype)
        return out.view(-1) if vec else out
