"""The sharded fit (ssse.fit_inverse_fisher(..., comm=ssse.comm.TorchComm(...))) on 2 and 3 CPU
ranks, one thread each, gloo, against the fit of one process.

For each number of ranks and each exchange ("reduce_scatter": every rank accumulates all blocks
for its rows, then each owner gets the sum of its blocks; "all_to_all": gradient slices go to
the blocks' owners), every rank reports its peak memory during the fit (the high-water mark of
its resident memory, reset before the fit), the bytes it sent, and the fit time (median of the
repeats, between barriers); the speed-up is over one rank, the fit of one process (a comm of
one process takes the local path), measured in the same run. The first fit of every
configuration is checked against the single-process inverse before anything is timed.

The default case makes the Gram accumulation dominate: a linear model of d = 9216 parameters
(18 classes x 512), blocks of B = 512, n = 4096 samples, float32 (Gram: n d B = 1.9e10
multiply-adds; gradients: n d).

    python benchmarks/bench_distributed.py [--ranks 1,2,3] [--samples 4096] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

DESIGNS = ("reduce_scatter", "all_to_all")
# Relative error of the sharded inverse against the single-process one of the same dtype: both
# round the same float64 inverse once (docs/maths.md), so they differ by ~2u.
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}
MIB = float(1 << 20)


def problem(args, dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(args.samples, args.features, generator=g, dtype=torch.float64)
    y = torch.randint(0, args.classes, (args.samples,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(args.features, args.classes).to(dtype).eval()
    return X.to(dtype), y, model


def memory() -> tuple[int, int]:
    """(resident, high-water mark) of this process, in bytes."""
    text = Path("/proc/self/status").read_text()
    return tuple(int(re.search(key + r":\s+(\d+)", text).group(1)) * 1024
                 for key in ("VmRSS", "VmHWM"))


def reset_peak() -> int:
    """Resets the high-water mark (Linux clear_refs) and returns the resident bytes now."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return memory()[0]


def fit_kwargs(args):
    return dict(damping=args.damping, layout="fixed", block_size=args.block_size,
                chunk_size=args.chunk_size, representation="dense", progress=False)


