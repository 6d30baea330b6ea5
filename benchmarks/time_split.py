"""Per-kernel time split, on CUDA measured with CUDA events: the Gram accumulation, the inverse, the
Woodbury update and the apply of each CUDA kernel set (simt, tc, and tc-m8n8k4 for the Gram)
beside torch's pieces of the closed form (bmm, cholesky, cholesky_inverse) in the same dtype on
the same inputs; then (--resnet18) the build on the ResNet-18-size per_parameter layout
(43 692 blocks of <= 256) against the same set's rate on 16 x 1024.

With --device cpu, the same split of the CPU kernels (the instruction set SSSE_CPU_ISA chose),
timed by the host clock, and the float64 matmul rate beside each dtype's: the CPU kernels
compute in float64 for both dtypes, so on a CPU whose float64 rate is half its float32 rate the
float32 closed form's Gram (a full one, in float32) and the build's (half of it, in float64)
cost the same arithmetic time. Run it with OMP_NUM_THREADS set (one thread: the kernels' own
rate); each row is labelled with the CPU, threads and instruction set.

Every result is checked against a float64 closed form before it is timed; a kernel whose result is
off is reported as such and not timed. Kernels are called through ssse_ext._ops (no input
validation, no host synchronisation), warmed up, and timed as the median of --repeats.

    python benchmarks/time_split.py [--cases 8192:16:1024,8192:16:4096] [--resnet18] [--json F]
    OMP_NUM_THREADS=1 python benchmarks/time_split.py --device cpu [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

import ssse_ext
from ssse_ext import BlockLayout, _ops
from ssse_ext.bench import _describe

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-10}  # of the build against float64
# (1e-10: a block with fewer rows than its size is singular up to the damping, kappa ~ 1e5)
UPDATE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


DEVICE = torch.device("cuda")
CPU_CASES = "1024:4:256,4096:16:1024,256:4:1024"  # ssse bench's CPU cases
MATMUL_SIZE = {"cuda": 8192, "cpu": 2048}  # a dry run: 512


def _kernel_set(kernels: str):
    """The CUDA kernel set ``kernels`` inside the block; the CPU has one (chosen at import)."""
    return ssse_ext.use_cuda_kernels(kernels) if DEVICE.type == "cuda" else \
        contextlib.nullcontext()


def matmul_gflops(dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, dtype=dtype, device=DEVICE)
    return 2 * size**3 / time_ms(lambda: a @ a, repeats) / 1e6


class _Timer:
    """CUDA events on a CUDA device; the host clock elsewhere (a dry run of the script's logic)."""

    def __init__(self):
        self.cuda = DEVICE.type == "cuda"
        if self.cuda:
            self.start, self.end = (torch.cuda.Event(enable_timing=True),
                                    torch.cuda.Event(enable_timing=True))

    def __enter__(self):
        if self.cuda:
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def time_ms(fn, repeats: int, setup=None, warmup: int = 1) -> float:
    """Median milliseconds of fn() between CUDA events; setup() (untimed) runs before each."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        with _Timer() as t:
            fn()
        if i >= warmup:
            times.append(t.ms)
    return statistics.median(times)


def closed_form(x: torch.Tensor, nb: int, block: int, damping: float, normalizer: float):
    """torch's closed form, returning its three pieces' outputs: (gram, chol, inverse)."""
    xb = x.view(x.shape[0], nb, block).transpose(0, 1)
    gram = torch.bmm(xb.transpose(1, 2), xb) / normalizer
    gram.diagonal(dim1=1, dim2=2).add_(damping)
    chol = torch.linalg.cholesky(gram)
    return gram, chol, torch.cholesky_inverse(chol)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def packed_blocks(packed: torch.Tensor, nb: int, block: int) -> torch.Tensor:
    return packed.view(nb, block, block)


def split_case(n: int, nb: int, block: int, dtype, kernel_sets, repeats: int, update_rows: int,
               damping: float, matmul_size: int = 512) -> dict:
    d = nb * block
    dev = DEVICE
    gen = torch.Generator(device=dev).manual_seed(1234)
    x64 = torch.randn(n, d, generator=gen, dtype=torch.float64, device=dev)
    oracle = closed_form(x64, nb, block, damping, float(n))[2]
    x = x64.to(dtype)
    del x64
    layout = BlockLayout.fixed(d, block)
    host = layout.table()
    tdev = host.to(dev)
    out = {"n": n, "blocks": nb, "B": block, "dtype": str(dtype)[6:], "sets": {},
           "machine": _describe(dev)}

    # torch, same dtype: the pieces of cholesky_inverse(cholesky(bmm)).
    gram_t, chol_t, inv_t = closed_form(x, nb, block, damping, float(n))
    out["torch_err"] = rel(inv_t, oracle)
    xb = x.view(n, nb, block).transpose(0, 1)
    out["torch_bmm_ms"] = time_ms(lambda: torch.bmm(xb.transpose(1, 2), xb), repeats)
    out["torch_cholesky_ms"] = time_ms(lambda: torch.linalg.cholesky(gram_t), repeats)
    out["torch_cholesky_inverse_ms"] = time_ms(lambda: torch.cholesky_inverse(chol_t), repeats)
    out["torch_closed_form_ms"] = time_ms(
        lambda: closed_form(x, nb, block, damping, float(n)), repeats)
    del gram_t, chol_t, inv_t
    out["matmul_gflops"] = matmul_gflops(dtype, matmul_size, repeats)
    # the rate of the arithmetic the kernels do (float64) where it is not the case's own
    out["matmul64_gflops"] = out["matmul_gflops"] if dtype == torch.float64 else \
        matmul_gflops(torch.float64, matmul_size, repeats)

    v = torch.randn(d, 1, dtype=dtype, device=dev)
    g_up = x[:update_rows].contiguous()
    for kernels in kernel_sets:
        res = {}
        out["sets"][kernels] = res
        try:
            with _kernel_set(kernels):
                gram = torch.zeros(layout.numel, dtype=torch.float64, device=dev)
                _ops.gram_accumulate_(x, host, tdev, gram)
                gram_keep = gram.clone()
                packed, info = _ops.inverse_from_gram(gram, host, tdev, damping, float(n), dtype)
                res["build_err"] = rel(packed_blocks(packed, nb, block), oracle)
                if info.count_nonzero().item() or not res["build_err"] <= TOLERANCE[dtype]:
                    res["error"] = f"build error {res['build_err']:.1e}: not timed"
                    continue
                res["gram_ms"] = time_ms(lambda: _ops.gram_accumulate_(x, host, tdev, gram),
                                         repeats)
                res["gram_tflops"] = 2.0 * n * d * block / res["gram_ms"] / 1e9
                if kernels == "tc-m8n8k4":  # only the Gram differs from tc
                    continue
                work = torch.empty_like(gram_keep)
                res["inverse_ms"] = time_ms(
                    lambda: _ops.inverse_from_gram(work, host, tdev, damping, float(n), dtype),
                    repeats, setup=lambda: work.copy_(gram_keep))
                del gram, work
                # Woodbury update of update_rows rows on a copy of the inverse.
                target = packed.clone()
                upd = target.clone()
                info = _ops.sherman_morrison_(upd, host, tdev, g_up, float(n), 1, True)
                _ops.sherman_morrison_(upd, host, tdev, g_up, float(n), -1, True)
                res["update_err"] = rel(packed_blocks(upd, nb, block),
                                        packed_blocks(target, nb, block).double())
                if info.count_nonzero().item() or not res["update_err"] <= UPDATE_TOLERANCE[dtype]:
                    res["error"] = f"update error {res['update_err']:.1e}: update not timed"
                else:
                    res["update_ms"] = time_ms(
                        lambda: _ops.sherman_morrison_(upd, host, tdev, g_up, float(n), 1, True),
                        repeats, setup=lambda: upd.copy_(target))
                    res["update_vs_matmul"] = (4.0 * g_up.shape[0] * d * block / res["update_ms"]
                                               / 1e6 / out["matmul_gflops"])
                del upd, target
                # Apply: bytes of the inverse over time, against a device copy of it.
                got = torch.empty_like(v)
                _ops.apply_inverse(packed, host, tdev, v, None, 1.0, got)
                expect = torch.bmm(packed_blocks(packed, nb, block).double(),
                                   v.double().view(nb, block, 1)).view(d, 1)
                res["apply_err"] = rel(got, expect)
                res["apply_ms"] = time_ms(lambda: _ops.apply_inverse(packed, host, tdev, v, None,
                                                                     1.0, got), repeats * 5)
                copy_ms = time_ms(lambda: packed.clone(), repeats * 5)
                nbytes = packed.numel() * packed.element_size()
                res["apply_gbs"] = nbytes / res["apply_ms"] / 1e6
                res["apply_vs_copy"] = res["apply_gbs"] / (2 * nbytes / copy_ms / 1e6)
                res["build_ms"] = res["gram_ms"] + res["inverse_ms"]
                res["build_vs_closed_form"] = out["torch_closed_form_ms"] / res["build_ms"]
                del packed
        except Exception as exc:  # report and go on with the next set
            res["error"] = f"{type(exc).__name__}: {exc}"
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def resnet18_shapes():
    """torchvision resnet18's parameter shapes (10 classes), named_parameters() order."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for blk in range(2):
            first_in = cin if blk == 0 else cout
            shapes += [(cout, first_in, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,),
                       (cout,)]
            if blk == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
        cin = cout
    return shapes + [(10, 512), (10,)]


def resnet18_case(kernel_sets, n: int, chunk: int, damping: float, dtype=torch.float32,
                  shapes=None) -> dict:
    """Build on the ResNet-18 per_parameter layout from n random rows in chunks (events around
    the kernel calls only); three blocks checked against a float64 closed form."""
    layout = BlockLayout.per_parameter(resnet18_shapes() if shapes is None else shapes, 256)
    dev = DEVICE
    host = layout.table()
    tdev = host.to(dev)
    d, nb = layout.dim, layout.num_blocks
    checked = [0, nb // 2, nb - 3]  # conv1's first block, a layer3 block, the classifier's last
    out = {"blocks": nb, "d": d, "n": n, "chunk": chunk, "dtype": str(dtype)[6:], "sets": {}}
    small = BlockLayout.per_parameter(resnet18_shapes()[:6], 256)  # warm-up: loads the kernels
    small_host = small.table()
    for kernels in kernel_sets:
        res = {}
        out["sets"][kernels] = res
        try:
            with _kernel_set(kernels):
                xs = torch.randn(16, small.dim, dtype=dtype, device=dev)
                gs = torch.zeros(small.numel, dtype=torch.float64, device=dev)
                _ops.gram_accumulate_(xs, small_host, small_host.to(dev), gs)
                _ops.inverse_from_gram(gs, small_host, small_host.to(dev), damping, 16.0, dtype)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                gram = torch.zeros(layout.numel, dtype=torch.float64, device=dev)
                cols = {b: [] for b in checked}
                gram_ms = 0.0
                for c in range(0, n, chunk):
                    gen = torch.Generator(device=dev).manual_seed(c)
                    x = torch.randn(min(chunk, n - c), d, generator=gen, dtype=dtype, device=dev)
                    for b in checked:
                        cols[b].append(x[:, layout.slice(b)].double().cpu())
                    with _Timer() as t:
                        _ops.gram_accumulate_(x, host, tdev, gram)
                    gram_ms += t.ms
                    del x
                with _Timer() as t:
                    packed, info = _ops.inverse_from_gram(gram, host, tdev, damping, float(n),
                                                          dtype)
                res["gram_ms"] = gram_ms
                res["inverse_ms"] = t.ms
                res["info_nonzero"] = int(info.count_nonzero().item())
                errs = []
                for b in checked:
                    xb = torch.cat(cols[b])
                    s = xb.shape[1]
                    f = xb.T @ xb / n + damping * torch.eye(s, dtype=torch.float64)
                    o = layout.offsets[b]
                    errs.append(rel(packed[o:o + s * s].view(s, s).cpu(), torch.linalg.inv(f)))
                res["max_block_err"] = max(errs)
                res["build_ms"] = gram_ms + res["inverse_ms"]
                res["rate_tflops"] = 2.0 * n * d * 256 / res["build_ms"] / 1e9
                del gram, packed
        except Exception as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _scaled(x, scale: float):
    return None if x is None else x * scale


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def times(x):
    return "-" if x is None else f"{x:.2f}x"


def _rate_unit() -> tuple[float, str]:
    """The scale and name of the rates printed: TF/s on a GPU, GFLOP/s on a CPU."""
    return (1.0, "TF/s") if DEVICE.type == "cuda" else (1e3, "GFLOP/s")


def print_split(case: dict):
    sets = case["sets"]
    names = list(sets)
    scale, unit = _rate_unit()
    rates = f"matmul {case['matmul_gflops'] / 1e3 * scale:.1f} {unit}"
    if case["dtype"] != "float64":
        rates += f", float64 matmul {case['matmul64_gflops'] / 1e3 * scale:.1f}"
    print(f"\n### {case['blocks']}x{case['B']}, n={case['n']}, {case['dtype']} "
          f"({rates}; ms, median; {case['machine']})")
    print("| piece | " + " | ".join(names) + " | torch |")
    print("|---" * (len(names) + 2) + "|")
    torch_col = {"gram_ms": case["torch_bmm_ms"],
                 "inverse_ms": case["torch_cholesky_ms"] + case["torch_cholesky_inverse_ms"],
                 "build_ms": case["torch_closed_form_ms"]}
    labels = [("gram_ms", "Gram (torch: bmm)"), ("gram_tflops", f"Gram {unit} (2nBd)"),
              ("inverse_ms", "inverse (torch: cholesky + cholesky_inverse)"),
              ("build_ms", "build (torch: closed form)"), ("build_vs_closed_form", "vs closed form"),
              ("build_err", "build err"), ("update_ms", "update"),
              ("update_vs_matmul", "update/matmul"), ("apply_ms", "apply"),
              ("apply_vs_copy", "apply/copy")]
    for key, label in labels:
        cells = []
        for nm in names:
            val = sets[nm].get(key)
            if key == "gram_tflops" and val is not None:
                val *= scale
            spec = ".1e" if key.endswith("err") else (".3f" if key.endswith("ms") else ".2f")
            cells.append(fmt(val, spec))
        t = torch_col.get(key)
        if key == "build_err":
            t = case["torch_err"]
        tcell = fmt(t, ".1e" if key == "build_err" else ".3f")
        print(f"| {label} | " + " | ".join(cells) + f" | {tcell} |")
    for nm in names:
        if "error" in sets[nm]:
            print(f"  {nm}: {sets[nm]['error']}")


def print_summary(report: dict):
    """One line per case, dtype and kernel set (and torch), for the end of a log."""
    scale, unit = _rate_unit()
    clock = "CUDA-event timings" if DEVICE.type == "cuda" else "the host clock"
    print(f"\n## split summary (ms, median of {clock}; {report['machine']})")
    print(f"| case | dtype | kernels | Gram | Gram {unit} | inverse | build | vs torch | build err |"
          " update/matmul | apply/copy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in report["cases"]:
        case = f"{c['blocks']}x{c['B']}, n={c['n']}"
        tinv = c["torch_cholesky_ms"] + c["torch_cholesky_inverse_ms"]
        print(f"| {case} | {c['dtype']} | torch | {c['torch_bmm_ms']:.2f} | "
              f"{2.0 * c['n'] * c['blocks'] * c['B'] ** 2 / c['torch_bmm_ms'] / 1e9 * scale:.1f} | "
              f"{tinv:.2f} | {c['torch_closed_form_ms']:.2f} | 1.00x | {c['torch_err']:.1e} | - | - |")
        for k, r in c["sets"].items():
            print(f"| {case} | {c['dtype']} | {k} | {fmt(r.get('gram_ms'))} | "
                  f"{fmt(_scaled(r.get('gram_tflops'), scale), '.1f')} | "
                  f"{fmt(r.get('inverse_ms'))} | "
                  f"{fmt(r.get('build_ms'))} | {times(r.get('build_vs_closed_form'))} | "
                  f"{fmt(r.get('build_err'), '.1e')} | {fmt(r.get('update_vs_matmul'))} | "
                  f"{fmt(r.get('apply_vs_copy'))} |" + (f" {r['error']}" if "error" in r else ""))
    r18 = report.get("resnet18")
    if r18:
        for k, r in r18["sets"].items():
            print(f"| resnet18 {r18['blocks']} blocks, n={r18['n']} | {r18['dtype']} | {k} | "
                  f"{fmt(r.get('gram_ms'), '.1f')} | - | {fmt(r.get('inverse_ms'), '.1f')} | "
                  f"{fmt(r.get('build_ms'), '.1f')} | {fmt(r.get('rate_tflops'), '.1f')} TF/s | "
                  f"{fmt(r.get('max_block_err'), '.1e')} | - | - |"
                  + (f" {r['error']}" if "error" in r else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None,
                   help="comma-separated n:blocks:B cases (default: 8192:16:1024,8192:16:4096 "
                        f"on CUDA, {CPU_CASES} on the CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the CPU kernels' split, timed by the host clock")
    p.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    p.add_argument("--kernels", default="simt,tc,tc-m8n8k4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--update-rows", type=int, default=1024)
    p.add_argument("--damping", type=float, default=1e-4)
    p.add_argument("--resnet18", action="store_true",
                   help="also the ResNet-18-size layout (float32, n rows in chunks)")
    p.add_argument("--resnet18-only", action="store_true", help="only the ResNet-18-size case")
    p.add_argument("--resnet18-rows", type=int, default=2048)
    p.add_argument("--resnet18-chunk", type=int, default=256)
    p.add_argument("--json", default=None)
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="run the script's logic on the CPU kernels with tiny cases (no timing "
                        "meaning): a check of the script itself")
    args = p.parse_args(argv)
    global DEVICE
    if args.dry_run_cpu or args.device == "cpu":
        DEVICE = torch.device("cpu")
        if (args.resnet18 or args.resnet18_only) and not args.dry_run_cpu:
            p.error("--resnet18 needs --device cuda (its blocks take 23 GiB)")
    elif not torch.cuda.is_available():
        print("time_split: no CUDA device visible to torch; nothing to time", file=sys.stderr)
        return 2
    if DEVICE.type == "cuda" and not ssse_ext.build_info()["cuda_compiled"]:
        print("time_split: ssse_ext was built without CUDA kernels", file=sys.stderr)
        return 2
    kernel_sets = [k for k in args.kernels.split(",") if k]
    if args.device == "cpu" and not args.dry_run_cpu:
        kernel_sets = [f"cpu {ssse_ext.build_info()['cpu_isa']}"]  # the one set of this CPU
    cases = args.cases or (CPU_CASES if DEVICE.type == "cpu" else "8192:16:1024,8192:16:4096")
    matmul_size = 512 if args.dry_run_cpu else MATMUL_SIZE[DEVICE.type]
    torch.backends.cuda.matmul.allow_tf32 = False
    dtypes = [torch.float32, torch.float64] if args.dtype == "both" else \
        [getattr(torch, args.dtype)]
    report = {"machine": "cpu dry run" if args.dry_run_cpu else _describe(DEVICE),
              "cases": [], "resnet18": None}
    t0 = time.time()
    if not args.resnet18_only:
        for case in cases.split(","):
            n, nb, block = (int(v) for v in case.split(":"))
            for dtype in dtypes:
                print(f"split {nb}x{block}, n={n}, {str(dtype)[6:]} ...", flush=True)
                report["cases"].append(split_case(n, nb, block, dtype, kernel_sets, args.repeats,
                                                  args.update_rows, args.damping, matmul_size))
                print_split(report["cases"][-1])
    if args.resnet18 or args.resnet18_only:
        sets = [k for k in kernel_sets if k != "tc-m8n8k4"]
        print(f"resnet18 layout, n={args.resnet18_rows} ...", flush=True)
        shapes = resnet18_shapes()[:12] if args.dry_run_cpu else None
        r = resnet18_case(sets, args.resnet18_rows, args.resnet18_chunk, args.damping,
                          shapes=shapes)
        report["resnet18"] = r
        print(f"\n### ResNet-18 per_parameter layout: {r['blocks']} blocks, d={r['d']}, "
              f"n={r['n']} in chunks of {r['chunk']}, float32")
        print("| kernels | Gram ms | inverse ms | build ms | TF/s (2nBd, B=256) | "
              "rate / 16x1024 rate | max block err |")
        print("|---|---|---|---|---|---|---|")
        for k, res in r["sets"].items():
            ref = None
            for c in report["cases"]:
                if (c["B"], c["blocks"], c["dtype"]) == (1024, 16, "float32") and \
                        c["sets"].get(k, {}).get("build_ms"):
                    rk = c["sets"][k]
                    ref = 2.0 * c["n"] * c["blocks"] * c["B"] * c["B"] / rk["build_ms"] / 1e9
            ratio = res.get("rate_tflops") / ref if ref and res.get("rate_tflops") else None
            print(f"| {k} | {fmt(res.get('gram_ms'), '.1f')} | {fmt(res.get('inverse_ms'), '.1f')}"
                  f" | {fmt(res.get('build_ms'), '.1f')} | {fmt(res.get('rate_tflops'), '.1f')} | "
                  f"{fmt(ratio)} | {fmt(res.get('max_block_err'), '.1e')} |")
            if "error" in res:
                print(f"  {k}: {res['error']}")
    print_summary(report)
    print(f"\ntime_split: {time.time() - t0:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
