"""Real-model benchmark: fit the inverse Fisher of a ResNet-size CNN and serve one deletion
request, measured stage by stage against the cost a user weighs them against (one training
epoch over the same samples), with peak memory as a multiple of the inverse's size.

Stages, all on the same random images and labels (seeded): one SGD epoch; the per-sample
gradients alone; the fit (:meth:`ssse.Eraser.fit`: gradients and build); the build alone from
a stream of gradient rows (its rate on the ``2 n Σ s²`` basis against this machine's matmul
rate, and against the same build on a 16 × 1024 fixed layout: the cost of many small blocks);
one erase of ``k`` samples, against its floor, one batched forward and backward pass of the
same samples, and split into its stages (:attr:`ssse.Eraser.last_timings`: the rows, the step
and the model update, the check of every block, the write, the health probe). Every result is
checked before it is timed: the fit against a float64 closed form on a few blocks, the erase
against the same step computed with a float64 copy of those blocks. Every table is labelled
with the CPU (or GPU) it ran on.

Run ``python benchmarks/bench_model.py --help`` or ``ssse bench --model --help``.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings

import torch
from torch import nn

import ssse
import ssse_ext
from ssse.models import build_model, loss_function
from ssse_ext import BlockLayout, bench

__all__ = ["main", "run"]

ARCHS = {
    "resnet18": lambda width: {"arch": "resnet", "depth": 18, "in_channels": 3,
                               "num_classes": 10, "width": width or 64, "image_size": 32},
    "small_resnet": lambda width: {"arch": "small_resnet", "in_channels": 3,
                                   "num_classes": 10, "width": width or 96, "image_size": 32},
}
# Blocks whose inverse is checked against a float64 closed form after the fit.
_CHECKED_BLOCKS = 4


def _epoch(model: nn.Module, loss_fn, x, y, batch: int) -> None:
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for i in range(0, x.shape[0], batch):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[i:i + batch]), y[i:i + batch]).mean().backward()
        opt.step()


def _forward_backward(model: nn.Module, loss_fn, x, y) -> None:
    """One batched forward and backward pass (the floor of a request's cost)."""
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).mean().backward()


def _check_fit(model, loss_fn, x, y, inv: ssse_ext.BlockInverseFisher, damping: float) -> float:
    """Relative error of a few blocks (the largest ones) against a float64 closed form from
    the same per-sample gradients."""
    lay = inv.layout
    order = sorted(range(lay.num_blocks), key=lambda b: -lay.sizes[b])[:_CHECKED_BLOCKS]
    cols = torch.cat([torch.arange(lay.starts[b], lay.starts[b] + lay.sizes[b]) for b in order])
    cols = cols.to(x.device)
    rows = torch.cat([g[:, cols].double().cpu() for g in ssse.per_sample_grads(model, loss_fn,
                                                                                (x, y))])
    err, pos = 0.0, 0
    for b in order:
        s = lay.sizes[b]
        ref = ssse_ext.reference.closed_form_inverse(rows[:, pos:pos + s], damping,
                                                     inv.normalizer)
        got = inv.dense_block(b).double().cpu()
        err = max(err, float((got - ref).norm() / ref.norm()))
        pos += s
    return err


def _build_rate(layout: BlockLayout, n: int, rows: int, dtype, device, repeats: int) -> float:
    """GFLOP/s of the build alone (2 n Σ s² flops) from a stream of ``n`` random rows."""
    chunk = torch.randn(rows, layout.dim, dtype=dtype, device=device)

    def stream():
        for i in range(0, n, rows):
            yield chunk[:min(rows, n - i)]

    build = lambda: ssse_ext.build_inverse_fisher(stream(), damping=1e-3, layout=layout)  # noqa
    seconds = bench.median_seconds(build, device, repeats)
    return 2.0 * n * layout.numel / seconds / 1e9


