"""One removal, evaluated: retrain without it, sweep ε of the SSSE update, compare every model
with the original and the retrained one on the paper's four splits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

import ssse
import ssse_ext
from ssse import plots
from ssse.data import four_splits
from ssse.io import write_json

from .common import Task, eps_grid, markdown_table, sweep_states, timed, with_state
from .evaluation import parameter_distance, removal_scores, split_accuracies

__all__ = ["Removal", "choose_eps", "evaluate", "prepare_removal", "run_sweep", "ssse_sweep"]

SPLITS = ("D-S", "S", "T-Ta", "Ta")


@dataclass
class Removal:
    """A removal set with its splits and the two reference models."""

    removed: torch.Tensor
    splits: dict
    original: nn.Module
    retrained: nn.Module
    retrain_seconds: float
    caches: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.removed.numel())


def prepare_removal(task: Task, model: nn.Module, removed: torch.Tensor, *, classes=None,
                    attribute: int | None = None, seed: int = 0,
                    reference: nn.Module | None = None) -> Removal:
    splits = four_splits(task.ds, removed, classes=classes, attribute=attribute)
    seconds = float("nan")
    if reference is None:
        reference, seconds = timed(task.train, task.retained(removed), seed=seed)
    return Removal(removed, splits, model, reference.eval(), seconds)


def score_name(task: Task) -> str:
    return "gamma" if task.ds.task == "multilabel" else "delta"


def evaluate(model: nn.Module, rem: Removal, task: Task, *, params: bool = True) -> dict:
    """Accuracy on the four splits, δ (or γ) on S and the normalised parameter distance."""
    out = {"accuracy": split_accuracies(model, rem.splits, task.ds.task)}
    s = removal_scores(model, rem.original, rem.retrained, rem.splits["S"], task.ds.task,
                       task.ds.num_classes, rem.caches.setdefault("S", {}))
    out.update(s)
    if params:
        out["param_distance"] = parameter_distance(model, rem.original, rem.retrained)
    return out


def ssse_sweep(task: Task, rem: Removal, inv: ssse_ext.BlockInverseFisher, eps: Sequence[float],
               *, fisher: str = "full", minibatch: int = 1, progress: bool = False,
               desc: str = "ε sweep") -> dict:
    """The SSSE update over the ε grid (one :func:`ssse.ssse_update`, eq. 8 is linear in ε)."""
    model = rem.original
    unit, seconds = timed(ssse.ssse_update, model, inv, task.data(rem.removed), task.loss_fn,
                          epsilon=1.0, n_total=task.n, weight_decay=task.weight_decay,
                          fisher=fisher, minibatch=minibatch)
    rows = []
    for state in tqdm(sweep_states(model, unit, eps), desc=desc, disable=not progress,
                      leave=False):
        rows.append(evaluate(with_state(model, state), rem, task))
    return {"eps": list(eps), "rows": rows, "erase_seconds": seconds}


def choose_eps(sweep: dict, criterion: str) -> float:
    """The paper's criterion: argmin δ (multiclass) or argmax γ (multi-label) over the grid."""
    values = [r[criterion] for r in sweep["rows"]]
    pick = min if criterion == "delta" else max
    best = pick(range(len(values)), key=lambda i: values[i])
    return float(sweep["eps"][best])


def row_at(sweep: dict, eps: float) -> dict:
    i = min(range(len(sweep["eps"])), key=lambda j: abs(math.log(sweep["eps"][j] / eps)))
    return sweep["rows"][i]


def run_sweep(task: Task, model: nn.Module, inv: ssse_ext.BlockInverseFisher,
              removed: torch.Tensor, *, out: Path, eps=(0.01, 100.0, 21),
              reference: nn.Module | None = None, classes=None, attribute=None, seed: int = 0,
              minibatch: int = 1, progress: bool = True) -> dict:
    """``ssse sweep``: writes ``sweep.json``, ``sweep.md`` and two PNGs to ``out``."""
    grid = eps_grid(*eps)
    rem = prepare_removal(task, model, removed, classes=classes, attribute=attribute, seed=seed,
                          reference=reference)
    crit = score_name(task)
    sw = ssse_sweep(task, rem, inv, grid, minibatch=minibatch, progress=progress)
    best = choose_eps(sw, crit)
    base = {"original": evaluate(rem.original, rem, task),
            "retrained": evaluate(rem.retrained, rem, task)}
    header = ["model", "ε", crit, "param dist"] + [f"acc {s}" for s in SPLITS]

    def line(name, e, r):
        return [name, e, r[crit], r["param_distance"]] + [r["accuracy"][s] for s in SPLITS]

    rows = [line("original", "-", base["original"]), line("retrained", "-", base["retrained"])]
    rows += [line("SSSE" + (" (best)" if e == best else ""), e, r)
             for e, r in zip(sw["eps"], sw["rows"])]
    table = markdown_table(header, rows)
    out = Path(out)
    eps_png = plots.eps_curves(out / f"sweep_{crit}.png", grid,
                               {"SSSE": [r[crit] for r in sw["rows"]]},
                               ylabel="δ on S (lower: closer to retrained)" if crit == "delta"
                               else "γ on S (higher: closer to retrained)",
                               hline=0.5, vline=best, title=f"k={rem.k} of n={task.n}")
    acc_png = plots.eps_panels(out / "sweep_accuracy.png", grid, {
        s: {"SSSE": [r["accuracy"][s] for r in sw["rows"]],
            "original": [base["original"]["accuracy"][s]] * len(grid),
            "retrained": [base["retrained"]["accuracy"][s]] * len(grid)} for s in SPLITS},
        ylabel="accuracy", vline=best)
    report = {"k": rem.k, "n": task.n, "removed": rem.removed.tolist(), "criterion": crit,
              "best_eps": best, "eps": grid, "ssse": sw["rows"], **base,
              "erase_seconds": sw["erase_seconds"], "retrain_seconds": rem.retrain_seconds,
              "plots": [eps_png.name, acc_png.name]}
    write_json(out / "sweep.json", report)
    report["table"] = table
    return report
