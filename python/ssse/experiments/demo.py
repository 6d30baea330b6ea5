"""``ssse demo``: train, fit the inverse Fisher, erase part of a class, retrain, compare."""

from __future__ import annotations

from pathlib import Path

import torch

import ssse
from ssse import plots
from ssse.data import class_removal
from ssse.io import write_json

from .common import EPS_GRID, eps_grid, markdown_table, nearest, timed
from .methods import select, ssse_curve
from .removal import SPLITS, make_removal
from .tasks import DEFAULTS, make_task

__all__ = ["run_demo"]

_SSSE = "SSSE ε={:.3g}"
_INFLUENCE = "influence (H of D∖S)"


def compute(*, data: str = "digits", data_dir=None, train_limit=None, remove_class: int = 3,
            fraction: float = 0.5, damping: float | None = None, eps=None, seed: int = 0,
            device="cpu", dtype=torch.float64, progress: bool = True) -> dict:
    """Train, fit, choose ε on a proxy removal, erase, retrain, compare: the demo's numbers."""
    say = print if progress else (lambda *a, **k: None)
    task = make_task(data, seed=seed, train_limit=train_limit, data_dir=data_dir, device=device,
                     dtype=dtype, test_limit=2000)
    if task.ds.task != "multiclass":
        raise ValueError(f"the demo needs a multiclass data set, not {data}")
    if not 0 <= remove_class < task.ds.num_classes:
        raise ValueError(f"--remove-class must be in 0..{task.ds.num_classes - 1}")
    damping = damping or DEFAULTS.get(data, {}).get("damping", 1e-3)
    grid = eps_grid(*(eps or EPS_GRID))

    say(f"[1/5] training an L2 logistic regression on {data} (n={task.n}) ...")
    model, t_train = timed(task.train, task.data(), seed=seed)
    say(f"[2/5] fitting the inverse Fisher (λ={damping:g}, one block per class row) ...")
    inv, t_fisher = timed(ssse.fit_inverse_fisher, model, task.loss_fn, task.data(),
                          damping=damping, layout="rows", weight_decay=task.weight_decay,
                          progress=progress)

    proxy_class = (remove_class + task.ds.num_classes // 2) % task.ds.num_classes
    say(f"[3/5] choosing ε on a proxy removal ({fraction:.0%} of class {proxy_class}) ...")
    proxy = make_removal(task, model, class_removal(task.ds.y_train, proxy_class, fraction,
                                                    seed=seed + 1),
                         classes=[proxy_class], seed=seed)
    eps_star = grid[select(grid, ssse_curve(proxy, inv, grid)["rows"], "delta")]

    say(f"[4/5] erasing {fraction:.0%} of class {remove_class} and retraining without it ...")
    removed = class_removal(task.ds.y_train, remove_class, fraction, seed=seed)
    rem = make_removal(task, model, removed, classes=[remove_class], seed=seed)
    sweep = ssse_curve(rem, inv, grid)
    state, t_erase = timed(ssse.ssse_update, model, task.loss_fn, task.data(removed),
                           inv_fisher=inv, epsilon=eps_star, n_total=task.n,
                           weight_decay=task.weight_decay)
    models = {"original": rem.evaluate(model), "retrained": rem.evaluate(rem.retrained),
              _SSSE.format(eps_star): rem.evaluate(state)}
    say("[5/5] comparing with the influence update ...")
    infl, t_infl = timed(ssse.influence_update, model, task.loss_fn, task.data(removed),
                         retained=task.retained(removed), weight_decay=task.weight_decay)
    models[_INFLUENCE] = rem.evaluate(infl)
    ours = models[_SSSE.format(eps_star)]
    return {"data": data, "n": task.n, "k": rem.k, "remove_class": remove_class,
            "fraction": fraction, "damping": damping, "proxy_class": proxy_class,
            "eps_chosen": eps_star, "eps_best": grid[select(grid, sweep["rows"], "delta")],
            "models": models, "eps": grid, "sweep": sweep["rows"],
            "seconds": {"train": t_train, "fisher": t_fisher, "erase": t_erase,
                        "retrain": rem.retrain_seconds, "influence": t_infl},
            "pass": ours["delta"] < 0.5}


def report(r: dict) -> str:
    """The printed report: the models' table, the sweep and the verdict."""
    rows, eps_star = r["models"], r["eps_chosen"]
    header = ["model", "δ on S", "param dist"] + [f"acc {s}" for s in SPLITS]
    table = markdown_table(header, [[name, m["delta"], m["param_distance"]]
                                     + [m["accuracy"][s] for s in SPLITS]
                                     for name, m in rows.items()])
    grid = r["eps"]
    shown = [e for i, e in enumerate(grid) if i % max(1, len(grid) // 7) == 0]
    at = {e: r["sweep"][nearest(grid, e)] for e in shown}
    sweep_table = markdown_table(["ε", "δ on S", "acc S", "acc Ta", "acc D-S"],
                                 [[e, at[e]["delta"], at[e]["accuracy"]["S"],
                                   at[e]["accuracy"]["Ta"], at[e]["accuracy"]["D-S"]]
                                  for e in shown])
    ours, sec = rows[_SSSE.format(eps_star)], r["seconds"]
    gaps = {s: abs(ours["accuracy"][s] - rows["retrained"]["accuracy"][s]) for s in SPLITS}
    speed = sec["retrain"] / sec["erase"] if sec["erase"] > 0 else float("inf")
    closer = ("closer to the retrained model than to the original" if r["pass"]
              else "not closer to the retrained model")
    verdict = [
        f"removed k={r['k']} of n={r['n']} training samples ({r['fraction']:.0%} of class "
        f"{r['remove_class']}); ε={eps_star:.3g} chosen on a proxy removal of class "
        f"{r['proxy_class']} (the best ε on this removal would be {r['eps_best']:.3g})",
        f"VERDICT: {'PASS' if r['pass'] else 'FAIL'}: the erased model is {closer}"
        f" (δ={ours['delta']:.3f}, < 0.5 means closer to retrained)",
        "accuracy gap to the retrained model: " + ", ".join(f"{s} {g:.3f}" for s, g in gaps.items()),
        f"time: erasure {sec['erase']:.3f} s vs retraining {sec['retrain']:.2f} s "
        f"({speed:.0f}x faster; the one-off inverse Fisher took {sec['fisher']:.2f} s, "
        f"the influence update {sec['influence']:.2f} s)",
    ]
    return (f"\nSSSE demo on {r['data']}: erase {r['fraction']:.0%} of class "
            f"{r['remove_class']}\n\n" + table + "\nε sweep (SSSE):\n\n" + sweep_table + "\n"
            + "\n".join(verdict) + "\n")


def run_demo(*, out=None, **kwargs) -> dict:
    """Runs the demo (arguments of :func:`compute`); writes ``demo.json`` and ``demo_delta.png``
    to ``out`` when given. Returns ``{"text": the printed report, "results": numbers}``."""
    results = compute(**kwargs)
    text = report(results)
    if out is not None:
        out = Path(out)
        write_json(out / "demo.json", results)
        plots.eps_curves(out / "demo_delta.png", results["eps"],
                         {"SSSE": [r["delta"] for r in results["sweep"]]},
                         ylabel="δ on S (< 0.5: closer to retrained)", hline=0.5,
                         vline=results["eps_chosen"],
                         constants={"influence": results["models"][_INFLUENCE]["delta"]})
        text += f"wrote {out / 'demo.json'} and {out / 'demo_delta.png'}\n"
    return {"text": text, "results": results}
