"""``ssse demo``: train, fit the inverse Fisher, erase part of a class, retrain, compare."""

from __future__ import annotations

from pathlib import Path

import torch

import ssse
from ssse import plots
from ssse.baselines import influence_update
from ssse.data import class_removal
from ssse.io import write_json

from .common import eps_grid, markdown_table, timed, with_state
from .sweep import SPLITS, choose_eps, evaluate, prepare_removal, row_at, ssse_sweep
from .tasks import DEFAULTS, make_task, row_layout

__all__ = ["run_demo"]


def run_demo(*, data: str = "digits", data_dir=None, train_limit=None, remove_class: int = 3,
             fraction: float = 0.5, damping: float | None = None, eps=None, seed: int = 0,
             device="cpu", dtype=torch.float64, out=None, progress: bool = True) -> dict:
    """Runs the demo; returns ``{"text": the printed report, "results": numbers}``."""
    say = print if progress else (lambda *a, **k: None)
    task = make_task(data, seed=seed, train_limit=train_limit, data_dir=data_dir, device=device,
                     dtype=dtype, test_limit=2000)
    if task.ds.task != "multiclass":
        raise ValueError(f"the demo needs a multiclass data set, not {data}")
    if not 0 <= remove_class < task.ds.num_classes:
        raise ValueError(f"--remove-class must be in 0..{task.ds.num_classes - 1}")
    damping = damping or DEFAULTS.get(data, {}).get("damping", 1e-3)
    grid = eps_grid(*(eps or (0.01, 100.0, 21)))

    say(f"[1/5] training an L2 logistic regression on {data} (n={task.n}) ...")
    model, t_train = timed(task.train, task.data(), seed=seed)
    say(f"[2/5] fitting the inverse Fisher (λ={damping:g}, one block per class row) ...")
    inv, t_fisher = timed(ssse.fit_inverse_fisher, model, task.loss_fn, task.data(),
                          damping=damping, layout=row_layout(model),
                          weight_decay=task.weight_decay, progress=progress)

    proxy_class = (remove_class + task.ds.num_classes // 2) % task.ds.num_classes
    say(f"[3/5] choosing ε on a proxy removal ({fraction:.0%} of class {proxy_class}) ...")
    proxy = prepare_removal(task, model, class_removal(task.ds.y_train, proxy_class, fraction,
                                                       seed=seed + 1),
                            classes=[proxy_class], seed=seed)
    eps_star = choose_eps(ssse_sweep(task, proxy, inv, grid), "delta")

    say(f"[4/5] erasing {fraction:.0%} of class {remove_class} and retraining without it ...")
    removed = class_removal(task.ds.y_train, remove_class, fraction, seed=seed)
    rem = prepare_removal(task, model, removed, classes=[remove_class], seed=seed)
    sweep = ssse_sweep(task, rem, inv, grid)
    state, t_erase = timed(ssse.ssse_update, model, inv, task.data(removed), task.loss_fn,
                           epsilon=eps_star, n_total=task.n, weight_decay=task.weight_decay)
    erased = with_state(model, state)
    say("[5/5] comparing with the influence update ...")
    infl, t_infl = timed(influence_update, model, task.loss_fn, task.data(removed),
                         task.retained(removed), weight_decay=task.weight_decay)

    rows = {"original": evaluate(model, rem, task), "retrained": evaluate(rem.retrained, rem, task),
            f"SSSE ε={eps_star:.3g}": evaluate(erased, rem, task),
            "influence (H of D∖S)": evaluate(with_state(model, infl), rem, task)}
    best_eps = choose_eps(sweep, "delta")
    header = ["model", "δ on S", "param dist"] + [f"acc {s}" for s in SPLITS]
    table = markdown_table(header, [[name, r["delta"], r["param_distance"]]
                                     + [r["accuracy"][s] for s in SPLITS]
                                     for name, r in rows.items()])
    shown = [e for i, e in enumerate(grid) if i % max(1, len(grid) // 7) == 0]
    sweep_table = markdown_table(["ε", "δ on S", "acc S", "acc Ta", "acc D-S"],
                                 [[e, row_at(sweep, e)["delta"],
                                   row_at(sweep, e)["accuracy"]["S"],
                                   row_at(sweep, e)["accuracy"]["Ta"],
                                   row_at(sweep, e)["accuracy"]["D-S"]] for e in shown])
    ours = rows[f"SSSE ε={eps_star:.3g}"]
    ok = ours["delta"] < 0.5
    gaps = {s: abs(ours["accuracy"][s] - rows["retrained"]["accuracy"][s]) for s in SPLITS}
    speed = rem.retrain_seconds / t_erase if t_erase > 0 else float("inf")
    verdict = [
        f"removed k={rem.k} of n={task.n} training samples ({fraction:.0%} of class "
        f"{remove_class}); ε={eps_star:.3g} chosen on a proxy removal of class {proxy_class} "
        f"(the best ε on this removal would be {best_eps:.3g})",
        f"VERDICT: {'PASS' if ok else 'FAIL'}: the erased model is "
        f"{'closer to the retrained model than to the original' if ok else 'not closer to the retrained model'}"
        f" (δ={ours['delta']:.3f}, < 0.5 means closer to retrained)",
        "accuracy gap to the retrained model: " + ", ".join(f"{s} {g:.3f}" for s, g in gaps.items()),
        f"time: erasure {t_erase:.3f} s vs retraining {rem.retrain_seconds:.2f} s "
        f"({speed:.0f}x faster; the one-off inverse Fisher took {t_fisher:.2f} s, "
        f"the influence update {t_infl:.2f} s)",
    ]
    text = (f"\nSSSE demo on {data}: erase {fraction:.0%} of class {remove_class}\n\n" + table
            + "\nε sweep (SSSE):\n\n" + sweep_table + "\n" + "\n".join(verdict) + "\n")
    results = {"data": data, "n": task.n, "k": rem.k, "remove_class": remove_class,
               "fraction": fraction, "damping": damping, "eps_chosen": eps_star,
               "eps_best": best_eps, "models": rows, "eps": grid, "sweep": sweep["rows"],
               "seconds": {"train": t_train, "fisher": t_fisher, "erase": t_erase,
                           "retrain": rem.retrain_seconds, "influence": t_infl},
               "pass": ok}
    if out is not None:
        out = Path(out)
        write_json(out / "demo.json", results)
        plots.eps_curves(out / "demo_delta.png", grid, {"SSSE": [r["delta"] for r in sweep["rows"]]},
                         ylabel="δ on S (< 0.5: closer to retrained)", hline=0.5, vline=eps_star,
                         constants={"influence": rows["influence (H of D∖S)"]["delta"]})
        text += f"wrote {out / 'demo.json'} and {out / 'demo_delta.png'}\n"
    return {"text": text, "results": results}
