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
from ssse.data import class_removal

from .common import eps_grid, geomean, markdown_table, nearest, summary, timed, report
from .methods import (NEWTON, NEWTON_EKFAC, NEWTON_SMALL, REFINED, curve, fit_ggn, newton_rows,
                      select)
from .removal import QUANTISED_BELOW, SPLITS, Removal, make_removal, quantised
from .tasks import make_task

NAME = "nonconvex"

#: Per data set: training-set size, test-set size, SGD epochs, CNN width and input pooling.
SETTINGS = {
    "digits": {"train_limit": None, "test_limit": None, "epochs": 30, "width": 8, "pool": 1},
    "fashion-mnist": {"train_limit": 4000, "test_limit": 2000, "epochs": 20, "width": 8,
                      "pool": 2},
}
#: The CIFAR ResNet-20 of paper §5.3 (``model="resnet20"``), smaller subsets for a CPU budget.
RESNET20 = {"digits": {"epochs": 20},
            "fashion-mnist": {"train_limit": 2000, "test_limit": 1000, "epochs": 10, "pool": 2}}
QUICK = {"train_limit": 160, "test_limit": 200, "epochs": 2, "width": 4}
#: Grid points of every method in the ``--quick`` setting.
QUICK_POINTS = 4

#: The methods compared, each with its hyperparameter's name and grid ``(lo, hi, num)``.
#: SSSE variants are named by Fisher (:data:`FISHERS`: per-sample or mini-batch gradients, EK-FAC)
#: and gradient:
#: ``∇S`` is Σ_S ∇ℓ (the paper's eq. 8), ``−∇D∖S`` is −Σ_{D∖S} ∇ℓ (the paper's §5.3).
METHODS = {
    "SSSE per-sample −∇D∖S": ("ε", (1e-4, 1e1, 31)),
    "SSSE per-sample ∇S": ("ε", (1e-4, 1e1, 31)),
    "SSSE mini-batch 10 −∇D∖S": ("ε", (1e-4, 1e1, 31)),
    "SSSE mini-batch 10 ∇S": ("ε", (1e-4, 1e1, 31)),
    "SSSE EK-FAC −∇D∖S": ("ε", (1e-4, 1e1, 31)),
    "SSSE EK-FAC ∇S": ("ε", (1e-4, 1e1, 31)),
    "gradient ascent": ("lr", (1e-3, 1e2, 31)),
    "Fisher forgetting": ("α", (1e-8, 1e-2, 25)),
}
#: The inverse Fishers the SSSE variants use: (rows per group, curvature) by name.
FISHERS = {"per-sample": (1, "empirical"), "mini-batch": (10, "empirical"),
           "EK-FAC": (1, "ekfac")}
_SSSE = {name: (next(f for f in FISHERS if f in name),
                ("retained" if "D∖S" in name else "removed"))
         for name in METHODS if name.startswith("SSSE")}
MINIBATCH = FISHERS["mini-batch"][0]
_FRACTIONS = {"100%": 1.0, "50%": 0.5}


def _units(rem: Removal, inverses: dict, names, *, seed: int) -> dict:
    """Each method's model at hyperparameter 1 (the unit its grid scales), and its wall time."""
    task, model = rem.task, rem.original
    removed, retained = task.data(rem.removed), task.retained(rem.removed)
    wd = task.weight_decay
    units = {}
    for name in names:
        if name in _SSSE:
            fisher, grad = _SSSE[name]
            units[name] = timed(ssse.ssse_update, model, task.loss_fn, removed,
                                inv_fisher=inverses[fisher], epsilon=1.0, n_total=task.n,
                                weight_decay=wd, gradient=grad,
                                retained=retained if grad == "retained" else None)
        elif name == "gradient ascent":
            units[name] = timed(ssse.gradient_ascent, model, task.loss_fn, removed, lr=1.0,
                                weight_decay=wd)
        else:
            units[name] = timed(ssse.fisher_forgetting, model, task.loss_fn, removed,
                                retained=retained, alpha=1.0, seed=seed)
    return units


def _scale(name: str, value: float) -> float:
    # Fisher forgetting's noise has variance α (standard deviation √α); the others are linear.
    return math.sqrt(value) if name == "Fisher forgetting" else value


