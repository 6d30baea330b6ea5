"""The forgetting test on digits (L2 logistic regression) and Fashion-MNIST (the non-convex
experiment's small ResNet): can a per-example likelihood-ratio attack (U-LiRA) tell the models
an erasure method produces from models retrained without the erased samples?

L2 logistic regression trained to its optimum is deterministic, so there the randomness the
attack has to see through is the data's, as in LiRA: each of ``R`` draws trains on the removal
set S plus a random half of the other training samples. The CNN's SGD adds the training's own
randomness: each draw trains its original, retrained and control models with seeds of their
own that vary with the draw (:func:`train_seeds`), as LiRA trains its shadow models. Per
draw: the original model, each method's erasure of S from it, the model retrained on the draw
without S (the reference family), and a control, retrained without S on an independent draw
(a family the attack cannot tell apart: it measures the test's floor). The statistic is the
logit-scaled confidence of the true class on S (:func:`ssse.metrics.forgetting_quality`).

The methods' hyperparameters (SSSE's ε, gradient ascent's step, Fisher forgetting's noise α)
are chosen once as the other experiments choose them, by argmin δ on a proxy removal (half of
class 9, on its own draw, with its own retrain) among the values that keep the accuracy on
D∖S within 5 points of the original's; the Newton step and the influence update have none.
The CNN uses the non-convex experiment's settings: its inverse Fisher blocks (per parameter
tensor, at most 256), its Gauss–Newton inverse for the Newton step (the largest blocks that
fit); the influence update's exact Hessian of all d parameters is out of reach there (its
measured cost is recorded with the results) and that row is left out.

Run: ``python -m ssse.experiments.forgetting [--data digits|fashion-mnist] [--quick]
[--models R] [--out DIR] [--note TEXT]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import ssse  # noqa: E402
from ssse import metrics  # noqa: E402
from ssse.data import class_removal  # noqa: E402
from ssse.forgetting import DEFAULT_FPRS  # noqa: E402
from ssse.io import atomic_path  # noqa: E402

from .common import EPS_GRID, eps_grid, markdown_table, report  # noqa: E402
from .methods import NEWTON, NEWTON_EKFAC, curve, fit_ggn, select  # noqa: E402
from .removal import make_removal, outputs  # noqa: E402
from . import nonconvex  # noqa: E402
from .tasks import DEFAULTS, make_task  # noqa: E402

NAME = "forgetting"
#: The data sets and the model each uses: L2 logistic regression on digits, the non-convex
#: experiment's small ResNet on Fashion-MNIST.
DATA = {"digits": "linear", "fashion-mnist": "resnet"}

#: The tuned methods: hyperparameter name and grid ``(lo, hi, num)`` (the non-convex
#: experiment's grids for gradient ascent and Fisher forgetting).
SSSE_EKFAC = "SSSE EK-FAC"
GRIDS = {"SSSE": ("ε", EPS_GRID), SSSE_EKFAC: ("ε", EPS_GRID),
         "gradient ascent": ("lr", (1e-3, 1e2, 31)),
         "Fisher forgetting": ("α", (1e-8, 1e-2, 25))}
ORIGINAL, CONTROL, INFLUENCE = "original (no erasure)", "retrained (control)", "influence"
#: The rows of the tables, in order (the CNN's lack :data:`INFLUENCE`).
ROWS = (ORIGINAL, "SSSE", SSSE_EKFAC, NEWTON, NEWTON_EKFAC, INFLUENCE, "Fisher forgetting",
        "gradient ascent", CONTROL)
#: The rows always run; ``methods=["SSSE EK-FAC"]`` adds the EK-FAC rows (the CNN only: SSSE
#: with the EK-FAC inverse of the same blocks, the Newton step with their Gauss–Newton EK-FAC).
DEFAULT_METHODS = ("SSSE", NEWTON, INFLUENCE, "Fisher forgetting", "gradient ascent")
EKFAC_ROWS = (SSSE_EKFAC, NEWTON_EKFAC)
#: The removals: half of one class (the paper's kind), and as many random samples.
REMOVED_CLASS, PROXY_CLASS, FRACTION = 3, 9, 0.5
#: The share of the samples outside the removal sets that each draw trains on (LiRA's half).
KEEP = 0.5
MAX_ACCURACY_DROP = 0.05
#: The digits subsets of the ``--quick`` setting (the CNN's are the non-convex experiment's).
QUICK_LIMITS = {"train_limit": 400, "test_limit": 300}
#: The inverse Fisher's blocks: one per output row for the linear model, the non-convex
#: experiment's for the CNN (per parameter tensor, at most 256).
INVERSE = {"linear": {"layout": "rows"},
           "resnet": {"layout": "per_parameter", "block_size": 256}}
#: The CNN's Fisher damping (the non-convex experiment's default).
CNN_DAMPING = 1e-3
#: Draws R per family when none is given.
DEFAULT_MODELS = {"digits": 64, "fashion-mnist": 46}
#: Retained samples of the CNN's timed influence update (what its exact Hessian costs).
HESSIAN_PROBE = 8


def make(data: str, *, quick: bool, seed: int, device, dtype, data_dir) -> tuple:
    """The task of data set ``data`` and its size settings (recorded with the results)."""
    if data not in DATA:
        raise ValueError(f"the forgetting experiment runs on {' or '.join(DATA)}, not {data}")
    if DATA[data] == "linear":
        limits = dict(QUICK_LIMITS) if quick else {}
        return make_task(data, data_dir=data_dir, seed=seed, device=device, dtype=dtype,
                         **limits), limits
    cfg = {**nonconvex.SETTINGS[data], **(nonconvex.QUICK if quick else {})}
    return make_task(data, model=DATA[data], data_dir=data_dir, seed=seed, device=device,
                     dtype=dtype, **cfg), cfg


def _arch(task) -> str:
    return "linear" if task.spec["arch"] == "linear" else "resnet"


def train_seeds(task, seed: int, r: int) -> dict:
    """The training seeds of draw ``r``'s original, retrained and control models: ``seed`` for
    all with a deterministic recipe (L-BFGS to the optimum), and with SGD one of their own per
    model that varies with ``r``."""
    roles = ("original", "retrained", "control")
    if task.recipe["optimizer"] != "sgd":
        return dict.fromkeys(roles, seed)
    return {role: seed + 20_000 + 10_000 * i + r for i, role in enumerate(roles)}


def _draw(task, must: torch.Tensor, seed: int):
    """The task restricted to ``must`` plus a random half of the other training samples, and
    the sorted training indices it holds."""
    g = torch.Generator().manual_seed(seed)
    rest = torch.ones(task.n, dtype=torch.bool)
    rest[must] = False
    others = torch.nonzero(rest).flatten()
    kept = others[torch.randperm(others.numel(), generator=g)[:int(KEEP * others.numel())]]
    idx = torch.sort(torch.cat([must, kept])).values
    ds = dataclasses.replace(task.ds, x_train=task.ds.x_train[idx], y_train=task.ds.y_train[idx])
    return dataclasses.replace(task, ds=ds), idx


def _positions(idx: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Where the training indices ``samples`` sit in the draw ``idx``."""
    return torch.searchsorted(idx, samples)


