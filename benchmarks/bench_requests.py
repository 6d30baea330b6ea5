"""Drift of a stored inverse over deletion requests, per block store (DESIGN §2, "Requests
that do not drift").

A float32 inverse at λ = 1e-4 on blocks of 256 serves ``--requests`` requests of ``--k`` rows
each, in the same order for every store. After requests 1, 5, 10 and 20 it prints the drift:
the relative error of ``inv @ V`` (8 random vectors) against a float64 fit on the rows that
remain (same normaliser), over all parameters and in the worst block; and, per store, the
health warnings counted after every request (:meth:`~ssse_ext.BlockInverseFisher.health`),
the time of one downdate (health check not included) and the bytes held. A store that refuses
a valid request (``NotPositiveDefiniteError``: its drift made the remaining Fisher look
indefinite) stops there.

Rows: ``synthetic`` (Gaussian, unit scale, ``--dim`` parameters in blocks of 256) and
``small_resnet`` (per-sample gradients of a SmallResNet of ``--width`` at random images,
``per_parameter`` blocks of up to 256, as python/ssse/experiments/model_bench.py).

    python benchmarks/bench_requests.py [--rows 384] [--requests 20] [--k 16]
        [--settings synthetic,small_resnet] [--stores dense,gram,dual] [--width 32]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import ssse
from ssse.models import build_model, loss_function
from ssse_ext import (BlockLayout, HealthWarning, NotPositiveDefiniteError,
                      build_inverse_fisher)
from ssse_ext.bench import machine

CHECKPOINTS = (1, 5, 10, 20)
DAMPING = 1e-4
BLOCK = 256


def synthetic(rows: int, dim: int, seed: int) -> tuple[torch.Tensor, BlockLayout, str]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(rows, dim, generator=gen, dtype=torch.float64).float()
    return g, BlockLayout.fixed(dim, BLOCK), f"synthetic Gaussian rows, d={dim}"


def small_resnet(rows: int, width: int, seed: int) -> tuple[torch.Tensor, BlockLayout, str]:
    torch.manual_seed(seed)
    model = build_model({"arch": "small_resnet", "in_channels": 3, "num_classes": 10,
                         "width": width, "image_size": 32}).eval()
    loss_fn = loss_function("cross_entropy")
    x = torch.randn(rows, 3, 32, 32)
    y = torch.randint(0, 10, (rows,))
    g = torch.cat(list(ssse.per_sample_grads(model, loss_fn, (x, y)))).float()
    layout = BlockLayout.per_parameter([p.shape for p in model.parameters()], BLOCK)
    return g, layout, f"SmallResNet width {width}, d={layout.dim}"


def drift(got: torch.Tensor, want: torch.Tensor, layout: BlockLayout) -> tuple[float, float]:
    """Relative error of all of ``got``, and of its worst block."""
    worst = max(float((got[sl] - want[sl]).norm() / want[sl].norm())
                for sl in map(layout.slice, range(layout.num_blocks)))
    return float((got - want).norm() / want.norm()), worst


def run(g: torch.Tensor, layout: BlockLayout, store: str, batches, fresh: dict,
        v: torch.Tensor) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # build-time condition warnings: not the subject
        inv = build_inverse_fisher(g, damping=DAMPING, layout=layout, representation=store)
    out = {"nbytes": inv.nbytes, "drift": {}, "warnings": {}, "refused": None, "seconds": []}
    count = 0
    for t, idx in enumerate(batches, start=1):
        t0 = time.perf_counter()
        try:
            inv.downdate(g[idx])
        except NotPositiveDefiniteError:
            out["refused"] = t
            break
        out["seconds"].append(time.perf_counter() - t0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inv.health()
        count += sum(issubclass(w.category, HealthWarning) for w in caught)
        if t in fresh:
            out["drift"][t] = drift((inv @ v.float()).double(), fresh[t], layout)
            out["warnings"][t] = count
    out["total"] = count
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=384)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--k", type=int, default=16, help="rows per request")
    p.add_argument("--dim", type=int, default=4096, help="synthetic: parameters")
    p.add_argument("--width", type=int, default=32, help="small_resnet: base width")
    p.add_argument("--settings", default="synthetic,small_resnet")
    p.add_argument("--stores", default="dense,gram,dual")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.requests * a.k >= a.rows:
        p.error("--requests * --k must be fewer than --rows")
    stores = a.stores.split(",")
    where = ", ".join(f"{k}: {v}" for k, v in machine().items() if v is not None)
    print(f"# drift over {a.requests} requests of {a.k} rows, float32, λ={DAMPING:g}, blocks "
          f"of up to {BLOCK}, {a.rows} rows ({where})\n")
    for setting in a.settings.split(","):
        t0 = time.perf_counter()
        g, layout, label = (synthetic(a.rows, a.dim, a.seed) if setting == "synthetic"
                            else small_resnet(a.rows, a.width, a.seed))
        order = torch.randperm(a.rows, generator=torch.Generator().manual_seed(a.seed + 1))
        batches = [order[t * a.k:(t + 1) * a.k] for t in range(a.requests)]
        v = torch.randn(layout.dim, 8, generator=torch.Generator().manual_seed(a.seed + 2),
                        dtype=torch.float64)
        fresh, keep = {}, torch.ones(a.rows, dtype=torch.bool)
        for t, idx in enumerate(batches, start=1):
            keep[idx] = False
            if t in CHECKPOINTS or t == a.requests:
                fit = build_inverse_fisher(g[keep].double(), damping=DAMPING, layout=layout,
                                           normalizer=float(a.rows), probe_vectors=0)
                fresh[t] = fit @ v
        results = {s: run(g, layout, s, batches, fresh, v) for s in stores}
        print(f"## {label}, {layout.num_blocks} blocks "
              f"({time.perf_counter() - t0:.0f} s in all)\n")
        print("drift: relative error of inv @ V against the fit on the rows left, all / worst "
              "block\n")
        print("| store | MiB held | ms / request | " +
              " | ".join(f"drift after {t} (rows left {a.rows - t * a.k})" for t in fresh) +
              " | health warnings after " + ", ".join(map(str, fresh)) + " |")
        print("|---|---|---|" + "---|" * len(fresh) + "---|")
        for s, r in results.items():
            ms = 1e3 * sum(r["seconds"]) / max(len(r["seconds"]), 1)
            cells = [f"{r['drift'][t][0]:.1e} / {r['drift'][t][1]:.1e}" if t in r["drift"] else
                     f"refused at {r['refused']}" for t in fresh]
            warned = ", ".join(str(r["warnings"][t]) for t in fresh if t in r["warnings"])
            if r["refused"]:
                warned += f" ({r['total']} when it refused)"
            print(f"| {s} | {r['nbytes'] / 2 ** 20:.1f} | {ms:.1f} | " + " | ".join(cells) +
                  f" | {warned} |")
        print()


if __name__ == "__main__":
    main()
