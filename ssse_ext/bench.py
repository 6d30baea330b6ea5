"""Kernel benchmark: build, update and apply of the block inverse Fisher, checked then timed.

Each case first checks the result against a float64 closed form (and refuses to time a result
above tolerance), then times with a warm-up and the median of repeats, and prints ratios
measured in the same run (the performance method of docs/maths.md):

* the build's effective rate, ``4 n d B`` flops (the chunked recurrence's work) over its time,
  against this machine's ``torch.matmul`` rate for the same dtype (TF32 off);
* the speed-up over the per-sample PyTorch loop (``bmm`` + ``baddbmm_`` per gradient, batched
  over blocks; timed on a prefix of the rows and scaled, since its cost per row is constant) and
  over the closed form ``cholesky_inverse(cholesky(lambda I + G^T G / N))``;
* the chunked Sherman–Morrison (Woodbury) update of an existing inverse;
* the apply ``theta + s F^{-1} v`` in GB/s against a copy of the inverse;
* peak memory (CUDA: the allocator's peak; CPU: the peak rise of the resident set).

On CUDA, ``--kernels simt,tc`` times each CUDA kernel set on the same inputs, with the baselines
(torch's closed form, the per-sample loop) measured once per case; the closed form's own error
against the float64 oracle is reported beside ours, and the apply is also timed at the op level
(``apply kernel/copy``: no input validation, no host synchronisation).

Run ``python benchmarks/bench_fisher.py --help`` or ``ssse bench --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

import torch

import ssse_ext
from ssse_ext import BlockLayout, build_inverse_fisher, validation

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---- timing and memory ------------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: The clocks of ``--clock``: wall time, or the process's CPU time (summed over its threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median time of fn() in seconds on the clock chosen by ``--clock`` (wall time by
    default), after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = _clock()
        fn()
        _sync(device)
        times.append(_clock() - t0)
    return statistics.median(times)


class _PeakRSS:
    """Samples the resident set size in a thread; ``peak - start`` is the peak extra memory."""

    def __init__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: no measurement
            return 0

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def measure(fn, device: torch.device):
    """``(fn(), seconds, peak extra bytes)`` of one call: the allocator's peak above what was
    allocated before on CUDA, the peak rise of the resident set on the CPU."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) - before
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, rss.peak - rss.start


def _peak_memory(fn, device: torch.device) -> int:
    """Peak extra bytes while fn() runs."""
    return measure(fn, device)[2]


# ---- the competitors ------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit 2, like ``ssse``'s."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(convert, check, what: str):
    """An argparse type: ``convert`` then ``check(value, "value")`` (a validation helper); a
    value either refuses is reported as ``expected WHAT, got TEXT``."""
    def parse(text: str):
        try:
            return check(convert(text), "value")
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    parse.__name__ = what
    return parse


#: Seeds of torch.Generator, numpy and scikit-learn alike.
MAX_SEED = 2**32 - 1


def check_seed(value, name: str) -> int:
    out = validation.check_int(value, name)
    if not 0 <= out <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, {MAX_SEED}], got {out}")
    return out


positive_int = checked(int, validation.check_positive_int, "an integer > 0")
positive_float = checked(float, validation.check_positive_float, "a finite number > 0")
seed = checked(int, check_seed, f"an integer in [0, {MAX_SEED}]")


def parse_cases(parser, text: str, example: str) -> list[tuple[int, int, int]]:
    """``--cases`` as triples of positive integers ``a:b:c,...``; a bad value is a usage error
    that shows ``example``."""
    try:
        cases = [tuple(int(x) for x in c.split(":")) for c in text.split(",")]
        if all(len(c) == 3 and min(c) > 0 for c in cases):
            return cases
    except ValueError:
        pass
    parser.error(f"--cases must look like {example}")


