"""ssse: erase training samples from a trained model in one closed-form step.

Single-Step Sample Erasure (SSSE; Peste, Alistarh & Lampert 2021): fit the block inverse of the
damped empirical Fisher once (:func:`fit_inverse_fisher`), then erase samples with the update of
paper eq. 8 (:func:`ssse_update`, or :class:`Eraser` for a sequence of requests).

A batch is an ``(inputs, targets)`` pair, a mapping with ``"labels"`` (Hugging Face models), or
what a :class:`Task` runs (:mod:`ssse.batches`); ``params=`` selects the parameters erased
(:func:`select_parameters`, e.g. a LoRA adapter's).

Every erasure method shares one calling convention,
``method(model, loss_fn, removed, *, ...) -> state_dict``: :func:`ssse_update` and the
tuning-free :func:`newton_erase` (the leave-k-out Newton step with a stored Gauss–Newton
inverse, no ε to choose) and the baselines :func:`influence_update`, :func:`fisher_forgetting`
and :func:`gradient_ascent`;
:func:`retrain` reruns a training recipe (the gold standard). :mod:`ssse.metrics` holds the
paper's evaluation metrics, :mod:`ssse.training` seeded training recipes and
:mod:`ssse.models` the model registry of the saved-model files.

Layers: this core (gradients, erasure, baselines, metrics, io, models, training) imports
nothing from :mod:`ssse.experiments` or :mod:`ssse.cli`, which use its public API only.
"""

from ssse_ext import __version__

from . import comm, curvature, ledger, metrics, models, newton, sharding, training
from .batches import Task
from .baselines import fisher_forgetting, gradient_ascent, influence_update, retrain
from .erasure import Eraser, ssse_update
from .fit import fit_inverse_fisher
from .gradients import gradient_sum, hessian_vector_products
from .layouts import LAYOUTS, resolve_layout
from .losses import causal_lm_loss
from .model import select_parameters
from .rows import per_sample_grads
from .newton import newton_erase

__all__ = [
    "__version__",
    "Eraser",
    "Task",
    "causal_lm_loss",
    "comm",
    "LAYOUTS",
    "curvature",
    "fisher_forgetting",
    "fit_inverse_fisher",
    "gradient_ascent",
    "gradient_sum",
    "hessian_vector_products",
    "influence_update",
    "ledger",
    "metrics",
    "models",
    "newton",
    "newton_erase",
    "per_sample_grads",
    "resolve_layout",
    "retrain",
    "select_parameters",
    "sharding",
    "ssse_update",
    "training",
]
