"""Pure-PyTorch reference of every kernel: the readable specification and the test oracle.

Short and literal on purpose, never optimised. Run it in float64 to get reference values.
Every function works on one dense ``(s, s)`` block; :func:`block_closed_form` and
:func:`apply_inverse` loop over a :class:`~ssse_ext.BlockLayout`. The ``dual_*`` functions are
the low-rank form of one block, kept as its gradient rows and a Cholesky factor.
"""

from __future__ import annotations

import torch

from .layout import BlockLayout

__all__ = [
    "closed_form_inverse",
    "sherman_morrison_inverse",
    "sherman_morrison_step",
    "woodbury_step",
    "block_closed_form",
    "apply_inverse",
    "dual_factor",
    "dual_apply",
    "dual_dense",
]


def closed_form_inverse(grads: torch.Tensor, damping: float, normalizer: float | None = None):
    r"""The damped empirical Fisher's inverse in closed form (Cholesky).

    .. math:: F^{-1} = \left(\lambda I + \tfrac{1}{N} G^\top G\right)^{-1}

    Args:
        grads: ``(n, s)`` gradients, one per row.
        damping: :math:`\lambda > 0`.
        normalizer: :math:`N`, default ``n``.
    """
    n, s = grads.shape
    normalizer = float(n if normalizer is None else normalizer) or 1.0
    fisher = damping * torch.eye(s, dtype=grads.dtype, device=grads.device)
    fisher = fisher + grads.T @ grads / normalizer
    return torch.cholesky_inverse(torch.linalg.cholesky(fisher))


def sherman_morrison_step(inv: torch.Tensor, g: torch.Tensor, normalizer: float, sign: int = 1):
    r"""One step of paper eq. 7: add (``sign=+1``) or remove (``sign=-1``) the gradient ``g``.

    .. math:: v = F^{-1} g,\quad F^{-1} \leftarrow F^{-1} - \mathrm{sign}\,
              \frac{v v^\top}{N + \mathrm{sign}\, g^\top v}
    """
    v = inv @ g
    den = normalizer + sign * (g @ v)
    if not bool(den > 0):
        raise ValueError(f"Sherman-Morrison denominator {float(den):.3e} is not positive: the "
                         "matrix is no longer positive definite")
    return inv - sign * torch.outer(v, v) / den


def sherman_morrison_inverse(grads: torch.Tensor, damping: float, normalizer: float | None = None):
    """The literal recurrence of paper eq. 7 from :math:`F_0^{-1} = I/\\lambda`, one row at a time."""
    n, s = grads.shape
    normalizer = float(n if normalizer is None else normalizer)
    inv = torch.eye(s, dtype=grads.dtype, device=grads.device) / damping
    for g in grads:
        inv = sherman_morrison_step(inv, g, normalizer)
    return inv


def woodbury_step(inv: torch.Tensor, grads: torch.Tensor, normalizer: float, sign: int = 1):
    r"""Adds (``sign=+1``) or removes (``sign=-1``) the ``m`` rows of ``grads`` at once.

    .. math:: U = F^{-1} G^\top,\quad F^{-1} \leftarrow F^{-1} - \mathrm{sign}\;
              U \left(N I_m + \mathrm{sign}\, G U\right)^{-1} U^\top
    """
    u = inv @ grads.T
    c = normalizer * torch.eye(grads.shape[0], dtype=inv.dtype, device=inv.device)
    c = c + sign * grads @ u
    return inv - sign * u @ torch.linalg.solve(c, u.T)


def block_closed_form(grads: torch.Tensor, layout: BlockLayout, damping: float,
                      normalizer: float | None = None) -> list[torch.Tensor]:
    """The closed-form inverse of every diagonal block of ``layout``."""
    return [closed_form_inverse(grads[:, layout.slice(b)], damping, normalizer)
            for b in range(layout.num_blocks)]


def apply_inverse(blocks: list[torch.Tensor], layout: BlockLayout, v: torch.Tensor,
                  base: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    r"""``base + scale * blockdiag(F^{-1}) v`` (paper eq. 8's step), ``v`` of shape ``(d,)`` or ``(d, r)``."""
    out = torch.zeros_like(v) if base is None else base.clone()
    for b, blk in enumerate(blocks):
        sl = layout.slice(b)
        out[sl] += scale * (blk @ v[sl])
    return out


def dual_factor(grads: torch.Tensor, damping: float, normalizer: float | None = None):
    r"""The dual (low-rank) form of one block's inverse Fisher: the rows and a Cholesky factor.

    .. math:: F^{-1} = \left(\lambda I + \tfrac{1}{N} G^\top G\right)^{-1}
              = \tfrac{1}{\lambda}\left[I - G^\top K^{-1} G\right],\quad
              K = \lambda N I_R + G G^\top = L L^\top

    (the Woodbury identity). Exact; it inverts only the ``R x R`` kernel ``K``, which stays well
    conditioned when ``F`` is not (``R < s`` rows and a tiny :math:`\lambda`).

    Args:
        grads: ``(R, s)`` gradient rows ``G``.
        damping: :math:`\lambda > 0`.
        normalizer: :math:`N`, default ``R`` (fixed for the life of the inverse; any value > 0).

    Returns:
        ``(G, L)``: ``grads`` itself and the lower Cholesky factor of ``K``.
    """
    n = grads.shape[0]
    normalizer = float(n if normalizer is None else normalizer) or 1.0
    kernel = damping * normalizer * torch.eye(n, dtype=grads.dtype, device=grads.device)
    kernel = kernel + grads @ grads.T
    return grads, torch.linalg.cholesky(kernel)


def dual_apply(G: torch.Tensor, L: torch.Tensor, damping: float, v: torch.Tensor,
               base: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    r"""``base + scale * F^{-1} v`` from the dual form, ``v`` of shape ``(s,)`` or ``(s, r)``.

    .. math:: F^{-1} v = \tfrac{1}{\lambda}\left(v - G^\top L^{-\top} L^{-1} G v\right)
    """
    vv = v.reshape(v.shape[0], -1)
    z = torch.cholesky_solve(G @ vv, L)
    out = (scale / damping) * (vv - G.T @ z)
    out = out.reshape(v.shape)
    return out if base is None else base + out


def dual_dense(G: torch.Tensor, L: torch.Tensor, damping: float) -> torch.Tensor:
    r"""The ``(s, s)`` inverse :math:`\tfrac{1}{\lambda}[I - G^\top K^{-1} G]` (for tests)."""
    eye = torch.eye(G.shape[1], dtype=G.dtype, device=G.device)
    return (eye - G.T @ torch.cholesky_solve(G, L)) / damping