def _unit_states(task, model, invs: dict, removed, *, seed: int) -> dict:
    """Each tuned method's model at hyperparameter 1 (its grid scales it); ``invs``: the
    inverse of each SSSE row run."""
    wd, data = task.weight_decay, task.data(removed)
    out = {name: ssse.ssse_update(model, task.loss_fn, data, inv_fisher=inv, epsilon=1.0,
                                  n_total=task.n, weight_decay=wd)
           for name, inv in invs.items()}
    out["gradient ascent"] = ssse.gradient_ascent(model, task.loss_fn, data, lr=1.0,
                                                  weight_decay=wd)
    out["Fisher forgetting"] = ssse.fisher_forgetting(model, task.loss_fn, data,
                                                      retained=task.retained(removed),
                                                      alpha=1.0, seed=seed)
    return out


def _scale(name: str, value: float) -> float:
    # Fisher forgetting's noise has variance α (standard deviation √α); the others are linear.
    return math.sqrt(value) if name == "Fisher forgetting" else value


def _fit(task, *, seed: int, damping: float, ekfac: bool = False):
    """The model trained on ``task`` and the inverse of each SSSE row (with ``ekfac``, the
    EK-FAC inverse of the same blocks too)."""
    model = task.train(task.data(), seed=seed)
    invs = {}
    for name, curvature in (("SSSE", "empirical"), (SSSE_EKFAC, "ekfac"))[:1 + ekfac]:
        invs[name] = ssse.fit_inverse_fisher(model, task.loss_fn, task.data(), damping=damping,
                                             weight_decay=task.weight_decay, progress=False,
                                             curvature=curvature, **INVERSE[_arch(task)])
    return model, invs


