"""Paper §5.2: L2 logistic regression (multinomial) on digits or Fashion-MNIST; remove 25, 50
and 100 % of one class, over several classes (mean ± std); δ vs ε (Fig. 3a) and the absolute
accuracy gaps to the retrained model on the four splits vs ε (Fig. 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssse import metrics, plots
from ssse.data import class_removal

from .common import eps_grid, geomean, markdown_table, summary, timed, report
from .convex import fit_all, run_setting, settings_of
from .methods import NEWTON, NEWTON_SMALL, REFINE_STEPS, REFINED, select, ssse_curve
from .removal import QUANTISED_BELOW, SPLITS, make_removal, quantised
from .tasks import DEFAULTS, make_task

NAME = "multinomial"
#: The ε grid ``(lo, hi, num)`` on Fashion-MNIST, where one seed takes hours on one thread: the
#: best ε of every removal of the single-seed run with the default grid (0.40–1.0, and a flat
#: plateau from 1.0 up for a full class 1) lies inside it.
FASHION_GRID = (0.1, 10.0, 11)


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
    if data == "fashion-mnist" and not quick:  # a seed takes hours: 11 points near the optimum
        grid = eps_grid(*FASHION_GRID)
    classes = list(range(repeats or (1 if quick else 3)))

    fitted = fit_all(task, damping, seed=seed, progress=progress)
    model, inv, ggn = fitted["model"], fitted["inv"], fitted["ggn"]
    t_train, t_fisher, t_ggn, t_rows = (fitted["seconds"][k] for k in (
        "train", "fisher", "ggn_fisher", "ggn_rows_fisher"))
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
                                                   seed=seed, ggn=ggn,
                                                   ggn_rows=fitted["ggn_rows"],
                                                   progress=progress)

    summ = summarize(settings)
    config = {"data": data, "quick": quick, "seed": seed, "n": task.n, "d": inv.dim,
              "damping": damping, "weight_decay": task.weight_decay, "fractions": fractions,
              "classes": classes, "eps": grid, "proxy_class": proxy_class,
              "newton_blocks": {NEWTON: ggn.layout.max_block_size,
                                NEWTON_SMALL: fitted["ggn_rows"].layout.max_block_size},
              **limits}
    results = {"eps_chosen": eps_star, "proxy_differing": proxy.differing(),
               "eps_estimated": eps_hat,
               "eps_estimate_seconds": t_eps_hat, "fisher_seconds": t_fisher,
               "ggn_fisher_seconds": t_ggn, "ggn_rows_fisher_seconds": t_rows,
               "train_seconds": t_train, "summary": summ,
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
    header = ["removed", "k", "quantised", "δ SSSE @ε*", "δ min (ε)", "δ min leave-k-out (ε)",
              "δ influence", f"δ {NEWTON}", f"gap S {NEWTON}"] + \
        [f"gap {s}" for s in SPLITS] + ["erase s", "Newton s", "retrain s"]
    rows, left_out = [], []
    for name, m in summarize(res["settings"]).items():
        pm = lambda k: f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}"  # noqa: E731
        runs = res["settings"][name]["runs"]
        q = sum(quantised(r["differing"]) for r in runs if "differing" in r)
        rows.append([name, f"{m['k_mean']:.0f}",
                     f"{q} of {len(runs)}" if "differing" in runs[0] else "?",
                     pm("delta_chosen"),
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
            f"a proxy removal (50 % of class {c['proxy_class']}{_proxy_note(res)}; without "
            f"retraining, "
            f"estimate_epsilon gives ε̂={res['eps_estimated']:.3g}); mean ± std over classes "
            f"(quantised removals included: see the table per removal)."
            f"{excluded} Fisher fit {res['fisher_seconds']:.2f} s, training "
            f"{res['train_seconds']:.2f} s.\n\n" + markdown_table(header, rows) + "\n"
            + per_class_table(r))


#: The target of a tuning-free erasure on a non-quantised removal: δ at most this, and the
#: accuracy on S within :data:`TARGET_GAP` of the retrained model's.
TARGET_DELTA, TARGET_GAP = 0.25, 0.05


def _models(run: dict) -> dict:
    """The evaluated models of a removal by column label (those the run has)."""
    nw = run["newton"]
    out = {"SSSE @ε*": run["chosen"], "Newton, row blocks": nw.get(NEWTON_SMALL),
           "Newton, largest blocks": nw[NEWTON],
           f"Newton largest + {REFINE_STEPS} refinement steps": nw[REFINED],
           "influence (full Hessian)": run["influence"]}
    return {k: v for k, v in out.items() if v is not None}


def target(run: dict, row: dict) -> str:
    """Whether ``row`` meets the target (:data:`TARGET_DELTA`, :data:`TARGET_GAP`) on this
    removal, what is left when not, or ``"quantised"``."""
    if quantised(run["differing"]):
        return "quantised"
    gap = abs(row["accuracy"]["S"] - run["retrained"]["accuracy"]["S"])
    left = ([f"δ {row['delta']:.2f}"] if row["delta"] > TARGET_DELTA else []) + \
        ([f"acc S off by {gap:.2f}"] if gap > TARGET_GAP else [])
    return "met" if not left else "not met: " + ", ".join(left)


def _proxy_note(res: dict) -> str:
    if "proxy_differing" not in res:
        return ""
    d = res["proxy_differing"]
    return (f", where original and retrained differ on {d} samples of S"
            + (": quantised, so ε* rests on a few predictions" if quantised(d) else ""))


def per_class_table(r: dict) -> str:
    """Per removal: the samples of S where the original and the retrained model differ (the
    removal is quantised below :data:`QUANTISED_BELOW`), δ and accuracy on S of SSSE at the
    proxy-chosen ε, its oracle ε, the Newton step on row blocks and on the largest blocks, its
    refinement, the influence step; the Newton target per removal."""
    res = r["results"]
    runs = [(setting, run) for setting, s in res["settings"].items() for run in s["runs"]]
    labels = list(_models(runs[0][1]))
    header = ["removed", "class", "k", "differ (quantised)", "δ SSSE oracle (ε)"] + \
        [f"δ {m}" for m in labels] + ["acc S retrained"] + [f"acc S {m}" for m in labels] + \
        [f"target (δ ≤ {TARGET_DELTA}, acc S ± {TARGET_GAP}): Newton largest",
         "target: + refinement"]
    rows = []
    for setting, run in runs:
        models = _models(run)
        diff = run.get("differing")
        rows.append([setting, run["classes"][0], run["k"],
                     "?" if diff is None else f"{diff} ({'yes' if quantised(diff) else 'no'})",
                     f"{run['best']['delta']:.3f} ({run['best_eps']:.2g})"]
                    + [models[m]["delta"] for m in labels] + [run["retrained"]["accuracy"]["S"]]
                    + [models[m]["accuracy"]["S"] for m in labels]
                    + [target(run, run["newton"][m]) if diff is not None else "?"
                       for m in (NEWTON, REFINED)])
    return (f"Per removal (differ: samples of S on which the original and the retrained model "
            f"predict differently; quantised when fewer than {QUANTISED_BELOW}: δ then takes a "
            f"few values and supports no claim):\n\n" + markdown_table(header, rows))


def _pm(values) -> str:
    return (f"{np.mean(values):.3f} ± {np.std(values):.3f} ({len(values)})" if values
            else "-")


def seeds_table(result: dict) -> str:
    """Per removal (setting and class) over the seeds: the differing counts, then δ and
    accuracy on S of each model as mean ± sd (number of seeds) over the seeds whose removal is
    not quantised; the Newton target met on how many of them; the timings."""
    per_seed = [r["results"]["settings"] for r in result["results"]["per_seed"]]
    first = per_seed[0]
    labels = list(_models(next(iter(first.values()))["runs"][0]))
    header = ["removed", "class", "k", "differ per seed", "quantised seeds"] + \
        [f"δ {m}" for m in labels] + ["acc S retrained"] + [f"acc S {m}" for m in labels] + \
        ["target met: Newton largest", "target met: + refinement"] + \
        [f"param dist {m} (all seeds)" for m in labels]
    rows = []
    for setting, st in first.items():
        for i, run0 in enumerate(st["runs"]):
            runs = [s[setting]["runs"][i] for s in per_seed]
            kept = [r for r in runs if not quantised(r["differing"])]
            met = [sum(target(r, r["newton"][m]) == "met" for r in kept)
                   for m in (NEWTON, REFINED)]
            rows.append([setting, run0["classes"][0], f"{np.mean([r['k'] for r in runs]):.0f}",
                         "/".join(str(r["differing"]) for r in runs),
                         f"{len(runs) - len(kept)} of {len(runs)}"]
                        + [_pm([_models(r)[m]["delta"] for r in kept]) for m in labels]
                        + [_pm([r["retrained"]["accuracy"]["S"] for r in kept])]
                        + [_pm([_models(r)[m]["accuracy"]["S"] for r in kept]) for m in labels]
                        + [f"{m} of {len(kept)}" for m in met]
                        + [_pm([_models(r)[m]["param_distance"] for r in runs])
                           for m in labels])
    return (f"Per removal over seeds: mean ± sd (seeds) over the seeds whose removal is not "
            f"quantised (original and retrained differ on ≥ {QUANTISED_BELOW} samples of S); "
            f"differ per seed: those counts, in seed order. The normalised parameter distance "
            f"to the retrained model (0: retrained, 1: original) is not quantised: over all "
            f"seeds.\n\n" + markdown_table(header, rows)
            + "\n" + timing_table(per_seed, result["results"]["per_seed"]))


def timing_table(per_seed: list, seeds: list) -> str:
    """Wall times over every seed and class: mean and range of the single runs."""
    def cell(vals):
        return f"{np.mean(vals):.3f} ({min(vals):.3f}–{max(vals):.3f})"

    rows = []
    for setting in per_seed[0]:
        runs = [r for s in per_seed for r in s[setting]["runs"]]
        rows.append([setting, cell([r["erase_seconds"] for r in runs])]
                    + [cell([r["newton"][m]["erase_seconds"] for r in runs])
                       for m in (NEWTON_SMALL, NEWTON) if m in runs[0]["newton"]]
                    + [cell([r["retrain_seconds"] for r in runs])])
    fits = {k: [s["results"][k] for s in seeds if k in s["results"]] for k in (
        "train_seconds", "fisher_seconds", "ggn_fisher_seconds", "ggn_rows_fisher_seconds")}
    return ("Wall times in seconds over every seed and class, mean (range of the single runs):"
            "\n\n" + markdown_table(["removed", "SSSE erase", "Newton, row blocks",
                                      "Newton, largest blocks", "retrain"], rows)
            + "\nFits, mean over seeds (s): " + ", ".join(
                f"{k.removesuffix('_seconds')} {np.mean(v):.2f}" for k, v in fits.items() if v)
            + ".\n")


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


def run(*, out: Path = Path(f"results/{NAME}"), seeds=None, **kwargs) -> str:
    """Runs the experiment (the options of :func:`compute`; ``seeds``: once per seed, each
    seed's results and their mean ± sd in one results file) and writes its results, table and
    figures to ``out``; returns the table."""
    return report(NAME, compute, table, figures, out, seeds=seeds, seeds_table=seeds_table,
                  **kwargs)
