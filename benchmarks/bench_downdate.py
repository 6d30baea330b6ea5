"""A downdate's two kernel passes over dense blocks against the memory they must move.

A Woodbury downdate of k rows checks every block (reads it once: ``woodbury_check``, with
F⁻¹v from the same pass for the step of eq. 8) and then writes it (reads and writes it once:
``woodbury_write``). On a CPU their floor is memory: one read of the blocks for the check, one
read and one write for the write. This prints, per block size and dtype, the CPU time of each
pass and of torch's own passes over the same bytes (a sum: one read; an in-place scale: a read
and a write), and their ratio, all measured in one run (best of ``--repeats``; one thread by
default). The blocks are random symmetric positive definite matrices, the rows small enough
for every block to pass its check; the write alternates sign so the blocks stay the same.

    python benchmarks/bench_downdate.py [--blocks-mib 350] [--k 16] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import ssse_ext
from ssse_ext import _ops
from ssse_ext.bench import machine


def cpu_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def case(size: int, dtype: torch.dtype, k: int, mib: float, repeats: int) -> dict:
    elem = torch.empty(0, dtype=dtype).element_size()
    nb = max(1, int(mib * 2**20 / (size * size * elem)))
    g = torch.Generator().manual_seed(size)
    blocks = torch.randn(nb, size, size, dtype=torch.float64, generator=g)
    blocks = blocks @ blocks.transpose(1, 2) / size + 10 * torch.eye(size, dtype=torch.float64)
    packed = blocks.to(dtype).reshape(-1).contiguous()
    del blocks
    table = torch.tensor([[b * size, size, b * size * size] for b in range(nb)],
                         dtype=torch.int64)
    d = nb * size
    rows = (0.01 * torch.randn(k, d, dtype=torch.float64, generator=g)).to(dtype)
    v = torch.randn(d, 1, dtype=torch.float64, generator=g).to(dtype)
    n = 1000.0

    def check():
        return _ops.call(_ops.woodbury_check, packed, table, rows, n, -1, v, True)

    wt, _, info, _ = check()
    if bool(info.any()):
        raise RuntimeError("a block failed its check: the benchmark's rows are too large")
    sign = [1]

    def write():
        sign[0] = -sign[0]
        _ops.call(_ops.woodbury_write_, packed, table, wt, k, sign[0])

    out = {"size": size, "dtype": str(dtype).removeprefix("torch."), "blocks": nb,
           "mib": packed.numel() * elem / 2**20,
           "check": cpu_time(check, repeats), "write": cpu_time(write, repeats),
           "read": cpu_time(lambda: packed.sum(), repeats),
           "read_write": cpu_time(lambda: packed.mul_(1.0), repeats)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks-mib", type=float, default=350.0,
                   help="bytes of blocks per case (well above the caches)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    info = machine()
    print(f"{info['cpu']}, {torch.get_num_threads()} thread(s), "
          f"{ssse_ext.build_info()['cpu_isa']} kernels; k = {a.k} rows, CPU time, best of "
          f"{a.repeats}")
    print("| block | dtype | blocks (MiB) | check + F⁻¹v s | one read s | check / read "
          "| write s | read + write s | write / (read + write) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in (256, 100):
        for dtype in (torch.float64, torch.float32):
            r = case(size, dtype, a.k, a.blocks_mib, a.repeats)
            print(f"| {size} | {r['dtype']} | {r['blocks']} ({r['mib']:.0f}) | "
                  f"{r['check']:.4f} | {r['read']:.4f} | {r['check'] / r['read']:.2f} | "
                  f"{r['write']:.4f} | {r['read_write']:.4f} | "
                  f"{r['write'] / r['read_write']:.2f} |")


if __name__ == "__main__":
    main()