def choose(task, *, seed: int, damping: float, grids: dict, ekfac: bool = False) -> dict:
    """The proxy's choice of each tuned method's hyperparameter, with its δ curve."""
    proxy_task, _ = _draw(task, torch.zeros(0, dtype=torch.long), seed + 10_000)
    model, invs = _fit(proxy_task, seed=seed, damping=damping, ekfac=ekfac)
    removed = class_removal(proxy_task.ds.y_train, PROXY_CLASS, FRACTION, seed=seed + 1)
    rem = make_removal(proxy_task, model, removed, classes=[PROXY_CLASS], seed=seed)
    floor = rem.evaluate(model)["accuracy"]["D-S"] - MAX_ACCURACY_DROP
    out = {}
    for name, unit in _unit_states(proxy_task, model, invs, removed, seed=seed).items():
        grid = grids[name]
        rows = curve(rem, unit, [_scale(name, v) for v in grid])
        allowed = [i for i, r in enumerate(rows) if r["accuracy"]["D-S"] >= floor] or None
        best = select(grid, rows, "delta", allowed)
        out[name] = {"value": grid[best], "delta": rows[best]["delta"],
                     "curve": [r["delta"] for r in rows],
                     "accuracy_D-S": [r["accuracy"]["D-S"] for r in rows]}
    return {"k": rem.k, "class": PROXY_CLASS, "accuracy_floor": floor, "methods": out}


def _erasures(task, model, invs: dict, ggns: dict, removed, chosen: dict, *,
              seed: int) -> dict:
    """Every method's erasure of ``removed`` (positions in the draw) from ``model``
    (``ggns``: the Gauss–Newton inverse of each Newton row)."""
    wd, data = task.weight_decay, task.data(removed)
    units = _unit_states(task, model, invs, removed, seed=seed)
    star = model.state_dict()
    states = {name: {k: star[k] + _scale(name, chosen[name]) * (units[name][k] - star[k])
                     if star[k].is_floating_point() else star[k] for k in star}
              for name in units}
    for name, ggn in ggns.items():
        states[name] = ssse.newton_erase(model, task.loss_fn, data, inv_fisher=ggn,
                                         n_total=task.n, weight_decay=wd,
                                         likelihood=task.likelihood)
    if _arch(task) == "linear":  # the exact Hessian of the CNN is out of reach
        states[INFLUENCE] = ssse.influence_update(model, task.loss_fn, data,
                                                  retained=task.retained(removed),
                                                  weight_decay=wd)
    return states