def _curves(rem: Removal, inverses: dict, grids: dict, *, seed: int, progress: bool) -> dict:
    """Per method: the evaluation (δ, accuracies, parameter distance) over its grid."""
    out = {}
    units = _units(rem, inverses, list(grids), seed=seed)
    for name, (unit, seconds) in tqdm(units.items(), desc=f"methods (k={rem.k})",
                                      disable=not progress, leave=False):
        out[name] = {"rows": curve(rem, unit, [_scale(name, v) for v in grids[name]]),
                     "seconds": seconds}
    return out


def _guarded(rows: list[dict], floor: float) -> list[int]:
    """The grid indices whose accuracy on D∖S is at least ``floor`` (all if none is)."""
    return [i for i, r in enumerate(rows) if r["accuracy"]["D-S"] >= floor] or \
        list(range(len(rows)))


def _gap(row: dict, reference: dict) -> dict:
    return {s: abs(row["accuracy"][s] - reference["accuracy"][s]) for s in SPLITS}


def compute(*, quick: bool = False, seed: int = 0, device="cpu", dtype=torch.float32,
            progress: bool = True, data: str | None = None, data_dir=None,
            repeats: int | None = None, damping: float = 1e-3, model: str = "resnet",
            layout: str = "per_parameter", block_size: int = 256,
            representation: str = "dense", methods=None, grid_points: int | None = None,
            tuning_free: bool | None = None, max_accuracy_drop: float = 0.05) -> dict:
    """The experiment's numbers. ``model``: ``"resnet"`` (the small ResNet) or ``"resnet20"``
    (paper §5.3's); ``layout``, ``block_size``, ``representation``: the inverse Fishers'
    blocks (``"fixed"`` with 70 000 and ``"auto"`` is the paper's configuration, whose blocks
    are larger than their number of rows: stored in the exact low-rank form); ``methods``: a
    subset of :data:`METHODS`; ``grid_points``: points of every grid; ``tuning_free``: the
    Gauss–Newton Newton rows (default: with the small ResNet)."""
    data = data or "digits"
    cfg = _settings(data, model, methods, quick)
    tuning_free = model == "resnet" if tuning_free is None else tuning_free
    task = make_task(data, model=model, data_dir=data_dir, seed=seed, device=device,
                     dtype=dtype, train_limit=cfg["train_limit"], test_limit=cfg["test_limit"],
                     epochs=cfg["epochs"], width=cfg["width"], pool=cfg["pool"])
    classes = list(range(repeats or (1 if quick else 3)))
    proxy_class = task.ds.num_classes - 1
    points = QUICK_POINTS if quick else grid_points
    grids = {name: eps_grid(lo, hi, points or num)
             for name, (_, (lo, hi, num)) in METHODS.items() if name in (methods or METHODS)}

    arch, (model, t_train) = model, timed(task.train, task.data(), seed=seed,
                                           progress=progress)
    inverses, t_fisher = {}, {}
    for fisher, (b, curvature) in FISHERS.items():
        if not any(_SSSE.get(name, ("",))[0] == fisher for name in grids):
            continue
        inverses[fisher], t_fisher[fisher] = timed(
            ssse.fit_inverse_fisher, model, task.loss_fn, task.data(), damping=damping,
            layout=layout, block_size=block_size, weight_decay=task.weight_decay,
            minibatch=b, representation=representation, curvature=curvature,
            progress=progress)
    any_inv = next(iter(inverses.values()), None)
    lay = any_inv.layout if any_inv is not None else ssse.resolve_layout(layout, block_size,
                                                                          model)
    memory = {fisher: {"bytes": inv.nbytes,
                       "dense_bytes": inv.layout.numel * torch.finfo(dtype).bits // 8,
                       "dual_blocks": inv.representation.count("dual")}
              for fisher, inv in inverses.items()}
    ggn = _newton_inverses(task, model, layout, block_size, "EK-FAC" in inverses, t_fisher,
                           memory, progress) if tuning_free else None
    newton_blocks = {name: inv.layout.max_block_size for name, inv in (ggn or {}).items()}

    def removal(removed, cls):
        return make_removal(task, model, removed, classes=[cls], seed=seed, progress=progress)

    proxies, chosen = _choose_on_proxies(task, model, inverses, grids, removal, classes,
                                         proxy_class, seed=seed, progress=progress,
                                         max_accuracy_drop=max_accuracy_drop)
    settings = {}
    for setting, f in _FRACTIONS.items():
        runs = []
        for c in classes:
            rem = removal(class_removal(task.ds.y_train, c, f, seed=seed + c), c)
            runs.append(_run(rem, c, model, inverses, grids, chosen[setting], ggn, seed=seed,
                             progress=progress, max_accuracy_drop=max_accuracy_drop))
        settings[setting] = {"runs": runs}

    config = {"data": data, "quick": quick, "seed": seed, "model": arch, "n": task.n,
              "d": lay.dim,
              "spec": task.spec, "recipe": task.recipe, "weight_decay": task.weight_decay,
              "damping": damping, "block_size": block_size, "layout": layout,
              "representation": representation, "inverse_memory": memory,
              "max_accuracy_drop": max_accuracy_drop,
              "num_blocks": lay.num_blocks, "max_block_size": lay.max_block_size,
              "newton_blocks": newton_blocks,
              "minibatch": MINIBATCH, "classes": classes,
              "proxy_class": proxy_class, "fractions": _FRACTIONS, "grids": grids,
              "hyperparameters": {name: h for name, (h, _) in METHODS.items()
                                  if name in grids},
              "train_limit": cfg["train_limit"], "test_limit": cfg["test_limit"],
              "n_test": int(task.ds.y_test.numel())}
    results = {"chosen": chosen, "train_seconds": t_train,
               "fisher_seconds": t_fisher, "proxies": proxies, "summary": _summary(settings),
               "settings": settings}
    return {"config": config, "results": results}




