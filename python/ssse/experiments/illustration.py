"""Paper Fig. 1: a 2-D binary logistic regression; the decision boundaries of the original
model, the retrained one, SSSE and the influence update, each with the curvature (Fisher or
Hessian) of D and of D∖S, removing one sample and then a small group."""

from __future__ import annotations

from pathlib import Path

import torch

import ssse
from ssse import plots
from ssse.baselines import influence_update
from ssse.data import Dataset, two_blobs_2d

from .common import Task, markdown_table, timed, with_state
from .evaluation import parameter_distance

NAME = "illustration"


def _line(model) -> tuple[list[float], float]:
    return model.weight.detach()[0].tolist(), float(model.bias.detach()[0])


def run(*, quick: bool = False, seed: int = 0, out: Path = Path("results/illustration"),
        device="cpu", dtype=torch.float64, progress: bool = True, data=None, data_dir=None,
        repeats=None, epsilon: float = 1.0, damping: float = 1e-3) -> str:
    blobs = two_blobs_2d(24 if quick else 40, seed=seed, dtype=dtype)
    x, y = blobs.x_train, blobs.y_train
    ds = Dataset("blobs-2d", x, y.to(dtype).unsqueeze(1), x[:0], y[:0].to(dtype).unsqueeze(1),
                 "multilabel", 1)
    task = Task(ds, {"arch": "linear", "in_features": 2, "out_features": 1, "bias": True},
                "bce", 1e-2, {"optimizer": "lbfgs", "max_iter": 500, "tolerance": 1e-10}, dtype,
                torch.device(device), {"name": "blobs-2d", "seed": seed})
    model = task.train(task.data(), seed=seed)
    inv = ssse.fit_inverse_fisher(model, task.loss_fn, task.data(), damping=damping,
                                  layout="fixed", block_size=3, weight_decay=task.weight_decay,
                                  progress=False)
    # The most influential points: the misclassified or least confident ones of class 1.
    with torch.no_grad():
        margin = model(x).squeeze(1) * (2 * y.to(dtype) - 1)
    order = torch.argsort(margin)
    requests = {"remove one sample": order[:1], "remove a group of 5": order[:5]}
    panels, rows, results = [], [], {}
    for title, removed in requests.items():
        removed = torch.sort(removed).values
        retrained, t_retrain = timed(task.train, task.retained(removed), seed=seed)
        kw = dict(epsilon=epsilon, n_total=task.n, weight_decay=task.weight_decay)
        variants = {
            "SSSE, F of D": ssse.ssse_update(model, inv, task.data(removed), task.loss_fn, **kw),
            "SSSE, F of D∖S": ssse.ssse_update(model, inv, task.data(removed), task.loss_fn,
                                               fisher="leave_k_out", **kw),
            "influence, H of D": influence_update(model, task.loss_fn, task.data(removed),
                                                  task.retained(removed), hessian="full",
                                                  weight_decay=task.weight_decay),
            "influence, H of D∖S": influence_update(model, task.loss_fn, task.data(removed),
                                                    task.retained(removed), hessian="retained",
                                                    weight_decay=task.weight_decay),
        }
        models = {"original": model, "retrained": retrained}
        models.update({k: with_state(model, v) for k, v in variants.items()})
        styles = {"original": dict(color="black", lw=2), "retrained": dict(color="green", lw=2.5),
                  "SSSE, F of D": dict(color="red", ls="--"),
                  "SSSE, F of D∖S": dict(color="purple", ls=":"),
                  "influence, H of D": dict(color="tab:blue", ls="-."),
                  "influence, H of D∖S": dict(color="tab:cyan", ls=(0, (1, 3)))}
        panels.append((title, removed.numpy(),
                       {k: (*_line(m), styles[k]) for k, m in models.items()}))
        results[title] = {"removed": removed.tolist(), "retrain_seconds": t_retrain}
        for k, m in models.items():
            dist = parameter_distance(m, model, retrained)
            w, b = _line(m)
            results[title][k] = {"w": w, "b": b, "param_distance": dist}
            rows.append([title, k, dist])
    png = plots.decision_boundaries(out / "illustration.png", x.numpy(), y.numpy(), panels,
                                    title=f"2-D logistic regression: erasing the red-circled "
                                          f"samples (SSSE with ε={epsilon:g})")
    table = (f"n={task.n}, L2 logistic regression, λ={damping:g}, ε={epsilon:g}; normalised "
             "parameter distance to the retrained model (0 = retrained, 1 = original).\n\n"
             + markdown_table(["request", "model", "param dist"], rows))
    write_results(Path(out), NAME, {"seed": seed, "n": task.n, "epsilon": epsilon,
                                    "damping": damping, "quick": quick}, results, table, [png])
    return table


from .common import write_results  # noqa: E402
