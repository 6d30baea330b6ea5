"""The methods stage: each erasure method's models over its hyperparameter grid, evaluated, and
the paper's choice of the hyperparameter (:func:`ssse.metrics.select_epsilon`).

SSSE and one gradient-ascent step are linear in their hyperparameter (ε, the step size) and
Fisher forgetting's noise, with a fixed seed, scales with √α: so one call of a method at
hyperparameter 1 (its *unit* update) gives the models of its whole grid.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

import ssse
import ssse_ext
from ssse import metrics

from .common import timed
from .removal import Removal

__all__ = ["CRITERIA", "REFINE_STEPS", "curve", "fit_ggn", "newton_rows", "scaled_states",
           "select", "ssse_curve"]

#: Refinement steps of the "+ refinement" rows of the experiments' tables.
REFINE_STEPS = 2
#: Names of the tuning-free rows.
NEWTON = "GGN Newton (no tuning)"
REFINED = f"GGN Newton + {REFINE_STEPS} refinement steps"

#: The criterion of :func:`ssse.metrics.select_epsilon` for each score.
CRITERIA = {"delta": "confusion", "gamma": "similarity_ratio"}


def scaled_states(model: nn.Module, unit_state: dict[str, torch.Tensor],
                  scales: Sequence[float]) -> list[dict[str, torch.Tensor]]:
    r"""The models :math:`\theta^* + c\,(\hat\theta_1 - \theta^*)` for each scale :math:`c`."""
    star = model.state_dict()
    return [{k: (star[k] + c * (unit_state[k] - star[k])) if star[k].is_floating_point()
             else star[k].clone() for k in star} for c in scales]


def curve(rem: Removal, unit_state: dict[str, torch.Tensor], scales: Sequence[float], *,
          progress: bool = False, desc: str = "grid") -> list[dict]:
    """The evaluation of every model of a grid (see :func:`scaled_states`)."""
    states = scaled_states(rem.original, unit_state, scales)
    return [rem.evaluate(s) for s in tqdm(states, desc=desc, disable=not progress, leave=False)]


def ssse_curve(rem: Removal, inv: ssse_ext.BlockInverseFisher, eps: Sequence[float], *,
               fisher: str = "full", minibatch: int = 1, progress: bool = False) -> dict:
    """SSSE (paper eq. 8) over an ε grid: ``{"eps", "rows", "erase_seconds"}``, from one
    :func:`ssse.ssse_update` at ε = 1."""
    task = rem.task
    unit, seconds = timed(ssse.ssse_update, rem.original, task.loss_fn, task.data(rem.removed),
                          inv_fisher=inv, epsilon=1.0, n_total=task.n,
                          weight_decay=task.weight_decay, fisher=fisher, minibatch=minibatch)
    return {"eps": list(eps), "rows": curve(rem, unit, eps, progress=progress, desc="ε sweep"),
            "erase_seconds": seconds}


def select(grid: Sequence[float], rows: Sequence[dict], score: str,
           allowed: Sequence[int] | None = None) -> int:
    """The index of the best grid value by the paper's criterion (argmin δ or argmax γ, first
    on ties, NaN never), among the indices ``allowed`` (all by default)."""
    index: dict[float, int] = {}
    for i in (range(len(grid)) if allowed is None else allowed):
        index.setdefault(grid[i], i)
    best, _ = metrics.select_epsilon(list(index), lambda e: rows[index[e]][score],
                                     criterion=CRITERIA[score])
    return index[best]


def fit_ggn(task, model, *, layout="rows", block_size: int | None = None,
            progress: bool = False):
    """The Gauss–Newton inverse of the tuning-free rows: damping = the task's weight decay, so
    the stored matrix is the curvature of the training objective; returns (inverse, seconds)."""
    return timed(ssse.fit_inverse_fisher, model, task.loss_fn, task.data(),
                 damping=task.weight_decay, layout=layout, block_size=block_size,
                 curvature="ggn", likelihood=task.likelihood, progress=progress)


def newton_rows(rem: Removal, inv: ssse_ext.BlockInverseFisher) -> dict:
    """The tuning-free rows: the leave-k-out Newton step and its refinement, evaluated, with the
    wall time of each erasure."""
    task, out = rem.task, {}
    for name, steps in ((NEWTON, 0), (REFINED, REFINE_STEPS)):
        state, seconds = timed(ssse.newton_erase, rem.original, task.loss_fn,
                               task.data(rem.removed), inv_fisher=inv, n_total=task.n,
                               weight_decay=task.weight_decay, likelihood=task.likelihood,
                               refine_steps=steps)
        out[name] = {**rem.evaluate(state), "erase_seconds": seconds}
    return out