def _newton_inverses(task, model, layout, block_size, ekfac: bool, seconds: dict,
                     memory: dict, progress: bool) -> dict:
    """The Gauss–Newton inverses of the tuning-free rows: the largest blocks that fit, the
    inverse Fishers' blocks and (with ``ekfac``) their EK-FAC; their fit times go into
    ``seconds``, their bytes into ``memory``."""
    ggn = {}
    ggn[NEWTON], seconds["ggn"] = fit_ggn(task, model, progress=progress)
    ggn[NEWTON_SMALL], seconds["ggn_small"] = fit_ggn(task, model, layout=layout,
                                                      block_size=block_size, progress=progress)
    if ekfac:  # the Newton step with the same Kronecker-factored blocks
        ggn[NEWTON_EKFAC], seconds["ggn_ekfac"] = fit_ggn(
            task, model, layout=layout, block_size=block_size, curvature="ekfac_ggn",
            progress=progress)
    memory.update({name: {"bytes": inv.nbytes, "dense_bytes": inv.layout.numel *
                          torch.finfo(task.dtype).bits // 8,
                          "dual_blocks": inv.representation.count("dual")}
                   for name, inv in ggn.items()})
    return ggn


def _settings(data: str, model: str, methods, quick: bool) -> dict:
    """The data set's settings for ``model`` (checked), with the quick ones over them."""
    if data not in SETTINGS:
        raise ValueError(f"the non-convex experiment runs on {' or '.join(SETTINGS)}, not {data}")
    if model not in ("resnet", "resnet20"):
        raise ValueError(f"model must be 'resnet' or 'resnet20', got {model!r}")
    unknown = [m for m in (methods or []) if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}: expected some of {list(METHODS)}")
    cfg = dict(SETTINGS[data])
    if model == "resnet20":
        cfg.update(RESNET20[data])
    if quick:
        cfg.update(QUICK)
    return cfg

def _choose_on_proxies(task, model, inverses, grids, removal, classes, proxy_class, *,
                       seed: int, progress: bool, max_accuracy_drop: float):
    """The paper's criterion on a proxy removal of each kind: argmin δ over each method's
    grid. A proxy where the original and its retrain make the same predictions on S scores
    δ = 0.5 for every model and chooses nothing: the next class down is taken instead."""
    proxies, chosen = {}, {}
    for setting, f in _FRACTIONS.items():
        skipped, first = [], None
        for cls in [k for k in range(proxy_class, -1, -1) if k not in classes]:
            rem = removal(class_removal(task.ds.y_train, cls, f, seed=seed + 1), cls)
            first = first or (rem, cls)
            if not _degenerate(rem):
                break
            skipped.append(cls)
        else:  # all degenerate: the first, marked as such in the results and the table
            (rem, cls), skipped = first, []
        curves = _curves(rem, inverses, grids, seed=seed, progress=progress)
        floor = rem.evaluate(model)["accuracy"]["D-S"] - max_accuracy_drop
        chosen[setting] = {name: grids[name][select(grids[name], c["rows"], "delta",
                                                    _guarded(c["rows"], floor))]
                           for name, c in curves.items()}
        proxies[setting] = {"k": rem.k, "class": cls, "degenerate_skipped": skipped,
                            "differing": rem.differing(),
                            "degenerate": _degenerate(rem),
                            "accuracy_floor": floor,
                            "delta": {name: [r["delta"] for r in c["rows"]]
                                      for name, c in curves.items()},
                            "accuracy_D-S": {name: [r["accuracy"]["D-S"] for r in c["rows"]]
                                             for name, c in curves.items()}}
    return proxies, chosen


