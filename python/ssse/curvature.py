r"""Rows of the curvature stored by the inverse Fisher: the kernels take *rows* :math:`u_r` and
build :math:`F_b = \lambda I + \frac{1}{N}\sum_r u_{r,b} u_{r,b}^\top` (docs/maths.md).

- ``"empirical"``: one row per sample, its gradient :math:`\nabla\ell_i` (the paper's Fisher).
- ``"ggn"``: the Gauss–Newton matrix :math:`\frac1n\sum_i J_i^\top \Lambda_i J_i` (for softmax
  and sigmoid outputs, the true Fisher): :math:`c` rows per sample,
  :math:`u_{i,c} = J_i^\top B_i e_c` with :math:`B_i B_i^\top = \Lambda_i`. For softmax,
  :math:`\Lambda = \mathrm{diag}\,p - p p^\top` and :math:`B e_c = \sqrt{p_c}(e_c - p)`, so
  :math:`u_{i,c} = \sqrt{p_c}\,\nabla_\theta \log p_c(x_i)`; for independent sigmoid outputs
  (multi-attribute), one row per attribute, :math:`\sqrt{p_a(1-p_a)}\,\nabla_\theta z_a`.
- ``"mc"``: the true Fisher by sampled labels :math:`\hat y \sim p(y\,|\,x_i)`: one row per
  draw, :math:`\nabla_\theta \ell(x_i, \hat y)`.

The GGN and Monte-Carlo rows need the inputs :math:`x_i` only, never the labels: an erasure
request can be served for samples whose labels were not kept.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from ssse_ext.fisher import CURVATURES

__all__ = ["CURVATURES", "LIKELIHOODS"]

#: The model's output distribution, for the ``"ggn"`` and ``"mc"`` curvatures: softmax over
#: ``(m, c)`` logits, or independent Bernoulli outputs (sigmoid logits, one per attribute).
LIKELIHOODS = ("categorical", "bernoulli")


def outputs_2d(fm, params: dict, frozen: dict, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs as ``(m, c)``, without gradients."""
    with torch.no_grad():
        return fm(params, x, frozen).reshape(x.shape[0], -1)


def check_outputs(z: torch.Tensor, likelihood: str) -> None:
    if likelihood == "categorical" and z.shape[1] < 2:
        raise ValueError(f'likelihood="categorical" needs (m, c) logits with c >= 2 classes, '
                         f"the model has {z.shape[1]} output; use likelihood=\"bernoulli\"")


def ggn_rows(fm, params: dict, frozen: dict, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    r"""``(m c, d)`` Gauss–Newton rows of the ``m`` samples of ``x``, ``c`` per sample (see the
    module docstring), from ``vmap(jacrev)`` of the outputs."""
    m = x.shape[0]
    z = outputs_2d(fm, params, frozen, x)
    check_outputs(z, likelihood)
    c = z.shape[1]

    def out(p, xi):
        return fm(p, xi.unsqueeze(0), frozen).reshape(-1)

    jac = vmap(jacrev(out), in_dims=(None, 0))(params, x)  # {name: (m, c, *shape)}
    J = fm.flatten_rows({k: v.reshape((m * c,) + tuple(v.shape[2:])) for k, v in jac.items()},
                        m * c).reshape(m, c, -1)
    del jac
    if likelihood == "categorical":
        p = torch.softmax(z, dim=1)
        mean = torch.einsum("mc,mcd->md", p, J)
        rows = p.sqrt().unsqueeze(2) * (J - mean.unsqueeze(1))
    else:
        p = torch.sigmoid(z)
        rows = (p * (1 - p)).sqrt().unsqueeze(2) * J
    return rows.reshape(m * c, -1).detach()


def sample_labels(fm, params: dict, frozen: dict, x: torch.Tensor, y: torch.Tensor,
                  likelihood: str, samples: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` labels per sample drawn from the model's predictive distribution:
    ``(x repeated, drawn labels)``, draw-major, labels shaped like ``y``."""
    z = outputs_2d(fm, params, frozen, x)
    check_outputs(z, likelihood)
    reps = (samples,) + (1,) * (x.dim() - 1)
    if likelihood == "categorical":
        drawn = torch.multinomial(torch.softmax(z, dim=1).float(), samples, replacement=True,
                                  generator=generator).T.reshape(-1)
        return x.repeat(reps), drawn.to(y.dtype)
    p = torch.sigmoid(z).unsqueeze(0).expand(samples, -1, -1)
    drawn = torch.bernoulli(p, generator=generator).reshape((-1,) + tuple(y.shape[1:]))
    return x.repeat(reps), drawn.to(y.dtype)