def check_destination(parser, path: str | None, option: str = "--json") -> None:
    """Refuses, before anything is measured, a results file that could not be written: a
    folder, or a file in a folder that does not exist or cannot be written."""
    if path is None:
        return
    target = os.path.abspath(path)
    if os.path.isdir(target):
        parser.error(f"{option}: {path} is a folder, expected a file")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        parser.error(f"{option}: the folder of {path} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        parser.error(f"{option}: cannot write in {folder} ({exc.strerror or exc})")


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Bytes free now on ``device`` and where the figure comes from."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), f"free on {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable of /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 1 << 62, "unknown"


def case_bytes(n: int, num_blocks: int, block: int, dtype) -> int:
    """Estimated peak bytes of :func:`run_case`: the float64 gradients, their copy in ``dtype``
    and the closed form's copy of them, and about a dozen block-diagonal matrices (the float64
    oracle and its Gram and Cholesky factors, the build's float64 accumulator, the inverses of
    the build, the update and the per-sample loop)."""
    elem = torch.finfo(dtype).bits // 8
    d = num_blocks * block
    return n * d * (16 + elem) + d * block * (48 + 6 * elem)


def _gib(n: int) -> str:
    return f"{n / 2**40:.1f} TiB" if n >= 2**40 else f"{n / 2**30:.1f} GiB"


def check_case_memory(parser, cases, dtypes, device: torch.device) -> None:
    """Refuses, before anything is allocated, a case whose estimated peak (:func:`case_bytes`)
    exceeds the memory free now."""
    free, source = available_bytes(device)
    for n, nb, block in cases:
        need = max(case_bytes(n, nb, block, dt) for dt in dtypes)
        if need > free:
            parser.error(f"--cases {n}:{nb}:{block} needs about {_gib(need)} on {device}, "
                         f"{_gib(free)} are available ({source}); choose smaller n, blocks or B")
        if device.type == "cuda":  # the gradients are drawn on the CPU, then copied
            host, where = available_bytes(torch.device("cpu"))
            if n * nb * block * 8 > host:
                parser.error(f"--cases {n}:{nb}:{block} needs about "
                             f"{_gib(n * nb * block * 8)} of CPU memory, {_gib(host)} are "
                             f"available ({where})")


def matmul_gflops(dtype, device, size: int, repeats: int) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    t = median_seconds(lambda: a @ b, device, repeats)
    return 2 * size**3 / t / 1e9


def closed_form_blocks(grads: torch.Tensor, num_blocks: int, block: int, damping: float,
                       normalizer: float) -> torch.Tensor:
    """Batched closed form with torch: (nb, B, B) Cholesky inverses."""
    x = grads.view(grads.shape[0], num_blocks, block).transpose(0, 1)  # (nb, n, B)
    gram = torch.bmm(x.transpose(1, 2), x) / normalizer
    gram.diagonal(dim1=1, dim2=2).add_(damping)
    return torch.cholesky_inverse(torch.linalg.cholesky(gram))


def per_sample_loop(grads: torch.Tensor, num_blocks: int, block: int, damping: float,
                    normalizer: float) -> torch.Tensor:
    """Paper eq. 7 one row at a time, batched over blocks (bmm + baddbmm_ per gradient)."""
    inv = torch.eye(block, dtype=grads.dtype, device=grads.device).repeat(num_blocks, 1, 1)
    inv /= damping
    for g in grads.view(grads.shape[0], num_blocks, block, 1):
        v = torch.bmm(inv, g)                                           # (nb, B, 1)
        den = normalizer + torch.bmm(g.transpose(1, 2), v)              # (nb, 1, 1)
        inv.baddbmm_(v / den, v.transpose(1, 2), alpha=-1.0)
    return inv


def _rel_err(inv: ssse_ext.BlockInverseFisher, ref: torch.Tensor) -> float:
    got = torch.stack([b.double() for b in inv.blocks]).cpu()
    ref = ref.cpu()
    return ((got - ref).norm() / ref.norm()).item()


# ---- one case -------------------------------------------------------------------------------

def run_case(n: int, num_blocks: int, block: int, dtype, device, *, repeats: int,
             loop_rows: int, damping: float, matmul_rate: float, seed: int,
             kernels: str | None = None, baselines: dict | None = None) -> dict:
    """One case, checked then timed. ``kernels``: the CUDA kernel set to time (default: the
    current one); ``baselines``: the closed-form and loop fields of an earlier row of the same
    case, reused instead of timing them again."""
    if kernels is not None:
        with ssse_ext.use_cuda_kernels(kernels):
            return run_case(n, num_blocks, block, dtype, device, repeats=repeats,
                            loop_rows=loop_rows, damping=damping, matmul_rate=matmul_rate,
                            seed=seed, baselines=baselines)
    d = num_blocks * block
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grads = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)
    ref = closed_form_blocks(grads, num_blocks, block, damping, float(n))  # float64 oracle
    g = grads.to(dtype)
    layout = BlockLayout.fixed(d, block)
    flops = 4.0 * n * d * block
    row = {"n": n, "blocks": num_blocks, "B": block, "d": d, "dtype": str(dtype)[6:],
           "device": str(device), "machine": _describe(device)}
    if device.type == "cuda":
        row["kernels"] = ssse_ext.cuda_kernels()

    # Build (default method): check, then time. A result above tolerance is reported, never timed.
    build = lambda: build_inverse_fisher(g, damping=damping, layout=layout,  # noqa: E731
                                         representation="dense")
    inv = build()
    err = _rel_err(inv, ref)
    row["build_rel_err"] = err
    row["matmul_gflops"] = matmul_rate
    if not err <= TOLERANCE[dtype]:
        print(f"    build error {err:.2e} above tolerance {TOLERANCE[dtype]:.0e}: not timed",
              flush=True)
        return row
    t_build = median_seconds(build, device, repeats)
    row.update(build_s=t_build, build_gflops=flops / t_build / 1e9,
               build_vs_matmul=flops / t_build / 1e9 / matmul_rate,
               build_peak_mb=_peak_memory(build, device) / 2**20)
    if baselines is None:
        baselines = _baselines(g, num_blocks, block, damping, ref, device, repeats=repeats,
                               loop_rows=loop_rows)
    row.update(baselines)
    row.update(speedup_vs_closed_form=row["closed_form_s"] / t_build,
               speedup_vs_loop=row["loop_s_est"] / t_build)
    row.update(_update_fields(g, layout, damping, ref, device, repeats=repeats,
                              matmul_rate=matmul_rate))
    row.update(_apply_fields(inv, ref, device, repeats=repeats))
    return row


def _baselines(g, num_blocks: int, block: int, damping: float, ref, device, *, repeats: int,
               loop_rows: int) -> dict:
    """The closed form with torch (Cholesky, same dtype: its error, then its time) and the
    per-sample PyTorch loop on a prefix, scaled to n rows (its cost per row is constant)."""
    n = g.shape[0]
    out = {}
    closed = closed_form_blocks(g, num_blocks, block, damping, float(n))
    out["closed_form_rel_err"] = ((closed.double() - ref).norm() / ref.norm()).item()
    del closed
    out["closed_form_s"] = median_seconds(
        lambda: closed_form_blocks(g, num_blocks, block, damping, float(n)), device, repeats)
    rows = min(n, loop_rows)
    out["loop_s_est"] = median_seconds(
        lambda: per_sample_loop(g[:rows], num_blocks, block, damping, float(n)),
        device, 1, warmup=1) * n / rows
    out["loop_rows_timed"] = rows
    return out


def _update_fields(g, layout: BlockLayout, damping: float, ref, device, *, repeats: int,
                   matmul_rate: float) -> dict:
    """The chunked Sherman-Morrison update of an accurate inverse built on the first half."""
    n, d, block = g.shape[0], layout.dim, layout.max_block_size
    half = n // 2
    base = build_inverse_fisher(g[:half], damping=damping, layout=layout, normalizer=float(n),
                                representation="dense")
    err_u = _rel_err(base.clone().update(g[half:]), ref)
    row = {"update_rel_err": err_u}
    if not err_u <= TOLERANCE[g.dtype]:
        print(f"    update error {err_u:.2e} above tolerance: not timed", flush=True)
        return row
    t_upd = median_seconds(lambda: base.clone().update(g[half:]), device, repeats)
    t_clone = median_seconds(lambda: base.clone(), device, repeats)
    t_upd = max(t_upd - t_clone, 1e-9)
    upd_flops = 4.0 * (n - half) * d * block
    row.update(update_s=t_upd, update_gflops=upd_flops / t_upd / 1e9,
               update_vs_matmul=upd_flops / t_upd / 1e9 / matmul_rate)
    return row


def _apply_fields(inv, ref, device, *, repeats: int) -> dict:
    """The apply (theta + s F^{-1} v): bandwidth against a copy of the inverse."""
    d, dtype, layout = inv.dim, inv.dtype, inv.layout
    theta = torch.randn(d, dtype=dtype, device=device)
    v = torch.randn(d, dtype=dtype, device=device)
    out = inv.apply_update(theta, v, 0.5)
    expect = theta.double() + 0.5 * torch.cat(
        [blk.to(device) @ v[layout.slice(b)].double() for b, blk in enumerate(ref)])
    err_a = ((out.double() - expect).norm() / expect.norm()).item()
    row = {"apply_rel_err": err_a}
    if not err_a <= TOLERANCE[dtype]:
        print(f"    apply error {err_a:.2e} above tolerance: not timed", flush=True)
        return row
    nbytes = inv.nbytes
    t_apply = median_seconds(lambda: inv.apply_update(theta, v, 0.5), device, repeats * 3)
    t_copy = median_seconds(lambda: inv.packed.clone(), device, repeats * 3)
    # The stores alone (what a caller that already validated its inputs pays).
    vv, tt = v.reshape(-1, 1), theta.reshape(-1, 1)
    out = torch.empty_like(vv)

    def kernel_only():
        for store in inv.stores:
            store.apply_into(vv, tt, 0.5, out)

    t_kernel = median_seconds(kernel_only, device, repeats * 3)
    row.update(apply_s=t_apply, apply_gbs=nbytes / t_apply / 1e9,
               copy_gbs=2 * nbytes / t_copy / 1e9,
               apply_vs_copy=(nbytes / t_apply) / (2 * nbytes / t_copy),
               apply_kernel_s=t_kernel,
               apply_kernel_vs_copy=(nbytes / t_kernel) / (2 * nbytes / t_copy))
    return row


def machine() -> dict:
    """Where numbers are measured: CPU model, torch threads, versions and the CUDA device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "ssse": ssse_ext.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _describe(device: torch.device) -> str:
    """The processor a row was measured on: the GPU's name, or the CPU's model, the threads
    and the instruction set of the CPU kernels (SSSE_CPU_ISA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    m = machine()
    return f"{m['cpu']}, {m['threads']} threads, {ssse_ext.build_info()['cpu_isa']}"


def format_table(rows: list[dict]) -> str:
    head = ("| case | dtype | kernels | build s | build GFLOP/s | matmul GFLOP/s | ratio | vs loop | "
            "vs closed form | update/matmul | apply/copy | apply kernel/copy | peak MB | "
            "build err | closed-form err | machine |")
    # "refused": the result was above tolerance against float64, so it was not timed.
    lines = [head, "|" + "---|" * 16]
    def f(r, key, fmt):
        return "refused" if r.get(key) is None else format(r[key], fmt)

    for r in rows:
        lines.append(
            f"| {r['blocks']}x{r['B']}, n={r['n']} | {r['dtype']} | {r.get('kernels', '-')} | "
            f"{f(r, 'build_s', '.3f')} | "
            f"{f(r, 'build_gflops', '.1f')} | {r['matmul_gflops']:.1f} | "
            f"{f(r, 'build_vs_matmul', '.2f')} | {f(r, 'speedup_vs_loop', '.0f')}x | "
            f"{f(r, 'speedup_vs_closed_form', '.2f')}x | {f(r, 'update_vs_matmul', '.2f')} | "
            f"{f(r, 'apply_vs_copy', '.2f')} | {f(r, 'apply_kernel_vs_copy', '.2f')} | "
            f"{f(r, 'build_peak_mb', '.0f')} | "
            f"{r['build_rel_err']:.1e} | {f(r, 'closed_form_rel_err', '.1e')} | "
            f"{r.get('machine', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="ssse bench", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    p.add_argument("--cases", default=None,
                   help="comma-separated n:blocks:B cases (default: 1024:4:256, "
                        "4096:16:1024 and 256:4:1024, fewer rows than a block, on CPU; "
                        "8192:16:1024 and 8192:16:4096 on CUDA); a case "
                        "that would not fit in the memory free now is refused")
    p.add_argument("--small", action="store_true", help="only the small case (a quick check)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (median)")
    p.add_argument("--loop-rows", type=positive_int, default=64,
                   help="rows of the per-sample loop actually timed (then scaled to n)")
    p.add_argument("--damping", type=positive_float, default=1e-4)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or cpu: the process's CPU time summed over its threads, "
                        "for a machine shared with other processes; CPU only, and comparable "
                        "with one thread (OMP_NUM_THREADS=1: torch's idle threads spin on CPU "
                        "time)")
    p.add_argument("--kernels", default=None,
                   help="CUDA only: comma-separated kernel sets to time on each case, e.g. "
                        "simt,tc (default: the current set, see SSSE_CUDA_KERNELS)")
    args = p.parse_args(argv)
    try:
        device = validation.check_device(args.device, "--device")
    except ValueError as exc:
        p.error(str(exc))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but torch sees no CUDA device")
    if device.type == "cuda" and args.clock != "wall":
        p.error("--clock cpu measures CPU time; it needs --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        p.error(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA devices")
    kernel_sets = [None]
    if args.kernels:
        if device.type != "cuda":
            p.error("--kernels selects CUDA kernel sets; it needs --device cuda")
        kernel_sets = [k.strip() for k in args.kernels.split(",") if k.strip()]
        bad = [k for k in kernel_sets if k not in ssse_ext.CUDA_KERNEL_SETS]
        if bad or not kernel_sets:
            p.error(f"--kernels must name sets among {ssse_ext.CUDA_KERNEL_SETS}, got {args.kernels!r}")
    if args.cases:
        cases = parse_cases(p, args.cases, "4096:16:1024,1024:4:256")
    elif device.type == "cuda":
        cases = [(8192, 16, 1024), (8192, 16, 4096)]
    else:
        # the last: fewer rows than a block, so each block is singular up to the damping
        cases = [(1024, 4, 256), (4096, 16, 1024), (256, 4, 1024)]
    if args.small:
        cases = cases[:1]
    dtypes = [torch.float32, torch.float64] if args.dtype == "both" else [DTYPES[args.dtype]]
    check_case_memory(p, cases, dtypes, device)
    check_destination(p, args.json)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    global _clock
    previous, _clock = _clock, CLOCKS[args.clock]
    try:
        return _run(args, device, cases, dtypes, kernel_sets)
    finally:
        _clock = previous


def _run(args, device: torch.device, cases, dtypes, kernel_sets) -> int:
    """The cases of ``ssse bench`` (arguments checked), printed as a table."""
    print(f"ssse_ext {ssse_ext.__version__} on {_describe(device)}; {args.clock} clock; build: "
          f"{ {k: v for k, v in ssse_ext.build_info().items() if k != 'version'} }", flush=True)
    rows = []
    for dtype in dtypes:
        rate = matmul_gflops(dtype, device, 2048 if device.type == "cpu" else 8192, args.repeats)
        for n, nb, block in cases:
            baselines = None
            for kernels in kernel_sets:
                label = f", {kernels} kernels" if kernels else ""
                print(f"  {nb}x{block}, n={n}, {str(dtype)[6:]}{label} ...", flush=True)
                row = run_case(n, nb, block, dtype, device, repeats=args.repeats,
                               loop_rows=args.loop_rows, damping=args.damping,
                               matmul_rate=rate, seed=args.seed, kernels=kernels,
                               baselines=baselines)
                rows.append(row)
                if "closed_form_s" in row:
                    baselines = {k: row[k] for k in ("closed_form_s", "closed_form_rel_err",
                                                     "loop_s_est", "loop_rows_timed")}
    print()
    print(format_table(rows))
    print("\nratio = build GFLOP/s (4 n d B basis) / torch.matmul GFLOP/s; vs loop / vs closed form"
          " = speed-ups of the build; update/matmul = chunked Sherman-Morrison update rate / matmul;"
          " apply/copy = apply GB/s (public API) / copy GB/s; apply kernel/copy = the same for the"
          " op alone; closed-form err = torch's closed form in the same dtype against float64;"
          " machine = the CPU (model, threads, kernel set) or GPU each row ran on.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _describe(device), "clock": args.clock, "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
