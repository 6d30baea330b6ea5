"""Paper §5.2: L2 logistic regression (multinomial) on digits or Fashion-MNIST; remove 25, 50
and 100 % of one class, over several classes (mean ± std); δ vs ε (Fig. 3a) and the absolute
accuracy gaps to the retrained model on the four splits vs ε (Fig. 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import ssse
from ssse import plots
from ssse.data import class_removal

from .common import eps_grid, markdown_table, timed, write_results
from .convex import mean_std, run_setting
from .sweep import SPLITS, choose_eps, prepare_removal, ssse_sweep
from .tasks import DEFAULTS, make_task, row_layout

NAME = "multinomial"


def run(*, quick: bool = False, seed: int = 0, out: Path = Path("results/multinomial"),
        device="cpu", dtype=torch.float64, progress: bool = True, data: str | None = None,
        data_dir=None, repeats: int | None = None) -> str:
    data = data or "digits"
    if data not in ("digits", "fashion-mnist"):
        raise ValueError(f"the multinomial experiment needs a multiclass data set (digits or "
                         f"fashion-mnist), not {data}")
    limits = {"train_limit": 10000, "test_limit": 5000} if data == "fashion-mnist" else {}
    if quick:
        limits = {"train_limit": 400, "test_limit": 300}
    task = make_task(data, data_dir=data_dir, seed=seed, device=device, dtype=dtype, **limits)
    damping = DEFAULTS[data]["damping"]
    fractions = [0.5, 1.0] if quick else [0.25, 0.5, 1.0]
    n_classes = repeats or (1 if quick else 3)
    classes = list(range(n_classes))
    grid = eps_grid(0.01, 100.0, 7 if quick else 21)

    model, t_train = timed(task.train, task.data(), seed=seed)
    inv, t_fisher = timed(ssse.fit_inverse_fisher, model, task.loss_fn, task.data(),
                          damping=damping, layout=row_layout(model),
                          weight_decay=task.weight_decay, progress=progress)
    proxy_class = task.ds.num_classes - 1
    proxy = prepare_removal(task, model, class_removal(task.ds.y_train, proxy_class, 0.5,
                                                       seed=seed + 1),
                            classes=[proxy_class], seed=seed)
    eps_star = choose_eps(ssse_sweep(task, proxy, inv, grid), "delta")
    # beyond the paper: ε from the Hessian-to-Fisher scale alone, without any retraining
    eps_hat, t_eps_hat = timed(ssse.metrics.estimate_epsilon, model, task.loss_fn, task.data(),
                               inv, weight_decay=task.weight_decay)

    settings = {}
    for f in fractions:
        removals = [{"removed": class_removal(task.ds.y_train, c, f, seed=seed + c),
                     "classes": [c]} for c in classes]
        settings[f"{int(f * 100)}%"] = run_setting(task, model, inv, removals, grid, eps_star,
                                                   seed=seed, progress=progress)

    out = Path(out)
    curves = {name: [r["curve"] for r in s["runs"]] for name, s in settings.items()}
    curves.update({f"{name} leave-k-out": [r["curve_leave_k_out"] for r in s["runs"]]
                   for name, s in settings.items()})
    p1 = plots.eps_curves(out / f"{data}_delta.png", grid, curves, hline=0.5, vline=eps_star,
                          ylabel="δ on S (< 0.5: closer to retrained)",
                          title=f"{data}: removing part of a class (Fig. 3a)")
    p2 = plots.eps_panels(out / f"{data}_accuracy_gaps.png", grid, {
        s: {name: [r["accuracy_gap"][s] for r in st["runs"]] for name, st in settings.items()}
        for s in SPLITS}, ylabel="|acc − acc retrained|", vline=eps_star,
        title=f"{data}: accuracy gaps to the retrained model (Fig. 4)")

    header = ["removed", "k", "δ SSSE @ε*", "δ min (ε)", "δ min leave-k-out (ε)", "δ influence"] + \
        [f"gap {s}" for s in SPLITS] + ["erase s", "retrain s"]
    rows, summary = [], {}
    for name, s in settings.items():
        runs = s["runs"]
        m = {key: mean_std(vals) for key, vals in {
            "delta_chosen": [r["chosen"]["delta"] for r in runs],
            "delta_best": [r["best"]["delta"] for r in runs],
            "delta_best_lko": [r["best_leave_k_out"]["delta"] for r in runs],
            "delta_influence": [r["influence"]["delta"] for r in runs],
            "erase_seconds": [r["erase_seconds"] for r in runs],
            "retrain_seconds": [r["retrain_seconds"] for r in runs],
            **{f"gap_{sp}": [abs(r["chosen"]["accuracy"][sp] - r["retrained"]["accuracy"][sp])
                             for r in runs] for sp in SPLITS}}.items()}
        best_eps = float(np.exp(np.mean(np.log([r["best_eps"] for r in runs]))))
        best_eps_lko = float(np.exp(np.mean(np.log([r["best_eps_leave_k_out"] for r in runs]))))
        summary[name] = {**{k: {"mean": v[0], "std": v[1]} for k, v in m.items()},
                         "best_eps_geomean": best_eps, "best_eps_leave_k_out_geomean": best_eps_lko,
                         "k_mean": float(np.mean([r["k"] for r in runs]))}
        pm = lambda k: f"{m[k][0]:.3f} ± {m[k][1]:.3f}"  # noqa: E731
        rows.append([name, f"{summary[name]['k_mean']:.0f}", pm("delta_chosen"),
                     f"{pm('delta_best')} ({best_eps:.2g})",
                     f"{pm('delta_best_lko')} ({best_eps_lko:.2g})", pm("delta_influence")]
                    + [pm(f"gap_{sp}") for sp in SPLITS]
                    + [f"{m['erase_seconds'][0]:.3f}", f"{m['retrain_seconds'][0]:.2f}"])
    table = (f"{data}, n={task.n}, L2 logistic regression (d={inv.dim}), λ={damping:g}, "
             f"classes {classes}, ε*={eps_star:.3g} chosen on a proxy removal (50 % of class "
             f"{proxy_class}; without retraining, estimate_epsilon gives ε̂={eps_hat:.3g}); "
             f"mean ± std over classes. Fisher fit {t_fisher:.2f} s, training "
             f"{t_train:.2f} s.\n\n" + markdown_table(header, rows))
    config = {"data": data, "quick": quick, "seed": seed, "n": task.n, "d": inv.dim,
              "damping": damping, "weight_decay": task.weight_decay, "fractions": fractions,
              "classes": classes, "eps": grid, "proxy_class": proxy_class, **limits}
    results = {"eps_chosen": eps_star, "eps_estimated": eps_hat,
               "eps_estimate_seconds": t_eps_hat, "fisher_seconds": t_fisher, "train_seconds": t_train,
               "summary": summary, "settings": settings}
    write_results(out, NAME, config, results, table, [p1, p2])
    return table
