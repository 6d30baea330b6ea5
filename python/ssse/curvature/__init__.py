r"""The curvatures the inverse can store, by name: the kernels take *rows* :math:`u_r` and build
:math:`F_b = \lambda I + \frac{1}{N}\sum_r u_{r,b} u_{r,b}^\top` (docs/maths.md).

- ``"empirical"`` (:mod:`~ssse.curvature.empirical`, the paper's): one row per sample, its
  gradient :math:`\nabla\ell_i`.
- ``"ggn"`` (:mod:`~ssse.curvature.ggn`): the Gauss–Newton matrix
  :math:`\frac1n\sum_i J_i^\top \Lambda_i J_i`, :math:`c` rows per sample
  :math:`u_{i,r} = J_i^\top B_i e_r` with :math:`B_i B_i^\top = \Lambda_i` given by the likelihood.
- ``"mc"`` (:mod:`~ssse.curvature.mc`): the true Fisher by sampled labels, one row per draw.
- ``"kfac"``, ``"ekfac"`` (:mod:`~ssse.curvature.kfac`): Kronecker-factored blocks for the
  weights of linear and convolution layers (their rows carry the factors as a side payload),
  the empirical Fisher for the other parameters; ``"kfac_ggn"``, ``"ekfac_ggn"``: the same
  for the Gauss–Newton matrix (the Newton step's).

Each is a :class:`~ssse.curvature.base.Curvature` registered here; a new one is a subclass and
one :func:`register_curvature` call, after which ``curvature="name"`` works everywhere. The
Gauss–Newton and Monte-Carlo rows need the model's output distribution, a
:class:`~ssse.curvature.likelihoods.Likelihood` inferred from the loss (never guessed) or given
as ``likelihood=`` and checked against it (:func:`resolve_likelihood`).
"""

from __future__ import annotations

from .base import Curvature, Registry, outputs_2d
from .likelihoods import (LIKELIHOODS, Bernoulli, Categorical, Gaussian, Likelihood,
                          check_likelihood, get_likelihood, likelihood_of_loss,
                          register_likelihood, resolve_likelihood)

__all__ = ["CURVATURES", "LIKELIHOODS", "Bernoulli", "Categorical", "Curvature", "Gaussian",
           "Likelihood", "Registry", "check_likelihood", "get_curvature", "get_likelihood",
           "ggn_rows", "likelihood_of_loss", "options_with", "outputs_2d", "register_curvature",
           "register_likelihood", "resolve_likelihood", "sample_labels", "unregister_curvature"]

#: The registered curvatures; as a sequence, their names (``"empirical"``, ``"ggn"``, ``"mc"``,
#: ``"kfac"``, ``"ekfac"``, ``"kfac_ggn"``, ``"ekfac_ggn"`` and any registered later).
CURVATURES = Registry("curvature", Curvature)


def register_curvature(obj: Curvature, *, replace: bool = False) -> Curvature:
    """Registers a :class:`Curvature` instance under its ``name`` and returns it: from then on
    ``curvature="name"`` selects it in :func:`ssse.fit_inverse_fisher`, :class:`ssse.Eraser`
    and the CLI, and inverses recording the name can be served. A taken name is refused unless
    ``replace``."""
    return CURVATURES.register(obj, replace=replace)


def unregister_curvature(name: str) -> None:
    """Removes a registered curvature (its inverses can no longer be served here)."""
    CURVATURES.unregister(name)


def get_curvature(name_or_obj) -> Curvature:
    """The registered :class:`Curvature` of a name (or the registered object itself); a
    ``ValueError`` naming the registered ones otherwise."""
    return CURVATURES.get(name_or_obj)


def options_with(attribute: str) -> str:
    """The registered curvatures whose ``attribute`` is true, as the ``curvature="..."``
    options a message names (e.g. ``options_with("supports_newton")``)."""
    names = CURVATURES.where(attribute)
    return " or ".join(f'curvature="{n}"' for n in names) if names else \
        f"a curvature with {attribute} (none is registered)"


# the built-in curvatures register themselves on import, so the registry must exist first
from . import empirical, ggn, mc  # noqa: E402
from . import kfac  # noqa: E402  (after mc: the registry's order is the order of the docs)
from .ggn import ggn_rows  # noqa: E402
from .mc import sample_labels  # noqa: E402
