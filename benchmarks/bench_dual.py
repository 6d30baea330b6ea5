"""Benchmark of the dual (low-rank) blocks: build and apply, checked, then timed (DESIGN §3).

For each case (R gradient rows, ``blocks`` blocks of size s) and dtype:

1. **Check first.** The kernels' factors ``L_b`` and one apply ``theta + c F^{-1} v`` are compared
   with the same formula in float64 torch ops; a result above tolerance is reported as refused and
   not timed.
2. **Time** (warm-up, median of repeats; CUDA: synchronised) against the same formula written with
   torch ops, batched over blocks:

   * build: ``K = G G^T + lambda N I; L = cholesky(K)`` with ``G`` in float64 (the precision the
     kernels give: float32 products are exact in float64), so a float32 build pays torch's
     conversion, as ours converts tile by tile;
   * apply: ``out = theta + c (v - G^T cholesky_solve(G v, L)) / lambda`` with ``G`` in its own
     dtype and the solve in float64.

3. **Ratios measured in one run:** apply/copy = ``t_copy / t_apply``, where the copy
   (``buf.copy_(G)``, preallocated) reads and writes G once and the apply reads it twice, so both
   move ``2 bytes(G)`` and 1.0 means the apply streams G at copy bandwidth (target >= 0.6); the
   build and apply speed-ups over torch; the bytes of the dual blocks against dense blocks.

The paper's ResNet20 configuration (§5.3: d ~ 270 k, B = 70 000, R = 4 500) is reported as a
memory figure computed from the sizes. Run ``python benchmarks/bench_dual.py --help``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import ssse_ext
from ssse_ext import BlockLayout, build_dual_blocks, choose_representation
from ssse_ext.bench import DTYPES, median_seconds, parse_cases
from ssse_ext.dual import dual_nbytes

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
PAPER = {"d": 270_000, "B": 70_000, "R": 4_500}


# ---- the same formula with torch ops, batched over blocks -------------------------------------

def torch_build(g: torch.Tensor, blocks: int, shift: float) -> torch.Tensor:
    """``(blocks, R, R)`` lower factors of ``K_b = G_b G_b^T + shift I`` in float64."""
    x = g.view(g.shape[0], blocks, -1).transpose(0, 1).double()  # (blocks, R, s)
    k = torch.bmm(x, x.transpose(1, 2))
    k.diagonal(dim1=1, dim2=2).add_(shift)
    return torch.linalg.cholesky(k)


def torch_apply(x: torch.Tensor, factors: torch.Tensor, damping: float, v: torch.Tensor,
                theta: torch.Tensor, scale: float) -> torch.Tensor:
    """``theta + scale (v - G_b^T K_b^{-1} G_b v) / damping`` per block; ``x`` is G block by
    block, ``(blocks, R, s)`` contiguous (the layout the kernels store), in its own dtype."""
    blocks = factors.shape[0]
    vb = v.view(blocks, -1, 1)                                       # (blocks, s, 1)
    z = torch.cholesky_solve(torch.bmm(x, vb).double(), factors)     # (blocks, R, 1)
    out = vb - torch.bmm(x.transpose(1, 2), z.to(x.dtype))
    return theta + (scale / damping) * out.view(-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ---- one case -----------------------------------------------------------------------------------

def run_case(rows: int, blocks: int, size: int, dtype, device, *, repeats: int, damping: float,
             seed: int) -> dict:
    d = blocks * size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g = torch.randn(rows, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    layout = BlockLayout.fixed(d, size)
    shift = damping * rows
    e = g.element_size()
    row = {"R": rows, "blocks": blocks, "s": size, "d": d, "dtype": str(dtype)[6:],
           "device": str(device), "dual_bytes": blocks * dual_nbytes(size, rows, dtype),
           "dense_bytes": blocks * size * size * e,
           "dual_chosen": all(choose_representation(layout.sizes, rows, dtype))}
    row["dual_vs_dense_memory"] = row["dual_bytes"] / row["dense_bytes"]

    # Check first: factors and one apply against float64 torch.
    dual = build_dual_blocks(g, damping=damping, layout=layout)
    ref_l = torch_build(g, blocks, shift)
    got_l = torch.stack([dual.factor_of(b).tril() for b in range(blocks)])
    row["factor_rel_err"] = _rel(got_l, ref_l)
    theta = torch.randn(d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    v = torch.randn(d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    out = torch.empty_like(v)
    dual.apply(v, base=theta, scale=0.5, out=out)
    x = g.view(rows, blocks, size).transpose(0, 1).contiguous()
    expect = torch_apply(x.double(), ref_l, damping, v.double(), theta.double(), 0.5)
    row["apply_rel_err"] = _rel(out, expect)
    if not (row["factor_rel_err"] <= TOLERANCE[dtype] and row["apply_rel_err"] <= TOLERANCE[dtype]):
        print(f"    error above tolerance {TOLERANCE[dtype]:.0e} (factor "
              f"{row['factor_rel_err']:.1e}, apply {row['apply_rel_err']:.1e}): not timed",
              flush=True)
        return row
    del ref_l, expect

    # Build.
    t_build = median_seconds(lambda: build_dual_blocks(g, damping=damping, layout=layout), device,
                    repeats)
    t_torch_build = median_seconds(lambda: torch_build(g, blocks, shift), device, repeats)
    row.update(build_s=t_build, torch_build_s=t_torch_build,
               build_vs_torch=t_torch_build / t_build)

    # Apply against torch and against a copy of G.
    factors = torch_build(g, blocks, shift)
    t_apply = median_seconds(lambda: dual.apply(v, base=theta, scale=0.5, out=out), device, 3 * repeats)
    t_torch_apply = median_seconds(lambda: torch_apply(x, factors, damping, v, theta, 0.5), device,
                          3 * repeats)
    buf = torch.empty_like(dual.g)
    t_copy = median_seconds(lambda: buf.copy_(dual.g), device, 3 * repeats)
    g_bytes = dual.g.numel() * e
    row.update(apply_s=t_apply, torch_apply_s=t_torch_apply,
               apply_vs_torch=t_torch_apply / t_apply, apply_gbs=2 * g_bytes / t_apply / 1e9,
               copy_gbs=2 * g_bytes / t_copy / 1e9, apply_vs_copy=t_copy / t_apply)
    return row


def paper_scale() -> dict:
    """Memory of the paper's ResNet20 configuration (fixed layout), from the sizes alone."""
    layout = BlockLayout.fixed(PAPER["d"], PAPER["B"])
    rows, f32 = PAPER["R"], torch.float32
    dense = sum(s * s * 4 for s in layout.sizes)
    dual = sum(dual_nbytes(s, rows, f32) for s in layout.sizes)
    return {"d": PAPER["d"], "B": PAPER["B"], "R": rows, "sizes": list(layout.sizes),
            "dense_bytes": dense, "dense_full_blocks_bytes": 4 * PAPER["B"] ** 2 * 4,
            "dual_bytes": dual, "dual_chosen": choose_representation(layout.sizes, rows, f32)}