def _influence_probe(task, model, removed) -> dict:
    """The wall time of the influence update (its exact Hessian of all d parameters) over
    :data:`HESSIAN_PROBE` retained samples, and the retained samples of a full erasure."""
    keep = torch.ones(task.n, dtype=torch.bool)
    keep[removed] = False
    retained = torch.nonzero(keep).flatten()
    t0 = time.perf_counter()
    ssse.influence_update(model, task.loss_fn, task.data(removed[:1]),
                          retained=task.data(retained[:HESSIAN_PROBE]),
                          weight_decay=task.weight_decay)
    return {"samples": HESSIAN_PROBE, "seconds": time.perf_counter() - t0,
            "retained": int(retained.numel())}


def _logits(model, state, data) -> np.ndarray:
    if state is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(state)
    return outputs(model.eval(), data).numpy()


def _one_draw(task, settings: dict, chosen: dict, r: int, *, seed: int, damping: float,
              probe: bool = False, ekfac: bool = False) -> dict:
    """Draw ``r``: per setting, the logits on S and the test accuracy of every row's model;
    with ``probe``, the influence update's timing (:func:`_influence_probe`); with ``ekfac``,
    the EK-FAC rows too."""
    must = torch.unique(torch.cat(list(settings.values())))
    sub, idx = _draw(task, must, seed + r)
    control, cidx = _draw(task, must, seed + 5_000 + r)
    seeds = train_seeds(task, seed, r)
    model, invs = _fit(sub, seed=seeds["original"], damping=damping, ekfac=ekfac)
    ggns = {NEWTON: fit_ggn(sub, model)[0]}
    if ekfac:  # the Gauss-Newton EK-FAC of the SSSE inverse's blocks
        ggns[NEWTON_EKFAC] = fit_ggn(sub, model, curvature="ekfac_ggn",
                                     **INVERSE[_arch(task)])[0]
    test = task.ds.test()
    out = {"settings": {}, "newton_block": ggns[NEWTON].layout.max_block_size}
    for setting, removed in settings.items():
        at, data = _positions(idx, removed), task.data(removed)
        models = {ORIGINAL: (model, None)}
        for name, state in _erasures(sub, model, invs, ggns, at, chosen,
                                     seed=seed + r).items():
            models[name] = (model, state)
        models["retrained"] = (sub.train(sub.retained(at), seed=seeds["retrained"]), None)
        models[CONTROL] = (control.train(control.retained(_positions(cidx, removed)),
                                         seed=seeds["control"]), None)
        logits = {name: _logits(m, s, data) for name, (m, s) in models.items()}
        acc = {name: metrics.accuracy(torch.from_numpy(_logits(m, s, test)), test[1])
               for name, (m, s) in models.items()}
        out["settings"][setting] = {"logits": logits, "test_accuracy": acc}
        if probe and "influence_probe" not in out:
            out["influence_probe"] = _influence_probe(sub, model, at)
    return out


def _settings(task, seed: int) -> dict:
    """The removal sets (training indices): half of one class, and as many random samples of
    the other classes."""
    part = class_removal(task.ds.y_train, REMOVED_CLASS, FRACTION, seed=seed)
    g = torch.Generator().manual_seed(seed + 2)
    pool = torch.nonzero(task.ds.y_train != REMOVED_CLASS).flatten()
    rand = torch.sort(pool[torch.randperm(pool.numel(), generator=g)[:part.numel()]]).values
    return {f"{int(FRACTION * 100)}% of class {REMOVED_CLASS}": part,
            f"{part.numel()} random samples": rand}


