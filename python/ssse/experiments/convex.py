"""The convex experiments' shared setting: for each removal, retrain, sweep ε of SSSE (Fisher
of D and leave-k-out Fisher), and compare with the influence update."""

from __future__ import annotations

import ssse

from .common import EPS_GRID, QUICK_GRID_POINTS, eps_grid, timed
from .methods import NEWTON, NEWTON_SMALL, fit_ggn, newton_rows, select, ssse_curve
from .removal import SPLITS, make_removal, score_name
from .tasks import Task

__all__ = ["fit_all", "run_setting", "settings_of"]


def settings_of(quick: bool) -> tuple[list[float], list[float]]:
    """The removal fractions and the ε grid of the convex experiments."""
    lo, hi, num = EPS_GRID
    return ([0.5, 1.0] if quick else [0.25, 0.5, 1.0],
            eps_grid(lo, hi, QUICK_GRID_POINTS if quick else num))


def fit_all(task: Task, damping: float, *, seed: int, progress: bool) -> dict:
    """The trained model, its inverse Fisher (one block per output row) and its Gauss–Newton
    inverses for the tuning-free rows (the largest blocks that fit, and one block per output
    row: ``ggn_rows``), with their wall times."""
    model, t_train = timed(task.train, task.data(), seed=seed)
    inv, t_fisher = timed(ssse.fit_inverse_fisher, model, task.loss_fn, task.data(),
                          damping=damping, layout="rows", weight_decay=task.weight_decay,
                          progress=progress)
    ggn, t_ggn = fit_ggn(task, model, progress=progress)
    ggn_rows, t_rows = fit_ggn(task, model, layout="rows", progress=progress)
    return {"model": model, "inv": inv, "ggn": ggn, "ggn_rows": ggn_rows, "seconds": {
        "train": t_train, "fisher": t_fisher, "ggn_fisher": t_ggn, "ggn_rows_fisher": t_rows}}


def run_setting(task: Task, model, inv, removals: list[dict], grid, eps_star: float, *,
                seed: int, ggn=None, ggn_rows=None, progress: bool = False) -> dict:
    """One setting (e.g. 50 % of a class) over several removals (``{"removed", "classes" or
    "attribute"}``): curves over ε per removal, the numbers at the chosen ``eps_star``, with
    ``ggn`` (a Gauss–Newton inverse) the tuning-free Newton rows, and with ``ggn_rows`` (one
    with row blocks) the Newton step on those blocks too."""
    crit = score_name(task)
    runs = []
    for r in removals:
        rem = make_removal(task, model, r["removed"], classes=r.get("classes"),
                           attribute=r.get("attribute"), seed=seed)
        full = ssse_curve(rem, inv, grid, progress=progress)
        lko = ssse_curve(rem, inv, grid, fisher="leave_k_out", progress=progress)
        removed = task.data(rem.removed)
        state, t_erase = timed(ssse.ssse_update, model, task.loss_fn, removed, inv_fisher=inv,
                               epsilon=eps_star, n_total=task.n, weight_decay=task.weight_decay)
        infl = ssse.influence_update(model, task.loss_fn, removed,
                                     retained=task.retained(rem.removed),
                                     weight_decay=task.weight_decay)
        chosen = rem.evaluate(state)
        retr = rem.evaluate(rem.retrained)
        best, best_lko = select(grid, full["rows"], crit), select(grid, lko["rows"], crit)

        def gaps(rows):
            return {s: [abs(row["accuracy"][s] - retr["accuracy"][s]) for row in rows]
                    for s in SPLITS}

        runs.append({
            "k": rem.k, "differing": rem.differing(), "removed": rem.removed.tolist(),
            "curve": [row[crit] for row in full["rows"]],
            "curve_leave_k_out": [row[crit] for row in lko["rows"]],
            "param_distance": [row["param_distance"] for row in full["rows"]],
            "param_distance_leave_k_out": [row["param_distance"] for row in lko["rows"]],
            "accuracy_gap": gaps(full["rows"]),
            "accuracy_gap_leave_k_out": gaps(lko["rows"]),
            "chosen": chosen, "retrained": retr, "original": rem.evaluate(model),
            "influence": rem.evaluate(infl),
            "best_eps": grid[best], "best_eps_leave_k_out": grid[best_lko],
            "best_leave_k_out": lko["rows"][best_lko], "best": full["rows"][best],
            "erase_seconds": t_erase, "retrain_seconds": rem.retrain_seconds,
            "classes": r.get("classes"), "attribute": r.get("attribute"),
            **({"newton": newton_rows(rem, ggn)} if ggn is not None else {}),
        })
        if ggn is not None and ggn_rows is not None:
            runs[-1]["newton"][NEWTON_SMALL] = newton_rows(rem, ggn_rows, refine=False)[NEWTON]
    return {"criterion": crit, "runs": runs}
