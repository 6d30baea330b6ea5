"""Kronecker-factored blocks (K-FAC, EK-FAC) against dense blocks, and EK-FAC's two refresh
modes over deletion requests (docs/maths.md, "Kronecker-factored blocks").

An MLP ``--width`` wide is trained on ``--n`` synthetic samples (float64); the inverses are
fitted at λ = 1e-3 with ``curvature="kfac"``, ``"ekfac"`` (basis-kept, default tolerance),
an EK-FAC that never changes its basis, and one with ``refresh="exact"``, next to dense
per-parameter blocks. ``--requests`` requests of ``--k`` samples are then served by an
:class:`ssse.Eraser` per curvature. Printed: bytes and fit seconds, one request's seconds,
the relative difference of ``inv @ V`` (8 random vectors) of each basis-kept inverse from the
exact one after 1, 5 and all requests, and the K-FAC inverse against a fresh fit on the
remaining samples (same normaliser), which must agree to rounding. Also the bytes of one
GPT-2-small MLP weight (768 x 3072) in each form (and with the bases kept only in float32,
``storage="compact"``).

    python benchmarks/bench_kfac.py [--n 2000] [--width 64] [--requests 20] [--k 10]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import ssse
import ssse_ext
from ssse.curvature import get_curvature, unregister_curvature
from ssse.curvature.kfac import ekfac
from ssse.model import FlatModel
from ssse_ext.bench import machine
from ssse_ext.blocks.kronecker import kronecker_nbytes

DAMPING = 1e-3


def trained(n: int, width: int, seed: int = 0):
    torch.manual_seed(seed)
    X = torch.randn(n, 32)
    y = (X @ torch.randn(32, 10) + 0.5 * torch.randn(n, 10)).argmax(1)
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.double().eval(), X.double(), y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()
    print(machine())
    model, X, y = trained(args.n, args.width)
    loss = nn.CrossEntropyLoss(reduction="none")
    extra = [ekfac("ekfac_never", tolerance=1e9), ekfac("ekfac_exact", refresh="exact")]
    try:
        erasers = {}
        for curv in ("kfac", "ekfac", "ekfac_never", "ekfac_exact"):
            t = time.perf_counter()
            erasers[curv] = ssse.Eraser(model, loss, damping=DAMPING, curvature=curv).fit(
                (X, y), progress=False)
            print(f"{curv:12s} fit {time.perf_counter() - t:6.2f} s, "
                  f"{erasers[curv].inv_fisher.nbytes / 1e6:8.2f} MB")
        dense = ssse.fit_inverse_fisher(model, loss, (X, y), damping=DAMPING, block_size=1 << 20,
                                        representation="dense", progress=False)
        print(f"{'dense':12s} per-parameter blocks {dense.nbytes / 1e6:8.2f} MB")
        V = torch.randn(dense.dim, 8, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))
        serve(erasers, X, y, V, args.requests, args.k)
        fm = FlatModel(model, loss_fn=loss)
        removed = args.requests * args.k
        curv = get_curvature("kfac")
        rows = curv.rows(fm, fm.param_dict(), fm.frozen_dict(), X[removed:], y[removed:],
                         loss_fn=loss, likelihood=None, generator=None, mc_samples=1,
                         minibatch=1, state={})
        inv = erasers["kfac"].inv_fisher
        fresh = ssse_ext.build_inverse_fisher(
            rows, damping=DAMPING, layout=inv.layout, normalizer=float(args.n),
            representation=curv.representation_for(fm, inv.layout, "dense"))
        ref = fresh @ V
        print(f"kfac after {args.requests} requests vs a fresh fit: "
              f"{float((inv @ V - ref).norm() / ref.norm()):.1e}")
    finally:
        for c in extra:
            unregister_curvature(c.name)
    f32 = torch.float32
    print(f"one 768 x 3072 weight, float32: dense {(768 * 3072) ** 2 * 4 / 1e12:.1f} TB, "
          f"K-FAC/EK-FAC {kronecker_nbytes(3072, 768, f32) / 1e6:.1f} MB (compact "
          f"{kronecker_nbytes(3072, 768, f32, storage='compact') / 1e6:.1f} MB), "
          f"EK-FAC exact with "
          f"10^5 rows {kronecker_nbytes(3072, 768, f32, 10 ** 5) / 1e9:.0f} GB")


def serve(erasers: dict, X, y, V, requests: int, k: int) -> None:
    for r in range(requests):
        ids = list(range(r * k, (r + 1) * k))
        seconds = {}
        for curv, eraser in erasers.items():
            t = time.perf_counter()
            eraser.erase((X[ids], y[ids]), ids=ids, epsilon=1.0)
            seconds[curv] = time.perf_counter() - t
        if r == 0:
            print("one request: " + ", ".join(f"{c} {s * 1e3:.0f} ms"
                                              for c, s in seconds.items()))
        if r + 1 in (1, 5, requests):
            ref = erasers["ekfac_exact"].inv_fisher @ V
            parts = []
            for curv in ("ekfac", "ekfac_never"):
                store = erasers[curv].inv_fisher.stores[-1]
                diff = float((erasers[curv].inv_fisher @ V - ref).norm() / ref.norm())
                parts.append(f"{curv} {diff:.2%} (bases changed {store.rebased})")
            print(f"after {(r + 1) * k} removed, basis-kept vs exact: " + "; ".join(parts))


if __name__ == "__main__":
    main()