def compute(*, quick: bool = False, seed: int = 0, device="cpu", dtype=None,
            progress: bool = True, data: str | None = None, data_dir=None,
            repeats: int | None = None, note: str | None = None, methods=None) -> dict:
    """The experiment's numbers; ``repeats``: the number of draws R (models per family);
    ``note``: recorded with the results (how R was chosen, say); ``methods``: with
    ``"SSSE EK-FAC"``, the EK-FAC rows as well (:func:`_wants_ekfac`)."""
    data = data or "digits"
    ekfac = _wants_ekfac(methods, DATA.get(data, "resnet"))
    task, limits = make(data, quick=quick, seed=seed, device=device, dtype=dtype,
                        data_dir=data_dir)
    models = repeats or (3 if quick else DEFAULT_MODELS[data])
    if models < 3:
        raise ValueError(f"repeats must be at least 3 (models per family), got {models}")
    arch = _arch(task)
    damping = DEFAULTS[data]["damping"] if arch == "linear" else CNN_DAMPING
    grids = {name: eps_grid(lo, hi, 7 if quick else num)
             for name, (_, (lo, hi, num)) in GRIDS.items() if ekfac or name != SSSE_EKFAC}
    t0 = time.perf_counter()
    proxy = choose(task, seed=seed, damping=damping, grids=grids, ekfac=ekfac)
    chosen = {name: m["value"] for name, m in proxy["methods"].items()}
    settings = _settings(task, seed)
    draws = []
    for r in range(models):
        draws.append(_one_draw(task, settings, chosen, r, seed=seed, damping=damping,
                               probe=r == 0 and arch != "linear" and not quick, ekfac=ekfac))
        if progress:
            print(f"draw {r + 1}/{models}: {time.perf_counter() - t0:.0f} s", flush=True)
    results = {"chosen": chosen, "proxy": proxy,
               "settings": {s: _attack(draws, s, task.ds.y_train[removed].numpy())
                            for s, removed in settings.items()},
               "seconds": time.perf_counter() - t0}
    config = {"data": data, "quick": quick, "seed": seed, "models": models, "n": task.n,
              "n_test": int(task.ds.y_test.numel()), "keep": KEEP, "damping": damping,
              "weight_decay": task.weight_decay, "grids": grids,
              "hyperparameters": {name: h for name, (h, _) in GRIDS.items() if name in grids},
              "removed": {s: r.tolist() for s, r in settings.items()},
              "fprs": list(DEFAULT_FPRS), "delta": 0.01,
              "statistic": "logit-scaled confidence of the true class", **limits,
              **_task_config(task, draws, seed)}
    if note:
        config["note"] = note
    return {"config": config, "results": results}


def _wants_ekfac(methods, arch: str) -> bool:
    """Whether ``methods`` asks for the EK-FAC rows: ``["SSSE EK-FAC"]`` adds SSSE with the
    EK-FAC inverse of the same blocks and the Newton step with their Gauss–Newton EK-FAC (the
    CNN only). The other rows always run (a draw trains every model they need anyway), so no
    other name is taken."""
    if methods is None:
        return False
    other = [m for m in methods if m != SSSE_EKFAC]
    if other:
        raise ValueError(f"methods: {other[0]!r} is not a row to add: the forgetting test runs "
                         f"its own rows always, and adds only {SSSE_EKFAC!r}")
    if SSSE_EKFAC in methods and arch == "linear":
        raise ValueError("methods: the EK-FAC rows need the CNN (data='fashion-mnist'): the "
                         "logistic regression's inverse is one exact block already")
    return SSSE_EKFAC in methods


def _task_config(task, draws: list, seed: int) -> dict:
    """What the results record of the model: its architecture, training, inverse Fisher and
    Newton blocks, training seeds, and the rows left out (with why)."""
    arch = _arch(task)
    d = sum(p.numel() for p in task.new_model().parameters())
    out = {"model": arch, "spec": task.spec, "recipe": task.recipe, "d": d,
           "inverse": INVERSE[arch], "newton_block": draws[0]["newton_block"],
           "train_seeds": ("the same seed for every model (L-BFGS to the optimum)"
                           if task.recipe["optimizer"] != "sgd" else
                           f"draw r trains its original with seed {seed} + 20000 + r, its "
                           f"retrained models with {seed} + 30000 + r, its controls with "
                           f"{seed} + 40000 + r")}
    if arch != "linear":
        p = draws[0].get("influence_probe")
        why = ("the exact Hessian of all d = {d} parameters (torch.func, float64) is out of "
               "reach on a CPU".format(d=d))
        if p:
            hours = p["seconds"] * p["retained"] / p["samples"] / 3600
            why += (f": the influence update over {p['samples']} retained samples took "
                    f"{p['seconds']:.0f} s, so about {hours:.1f} h per erasure over a draw's "
                    f"{p['retained']} retained samples (linear in the samples), twice per draw")
        out["omitted"] = {INFLUENCE: why}
        out["influence_probe"] = p
    return out


