"""What float32 accumulation would cost the build in accuracy.

The build accumulates each block's Gram matrix in float64 (the products of two float32 numbers
are exact in float64) and inverts it in float64, which is why its float32 inverse is exact to
the rounding of its output, and why it cannot run at float32 GEMM speed. This script measures
the alternative: each slab of ``kc`` rows multiplied in float32 (``torch.mm``: the
accumulation a float32 GEMM kernel does inside a slab) and the slabs added in float64, then
the same float64 Cholesky inverse. It prints, per case, the relative error (Frobenius, over
the blocks) against the float64 closed form of the same float32 rows, the largest over
``--seeds``, beside the build's and torch's float32 closed form's.

    python benchmarks/bench_precision.py [--seeds 0,1,2]
"""

import argparse
import sys

import torch

import ssse_ext
from ssse_ext.layout import BlockLayout

CASES = [(1024, 256), (4096, 1024), (256, 256), (256, 1024)]  # (rows n, block size B)
SLABS = [32, 256]
DAMPING = 1e-4


def inverse64(gram: torch.Tensor, n: int) -> torch.Tensor:
    a = gram / n + DAMPING * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.cholesky_inverse(torch.linalg.cholesky(a))


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def errors(n: int, block: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, block, generator=gen, dtype=torch.float64).float()
    ref = inverse64(g.double().T @ g.double(), n)
    out = {}
    for kc in SLABS:
        gram = torch.zeros(block, block, dtype=torch.float64)
        for p in range(0, n, kc):
            x = g[p:p + kc]
            gram += (x.T @ x).double()
        out[f"float32 slabs of {kc}"] = rel(inverse64(gram, n).float(), ref)
    a = g.T @ g / n + DAMPING * torch.eye(block)
    out["torch float32 closed form"] = rel(torch.cholesky_inverse(torch.linalg.cholesky(a)), ref)
    inv = ssse_ext.build_inverse_fisher(g, damping=DAMPING, layout=BlockLayout.fixed(block, block),
                                        normalizer=float(n))
    out["the build (float64 Gram)"] = rel(inv.dense_block(0), ref)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    print(f"damping {DAMPING}, float32 rows, relative error of the float32 inverse, the largest "
          f"over seeds {seeds}\n")
    rows = {}
    for n, block in CASES:
        worst: dict[str, float] = {}
        for seed in seeds:
            for k, v in errors(n, block, seed).items():
                worst[k] = max(worst.get(k, 0.0), v)
        rows[(n, block)] = worst
    names = list(next(iter(rows.values())))
    print("| n, B | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for (n, block), worst in rows.items():
        print(f"| {n}, {block} | " + " | ".join(f"{worst[k]:.1e}" for k in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
