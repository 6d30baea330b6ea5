"""Paper Fig. 1: a 2-D binary logistic regression; the decision boundaries of the original
model, the retrained one, SSSE and the influence update, each with the curvature (Fisher or
Hessian) of D and of D∖S, removing one sample and then a small group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import ssse
from ssse import metrics, plots
from ssse.data import Dataset, two_blobs_2d

from .common import markdown_table, timed, report
from .tasks import Task

NAME = "illustration"
_STYLES = {"original": dict(color="black", lw=2), "retrained": dict(color="green", lw=2.5),
           "SSSE, F of D": dict(color="red", ls="--"),
           "SSSE, F of D∖S": dict(color="purple", ls=":"),
           "influence, H of D": dict(color="tab:blue", ls="-."),
           "influence, H of D∖S": dict(color="tab:cyan", ls=(0, (1, 3))),
           "GGN Newton (no tuning)": dict(color="tab:olive", ls=(0, (5, 5)))}
NEWTON = "GGN Newton (no tuning)"


def _line(model) -> tuple[list[float], float]:
    return model.weight.detach()[0].tolist(), float(model.bias.detach()[0])


#: The L2 coefficient of the 2-D logistic regression.
WEIGHT_DECAY = 1e-2


def compute(*, quick: bool = False, seed: int = 0, device="cpu", dtype=torch.float64,
            epsilon: float = 1.0, damping: float = WEIGHT_DECAY, progress: bool = False,
            data=None, data_dir=None, repeats=None) -> dict:
    """Train on the blobs, then per request the retrained model, SSSE and the influence update
    with the curvature of D and of D∖S: their lines and parameter distances. The data set is
    generated (``data``, ``data_dir`` and ``repeats`` do not apply)."""
    if data is not None or data_dir is not None or repeats is not None:
        raise ValueError("the illustration generates its 2-D data: --data, --data-dir and "
                         "--repeats do not apply")
    blobs = two_blobs_2d(24 if quick else 40, seed=seed, dtype=dtype)
    x, y = blobs.x_train, blobs.y_train
    ds = Dataset("blobs-2d", x, y.to(dtype).unsqueeze(1), x[:0], y[:0].to(dtype).unsqueeze(1),
                 "multilabel", 1)
    task = Task(ds, {"arch": "linear", "in_features": 2, "out_features": 1, "bias": True},
                "bce", WEIGHT_DECAY, {"optimizer": "lbfgs", "max_iter": 500, "tolerance": 1e-10},
                dtype,
                torch.device(device), {"name": "blobs-2d", "seed": seed})
    model = task.train(task.data(), seed=seed)
    inv = ssse.fit_inverse_fisher(model, task.loss_fn, task.data(), damping=damping,
                                  layout="fixed", block_size=3, weight_decay=task.weight_decay,
                                  progress=False)
    ggn = ssse.fit_inverse_fisher(model, task.loss_fn, task.data(), damping=task.weight_decay,
                                  layout="fixed", block_size=3, curvature="ggn",
                                  likelihood="bernoulli", progress=False)
    # The most influential points: the misclassified or least confident ones of class 1.
    with torch.no_grad():
        margin = model(x).squeeze(1) * (2 * y.to(dtype) - 1)
    order = torch.argsort(margin)
    requests = {"remove one sample": order[:1], "remove a group of 5": order[:5]}
    results = {}
    for title, removed in requests.items():
        removed = torch.sort(removed).values
        retrained, t_retrain = timed(task.train, task.retained(removed), seed=seed)
        S, rest = task.data(removed), task.retained(removed)
        wd = task.weight_decay
        kw = dict(inv_fisher=inv, epsilon=epsilon, n_total=task.n, weight_decay=wd)
        variants = {
            "SSSE, F of D": ssse.ssse_update(model, task.loss_fn, S, **kw),
            "SSSE, F of D∖S": ssse.ssse_update(model, task.loss_fn, S, fisher="leave_k_out",
                                               **kw),
            "influence, H of D": ssse.influence_update(model, task.loss_fn, S, retained=rest,
                                                       hessian="full", weight_decay=wd),
            "influence, H of D∖S": ssse.influence_update(model, task.loss_fn, S, retained=rest,
                                                         hessian="retained", weight_decay=wd),
            # needs S and the stored inverse only; for a linear model with one block it is the
            # influence update with the Hessian of D∖S
            NEWTON: ssse.newton_erase(model, task.loss_fn, S, inv_fisher=ggn, n_total=task.n,
                                      weight_decay=wd, likelihood="bernoulli"),
        }
        states = {"original": model.state_dict(), "retrained": retrained.state_dict(), **variants}
        results[title] = {"removed": removed.tolist(), "retrain_seconds": t_retrain}
        for k, st in states.items():
            results[title][k] = {"w": st["weight"][0].tolist(), "b": float(st["bias"][0]),
                                 "param_distance": metrics.normalized_parameter_distance(
                                     st, model, retrained)}
    config = {"seed": seed, "n": task.n, "epsilon": epsilon, "damping": damping, "quick": quick}
    return {"config": config, "results": results, "x": x.numpy(), "y": y.numpy()}


def table(r: dict) -> str:
    c = r["config"]
    rows = [[title, k, v["param_distance"]] for title, req in r["results"].items()
            for k, v in req.items() if isinstance(v, dict)]
    return (f"n={c['n']}, L2 logistic regression with weight decay w={WEIGHT_DECAY:g}, Fisher "
            f"damping λ={c['damping']:g}, ε={c['epsilon']:g}; normalised parameter distance to "
            "the retrained model (0 = retrained, 1 = original).\n\n"
            + markdown_table(["request", "model", "param dist"], rows))


def seeds_table(result: dict) -> str:
    """The parameter distance of every model per request, mean ± sd over the seeds."""
    per_seed = [r["results"] for r in result["results"]["per_seed"]]
    rows = []
    for title, req in per_seed[0].items():
        for k, v in req.items():
            if isinstance(v, dict):
                vals = [res[title][k]["param_distance"] for res in per_seed]
                rows.append([title, k, f"{np.mean(vals):.3f} ± {np.std(vals):.3f}",
                             f"{min(vals):.3f}–{max(vals):.3f}"])
    return ("Normalised parameter distance to the retrained model over the seeds (0 = "
            "retrained, 1 = original):\n\n"
            + markdown_table(["request", "model", "mean ± sd", "range"], rows))


def figures(r: dict, out: Path) -> list[Path]:
    panels = [(title, np.asarray(req["removed"]),
               {k: (v["w"], v["b"], _STYLES[k]) for k, v in req.items() if isinstance(v, dict)})
              for title, req in r["results"].items()]
    return [plots.decision_boundaries(out / "illustration.png", np.asarray(r["x"]),
                                      np.asarray(r["y"]), panels,
                                      title=f"2-D logistic regression: erasing the red-circled "
                                            f"samples (SSSE with ε={r['config']['epsilon']:g})")]


def run(*, out: Path = Path(f"results/{NAME}"), seeds=None, **kwargs) -> str:
    """Runs the experiment (the options of :func:`compute`; ``seeds``: once per seed, each
    seed's results and their mean ± sd in one results file) and writes its results, table and
    figures to ``out``; returns the table."""
    return report(NAME, compute, table, figures, out, seeds=seeds, seeds_table=seeds_table,
                  **kwargs)