def _attack(draws: list, setting: str, labels: np.ndarray) -> dict:
    """The forgetting test of every row against the retrained family."""
    stack = {name: np.stack([d["settings"][setting]["logits"][name] for d in draws])
             for name in draws[0]["settings"][setting]["logits"]}
    out = {}
    for name in [n for n in ROWS if n in stack]:
        q = metrics.forgetting_quality(stack["retrained"], stack[name], labels)
        v = metrics.forgetting_quality(stack["retrained"], stack[name], labels,
                                       variance="per_sample")
        acc_s = float(np.mean(stack[name].argmax(-1) == labels))
        out[name] = {"tpr_at_fpr": {str(f): v for f, v in q["tpr_at_fpr"].items()},
                     "auc": q["auc"], "epsilon": q["epsilon"],
                     "forget_score": q["forget_score"],
                     "per_sample_epsilon_median": float(np.median(q["per_sample_epsilon"])),
                     "accuracy_S": acc_s,
                     "test_accuracy": float(np.mean([d["settings"][setting]["test_accuracy"]
                                                     [name] for d in draws])),
                     "decisions": q["decisions"],
                     "per_sample_variance": {"tpr_at_fpr": {str(f): t for f, t in
                                                            v["tpr_at_fpr"].items()},
                                             "auc": v["auc"], "epsilon": v["epsilon"]}}
    return {"k": int(labels.size), "rows": out}


def table(r: dict) -> str:
    c, res = r["config"], r["results"]
    chosen = res["chosen"]
    label = {name: f"{name} ({GRIDS[name][0]}={chosen[name]:.3g})" for name in chosen}
    header = ["model", "TPR @ FPR 0.01", "TPR @ 0.05", "TPR @ 0.1", "AUC", "ε (δ=0.01)",
              "F (challenge)", "median per-sample ε", "acc S", "acc test"]
    text = (f"{c['data']} (n={c['n']}), {_model_text(c)}; R={c['models']} draws per "
            f"family, each training on S plus a random half of the other samples; attack: "
            f"per-example likelihood ratio of Gaussian fits (U-LiRA) to the logit-scaled "
            f"confidence of the true class, each model scored by fits to the other R-1 pairs; "
            f"TPR/FPR pooled over R·k decisions. Hyperparameters chosen by argmin δ on a proxy "
            f"removal (half of class {res['proxy']['class']}, own draw and retrain) within "
            f"{MAX_ACCURACY_DROP:.0%} accuracy on D∖S. {res['seconds']:.0f} s.\n")
    for name, why in c.get("omitted", {}).items():
        text += f"\nNot run: {name}: {why}.\n"
    if c.get("note"):
        text += f"\n{c['note']}\n"
    for setting, s in res["settings"].items():
        rows = []
        for name, q in s["rows"].items():
            t = q["tpr_at_fpr"]
            rows.append([label.get(name, name), t["0.01"], t["0.05"], t["0.1"], q["auc"],
                         q["epsilon"], q["forget_score"], q["per_sample_epsilon_median"],
                         q["accuracy_S"], q["test_accuracy"]])
        text += f"\n## {setting} (k={s['k']})\n\n" + markdown_table(header, rows)
    return text


