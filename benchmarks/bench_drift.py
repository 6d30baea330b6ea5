"""Drift of a stored inverse over many single-sample deletion requests (README, "Serving
deletions"; issue 13 §4).

An ``ssse.Eraser`` on the digits model (the demo's L2 logistic regression, d = 650, one block
per output row, λ = 1e-3, all 1257 training samples) serves ``--requests`` requests of one
sample each, in float32 and in float64. After some of them it prints the health probe's
residual |F(F⁻¹x) − x|/|x| (the largest over blocks), its threshold, and the true relative
error of the stored inverse against the float64 closed form of the Fisher of the samples
left (computed from the same gradient rows the Eraser removes).

    python benchmarks/bench_drift.py [--requests 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import ssse
from ssse_ext import reference
from ssse_ext.bench import machine
from ssse.experiments.tasks import make_task

CHECKPOINTS = (0, 1, 10, 100, 300, 1000)


def true_error(inv, rows64: torch.Tensor, keep: torch.Tensor) -> float:
    """max over blocks of ‖A_b − F_b⁻¹‖_F / ‖F_b⁻¹‖_F, F of the rows kept (float64)."""
    exact = reference.block_closed_form(rows64[keep], inv.layout, inv.damping, inv.normalizer)
    return max(float((a.double() - b).norm() / b.norm()) for a, b in zip(inv.blocks, exact))


def run(dtype: torch.dtype, requests: int, seed: int) -> list[tuple]:
    task = make_task("digits", seed=0)
    model = task.train(task.data(), seed=0).to(dtype)
    X, y = task.ds.train()
    X = X.to(dtype)
    eraser = ssse.Eraser(model, task.loss_fn, damping=1e-3, layout="rows",
                         weight_decay=task.weight_decay, dtype=dtype).fit((X, y))
    # the rows the fit added and every request removes, in the inverse's dtype
    rows = torch.cat(list(ssse.per_sample_grads(model, task.loss_fn, (X, y),
                                                weight_decay=task.weight_decay)))
    rows64 = rows.double()
    order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    keep = torch.ones(X.shape[0], dtype=torch.bool)
    out, seconds = [], 0.0
    for t in range(requests + 1):
        if t in CHECKPOINTS or t == requests:
            health = eraser.inv_fisher.health(warn=False)
            out.append((t, eraser.n, health.residual, health.tolerance,
                        true_error(eraser.inv_fisher, rows64, keep)))
        if t == requests:
            break
        i = int(order[t])
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the table reports the probe
            eraser.erase((X[i:i + 1], y[i:i + 1]), ids=[i], epsilon=0.1)
        seconds += time.perf_counter() - t0
        keep[i] = False
    return out, seconds / requests


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"# drift over {args.requests} single-sample requests, digits, d=650, 10 blocks of 64 "
          f"+ 1 of 10, λ=1e-3 ({machine()})\n")
    print("| dtype | requests served | n left | probe residual | threshold | true rel. error |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        rows, per_request = run(dtype, args.requests, args.seed)
        for t, n, res, tol, err in rows:
            print(f"| {str(dtype).removeprefix('torch.')} | {t} | {n} | {res:.1e} | {tol:.1e} | "
                  f"{err:.1e} |")
        print(f"| {str(dtype).removeprefix('torch.')} | (one request: {per_request * 1e3:.1f} ms,"
              f" health probe included) | | | | |")


if __name__ == "__main__":
    main()
