"""Paper §5.1: a linear multi-attribute model without bias on Yeast (one Fisher block per
attribute row); remove 25, 50 and 100 % of the samples carrying a rare label; γ vs ε (Fig. 2a),
normalised parameter distance vs ε (Fig. 2b), a Table-1-style table, SSSE vs influence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import ssse
from ssse import metrics, plots
from ssse.data import attribute_removal

from .common import markdown_table, summary, timed, report
from .convex import fit_all, run_setting, settings_of
from .methods import NEWTON, REFINED, select, ssse_curve
from .removal import QUANTISED_BELOW, SPLITS, make_removal, quantised
from .tasks import DEFAULTS, make_task

NAME = "multiattribute"


def compute(*, quick: bool = False, seed: int = 0, device="cpu", dtype=torch.float64,
            progress: bool = True, data: str | None = None, data_dir=None,
            repeats: int | None = None) -> dict:
    data = data or "yeast"
    task = make_task(data, data_dir=data_dir, seed=seed, device=device, dtype=dtype)
    if task.ds.task != "multilabel":
        raise ValueError(f"the multi-attribute experiment needs a multi-label data set, not {data}")
    damping = DEFAULTS[data]["damping"]
    counts = task.ds.y_train.sum(0)
    attribute = int(torch.argmin(counts))             # the rarest label
    proxy_attr = int(torch.argsort(counts)[1])        # the next rarest: ε is chosen there
    fractions, grid = settings_of(quick)
    reps = repeats or (1 if quick else 3)

    fitted = fit_all(task, damping, seed=seed, progress=progress)
    model, inv, ggn = fitted["model"], fitted["inv"], fitted["ggn"]
    t_train, t_fisher, t_ggn = (fitted["seconds"][k] for k in ("train", "fisher", "ggn_fisher"))
    proxy = make_removal(task, model, attribute_removal(task.ds.y_train, proxy_attr, 0.5,
                                                        seed=seed + 1),
                         attribute=proxy_attr, seed=seed)
    eps_star = grid[select(grid, ssse_curve(proxy, inv, grid)["rows"], "gamma")]
    # beyond the paper: ε from the Hessian-to-Fisher scale alone, without any retraining
    eps_hat, t_eps_hat = timed(metrics.estimate_epsilon, model, task.loss_fn, task.data(),
                               inv_fisher=inv, weight_decay=task.weight_decay)

    settings = {}
    for f in fractions:
        n_rep = 1 if f == 1.0 else reps
        removals = [{"removed": attribute_removal(task.ds.y_train, attribute, f, seed=seed + r),
                     "attribute": attribute} for r in range(n_rep)]
        settings[f"{int(f * 100)}%"] = run_setting(task, model, inv, removals, grid, eps_star,
                                                   seed=seed, ggn=ggn, progress=progress)

    # Table 1: loss, gradient norm, accuracy on the four splits, first removal of each setting.
    table1, summ = [], {}
    for name, s in settings.items():
        r0 = s["runs"][0]
        rem = make_removal(task, model, torch.tensor(r0["removed"]), attribute=attribute,
                           seed=seed)
        state = ssse.ssse_update(model, task.loss_fn, task.data(rem.removed), inv_fisher=inv,
                                 epsilon=eps_star, n_total=task.n,
                                 weight_decay=task.weight_decay)
        for label, m in (("SSSE", rem.model_with(state)), ("retrained", rem.retrained),
                         ("original", model)):
            rep = metrics.split_report(m, {k: [v] for k, v in rem.splits.items()},
                                       loss_fn=task.loss_fn, weight_decay=task.weight_decay)
            table1.append([name, label, rep["D-S"]["loss"], rep["D-S"]["grad_norm"]]
                          + [rep[sp]["accuracy"] for sp in SPLITS])
        runs = s["runs"]
        summ[name] = {k: summary(v) for k, v in {
            "gamma_chosen": [r["chosen"]["gamma"] for r in runs],
            "gamma_best": [r["best"]["gamma"] for r in runs],
            "gamma_best_lko": [r["best_leave_k_out"]["gamma"] for r in runs],
            "gamma_influence": [r["influence"]["gamma"] for r in runs],
            "gamma_newton": [r["newton"][NEWTON]["gamma"] for r in runs],
            "gamma_refined": [r["newton"][REFINED]["gamma"] for r in runs],
            "newton_seconds": [r["newton"][NEWTON]["erase_seconds"] for r in runs],
            "param_distance_chosen": [r["chosen"]["param_distance"] for r in runs],
            "erase_seconds": [r["erase_seconds"] for r in runs],
            "retrain_seconds": [r["retrain_seconds"] for r in runs]}.items()}
        summ[name]["k"] = r0["k"]
        summ[name]["best_eps"] = [r["best_eps"] for r in runs]
    config = {"data": data, "quick": quick, "seed": seed, "n": task.n, "d": inv.dim,
              "blocks": inv.layout.num_blocks, "damping": damping,
              "weight_decay": task.weight_decay, "attribute": attribute,
              "attribute_count": int(counts[attribute]), "proxy_attribute": proxy_attr,
              "fractions": fractions, "repeats": reps, "eps": grid}
    results = {"eps_chosen": eps_star, "eps_estimated": eps_hat,
               "eps_estimate_seconds": t_eps_hat, "fisher_seconds": t_fisher,
               "ggn_fisher_seconds": t_ggn, "train_seconds": t_train, "summary": summ,
               "table1": table1,
               "settings": settings}
    return {"config": config, "results": results}


def table(r: dict) -> str:
    c, res = r["config"], r["results"]
    pm = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    header = ["removed", "k", "γ SSSE @ε*", "γ max", "γ max leave-k-out", "γ influence",
              f"γ {NEWTON}", f"γ {REFINED}", "param dist @ε*", "erase s", "Newton s",
              "retrain s"]
    rows = [[n, s["k"], pm(s["gamma_chosen"]), pm(s["gamma_best"]), pm(s["gamma_best_lko"]),
             pm(s["gamma_influence"]), pm(s["gamma_newton"]), pm(s["gamma_refined"]),
             pm(s["param_distance_chosen"]), f"{s['erase_seconds']['mean']:.3f}",
             f"{s['newton_seconds']['mean']:.3f}", f"{s['retrain_seconds']['mean']:.2f}"]
            for n, s in res["summary"].items()]
    return (f"{c['data']}, n={c['n']}, linear model without bias (d={c['d']}, {c['blocks']}"
            f" blocks), λ={c['damping']:g}; removed label {c['attribute'] + 1} "
            f"({c['attribute_count']} training samples); ε*={res['eps_chosen']:.3g} chosen on "
            f"label {c['proxy_attribute'] + 1} (without retraining, estimate_epsilon gives "
            f"ε̂={res['eps_estimated']:.3g}); mean ± std over {c['repeats']} random subsets.\n\n"
            + markdown_table(header, rows)
            + "\nTable 1 (first removal of each setting; loss and gradient norm on D∖S):\n\n"
            + markdown_table(["removed", "model", "loss D∖S", "‖∇‖ D∖S"]
                             + [f"acc {sp}" for sp in SPLITS], res["table1"]))


def seeds_table(result: dict) -> str:
    """Per removal (setting and subset) over the seeds: the samples of S on which the original
    and the retrained model differ (any label), then γ of each model as mean ± sd (seeds) over
    the seeds whose removal is not quantised, and the parameter distance over all seeds."""
    per_seed = [r["results"] for r in result["results"]["per_seed"]]
    models = {"SSSE @ε*": lambda r: r["chosen"], "influence (full Hessian)":
              lambda r: r["influence"], NEWTON: lambda r: r["newton"][NEWTON],
              REFINED: lambda r: r["newton"][REFINED]}

    def pm(vals):
        return f"{np.mean(vals):.3f} ± {np.std(vals):.3f} ({len(vals)})" if vals else "-"

    rows = []
    for setting, st in per_seed[0]["settings"].items():
        for i in range(len(st["runs"])):
            runs = [res["settings"][setting]["runs"][i] for res in per_seed]
            kept = [r for r in runs if not quantised(r["differing"])]
            rows.append([setting, i, "/".join(str(r["k"]) for r in runs),
                         "/".join(str(r["differing"]) for r in runs),
                         f"{len(runs) - len(kept)} of {len(runs)}"]
                        + [pm([get(r)["gamma"] for r in kept]) for get in models.values()]
                        + [pm([get(r)["param_distance"] for r in runs])
                           for get in models.values()])
    header = ["removed", "subset", "k per seed", "differ per seed", "quantised seeds"] + \
        [f"γ {m}" for m in models] + [f"param dist {m} (all seeds)" for m in models]
    return (f"Per removal over seeds: γ as mean ± sd (seeds) over the seeds whose removal is "
            f"not quantised (original and retrained differ on ≥ {QUANTISED_BELOW} samples of "
            f"S, in any label; a removal of k < {QUANTISED_BELOW} samples always is); the "
            f"normalised parameter distance (0: retrained, 1: original) over all seeds.\n\n"
            + markdown_table(header, rows))


def figures(r: dict, out: Path) -> list[Path]:
    c, res = r["config"], r["results"]
    grid, settings = c["eps"], res["settings"]
    p1 = plots.eps_curves(out / "yeast_gamma.png", grid,
                          {**{n: [r["curve"] for r in s["runs"]] for n, s in settings.items()},
                           **{f"{n} leave-k-out": [r["curve_leave_k_out"] for r in s["runs"]]
                              for n, s in settings.items()}},
                          ylabel="γ on S (1: as retrained)", vline=res["eps_chosen"],
                          constants={f"influence {n}": float(np.mean([r["influence"]["gamma"]
                                                                      for r in s["runs"]]))
                                     for n, s in settings.items()},
                          title=f"{c['data']}: removing label {c['attribute'] + 1} (Fig. 2a)")
    p2 = plots.eps_curves(out / "yeast_param_distance.png", grid,
                          {n: [r["param_distance"] for r in s["runs"]]
                           for n, s in settings.items()},
                          ylabel="‖θ − θ_retrained‖ / ‖θ* − θ_retrained‖",
                          vline=res["eps_chosen"],
                          title=f"{c['data']}: normalised parameter distance (Fig. 2b)")
    return [p1, p2]


def run(*, out: Path = Path(f"results/{NAME}"), seeds=None, **kwargs) -> str:
    """Runs the experiment (the options of :func:`compute`; ``seeds``: once per seed, each
    seed's results and their mean ± sd in one results file) and writes its results, table and
    figures to ``out``; returns the table."""
    return report(NAME, compute, table, figures, out, seeds=seeds, seeds_table=seeds_table,
                  **kwargs)