def rank_main(rank: int, world: int, init: str, args, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    import ssse
    import ssse.comm

    dtype = getattr(torch, args.dtype)
    X, y, model = problem(args, dtype)
    part = ssse.comm.TorchComm().share(args.samples)
    mine = [(X[part.start:part.stop], y[part.start:part.stop])]
    loss = nn.CrossEntropyLoss(reduction="none")
    ref = torch.load(Path(out) / "reference.pt")
    rows = []

    def timed(fit):
        seconds, cpu, peaks, result = [], [], [], None
        for _ in range(args.repeats):
            result = None
            base = reset_peak()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            result = fit()
            c1 = time.process_time()
            dist.barrier()
            seconds.append(time.perf_counter() - t0)
            cpu.append(c1 - c0)
            peaks.append(memory()[1] - base)
        return statistics.median(seconds), statistics.median(cpu), max(peaks), result

    def fit(design):
        return ssse.fit_inverse_fisher(model, loss, mine, **fit_kwargs(args),
                                       comm=ssse.comm.TorchComm(exchange=design))

    if world == 1:  # one process: the local path, the baseline of the sharded one
        fit("auto")  # warm-up
        t, cpu, peak, _ = timed(lambda: fit("auto"))
        rows.append({"ranks": 1, "exchange": "single process", "rank": 0, "seconds": t,
                     "cpu_seconds": cpu, "peak_bytes": peak})
    for design in (DESIGNS if world > 1 else ()):
        # checked before timing: the whole inverse against the single-process one
        inv = fit(design)
        first, last = inv.block_range
        offsets = inv.layout.offsets
        lo = offsets[first] if first < last else 0
        want = ref[lo:lo + inv.local.packed.numel()].double()
        sums = torch.tensor([float((inv.local.packed.double() - want).pow(2).sum()),
                             float(want.pow(2).sum())], dtype=torch.float64)
        dist.all_reduce(sums)
        error = float(sums[0].sqrt() / sums[1].sqrt())
        if not error <= TOLERANCE[dtype]:
            raise AssertionError(f"{design} on {world} ranks: relative error {error:.2e} "
                                 f"against the single-process inverse, tolerance "
                                 f"{TOLERANCE[dtype]:g}")
        del inv
        t, cpu, peak, inv = timed(lambda: fit(design))
        s = inv.fit_stats
        rows.append({"ranks": world, "exchange": design, "rank": rank, "seconds": t,
                     "cpu_seconds": cpu, "peak_bytes": peak, "bytes_sent": s["bytes_sent"],
                     "control_bytes": s["control_bytes"],
                     "accumulator_bytes": s["accumulator_bytes"],
                     "inverse_bytes": s["inverse_bytes"], "rel_error": error,
                     "blocks": list(inv.block_range)})
        del inv
    (Path(out) / f"rows-{world}-{rank}.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args, out: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    init = f"file://{out}/pg-{world}-{time.monotonic_ns()}"
    procs = [ctx.Process(target=rank_main, args=(r, world, init, args, str(out)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"{world} ranks: exit codes {[p.exitcode for p in procs]}")
    rows = []
    for r in range(world):
        rows += json.loads((out / f"rows-{world}-{r}.json").read_text())
    return rows


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} logical CPUs visible, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def table(rows: list[dict]) -> str:
    """The speed-up is over one rank (the fit of one process); "by CPU time" divides its CPU
    time by the largest of the P ranks' (what one core per rank gives, on a machine where
    other work takes CPU time away from the wall-clock measurement)."""
    one = next(r for r in rows if r["ranks"] == 1)
    out = ["| ranks | exchange | fit (s, median) | speed-up over 1 rank | CPU s per rank | "
           "speed-up by CPU time | peak memory per rank (MiB) | accumulators per rank (MiB) | "
           "sent per rank (MiB) | rel. error |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["ranks"], r["exchange"]) for r in rows},
                  key=lambda k: (k[0], k[1] != "single process", k[1]))
    for ranks, design in keys:
        group = sorted((r for r in rows if (r["ranks"], r["exchange"]) == (ranks, design)),
                       key=lambda r: r["rank"])
        t = max(r["seconds"] for r in group)
        cpu = max(r["cpu_seconds"] for r in group)
        per = lambda key, scale=MIB, digits=1: " / ".join(  # noqa: E731
            f"{r[key] / scale:.{digits}f}" for r in group)
        speed, speed_cpu = one["seconds"] / t, one["cpu_seconds"] / cpu
        out.append(f"| {ranks} | {design} | {t:.2f} | {speed:.2f}x | {per('cpu_seconds', 1, 2)} | "
                   f"{speed_cpu:.2f}x | {per('peak_bytes')} | "
                   + (f"{per('accumulator_bytes')} | {per('bytes_sent')} | "
                      f"{group[0]['rel_error']:.1e} |" if "bytes_sent" in group[0]
                      else "- | - | - |"))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,3", help="numbers of ranks (default: 1,2,3)")
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--features", type=int, default=511)
    p.add_argument("--classes", type=int, default=18)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=128, help="gradient rows per chunk")
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed fits (after the checked one)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    if 1 not in ranks:
        ranks = [1] + ranks  # the speed-up is over one rank, measured in this run
    # one thread per rank; large buffers mapped and unmapped by malloc, so that the resident
    # high-water mark measures the fit's live memory
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)

    import ssse

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        dtype = getattr(torch, args.dtype)
        X, y, model = problem(args, dtype)
        ref = ssse.fit_inverse_fisher(model, nn.CrossEntropyLoss(reduction="none"), [(X, y)],
                                      **fit_kwargs(args))
        torch.save(ref.packed, out / "reference.pt")
        d, nb = ref.dim, ref.layout.num_blocks
        del ref
        rows = []
        for world in ranks:
            rows += run(world, args, out)
    load_after = os.getloadavg()
    print(f"sharded fit: d={d}, {nb} blocks of <= {args.block_size}, n={args.samples}, "
          f"{args.dtype}, chunks of {args.chunk_size} rows, one thread per rank, gloo")
    print(f"machine: {machine()}")
    busy = max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}"
          + (" (busy: other work shared the CPUs)" if busy else ""))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args),
                                               "machine": machine(),
                                               "load": [load_before, load_after]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
