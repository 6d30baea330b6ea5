"""Paper §5.3: a small ResNet-style CNN trained with SGD on digits (or Fashion-MNIST); remove
all or 50 % of one class; block-diagonal Fisher from per-sample and mini-batch-10 gradients
(δ vs ε, Fig. 5); SSSE against one gradient-ascent step (δ vs its step size, Fig. 6) and
Fisher forgetting (δ vs its noise scale α, Fig. 7); accuracy on the four splits.

Every method has one hyperparameter (ε, the step size, α), chosen by the paper's criterion
(argmin δ) on a proxy removal of the same kind with its own retrain, among the values that keep
the accuracy on D∖S within ``max_accuracy_drop`` of the original model's: a model pushed until
it no longer predicts the removed class at all (a broken one included) already scores δ ≤ 0.5
on a full-class removal, so unguarded argmin δ prefers broken models for every method. Each
method's models over its grid come from one call: SSSE and gradient ascent are linear in their
hyperparameter, and Fisher forgetting's noise (same seed) scales with √α.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import ssse
from ssse import plots
from ssse.baselines import fisher_forgetting, gradient_ascent
from ssse.data import class_removal

from .common import Task, eps_grid, markdown_table, sweep_states, timed, with_state
from .common import write_results
from .convex import mean_std
from .sweep import SPLITS, Removal, evaluate, prepare_removal
from .tasks import make_task

NAME = "nonconvex"

#: Per data set: training-set size, test-set size, SGD epochs, CNN width and input pooling.
SETTINGS = {
    "digits": {"train_limit": None, "test_limit": None, "epochs": 30, "width": 8, "pool": 1},
    "fashion-mnist": {"train_limit": 4000, "test_limit": 2000, "epochs": 20, "width": 8,
                      "pool": 2},
}
QUICK = {"train_limit": 160, "test_limit": 200, "epochs": 2, "width": 4}

#: The methods compared, each with its hyperparameter's name and grid ``(lo, hi, num)``.
#: SSSE variants are named by Fisher (per-sample or mini-batch gradients) and gradient:
#: ``∇S`` is Σ_S ∇ℓ (the paper's eq. 8), ``−∇D∖S`` is −Σ_{D∖S} ∇ℓ (the paper's §5.3).
METHODS = {
    "SSSE per-sample −∇D∖S": ("ε", (1e-4, 1e1, 31)),
    "SSSE per-sample ∇S": ("ε", (1e-4, 1e1, 31)),
    "SSSE mini-batch 10 −∇D∖S": ("ε", (1e-4, 1e1, 31)),
    "SSSE mini-batch 10 ∇S": ("ε", (1e-4, 1e1, 31)),
    "gradient ascent": ("lr", (1e-3, 1e2, 31)),
    "Fisher forgetting": ("α", (1e-8, 1e-2, 25)),
}
_SSSE = {name: (("per-sample" if "per-sample" in name else "mini-batch"),
                ("retained" if "D∖S" in name else "removed"))
         for name in METHODS if name.startswith("SSSE")}
MINIBATCH = 10


def _removal(task: Task, model, removed, cls: int, *, seed: int, progress: bool) -> Removal:
    reference, seconds = timed(task.train, task.retained(removed), seed=seed,
                               progress=progress)
    rem = prepare_removal(task, model, removed, classes=[cls], seed=seed, reference=reference)
    rem.retrain_seconds = seconds
    return rem


def _units(task: Task, rem: Removal, inverses: dict, *, seed: int) -> dict:
    """Each method's model at hyperparameter 1 (the unit its grid scales), and its wall time."""
    model = rem.original
    removed, retained = task.data(rem.removed), task.retained(rem.removed)
    units = {}
    for name, (fisher, grad) in _SSSE.items():
        units[name] = timed(ssse.ssse_update, model, inverses[fisher], removed, task.loss_fn,
                            epsilon=1.0, n_total=task.n, weight_decay=task.weight_decay,
                            gradient=grad, retained=retained if grad == "retained" else None)
    units["gradient ascent"] = timed(gradient_ascent, model, task.loss_fn, removed, lr=1.0,
                                     weight_decay=task.weight_decay)
    units["Fisher forgetting"] = timed(fisher_forgetting, model, task.loss_fn, retained,
                                       alpha=1.0, seed=seed)
    return units


def _scale(name: str, value: float) -> float:
    # Fisher forgetting's noise has variance α (standard deviation √α); the others are linear.
    return math.sqrt(value) if name == "Fisher forgetting" else value