def _run(rem, cls: int, model, inverses, grids, chosen: dict, ggn, *, seed: int, progress: bool,
         max_accuracy_drop: float) -> dict:
    """One removal: every method over its grid, at the proxy's ε and at the best one, and the
    Newton rows when a Gauss–Newton inverse is given."""
    curves = _curves(rem, inverses, grids, seed=seed, progress=progress)
    original, retrained = rem.evaluate(model), rem.evaluate(rem.retrained)
    floor = original["accuracy"]["D-S"] - max_accuracy_drop
    methods = {}
    for name, cv in curves.items():
        rows, grid = cv["rows"], grids[name]
        at = rows[nearest(grid, chosen[name])]
        best = select(grid, rows, "delta", _guarded(rows, floor))
        free = select(grid, rows, "delta")
        methods[name] = {
            "delta": [r["delta"] for r in rows],
            "accuracy": {s: [r["accuracy"][s] for r in rows] for s in SPLITS},
            "param_distance": [r["param_distance"] for r in rows],
            "chosen": at, "chosen_gap": _gap(at, retrained),
            "best": rows[best], "best_value": grid[best],
            "best_unguarded": rows[free], "best_unguarded_value": grid[free],
            "erase_seconds": cv["seconds"]}
    run = {"class": cls, "k": rem.k, "differing": rem.differing(),
           "removed": rem.removed.tolist(),
           "accuracy_floor": floor, "original": original, "retrained": retrained,
           "retrain_seconds": rem.retrain_seconds, "methods": methods}
    if ggn is not None:
        run["newton"] = newton_rows(rem, ggn[NEWTON])
        for name in (NEWTON_SMALL, NEWTON_EKFAC):
            if name in ggn:
                run["newton"][name] = newton_rows(rem, ggn[name], refine=False)[NEWTON]
        for row in run["newton"].values():
            row["gap"] = _gap(row, retrained)
    return run

def run(*, out: Path = Path(f"results/{NAME}"), seeds=None, **kwargs) -> str:
    """Runs the experiment (the options of :func:`compute`; ``seeds``: once per seed, each
    seed's results and their mean ± sd in one results file) and writes its results, table and
    figures to ``out``; returns the table."""
    return report(NAME, compute, table, figures, out, seeds=seeds, seeds_table=seeds_table,
                  **kwargs)

def _summary(settings: dict) -> dict:
    """Mean ± std over the removed classes, per setting and method, at the chosen value."""
    out = {}
    for setting, st in settings.items():
        runs = st["runs"]
        entry = {"k_mean": float(np.mean([r["k"] for r in runs])),
                 "retrain_seconds": summary([r["retrain_seconds"] for r in runs])}
        for ref in ("original", "retrained"):
            entry[ref] = {"delta": summary([r[ref]["delta"] for r in runs]),
                          **{f"acc_{sp}": summary([r[ref]["accuracy"][sp] for r in runs])
                             for sp in SPLITS}}
        for name in runs[0]["methods"]:
            ms = [r["methods"][name] for r in runs]
            entry[name] = {
                "delta_chosen": summary([m["chosen"]["delta"] for m in ms]),
                "delta_best": summary([m["best"]["delta"] for m in ms]),
                "delta_best_unguarded": summary([m["best_unguarded"]["delta"] for m in ms]),
                "acc_D-S_best_unguarded": summary([m["best_unguarded"]["accuracy"]["D-S"]
                                                   for m in ms]),
                "best_value_geomean": geomean([m["best_value"] for m in ms]),
                "param_distance_chosen": summary([m["chosen"]["param_distance"] for m in ms]),
                "erase_seconds": summary([m["erase_seconds"] for m in ms]),
                **{f"acc_{sp}": summary([m["chosen"]["accuracy"][sp] for m in ms])
                   for sp in SPLITS},
                **{f"gap_{sp}": summary([m["chosen_gap"][sp] for m in ms]) for sp in SPLITS}}
        for name in _newton_names(runs[0]):
            rs = [r["newton"][name] for r in runs]
            entry[name] = {"delta": summary([m["delta"] for m in rs]),
                           "param_distance": summary([m["param_distance"] for m in rs]),
                           "erase_seconds": summary([m["erase_seconds"] for m in rs]),
                           **{f"acc_{sp}": summary([m["accuracy"][sp] for m in rs])
                              for sp in SPLITS},
                           **{f"gap_{sp}": summary([m["gap"][sp] for m in rs])
                              for sp in SPLITS}}
        out[setting] = entry
    return out


