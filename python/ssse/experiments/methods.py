"""The methods stage: each erasure method's models over its hyperparameter grid, evaluated, and
the paper's choice of the hyperparameter (:func:`ssse.metrics.select_epsilon`).

SSSE and one gradient-ascent step are linear in their hyperparameter (ε, the step size) and
Fisher forgetting's noise, with a fixed seed, scales with √α: so one call of a method at
hyperparameter 1 (its *unit* update) gives the models of its whole grid.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

import ssse
import ssse_ext
from ssse import metrics
from ssse.budget import MEMORY_SHARE
from ssse_ext.budget import available_memory
from ssse_ext.build import build_peak_bytes

from .common import timed
from .removal import Removal

__all__ = ["CRITERIA", "NEWTON_EKFAC", "NEWTON_SMALL", "REFINE_STEPS", "curve", "fit_ggn", "largest_block_size",
           "newton_rows", "scaled_states", "select", "ssse_curve"]

#: Refinement steps of the "+ refinement" rows of the experiments' tables.
REFINE_STEPS = 2
#: Names of the tuning-free rows.
NEWTON = "GGN Newton (no tuning)"
REFINED = f"GGN Newton + {REFINE_STEPS} refinement steps"
#: The Newton step with the earlier default blocks (one per output row of a linear model; the
#: inverse Fishers' blocks of a CNN).
NEWTON_SMALL = "GGN Newton, small blocks"
#: The Newton step with the EK-FAC of the Gauss–Newton matrix (``curvature="ekfac_ggn"``): the
#: weights in Kronecker-factored blocks, the other parameters in the inverse Fishers' blocks.
NEWTON_EKFAC = "GGN Newton, EK-FAC"

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


def largest_block_size(model: nn.Module, *, dtype: torch.dtype = torch.float64,
                       rows: int | None = None, device="cpu",
                       max_memory: int | None = None) -> int:
    """The largest ``B`` of a ``"fixed"`` layout whose dense build fits ``max_memory`` bytes
    (default :data:`ssse.budget.MEMORY_SHARE` of what ``device`` has free): ``d`` itself (one
    block) whenever it fits, as for the linear models here (d = 650 on digits, 7 850 on
    Fashion-MNIST)."""
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if d == 0:
        raise ValueError("model has no trainable parameters")
    if max_memory is None:
        max_memory = int(MEMORY_SHARE * available_memory(device))
    if max_memory <= 0:
        raise ValueError(f"max_memory must be positive, got {max_memory}")
    b = d
    while b > 1:
        layout = ssse_ext.BlockLayout.fixed(d, b)
        if build_peak_bytes(layout, dtype, rows=rows, representation="dense",
                            device=device) <= max_memory:
            break
        b = math.ceil(b / 2)
    return b


def fit_ggn(task, model, *, layout=None, block_size: int | None = None,
            curvature: str = "ggn", progress: bool = False):
    """The Gauss–Newton inverse of the tuning-free rows: damping = the task's weight decay, so
    the stored matrix is the curvature of the training objective; returns (inverse, seconds).
    ``layout=None`` (default): the largest blocks that fit the memory budget
    (:func:`largest_block_size`; one block for the linear models); ``"rows"``: one block per
    output row, the earlier default. ``curvature``: a Gauss–Newton one (``"ggn"``, or
    ``"ekfac_ggn"`` for Kronecker-factored weights)."""
    if layout is None:
        if block_size is not None:
            raise ValueError("block_size needs a layout (the default chooses its own blocks)")
        layout = "fixed"
        block_size = largest_block_size(model, dtype=task.dtype, device=task.device)
    return timed(ssse.fit_inverse_fisher, model, task.loss_fn, task.data(),
                 damping=task.weight_decay, layout=layout, block_size=block_size,
                 curvature=curvature, likelihood=task.likelihood, progress=progress)


def newton_rows(rem: Removal, inv: ssse_ext.BlockInverseFisher, *,
                refine: bool = True) -> dict:
    """The tuning-free rows: the leave-k-out Newton step and (with ``refine``) its refinement,
    evaluated, with the wall time of each erasure."""
    task, out = rem.task, {}
    for name, steps in ((NEWTON, 0), (REFINED, REFINE_STEPS))[:2 if refine else 1]:
        state, seconds = timed(ssse.newton_erase, rem.original, task.loss_fn,
                               task.data(rem.removed), inv_fisher=inv, n_total=task.n,
                               weight_decay=task.weight_decay, likelihood=task.likelihood,
                               refine_steps=steps)
        out[name] = {**rem.evaluate(state), "erase_seconds": seconds}
    return out