def _curves(task: Task, rem: Removal, inverses: dict, grids: dict, *, seed: int,
            progress: bool) -> dict:
    """Per method: the evaluation (δ, accuracies, parameter distance) over its grid."""
    out = {}
    units = _units(task, rem, inverses, seed=seed)
    for name, (unit, seconds) in tqdm(units.items(), desc=f"methods (k={rem.k})",
                                      disable=not progress, leave=False):
        states = sweep_states(rem.original, unit, [_scale(name, v) for v in grids[name]])
        out[name] = {"rows": [evaluate(with_state(rem.original, s), rem, task) for s in states],
                     "seconds": seconds}
    return out


def _argmin(rows: list[dict], floor: float = -1.0) -> int:
    """argmin δ over the rows whose accuracy on D∖S is at least ``floor`` (all rows if none)."""
    ok = [i for i, r in enumerate(rows) if r["accuracy"]["D-S"] >= floor] or range(len(rows))
    return min(ok, key=lambda i: rows[i]["delta"])


def _nearest(grid, value: float) -> int:
    return min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / value)))


def _gap(row: dict, reference: dict) -> dict:
    return {s: abs(row["accuracy"][s] - reference["accuracy"][s]) for s in SPLITS}


def run(*, quick: bool = False, seed: int = 0, out: Path = Path("results/nonconvex"),
        device="cpu", dtype=torch.float32, progress: bool = True, data: str | None = None,
        data_dir=None, repeats: int | None = None, damping: float = 1e-3,
        block_size: int = 256, max_accuracy_drop: float = 0.05) -> str:
    data = data or "digits"
    if data not in SETTINGS:
        raise ValueError(f"the non-convex experiment runs on {' or '.join(SETTINGS)}, not {data}")
    cfg = dict(SETTINGS[data])
    if quick:
        cfg.update(QUICK)
    task = make_task(data, model="resnet", data_dir=data_dir, seed=seed, device=device,
                     dtype=dtype, train_limit=cfg["train_limit"], test_limit=cfg["test_limit"],
                     epochs=cfg["epochs"], width=cfg["width"], pool=cfg["pool"])
    classes = list(range(repeats or (1 if quick else 3)))
    proxy_class = task.ds.num_classes - 1
    fractions = {"100%": 1.0, "50%": 0.5}
    grids = {name: eps_grid(lo, hi, 4 if quick else num)
             for name, (_, (lo, hi, num)) in METHODS.items()}

    model, t_train = timed(task.train, task.data(), seed=seed, progress=progress)
    inverses, t_fisher = {}, {}
    for fisher, b in (("per-sample", 1), ("mini-batch", MINIBATCH)):
        inverses[fisher], t_fisher[fisher] = timed(
            ssse.fit_inverse_fisher, model, task.loss_fn, task.data(), damping=damping,
            layout="per_parameter", block_size=block_size, weight_decay=task.weight_decay,
            minibatch=b, progress=progress)
    layout = inverses["per-sample"].layout

    # The paper's criterion on a proxy removal of each kind: argmin δ over each method's grid.
    proxies, chosen = {}, {}
    for setting, f in fractions.items():
        removed = class_removal(task.ds.y_train, proxy_class, f, seed=seed + 1)
        rem = _removal(task, model, removed, proxy_class, seed=seed, progress=progress)
        curves = _curves(task, rem, inverses, grids, seed=seed, progress=progress)
        floor = evaluate(model, rem, task)["accuracy"]["D-S"] - max_accuracy_drop
        chosen[setting] = {name: grids[name][_argmin(c["rows"], floor)]
                           for name, c in curves.items()}
        proxies[setting] = {"k": rem.k, "class": proxy_class, "accuracy_floor": floor,
                            "delta": {name: [r["delta"] for r in c["rows"]]
                                      for name, c in curves.items()},
                            "accuracy_D-S": {name: [r["accuracy"]["D-S"] for r in c["rows"]]
                                             for name, c in curves.items()}}

    settings = {}
    for setting, f in fractions.items():
        runs = []
        for c in classes:
            removed = class_removal(task.ds.y_train, c, f, seed=seed + c)
            rem = _removal(task, model, removed, c, seed=seed, progress=progress)
            curves = _curves(task, rem, inverses, grids, seed=seed, progress=progress)
            original, retrained = evaluate(model, rem, task), evaluate(rem.retrained, rem, task)
            floor = original["accuracy"]["D-S"] - max_accuracy_drop
            methods = {}
            for name, cv in curves.items():
                rows = cv["rows"]
                at = rows[_nearest(grids[name], chosen[setting][name])]
                best, free = _argmin(rows, floor), _argmin(rows)
                methods[name] = {
                    "delta": [r["delta"] for r in rows],
                    "accuracy": {s: [r["accuracy"][s] for r in rows] for s in SPLITS},
                    "param_distance": [r["param_distance"] for r in rows],
                    "chosen": at, "chosen_gap": _gap(at, retrained),
                    "best": rows[best], "best_value": grids[name][best],
                    "best_unguarded": rows[free], "best_unguarded_value": grids[name][free],
                    "erase_seconds": cv["seconds"]}
            runs.append({"class": c, "k": rem.k, "removed": rem.removed.tolist(),
                         "accuracy_floor": floor,
                         "original": original, "retrained": retrained,
                         "retrain_seconds": rem.retrain_seconds, "methods": methods})
        settings[setting] = {"runs": runs}

    summary = _summary(settings)
    out = Path(out)
    pngs = _plots(out, data, grids, settings, chosen)
    table = _table(task, data, settings, summary, chosen, classes, proxy_class, layout,
                   damping, max_accuracy_drop, t_train, t_fisher)
    config = {"data": data, "quick": quick, "seed": seed, "n": task.n, "d": layout.dim,
              "spec": task.spec, "recipe": task.recipe, "weight_decay": task.weight_decay,
              "damping": damping, "block_size": block_size, "layout": "per_parameter",
              "max_accuracy_drop": max_accuracy_drop,
              "num_blocks": layout.num_blocks, "minibatch": MINIBATCH, "classes": classes,
              "proxy_class": proxy_class, "fractions": fractions, "grids": grids,
              "hyperparameters": {name: h for name, (h, _) in METHODS.items()},
              "train_limit": cfg["train_limit"], "test_limit": cfg["test_limit"],
              "n_test": int(task.ds.y_test.numel())}
    results = {"chosen": chosen, "train_seconds": t_train,
               "fisher_seconds": t_fisher, "proxies": proxies, "summary": summary,
               "settings": settings}
    write_results(out, NAME, config, results, table, pngs)
    return table