def figures(r: dict, out: Path) -> list[Path]:
    c, res = r["config"], r["results"]
    data, grids, settings, chosen = c["data"], c["grids"], res["settings"], res["chosen"]
    tag = data if c.get("model", "resnet") == "resnet" else f"{data}_{c['model']}"

    def curves(name, key="delta", split=None):
        return {setting: [(run["methods"][name][key] if split is None
                           else run["methods"][name][key][split]) for run in st["runs"]]
                for setting, st in settings.items()}

    def with_accuracy(name):
        # δ alone hides a broken model (δ ≈ 0.5): show what each value costs on D∖S
        return {**{f"δ {k}": v for k, v in curves(name).items()},
                **{f"acc D∖S {k}": v for k, v in curves(name, "accuracy", "D-S").items()}}

    pngs = []
    ssse_names = [name for name in grids if name in _SSSE]
    if ssse_names:
        eps = grids[ssse_names[0]]
        pngs.append(plots.eps_panels(
            out / f"{tag}_ssse_delta.png", eps,
            {f"remove {setting} of a class": {name.removeprefix("SSSE "): [
                run["methods"][name]["delta"] for run in st["runs"]] for name in ssse_names}
             for setting, st in settings.items()},
            ylabel="δ on S (< 0.5: closer to retrained)", ncols=2,
            title=f"{data}: SSSE, per-sample vs mini-batch-10 Fisher (Fig. 5)"))
    for name, xlabel, fig in (("gradient ascent", "step size", "Fig. 6"),
                              ("Fisher forgetting", "α", "Fig. 7")):
        if name in grids:
            pngs.append(plots.eps_curves(
                out / f"{tag}_{name.replace(' ', '_').lower()}_delta.png", grids[name],
                with_accuracy(name), hline=0.5, xlabel=xlabel,
                ylabel="δ on S, accuracy on D∖S", title=f"{data}: {name} ({fig})"))
    if ssse_names:
        main = "SSSE per-sample ∇S" if "SSSE per-sample ∇S" in ssse_names else ssse_names[0]
        pngs.append(plots.eps_panels(
            out / f"{tag}_ssse_accuracy.png", eps,
            {sp: {**{f"{setting}": [run["methods"][main]["accuracy"][sp] for run in st["runs"]]
                     for setting, st in settings.items()},
                  **{f"{setting} retrained": [[run["retrained"]["accuracy"][sp]] * len(eps)
                                              for run in st["runs"]]
                     for setting, st in settings.items()}} for sp in SPLITS},
            ylabel="accuracy", vline=chosen["100%"][main],
            title=f"{data}: accuracy of {main} on the four splits (dashed: ε chosen for "
                  f"100 %)"))
    return pngs


def _degenerate(rem) -> bool:
    """Whether δ cannot tell the original from the retrained model on this removal."""
    return rem.evaluate(rem.original, params=False)["delta"] == 0.5 == \
        rem.evaluate(rem.retrained, params=False)["delta"]