def format_table(rows: list[dict]) -> str:
    head = ("| case | dtype | build s | torch build s | build vs torch | apply ms | torch apply ms"
            " | apply vs torch | apply GB/s | copy GB/s | apply/copy | dual MB | dense MB | "
            "dual/dense | factor err | apply err |")
    lines = [head, "|" + "---|" * 16]

    def f(r, key, fmt, mul=1.0):
        return "refused" if r.get(key) is None else format(r[key] * mul, fmt)

    for r in rows:
        lines.append(
            f"| {r['blocks']}x{r['s']}, R={r['R']} | {r['dtype']} | {f(r, 'build_s', '.3f')} | "
            f"{f(r, 'torch_build_s', '.3f')} | {f(r, 'build_vs_torch', '.2f')}x | "
            f"{f(r, 'apply_s', '.2f', 1e3)} | {f(r, 'torch_apply_s', '.2f', 1e3)} | "
            f"{f(r, 'apply_vs_torch', '.2f')}x | {f(r, 'apply_gbs', '.1f')} | "
            f"{f(r, 'copy_gbs', '.1f')} | {f(r, 'apply_vs_copy', '.2f')} | "
            f"{r['dual_bytes'] / 1e6:.0f} | {r['dense_bytes'] / 1e6:.0f} | "
            f"{r['dual_vs_dense_memory']:.3f} | {r['factor_rel_err']:.1e} | "
            f"{r['apply_rel_err']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    p.add_argument("--cases", default=None,
                   help="comma-separated R:blocks:s cases (default: 256:4:8000 and 512:4:16000 on "
                        "CPU; 2048:4:70000 and 4500:4:70000, the paper's block, on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--damping", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the kernels (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but torch sees no CUDA device")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.cases:
        cases = parse_cases(p, args.cases, "512:4:16000,256:4:8000")
    elif device.type == "cuda":
        cases = [(2048, 4, 70000), (4500, 4, 70000)]
    else:
        cases = [(256, 4, 8000), (512, 4, 16000)]
    dtypes = [torch.float32, torch.float64] if args.dtype == "both" else [DTYPES[args.dtype]]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False

    info = {k: v for k, v in ssse_ext.build_info().items() if k != "version"}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"ssse_ext {ssse_ext.__version__} on {machine}; build: {info}", flush=True)
    rows = []
    for dtype in dtypes:
        for r, nb, s in cases:
            print(f"  {nb}x{s}, R={r}, {str(dtype)[6:]} ...", flush=True)
            rows.append(run_case(r, nb, s, dtype, device, repeats=args.repeats,
                                 damping=args.damping, seed=args.seed))
    print()
    print(format_table(rows))
    print("\nbuild/apply vs torch = speed-ups over the same formula in torch ops (build: G in "
          "float64; apply: G in its dtype, solve in float64); apply/copy = t_copy / t_apply (both "
          "move 2 bytes(G): the apply reads G twice, a copy reads and writes it; target >= 0.6); "
          "GB/s = 2 bytes(G) / time; dual/dense = bytes of the dual blocks (G + float64 factors) "
          "over dense blocks of the same dtype.")
    paper = paper_scale()
    print(f"\nPaper scale (ResNet20, §5.3): d = {paper['d']:,}, B = {paper['B']:,}, R = "
          f"{paper['R']:,} rows, float32, blocks {paper['sizes']}: dense blocks "
          f"{paper['dense_bytes'] / 1e9:.1f} GB ({paper['dense_full_blocks_bytes'] / 1e9:.1f} GB "
          f"for four full blocks of {paper['B']:,}), dual blocks {paper['dual_bytes'] / 1e9:.2f} "
          f"GB (R d 4 + blocks R^2 8 bytes), ratio "
          f"{paper['dual_bytes'] / paper['dense_bytes']:.3f}; chosen per block: "
          f"{paper['dual_chosen']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows, "paper_scale": paper}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