def _summary(settings: dict) -> dict:
    """Mean ± std over the removed classes, per setting and method, at the chosen value."""
    summary = {}
    for setting, s in settings.items():
        runs = s["runs"]
        entry = {"k_mean": float(np.mean([r["k"] for r in runs])),
                 "retrain_seconds": _ms([r["retrain_seconds"] for r in runs])}
        for ref in ("original", "retrained"):
            entry[ref] = {"delta": _ms([r[ref]["delta"] for r in runs]),
                          **{f"acc_{sp}": _ms([r[ref]["accuracy"][sp] for r in runs])
                             for sp in SPLITS}}
        for name in runs[0]["methods"]:
            ms = [r["methods"][name] for r in runs]
            entry[name] = {
                "delta_chosen": _ms([m["chosen"]["delta"] for m in ms]),
                "delta_best": _ms([m["best"]["delta"] for m in ms]),
                "delta_best_unguarded": _ms([m["best_unguarded"]["delta"] for m in ms]),
                "acc_D-S_best_unguarded": _ms([m["best_unguarded"]["accuracy"]["D-S"]
                                               for m in ms]),
                "best_value_geomean": float(np.exp(np.mean(np.log([m["best_value"]
                                                                   for m in ms])))),
                "param_distance_chosen": _ms([m["chosen"]["param_distance"] for m in ms]),
                "erase_seconds": _ms([m["erase_seconds"] for m in ms]),
                **{f"acc_{sp}": _ms([m["chosen"]["accuracy"][sp] for m in ms]) for sp in SPLITS},
                **{f"gap_{sp}": _ms([m["chosen_gap"][sp] for m in ms]) for sp in SPLITS}}
        summary[setting] = entry
    return summary


def _ms(values) -> dict:
    m, s = mean_std(values)
    return {"mean": m, "std": s}