def _model_text(c: dict) -> str:
    """The model, its training and curvatures, as the table's preamble states them."""
    if c.get("model", "linear") == "linear":
        return "L2 logistic regression"
    inv = c["inverse"]
    return (f"SmallResNet {c['spec']} (d={c['d']}), SGD {c['recipe']}, weight decay "
            f"{c['weight_decay']:g}, n_test={c['n_test']}; training seeds: {c['train_seeds']}; "
            f"inverse Fisher λ={c['damping']:g}, {inv['layout']} blocks of ≤ "
            f"{inv['block_size']}; Newton step: Gauss–Newton blocks of ≤ {c['newton_block']}")


def figures(r: dict, out: Path) -> list[Path]:
    """TPR at FPR 0.01 and ε per method, one group of bars per removal."""
    res = r["results"]
    settings = list(res["settings"])
    names = [n for n in ROWS if n in res["settings"][settings[0]]["rows"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(settings)
    x = np.arange(len(names))
    for i, setting in enumerate(settings):
        rows = res["settings"][setting]["rows"]
        tpr = [rows[n]["tpr_at_fpr"]["0.01"] for n in names]
        eps = [rows[n]["epsilon"] for n in names]
        axes[0].bar(x + i * width, tpr, width, label=setting)
        finite = [e for e in eps if math.isfinite(e)]
        cap = 1.2 * max(finite + [1.0])
        bars = axes[1].bar(x + i * width, [min(e, cap) for e in eps], width, label=setting)
        for b, e in zip(bars, eps):
            if not math.isfinite(e):
                axes[1].text(b.get_x() + b.get_width() / 2, b.get_height(), "∞", ha="center",
                             va="bottom")
    axes[0].axhline(0.01, color="k", ls="--", lw=0.8, label="chance (TPR = FPR)")
    axes[0].set_ylabel("TPR at FPR 0.01 (lower: forgotten)")
    axes[1].set_ylabel("ε (δ = 0.01; lower: forgotten)")
    for ax in axes:
        ax.set_xticks(x + width * (len(settings) - 1) / 2)
        ax.set_xticklabels([n.replace(" (", "\n(") for n in names], fontsize=7, rotation=30)
        ax.legend(fontsize=7)
    model = "CNN" if r["config"].get("model", "linear") != "linear" else "logistic regression"
    fig.suptitle(f"{r['config']['data']} ({model}): can U-LiRA tell erased from retrained "
                 f"models? (R={r['config']['models']})")
    path = Path(out) / "forgetting.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    plt.close(fig)
    return [path]


def default_out(data: str | None) -> Path:
    """The results folder of data set ``data``: ``results/forgetting`` for digits,
    ``results/forgetting_<data>`` otherwise."""
    data = data or "digits"
    return Path(f"results/{NAME}" if data == "digits" else f"results/{NAME}_{data}")


def run(*, out: Path | None = None, seeds=None, **kwargs) -> str:
    """Runs the experiment (the options of :func:`compute`; ``seeds``: once per seed, each
    seed's results and their mean ± sd in one results file) and writes its results, table and
    figures to ``out`` (default :func:`default_out`); returns the table."""
    out = default_out(kwargs.get("data")) if out is None else out
    return report(NAME, compute, table, figures, out, seeds=seeds, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ssse.experiments.forgetting",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=list(DATA), default="digits",
                   help="digits (logistic regression) or fashion-mnist (the small ResNet)")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    p.add_argument("--models", type=int, default=None,
                   help="draws R per family (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_MODELS.items())
                        + "; --quick: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default results/forgetting for digits, "
                        "results/forgetting_<data> otherwise)")
    p.add_argument("--note", default=None, help="a line recorded with the results")
    p.add_argument("--methods", default=None, type=lambda t: [m.strip() for m in t.split(",")],
                   help=f"'{SSSE_EKFAC}' adds the EK-FAC rows (the CNN)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    print(run(out=a.out, quick=a.quick, seed=a.seed, repeats=a.models, progress=not a.quiet,
              data=a.data, data_dir=a.data_dir, note=a.note, methods=a.methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