def _proxy_text(res: dict) -> str:
    """Which proxy each setting used, and the degenerate ones skipped (or, for results written
    before the fallback existed, found degenerate: δ = 0.5 everywhere)."""
    parts = []
    for setting, p in res["proxies"].items():
        flat = [v for d in p["delta"].values() for v in d]
        if p.get("degenerate", flat and all(v == 0.5 for v in flat)):
            parts.append(f"{setting}: class {p['class']} is DEGENERATE (δ = 0.5 for every value "
                         "of every method: its retrain makes the original's predictions on S), "
                         "so its 'chosen' values are the first of each grid and mean nothing")
        elif p.get("degenerate_skipped"):
            parts.append(f"{setting}: class {p['class']} (classes {p['degenerate_skipped']} "
                         "skipped as degenerate: their retrain makes the original's predictions "
                         "on S)")
        else:
            parts.append(f"{setting}: class {p['class']}")
        if "differing" in p:
            parts[-1] += (f", original and retrained differ on {p['differing']} samples of S"
                          + (" (quantised)" if quantised(p["differing"]) else ""))
    return "; ".join(parts)


def table(r: dict) -> str:
    c, res = r["config"], r["results"]
    summ, chosen = res["summary"], res["chosen"]
    pm = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    header = ["removed", "method", "value (proxy)", "δ at value", "min δ (at)",
              "min δ unguarded (acc D-S)"] + \
        [f"acc {sp}" for sp in SPLITS] + ["erase s"]
    rows = []
    for setting, e in summ.items():
        for ref in ("original", "retrained"):
            rows.append([setting, ref, "-", pm(e[ref]["delta"]), "-", "-"]
                        + [pm(e[ref][f"acc_{sp}"]) for sp in SPLITS]
                        + ([f"retrain {e['retrain_seconds']['mean']:.2f}"]
                           if ref == "retrained" else ["-"]))
        for name, h in c["hyperparameters"].items():
            m = e[name]
            rows.append([setting, name, f"{h} = {chosen[setting][name]:.3g}",
                         pm(m["delta_chosen"]),
                         f"{pm(m['delta_best'])} ({m['best_value_geomean']:.2g})",
                         f"{pm(m['delta_best_unguarded'])} "
                         f"({m['acc_D-S_best_unguarded']['mean']:.2f})"]
                        + [pm(m[f"acc_{sp}"]) for sp in SPLITS]
                        + [f"{m['erase_seconds']['mean']:.3f}"])
        for name in [n for n in (NEWTON, REFINED, NEWTON_SMALL, NEWTON_EKFAC) if n in e]:
            m = e[name]
            rows.append([setting, name, "none", pm(m["delta"]), "-", "-"]
                        + [pm(m[f"acc_{sp}"]) for sp in SPLITS]
                        + [f"{m['erase_seconds']['mean']:.3f}"])
    k = ", ".join(f"{s}: k = {e['k_mean']:.0f}" for s, e in summ.items())
    t_fisher = res["fisher_seconds"]
    fits = ", ".join(f"{t:.2f} s ({name})" for name, t in t_fisher.items())
    memory = "; ".join(f"{name} inverse {m['bytes'] / 2**20:.1f} MiB ({m['dual_blocks']} dual "
                       f"blocks; dense blocks would take {m['dense_bytes'] / 2**20:.1f} MiB)"
                       for name, m in c.get("inverse_memory", {}).items())
    arch = "ResNet-20" if c.get("model") == "resnet20" else "SmallResNet"
    return (f"{c['data']}, n={c['n']}, n_test={c['n_test']}, {arch} "
            f"{c['spec']} (d={c['d']}), SGD {c['recipe']}, weight decay "
            f"{c['weight_decay']:g}; Fisher λ={c['damping']:g}, {c.get('layout', 'per_parameter')}"
            f" blocks of ≤ {c['max_block_size']} ({c['num_blocks']} blocks; {memory}), "
            f"per-sample and mini-batch "
            f"{c['minibatch']} gradients; removed classes {c['classes']} ({k}); each method's "
            f"value chosen by argmin δ on a proxy removal of the same kind "
            f"({_proxy_text(res)}) among the values that keep the accuracy on D∖S within "
            f"{c['max_accuracy_drop']:g} of the original's (min δ: the same on the removal "
            f"itself; unguarded: over the whole grid); accuracies at the chosen value; mean ± "
            f"std over classes. Training {res['train_seconds']:.2f} s, "
            f"Fisher fits {fits}"
            + (" (ggn: the Gauss-Newton inverse, damping = weight decay, for the rows without "
               f"tuning, blocks of ≤ {_blocks(c, NEWTON)}; ggn_small: the same on the inverse "
               f"Fishers' blocks, for '{NEWTON_SMALL}'"
               + (f"; ggn_ekfac: its EK-FAC on those blocks, for '{NEWTON_EKFAC}'"
                  if "ggn_ekfac" in res["fisher_seconds"] else "") + ")"
               if "ggn" in res["fisher_seconds"]
               else "") + ".\n\n"
            + markdown_table(header, rows) + "\n" + per_class_table(r))