def run(*, arch: str = "small_resnet", width: int | None = None, n: int = 256,
        block_size: int = 256, k: int = 16, device="cpu", dtype=torch.float32,
        damping: float = 1e-4, repeats: int = 1, seed: int = 0) -> dict:
    """Measures every stage; returns the numbers (see the module docstring)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    spec = ARCHS[arch](width)
    model = build_model(spec).to(device=device, dtype=dtype).eval()
    loss_fn = loss_function("cross_entropy")
    x = torch.randn(n, 3, 32, 32, dtype=dtype, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    d = sum(p.numel() for p in model.parameters())
    out = {"arch": arch, "spec": spec, "d": d, "n": n, "block_size": block_size, "k": k,
           "device": str(device), "dtype": str(dtype).removeprefix("torch."),
           "machine": bench.machine()}

    _epoch(model, loss_fn, x[:2], y[:2], 128)  # warm-up (kernels, allocator)
    _, out["epoch_s"], _ = bench.measure(lambda: _epoch(model, loss_fn, x, y, 128), device)

    def grads():
        return sum(g.shape[0] for g in ssse.per_sample_grads(model, loss_fn, (x, y)))

    _, out["grads_s"], _ = bench.measure(grads, device)

    eraser = ssse.Eraser(model, loss_fn, damping=damping, block_size=block_size)
    _, out["fit_s"], out["fit_peak_bytes"] = bench.measure(lambda: eraser.fit((x, y)), device)
    inv = eraser.inv_fisher
    out.update(inverse_bytes=inv.nbytes, blocks=inv.layout.num_blocks,
               stores={n: inv.representation.count(n) for n in sorted(set(inv.representation))},
               segments=sum(int(st.state()[1].get("segments", 1)) for st in inv.stores),
               fit_rel_err=_check_fit(model, loss_fn, x, y, inv,
                                                                   damping))

    # One request: its step checked against a float64 computation on a copy of a few blocks.
    theta, before = eraser.theta.clone(), inv.dense_block(0).double()
    removed = (x[:k], y[:k])
    _, out["erase_s"], out["erase_peak_bytes"] = bench.measure(
        lambda: eraser.erase(removed, epsilon=1.0), device)
    splits = [dict(eraser.last_timings)]
    g0 = torch.cat(list(ssse.per_sample_grads(model, loss_fn, removed)))
    s0 = inv.layout.sizes[0]
    step = (before @ g0[:, :s0].double().sum(0).cpu()) / (n - k)
    got = (eraser.theta[:s0] - theta[:s0]).double().cpu()
    out["erase_rel_err"] = float((got - step).norm() / step.norm())
    # Two more requests of k other samples: the resident set's peak depends on what the
    # allocator kept from earlier work, so the largest of the three is reported
    times, peaks = [out["erase_s"]], [out["erase_peak_bytes"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ssse_ext.HealthWarning)
        for i in (1, 2):
            if (i + 1) * k < n:
                _, t, p = bench.measure(lambda: eraser.erase((x[i * k:(i + 1) * k],
                                                               y[i * k:(i + 1) * k]),
                                                              epsilon=1.0), device)
                times.append(t)
                peaks.append(p)
                splits.append(dict(eraser.last_timings))
    median = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
    out["erase_s"], out["erase_peak_bytes"] = times[median], max(peaks)
    out["erase_split"] = splits[median]  # the stages of the median request
    out["erase_peaks"] = peaks
    out["erase_requests"] = len(times)
    # its floor: one batched forward and backward pass of the same number of samples
    out["forward_backward_s"] = bench.median_seconds(
        lambda: _forward_backward(model, loss_fn, x[:k], y[:k]), device, max(5, repeats))
    # the health probe's verdict on the stored inverse after the requests (float32 drift)
    out["health_warnings"] = [str(w.message) for w in caught
                              if issubclass(w.category, ssse_ext.HealthWarning)]

    rows = max(1, min(256, n))
    out["matmul_gflops"] = bench.matmul_gflops(dtype, device, 2048 if device.type == "cpu"
                                               else 8192, max(1, repeats))
    out["build_gflops"] = _build_rate(inv.layout, n, rows, dtype, device, repeats)
    out["fixed_build_gflops"] = _build_rate(BlockLayout.fixed(16 * 1024, 1024), n, rows, dtype,
                                            device, repeats)
    return out


def where(r: dict) -> str:
    """The machine a result ran on, in words: the GPU, or the CPU and its threads."""
    m = r.get("machine", {})
    if str(r.get("device", "cpu")).startswith("cuda") and m.get("cuda"):
        return f"{r['device']} ({m['cuda']})"
    return f"{r.get('device', 'cpu')} ({m.get('cpu', 'unknown CPU')}, {m.get('threads')} threads)"


def request_lines(r: dict) -> list[str]:
    """The rows of the table on one request: its time against its floor, and its split."""
    fb, split = r.get("forward_backward_s"), r.get("erase_split") or {}
    if not fb:
        return []
    stages = [s for s in ("rows", "apply", "check", "write", "probe", "ledger") if s in split]
    total = split.get("total", r["erase_s"])
    lines = [f"| one batched forward + backward of the {r['k']} samples (the floor) | {fb:.3f} "
             f"| 1 |",
             f"| erase {r['k']} samples / forward + backward | - | "
             f"**{r['erase_s'] / fb:.1f} x** |"]
    lines += [f"| - {s} | {split[s]:.3f} | {split[s] / fb:.2f} x forward + backward, "
              f"{100 * split[s] / total:.0f} % of the request |" for s in stages]
    return lines


def _stores(stores: dict | None) -> str:
    """``"; blocks: 2694 dense64"``: the blocks of each store of the inverse."""
    if not stores:
        return ""
    return "; blocks: " + ", ".join(f"{count} {name}" for name, count in stores.items())


def format_table(r: dict) -> str:
    inv = r["inverse_bytes"]
    lines = [
        f"{r['arch']} (d={r['d']:,}, {r['blocks']:,} blocks of <= {r['block_size']}, inverse "
        f"{inv / 2**30:.2f} GiB {r['dtype']} in {r['segments']} segments"
        f"{_stores(r.get('stores'))}), n={r['n']}, "
        f"k={r['k']}, on {where(r)}",
        "",
        "| stage | s | ratio |",
        "|---|---|---|",
        f"| one training epoch (SGD, batch 128) | {r['epoch_s']:.3f} | 1 epoch |",
        f"| per-sample gradients | {r['grads_s']:.3f} | {r['grads_s'] / r['epoch_s']:.1f} epochs |",
        f"| fit (gradients + build) | {r['fit_s']:.3f} | fit / epoch = "
        f"{r['fit_s'] / r['epoch_s']:.1f} |",
        f"| fit peak memory | - | {r['fit_peak_bytes'] / inv:.2f} x inverse |",
        f"| erase {r['k']} samples (median of {r.get('erase_requests', 1)} requests) | "
        f"{r['erase_s']:.3f} | peak extra memory {r['erase_peak_bytes'] / inv:.3f} x inverse "
        f"(largest of {', '.join(f'{p / inv:.2f}' for p in r.get('erase_peaks', []))}) |",
        *request_lines(r),
        f"| build rate (2 n Σs² basis) | - | {r['build_gflops']:.1f} GFLOP/s = "
        f"{r['build_gflops'] / r['matmul_gflops']:.2f} x matmul "
        f"({r['matmul_gflops']:.1f} GFLOP/s) |",
        f"| same build on 16 x 1024 fixed blocks | - | {r['fixed_build_gflops']:.1f} GFLOP/s: "
        f"these blocks run at {r['build_gflops'] / r['fixed_build_gflops']:.2f} x that |",
        "",
        f"checks: fit {r['fit_rel_err']:.1e} (largest blocks vs float64 closed form), erase step "
        f"{r['erase_rel_err']:.1e} (first block vs float64)",
    ]
    health = r.get("health_warnings") or []
    if health:
        lines.append(f"health probe after the requests ({len(health)} warnings), the last: "
                     f"{health[-1]}")
    return "\n".join(lines)


def _estimated_bytes(arch: str, width: int | None, n: int, block_size: int, dtype) -> int:
    """A lower bound of :func:`run`'s peak: the images, and the inverse (blocks of at most
    ``block_size``) with its float64 accumulator."""
    elem = torch.finfo(dtype).bits // 8
    with torch.device("meta"):
        d = sum(p.numel() for p in build_model(ARCHS[arch](width)).parameters())
    return n * 3 * 32 * 32 * elem + d * min(block_size, d) * (elem + 8)


def main(argv: list[str] | None = None) -> int:
    p = bench.OneLineParser(prog="ssse bench --model",
                            description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default=None,
                   help="model (default: resnet18 on CUDA, small_resnet on the CPU)")
    p.add_argument("--width", type=bench.positive_int, default=None,
                   help="base width (default: 64 for resnet18, 96 for small_resnet)")
    p.add_argument("--n", type=bench.positive_int, default=None, help="training samples "
                   "(default: 2048 on CUDA, 256 on the CPU)")
    p.add_argument("--block-size", type=bench.positive_int, default=256)
    p.add_argument("--k", type=bench.positive_int, default=None, help="samples erased "
                   "(default: 64 on CUDA, 16 on the CPU), fewer than --n")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=bench.positive_int, default=1)
    p.add_argument("--threads", type=bench.positive_int, default=None,
                   help="CPU threads of torch and the kernels (default: torch's)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    try:
        device = ssse_ext.validation.check_device(args.device, "--device")
    except ValueError as exc:
        p.error(str(exc))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda asked for but torch sees no CUDA device")
        if (device.index or 0) >= torch.cuda.device_count():
            p.error(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA "
                    "devices")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    gpu = device.type == "cuda"
    arch = args.arch or ("resnet18" if gpu else "small_resnet")
    n, k = args.n or (2048 if gpu else 256), args.k or (64 if gpu else 16)
    if k >= n:
        p.error(f"--k ({k} samples erased) must be less than --n ({n} samples)")
    dtype = getattr(torch, args.dtype)
    need = _estimated_bytes(arch, args.width, n, args.block_size, dtype)
    free, source = bench.available_bytes(device)
    if need > free:
        p.error(f"--arch {arch} with --width {args.width or 'default'}, --n {n} and --block-size "
                f"{args.block_size} needs about {need / 2**30:.1f} GiB on {device}, "
                f"{free / 2**30:.1f} GiB are available ({source})")
    bench.check_destination(p, args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    r = run(arch=arch, width=args.width, n=n, block_size=args.block_size, k=k, device=device,
            dtype=dtype, repeats=args.repeats)
    print(format_table(r))
    print(f"(benchmark wall time {time.perf_counter() - t0:.0f} s)")
    if args.json:
        from ssse.io import write_json
        write_json(args.json, r)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
