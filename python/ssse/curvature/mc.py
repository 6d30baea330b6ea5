r"""The true Fisher by Monte-Carlo: ``mc_samples`` = :math:`S` labels drawn per sample from the
model's predictive distribution, :math:`\hat y_{i,s} \sim p(y\,|\,x_i)`, one row per draw,

.. math:: F = \lambda I + \frac{1}{nS}\sum_i\sum_{s=1}^{S}
          \nabla\ell(x_i, \hat y_{i,s})\,\nabla\ell(x_i, \hat y_{i,s})^\top ,\qquad N = nS,

an unbiased estimate of the Gauss–Newton matrix :math:`\frac1n\sum_i J_i^\top\Lambda_i J_i`
(:mod:`ssse.curvature.ggn`) when the loss is the likelihood's negative log-likelihood. The draws
cannot be replayed, so a downdate removes a sample's expected rows: its Gauss–Newton rows times
:math:`\sqrt S` (each weighed by :math:`1/(nS)`).
"""

from __future__ import annotations

import math

import torch

from ..batches import batch_map
from . import register_curvature
from .base import Curvature, outputs_2d
from .empirical import group_gradients
from .ggn import GGN
from .likelihoods import get_likelihood

__all__ = ["MonteCarloFisher", "sample_labels"]


def sample_labels(fm, params: dict, frozen: dict, x, y: torch.Tensor, likelihood,
                  samples: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` labels per sample drawn from the model's predictive distribution:
    ``(x repeated, drawn labels)``, draw-major, labels shaped and typed like ``y``."""
    lik = get_likelihood(likelihood)
    z = outputs_2d(fm, params, frozen, x)
    lik.check_outputs(z)
    return (batch_map(lambda t: t.repeat((samples,) + (1,) * (t.dim() - 1)), x),
            lik.sample(z, samples, generator, y))


class MonteCarloFisher(Curvature):
    """Sampled-label gradients, ``mc_samples`` rows per sample (see the module docstring)."""

    name = "mc"
    needs_labels = False
    needs_likelihood = True
    random = True
    rows_option = "mc_samples (--mc-samples)"

    def rows_per_sample(self, num_outputs, *, mc_samples=1):
        return mc_samples

    def normalizer_weight(self, *, mc_samples=1):
        return mc_samples

    def for_removal(self, *, mc_samples=1):
        return GGN, math.sqrt(mc_samples)

    def rows(self, fm, params, frozen, x, y, *, loss_fn, likelihood, generator, mc_samples,
             minibatch, state):
        x, y = sample_labels(fm, params, frozen, x, y, likelihood, mc_samples, generator)
        return group_gradients(fm, loss_fn, params, frozen, x, y, 1, state).detach()


MC = register_curvature(MonteCarloFisher())
