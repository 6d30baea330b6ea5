"""Paper §5.2: L2 logistic regression (multinomial) on digits or Fashion-MNIST; remove 25, 50
and 100 % of one class, over several classes (mean ± std); δ vs ε (Fig. 3a) and the absolute
accuracy gaps to the retrained model on the four splits vs ε (Fig. 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssse import metrics, plots
from ssse.data import class_removal

from .common import geomean, markdown_table, summary, timed, write_report
from .convex import fit_all, run_setting, settings_of
from .methods import NEWTON, REFINED, select, ssse_curve
from .removal import SPLITS, make_removal
from .tasks import DEFAULTS, make_task

NAME = "multinomial"


def compute(*, quick: bool = False, seed: int = 0, device="cpu", dtype=torch.float64,
            progress: bool = True, data: str | None = None, data_dir=None,
            repeats: int | None = None) -> dict:
    data = data or "digits"
    if data not in ("digits", "fashion-mnist"):
        raise ValueError(f"the multinomial experiment needs a multiclass data set (digits or "
                         f"fashion-mnist), not {data}")
    limits = {"train_limit": 10000, "test_limit": 5000} if data == "fashion-mnist" else {}
    if quick:
        limits = {"train_limit": 400, "test_limit": 300}
    task = make_task(data, data_dir=data_dir, seed=seed, device=device, dtype=dtype, **limits)
    damping = DEFAULTS[data]["damping"]
    fractions, grid = settings_of(quick)
    classes = list(range(repeats or (1 if quick else 3)))

    fitted = fit_all(task, damping, seed=seed, progress=progress)
    model, inv, ggn = fitted["model"], fitted["inv"], fitted["ggn"]
    t_train, t_fisher, t_ggn = (fitted["seconds"][k] for k in ("train", "fisher", "ggn_fisher"))
    proxy_class = task.ds.num_classes - 1
    proxy = make_removal(task, model, class_removal(task.ds.y_train, proxy_class, 0.5,
                                                    seed=seed + 1),
                         classes=[proxy_class], seed=seed)
    eps_star = grid[select(grid, ssse_curve(proxy, inv, grid)["rows"], "delta")]
    # beyond the paper: ε from the Hessian-to-Fisher scale alone, without any retraining
    eps_hat, t_eps_hat = timed(metrics.estimate_epsilon, model, task.loss_fn, task.data(),
                               inv_fisher=inv, weight_decay=task.weight_decay)

    settings = {}
    for f in fractions:
        removals = [{"removed": class_removal(task.ds.y_train, c, f, seed=seed + c),
                     "classes": [c]} for c in classes]
        settings[f"{int(f * 100)}%"] = run_setting(task, model, inv, removals, grid, eps_star,
                                                   seed=seed, ggn=ggn, progress=progress)

    summ = summarize(settings)
    config = {"data": data, "quick": quick, "seed": seed, "n": task.n, "d": inv.dim,
              "damping": damping, "weight_decay": task.weight_decay, "fractions": fractions,
              "classes": classes, "eps": grid, "proxy_class": proxy_class, **limits}
    results = {"eps_chosen": eps_star, "eps_estimated": eps_hat,
               "eps_estimate_seconds": t_eps_hat, "fisher_seconds": t_fisher,
               "ggn_fisher_seconds": t_ggn, "train_seconds": t_train, "summary": summ,
               "settings": settings}
    return {"config": config, "results": results}


def summarize(settings: dict) -> dict:
    """Mean ± std over the removals of each setting, leaving out the degenerate ones (where δ is
    0.5 for every model: see :func:`degenerate`) unless all are; ``degenerate_excluded`` lists
    the classes left out."""
    summ = {}
    for name, s in settings.items():
        kept = [r for r in s["runs"] if not degenerate(r)]
        runs = kept or s["runs"]
        summ[name] = {**{key: summary(vals) for key, vals in {
            "delta_chosen": [r["chosen"]["delta"] for r in runs],
            "delta_best": [r["best"]["delta"] for r in runs],
            "delta_best_lko": [r["best_leave_k_out"]["delta"] for r in runs],
            "delta_influence": [r["influence"]["delta"] for r in runs],
            "erase_seconds": [r["erase_seconds"] for r in runs],
            "retrain_seconds": [r["retrain_seconds"] for r in runs],
            **{f"gap_{sp}": [abs(r["chosen"]["accuracy"][sp] - r["retrained"]["accuracy"][sp])
                             for r in runs] for sp in SPLITS},
            **{f"{key}_{name}": [r["newton"][name][field] if field != "gap_S" else
                                 abs(r["newton"][name]["accuracy"]["S"]
                                     - r["retrained"]["accuracy"]["S"]) for r in runs]
               for name in (NEWTON, REFINED)
               for key, field in (("delta", "delta"), ("gap_S", "gap_S"),
                                  ("erase_seconds", "erase_seconds"))}}.items()},
            "best_eps_geomean": geomean([r["best_eps"] for r in runs]),
            "best_eps_leave_k_out_geomean": geomean([r["best_eps_leave_k_out"] for r in runs]),
            "k_mean": float(np.mean([r["k"] for r in runs])),
            "degenerate_excluded": [r["classes"][0] for r in s["runs"]
                                    if kept and degenerate(r)]}
    return summ


def table(r: dict) -> str:
    c, res = r["config"], r["results"]
    header = ["removed", "k", "δ SSSE @ε*", "δ min (ε)", "δ min leave-k-out (ε)",
              "δ influence", f"δ {NEWTON}", f"gap S {NEWTON}"] + \
        [f"gap {s}" for s in SPLITS] + ["erase s", "Newton s", "retrain s"]
    rows, left_out = [], []
    for name, m in summarize(res["settings"]).items():
        pm = lambda k: f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}"  # noqa: E731
        rows.append([name, f"{m['k_mean']:.0f}", pm("delta_chosen"),
                     f"{pm('delta_best')} ({m['best_eps_geomean']:.2g})",
                     f"{pm('delta_best_lko')} ({m['best_eps_leave_k_out_geomean']:.2g})",
                     pm("delta_influence"), pm(f"delta_{NEWTON}"), pm(f"gap_S_{NEWTON}")]
                    + [pm(f"gap_{sp}") for sp in SPLITS]
                    + [f"{m['erase_seconds']['mean']:.3f}",
                       f"{m[f'erase_seconds_{NEWTON}']['mean']:.3f}",
                       f"{m['retrain_seconds']['mean']:.2f}"])
        left_out += [f"{name} of class {k}" for k in m["degenerate_excluded"]]
    excluded = (f" Left out of the means as degenerate (δ = 0.5 for every model): "
                f"{', '.join(left_out)}." if left_out else "")
    return (f"{c['data']}, n={c['n']}, L2 logistic regression (d={c['d']}), "
            f"λ={c['damping']:g}, classes {c['classes']}, ε*={res['eps_chosen']:.3g} chosen on "
            f"a proxy removal (50 % of class {c['proxy_class']}; without retraining, "
            f"estimate_epsilon gives ε̂={res['eps_estimated']:.3g}); mean ± std over classes."
            f"{excluded} Fisher fit {res['fisher_seconds']:.2f} s, training "
            f"{res['train_seconds']:.2f} s.\n\n" + markdown_table(header, rows) + "\n"
            + per_class_table(r))


def per_class_table(r: dict) -> str:
    """δ on S and accuracy on S per removed class: SSSE at the proxy-chosen ε and at the best
    ε of that removal (an oracle), the tuning-free Newton rows, influence, retrained."""
    res = r["results"]
    header = ["removed", "class", "k", "δ SSSE @ε*", "δ SSSE oracle (ε)", f"δ {NEWTON}",
              f"δ {REFINED}", "δ influence", "acc S retrained", "acc S SSSE @ε*",
              f"acc S {NEWTON}", f"acc S {REFINED}", "degenerate"]
    rows = []
    for setting, s in res["settings"].items():
        for run in s["runs"]:
            nw = run["newton"]
            rows.append([setting, run["classes"][0], run["k"], run["chosen"]["delta"],
                         f"{run['best']['delta']:.3f} ({run['best_eps']:.2g})",
                         nw[NEWTON]["delta"], nw[REFINED]["delta"], run["influence"]["delta"],
                         run["retrained"]["accuracy"]["S"], run["chosen"]["accuracy"]["S"],
                         nw[NEWTON]["accuracy"]["S"], nw[REFINED]["accuracy"]["S"],
                         "yes" if degenerate(run) else "no"])
    return ("Per removed class (degenerate: the original and the retrained model make the same "
            "predictions on S, so δ is 0.5 for every model and says nothing):\n\n"
            + markdown_table(header, rows))


def degenerate(run: dict) -> bool:
    """Whether δ cannot tell the original from the retrained model on this removal."""
    return run["original"]["delta"] == run["retrained"]["delta"] == 0.5


def figures(r: dict, out: Path) -> list[Path]:
    c, res = r["config"], r["results"]
    grid, settings, data = c["eps"], res["settings"], c["data"]
    curves = {name: [r["curve"] for r in s["runs"]] for name, s in settings.items()}
    curves.update({f"{name} leave-k-out": [r["curve_leave_k_out"] for r in s["runs"]]
                   for name, s in settings.items()})
    p1 = plots.eps_curves(out / f"{data}_delta.png", grid, curves, hline=0.5,
                          vline=res["eps_chosen"], ylabel="δ on S (< 0.5: closer to retrained)",
                          title=f"{data}: removing part of a class (Fig. 3a)")
    p2 = plots.eps_panels(out / f"{data}_accuracy_gaps.png", grid, {
        s: {name: [r["accuracy_gap"][s] for r in st["runs"]] for name, st in settings.items()}
        for s in SPLITS}, ylabel="|acc − acc retrained|", vline=res["eps_chosen"],
        title=f"{data}: accuracy gaps to the retrained model (Fig. 4)")
    return [p1, p2]


def run(*, out: Path = Path(f"results/{NAME}"), **kwargs) -> str:
    """Runs the experiment (the options of :func:`compute`) and writes its results, table and
    figures to ``out``; returns the table."""
    return write_report(NAME, compute(**kwargs), table, figures, out)