def _plots(out: Path, data: str, grids: dict, settings: dict, chosen: dict) -> list[Path]:
    def curves(name, key="delta", split=None):
        return {setting: [(r["methods"][name][key] if split is None
                           else r["methods"][name][key][split]) for r in s["runs"]]
                for setting, s in settings.items()}

    ssse_names = list(_SSSE)
    eps = grids[ssse_names[0]]
    fig5 = plots.eps_panels(
        out / f"{data}_ssse_delta.png", eps,
        {f"remove {setting} of a class": {name.removeprefix("SSSE "): [
            r["methods"][name]["delta"] for r in s["runs"]] for name in ssse_names}
         for setting, s in settings.items()},
        ylabel="δ on S (< 0.5: closer to retrained)", ncols=2,
        title=f"{data}: SSSE, per-sample vs mini-batch-10 Fisher (Fig. 5)")
    def with_accuracy(name):
        # δ alone hides a broken model (δ ≈ 0.5): show what each value costs on D∖S
        return {**{f"δ {k}": v for k, v in curves(name).items()},
                **{f"acc D∖S {k}": v for k, v in curves(name, "accuracy", "D-S").items()}}

    fig6 = plots.eps_curves(out / f"{data}_gradient_ascent_delta.png",
                            grids["gradient ascent"], with_accuracy("gradient ascent"),
                            hline=0.5, xlabel="step size", ylabel="δ on S, accuracy on D∖S",
                            title=f"{data}: one gradient-ascent step (Fig. 6)")
    fig7 = plots.eps_curves(out / f"{data}_fisher_forgetting_delta.png",
                            grids["Fisher forgetting"], with_accuracy("Fisher forgetting"),
                            hline=0.5, xlabel="α", ylabel="δ on S, accuracy on D∖S",
                            title=f"{data}: Fisher forgetting (Fig. 7)")
    main = "SSSE per-sample ∇S"
    acc = plots.eps_panels(
        out / f"{data}_ssse_accuracy.png", eps,
        {sp: {**{f"{setting}": [r["methods"][main]["accuracy"][sp] for r in s["runs"]]
                 for setting, s in settings.items()},
              **{f"{setting} retrained": [[r["retrained"]["accuracy"][sp]] * len(eps)
                                          for r in s["runs"]]
                 for setting, s in settings.items()}} for sp in SPLITS},
        ylabel="accuracy", vline=chosen["100%"][main],
        title=f"{data}: accuracy of {main} on the four splits (dashed: ε chosen for 100 %)")
    return [fig5, fig6, fig7, acc]


def _table(task, data, settings, summary, chosen, classes, proxy_class, layout, damping,
           max_drop, t_train, t_fisher) -> str:
    pm = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    header = ["removed", "method", "value (proxy)", "δ at value", "min δ (at)",
              "min δ unguarded (acc D-S)"] + \
        [f"acc {sp}" for sp in SPLITS] + ["erase s"]
    rows = []
    for setting, e in summary.items():
        for ref in ("original", "retrained"):
            rows.append([setting, ref, "-", pm(e[ref]["delta"]), "-", "-"]
                        + [pm(e[ref][f"acc_{sp}"]) for sp in SPLITS]
                        + ([f"retrain {e['retrain_seconds']['mean']:.2f}"]
                           if ref == "retrained" else ["-"]))
        for name, (h, _) in METHODS.items():
            m = e[name]
            rows.append([setting, name, f"{h} = {chosen[setting][name]:.3g}",
                         pm(m["delta_chosen"]),
                         f"{pm(m['delta_best'])} ({m['best_value_geomean']:.2g})",
                         f"{pm(m['delta_best_unguarded'])} "
                         f"({m['acc_D-S_best_unguarded']['mean']:.2f})"]
                        + [pm(m[f"acc_{sp}"]) for sp in SPLITS]
                        + [f"{m['erase_seconds']['mean']:.3f}"])
    k = ", ".join(f"{s}: k = {e['k_mean']:.0f}" for s, e in summary.items())
    return (f"{data}, n={task.n}, n_test={task.ds.y_test.numel()}, SmallResNet "
            f"{task.spec} (d={layout.dim}), SGD {task.recipe}, weight decay "
            f"{task.weight_decay:g}; Fisher λ={damping:g}, per_parameter blocks of ≤ "
            f"{layout.max_block_size} ({layout.num_blocks} blocks), per-sample and mini-batch "
            f"{MINIBATCH} gradients; removed classes {classes} ({k}); each method's value "
            f"chosen by argmin δ on a proxy removal of the same kind (class {proxy_class}) "
            f"among the values that keep the accuracy on D∖S within {max_drop:g} of the "
            f"original's (min δ: the same on the removal itself; unguarded: over the whole "
            f"grid); accuracies at the chosen value; mean ± std over classes. Training "
            f"{t_train:.2f} s, "
            f"Fisher fit {t_fisher['per-sample']:.2f} s (per-sample), "
            f"{t_fisher['mini-batch']:.2f} s (mini-batch).\n\n" + markdown_table(header, rows))
