"""Accuracy of the build methods against a high-precision inverse, and what the condition
warning says (README, "Accuracy"; issue 13).

Cases: the issue's rank-deficient float32 block (n = 30 rows < B = 60, gradients of scale 1e4,
λ = 1e-6), the same with λ = 1e-3, and the README's well-conditioned cases. The reference is
mpmath at 60 digits for the 60-wide blocks, and the float64 closed form for the larger
well-conditioned ones (condition number ~10: its own error is ~1e-15). Prints a markdown table.

    python benchmarks/bench_accuracy.py
"""

from __future__ import annotations

import platform
import time
import warnings

import torch

import ssse_ext
from ssse_ext import reference
from ssse_ext.bench import machine
from ssse_ext.health import U64

F64 = torch.float64


def mp_inverse(g: torch.Tensor, damping: float, digits: int = 60):
    """The exact inverse of λI + GᵀG/N, rounded to float64, and its condition number."""
    import mpmath

    mpmath.mp.dps = digits
    n, s = g.shape
    G = mpmath.matrix(g.double().tolist())
    F = damping * mpmath.eye(s) + (G.T * G) / n
    inv = F ** -1
    eig = mpmath.eigsy(F, eigvals_only=True)
    cond = float(max(eig) / min(eig))
    return torch.tensor([[float(inv[i, j]) for j in range(s)] for i in range(s)], dtype=F64), cond


def dual_form(g: torch.Tensor, damping: float) -> torch.Tensor:
    """(1/λ)(I − Gᵀ(λN I + GGᵀ)⁻¹G), float64: the low-rank (dual) form of docs/maths.md."""
    g = g.double()
    n, s = g.shape
    k = damping * n * torch.eye(n, dtype=F64) + g @ g.T
    return (torch.eye(s, dtype=F64) - g.T @ torch.cholesky_solve(g, torch.linalg.cholesky(k))) \
        / damping


def rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


def build(g, damping, method, dtype, representation="dense"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            inv = ssse_ext.build_inverse_fisher(g.to(dtype), damping=damping,
                                                block_size=g.shape[1], method=method,
                                                representation=representation)
        except ssse_ext.NotPositiveDefiniteError:
            return None, "fails"
    kinds = sorted({type(w.message).__name__ for w in caught})
    return inv.blocks[0], ",".join(kinds)


def main() -> None:
    torch.manual_seed(0)
    cases = []
    g = torch.randn(30, 60) * 1e4
    cases += [("n=30 < B=60, scale 1e4, λ=1e-6", g, 1e-6, "mpmath"),
              ("n=30 < B=60, scale 1e4, λ=1e-3", g, 1e-3, "mpmath")]
    torch.manual_seed(1)
    cases.append(("n=600, B=200, unit scale, λ=1e-4", torch.randn(600, 200), 1e-4, "float64"))
    torch.manual_seed(2)
    cases.append(("n=2000, B=256, scale 3, λ=1e-4", torch.randn(2000, 256) * 3, 1e-4,
                  "float64"))
    torch.manual_seed(3)
    cases.append(("n=600, B=200, scale 1e4, λ=1e-6", torch.randn(600, 200) * 1e4, 1e-6,
                  "float64"))
    print(f"# build accuracy against an exact inverse ({machine()}, torch {torch.__version__}, "
          f"python {platform.python_version()})\n")
    print("| case | κ(F) | reference | method | dtype | rel. error | κ·u64 | warnings |")
    print("|---|---|---|---|---|---|---|---|")
    for name, g, damping, how in cases:
        t0 = time.perf_counter()
        if how == "mpmath":
            exact, cond = mp_inverse(g, damping)
        else:
            g64 = g.double()
            f = damping * torch.eye(g.shape[1], dtype=F64) + g64.T @ g64 / g.shape[0]
            exact = reference.closed_form_inverse(g.double(), damping)
            cond = float(torch.linalg.cond(f))
        ref_time = time.perf_counter() - t0
        rows = []
        for method in ("auto", "woodbury", "sherman_morrison"):
            for dtype in (torch.float32, torch.float64):
                blk, warned = build(g, damping, method, dtype)
                err = "fails (not positive definite)" if blk is None else f"{rel(blk, exact):.1e}"
                rows.append((method, str(dtype).removeprefix("torch."), err, warned))
        closed = reference.closed_form_inverse(g.double(), damping)
        rows.append(("reference.closed_form (torch Cholesky)", "float64",
                     f"{rel(closed, exact):.1e}", ""))
        if g.shape[0] < g.shape[1]:
            for dtype in (torch.float32, torch.float64):
                blk, warned = build(g, damping, "auto", dtype, representation="dual")
                rows.append(('auto, representation="dual"', str(dtype).removeprefix("torch."),
                             f"{rel(blk, exact):.1e}", warned))
            rows.append(("low-rank (dual) form in torch", "float64",
                         f"{rel(dual_form(g, damping), exact):.1e}", ""))
        for method, dtype, err, warned in rows:
            print(f"| {name} | {cond:.1e} | {how} ({ref_time:.1f} s) | {method} | {dtype} | {err} "
                  f"| {cond * U64:.0e} | {warned} |")


if __name__ == "__main__":
    main()