def per_class_table(r: dict) -> str:
    """δ and accuracy on S and D∖S per removed class: the chosen value of each method with a
    hyperparameter, the rows without tuning, the retrained model."""
    res = r["results"]
    names = list(r["config"]["hyperparameters"])
    newton = _newton_names(res["settings"]["100%"]["runs"][0])
    header = ["removed", "class", "k", "differ (quantised)", "acc S / D∖S retrained"] + \
        [f"δ {n} (acc S / D∖S)" for n in names + newton]
    rows = []
    for setting, st in res["settings"].items():
        for run in st["runs"]:
            cells = [f"{run['methods'][n]['chosen']['delta']:.3f} "
                     f"({run['methods'][n]['chosen']['accuracy']['S']:.2f} / "
                     f"{run['methods'][n]['chosen']['accuracy']['D-S']:.2f})" for n in names]
            cells += [f"{run['newton'][n]['delta']:.3f} ({run['newton'][n]['accuracy']['S']:.2f}"
                      f" / {run['newton'][n]['accuracy']['D-S']:.2f})" for n in newton]
            diff = run.get("differing")
            rows.append([setting, run["class"], run["k"],
                         "?" if diff is None else f"{diff} ({'yes' if quantised(diff) else 'no'})",
                         f"{run['retrained']['accuracy']['S']:.2f} / "
                         f"{run['retrained']['accuracy']['D-S']:.2f}"] + cells)
    return ("Per removed class, at the proxy-chosen values (differ: samples of S on which the "
            "original and the retrained model predict differently; quantised when fewer than "
            f"{QUANTISED_BELOW}: δ then supports no claim):\n\n" + markdown_table(header, rows))


def _blocks(config: dict, name: str) -> str:
    return str(config.get("newton_blocks", {}).get(name, config["max_block_size"]))


def _newton_names(run: dict) -> list[str]:
    """The tuning-free rows a run has, in table order."""
    return [n for n in (NEWTON, REFINED, NEWTON_SMALL, NEWTON_EKFAC)
            if n in run.get("newton", {})]


def seeds_table(result: dict) -> str:
    """Per removal (setting and class) over the seeds: the differing counts, then δ (accuracy
    on S) of every method at its proxy-chosen value and of the tuning-free rows, as mean ± sd
    (number of seeds) over the seeds whose removal is not quantised."""
    per_seed = [r["results"]["settings"] for r in result["results"]["per_seed"]]
    run0 = per_seed[0]["100%"]["runs"][0]
    names = list(run0["methods"]) + _newton_names(run0)

    def row_of(run, name):
        return run["methods"][name]["chosen"] if name in run["methods"] else run["newton"][name]

    def pm(vals):
        return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else "-"

    rows = []
    for setting, st in per_seed[0].items():
        for i, first in enumerate(st["runs"]):
            runs = [s[setting]["runs"][i] for s in per_seed]
            kept = [r for r in runs if not quantised(r["differing"])]
            rows.append([setting, first["class"], f"{np.mean([r['k'] for r in runs]):.0f}",
                         "/".join(str(r["differing"]) for r in runs),
                         f"{len(runs) - len(kept)} of {len(runs)}", len(kept),
                         f"{pm([r['retrained']['accuracy']['S'] for r in kept])}"]
                        + [f"{pm([row_of(r, n)['delta'] for r in kept])} "
                           f"({pm([row_of(r, n)['accuracy']['S'] for r in kept])})"
                           for n in names])
    header = ["removed", "class", "k", "differ per seed", "quantised seeds", "seeds used",
              "acc S retrained"] + [f"δ {n} (acc S)" for n in names]
    return (f"Per removal over seeds: mean ± sd over the seeds whose removal is not quantised "
            f"(original and retrained differ on ≥ {QUANTISED_BELOW} samples of S); differ per "
            f"seed: those counts, in seed order.\n\n" + markdown_table(header, rows))
