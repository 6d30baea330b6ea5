r"""The generalised Gauss–Newton matrix: for the model's outputs :math:`z_i = f_\theta(x_i)`
with Jacobian :math:`J_i = \partial z_i / \partial\theta` and a likelihood whose negative
log-likelihood has Hessian :math:`\Lambda_i = B_i B_i^\top` in :math:`z`,

.. math:: G = \frac1n \sum_i J_i^\top \Lambda_i J_i = \frac1n \sum_i \sum_{r=1}^{c}
          u_{i,r} u_{i,r}^\top ,\qquad u_{i,r} = J_i^\top B_i e_r ,\qquad N = n

(:mod:`ssse.curvature.likelihoods`). For softmax and sigmoid outputs it is the true Fisher;
for a linear model it is the Hessian of the loss. The rows need the inputs only, never the
labels: an erasure request can be served for samples whose labels were not kept. The
regulariser's curvature :math:`wI` is not in the rows: with ``damping = weight_decay`` the stored
matrix is the curvature of the training objective, and the leave-k-out Newton step
(:func:`ssse.newton_erase`) downdates it exactly.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from ..batches import batch_len, batch_map
from . import register_curvature
from .base import Curvature, outputs_2d
from .likelihoods import get_likelihood

__all__ = ["GaussNewton", "ggn_rows", "output_jacobian"]


def output_jacobian(fm, params: dict, frozen: dict, x, c: int) -> torch.Tensor:
    """The ``(m, c, d)`` Jacobians of the ``c`` outputs of each sample in the flat parameters,
    by ``vmap(jacrev)``."""
    m = batch_len(x)

    def out(p, xi):
        return fm(p, batch_map(lambda t: t.unsqueeze(0), xi), frozen).reshape(-1)

    jac = vmap(jacrev(out), in_dims=(None, 0))(params, x)  # {name: (m, c, *shape)}
    J = fm.flatten_rows({k: v.reshape((m * c,) + tuple(v.shape[2:])) for k, v in jac.items()},
                        m * c).reshape(m, c, -1)
    return J


def ggn_rows(fm, params: dict, frozen: dict, x, likelihood) -> torch.Tensor:
    r"""``(m c, d)`` Gauss–Newton rows :math:`u_{i,r} = J_i^\top B_i e_r` of the ``m`` samples
    of ``x``, ``c`` per sample, sample by sample (``likelihood``: a name or a
    :class:`~ssse.curvature.likelihoods.Likelihood`)."""
    lik = get_likelihood(likelihood)
    z = outputs_2d(fm, params, frozen, x)
    lik.check_outputs(z)
    J = output_jacobian(fm, params, frozen, x, z.shape[1])
    rows = lik.factor_rows(z, J)
    del J
    return rows.reshape(-1, rows.shape[-1]).detach()


class GaussNewton(Curvature):
    """``c`` Gauss–Newton rows per sample (see the module docstring)."""

    name = "ggn"
    needs_labels = False
    needs_likelihood = True
    supports_newton = True

    def rows_per_sample(self, num_outputs, *, mc_samples=1):
        return num_outputs

    def rows(self, fm, params, frozen, x, y, *, loss_fn, likelihood, generator, mc_samples,
             minibatch, state):
        return ggn_rows(fm, params, frozen, x, likelihood)


GGN = register_curvature(GaussNewton())
