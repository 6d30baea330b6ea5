"""The convex experiments' shared loop: for each removal setting, retrain, sweep ε of SSSE
(Fisher of D and leave-k-out Fisher), and compare with the influence update."""

from __future__ import annotations

import statistics

import ssse
from ssse.baselines import influence_update

from .common import Task, timed, with_state
from .sweep import SPLITS, choose_eps, evaluate, prepare_removal, row_at, ssse_sweep

__all__ = ["mean_std", "run_setting"]


def mean_std(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    return (statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)


def run_setting(task: Task, model, inv, removals: list[dict], grid, eps_star: float, *,
                seed: int, progress: bool = False) -> dict:
    """One setting (e.g. 50 % of a class) over several removals (``{"removed", "classes" or
    "attribute"}``): curves over ε per removal and the numbers at the chosen ``eps_star``."""
    crit = "gamma" if task.ds.task == "multilabel" else "delta"
    runs = []
    for r in removals:
        rem = prepare_removal(task, model, r["removed"], classes=r.get("classes"),
                              attribute=r.get("attribute"), seed=seed)
        full = ssse_sweep(task, rem, inv, grid, progress=progress)
        lko = ssse_sweep(task, rem, inv, grid, fisher="leave_k_out", progress=progress)
        state, t_erase = timed(ssse.ssse_update, model, inv, task.data(rem.removed), task.loss_fn,
                               epsilon=eps_star, n_total=task.n, weight_decay=task.weight_decay)
        infl = influence_update(model, task.loss_fn, task.data(rem.removed),
                                task.retained(rem.removed), weight_decay=task.weight_decay)
        chosen = evaluate(with_state(model, state), rem, task)
        retr = evaluate(rem.retrained, rem, task)
        runs.append({
            "k": rem.k, "removed": rem.removed.tolist(),
            "curve": [row[crit] for row in full["rows"]],
            "curve_leave_k_out": [row[crit] for row in lko["rows"]],
            "param_distance": [row["param_distance"] for row in full["rows"]],
            "param_distance_leave_k_out": [row["param_distance"] for row in lko["rows"]],
            "accuracy_gap": {s: [abs(row["accuracy"][s] - retr["accuracy"][s])
                                 for row in full["rows"]] for s in SPLITS},
            "accuracy_gap_leave_k_out": {s: [abs(row["accuracy"][s] - retr["accuracy"][s])
                                             for row in lko["rows"]] for s in SPLITS},
            "chosen": chosen, "retrained": retr, "original": evaluate(model, rem, task),
            "influence": evaluate(with_state(model, infl), rem, task),
            "best_eps": choose_eps(full, crit), "best_eps_leave_k_out": choose_eps(lko, crit),
            "best_leave_k_out": row_at(lko, choose_eps(lko, crit)),
            "best": row_at(full, choose_eps(full, crit)),
            "erase_seconds": t_erase, "retrain_seconds": rem.retrain_seconds,
        })
    return {"criterion": crit, "runs": runs}
