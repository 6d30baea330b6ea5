"""ssse: erase training samples from a trained model in one closed-form step.

Single-Step Sample Erasure (SSSE; Peste, Alistarh & Lampert 2021): fit the block inverse of the
damped empirical Fisher once (:func:`fit_inverse_fisher`), then erase samples with the update of
paper eq. 8 (:func:`ssse_update`, or :class:`Eraser` for a sequence of requests). Baselines
(:func:`influence_update`, :func:`fisher_forgetting`, :func:`gradient_ascent`, :func:`retrain`)
share the same interface; :mod:`ssse.metrics` holds the paper's evaluation metrics and
:mod:`ssse.training` seeded training recipes.
"""

from . import metrics, training
from .baselines import fisher_forgetting, gradient_ascent, influence_update, retrain
from .erasure import Eraser, ssse_update
from .gradients import (fit_inverse_fisher, gradient_sum, hessian_vector_products,
                        per_sample_grads)

__all__ = [
    "Eraser",
    "fisher_forgetting",
    "fit_inverse_fisher",
    "gradient_ascent",
    "gradient_sum",
    "hessian_vector_products",
    "influence_update",
    "metrics",
    "per_sample_grads",
    "retrain",
    "ssse_update",
    "training",
]
