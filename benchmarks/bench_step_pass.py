"""One request's step of eq. 8 and its downdate: three passes over the inverse (the step's
apply, the downdate's check, its write) against two (the check also gives the step,
:meth:`ssse_ext.BlockInverseFisher.checked_change`).

The inverse is the default ``Eraser``'s on the real-model benchmark's setting
(python/ssse/experiments/model_bench.py: SmallResNet of ``--width``, per-parameter blocks of
<= 256, float32, λ = 1e-4, n = 256). Each repeat serves the same ``--k`` rows both ways (an
update puts them back), alternating which goes first; the medians are printed with their
ratio, measured in one run, and the largest difference of the two steps.

    python benchmarks/bench_step_pass.py [--width 96] [--k 16] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ssse
from ssse.models import build_model, loss_function
from ssse.experiments.model_bench import ARCHS
from ssse_ext.bench import machine


def three_passes(inv, theta, rows, v, scale):
    t0 = time.perf_counter()
    step = inv.apply_update(theta, v, scale)
    t1 = time.perf_counter()
    inv.downdate(rows)
    return step, t1 - t0, time.perf_counter() - t1


def two_passes(inv, theta, rows, v, scale):
    t0 = time.perf_counter()
    change = inv.checked_change(rows, apply=v)
    step = (theta.double() + scale * change.applied).to(theta.dtype)
    t1 = time.perf_counter()
    change.commit()
    return step, t1 - t0, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model(ARCHS["small_resnet"](a.width)).eval()
    loss = loss_function("cross_entropy")
    n = 256
    x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    eraser = ssse.Eraser(model, loss, damping=1e-4, block_size=256).fit((x, y),
                                                                        progress=False)
    inv, theta = eraser.inv_fisher, eraser.theta
    rows, v = eraser.rows_and_gradient([(x[:a.k], y[:a.k])])
    scale = 1.0 / (n - a.k)
    info = machine()
    print(f"{info['cpu']}, {torch.get_num_threads()} threads; d = {inv.dim:,}, inverse "
          f"{inv.nbytes / 2**30:.2f} GiB ({', '.join(f'{inv.representation.count(s)} {s}' for s in sorted(set(inv.representation)))}), k = {a.k}")
    times = {"three passes": [], "two passes": []}
    steps = {}
    for i in range(a.repeats):
        order = [("three passes", three_passes), ("two passes", two_passes)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            step, t_step, t_rest = fn(inv, theta, rows, v, scale)
            inv.update(rows)  # the next repeat starts from the same inverse
            times[name].append((t_step, t_rest))
            steps[name] = step
    print("| | step (and check) s | downdate (or write) s | request's inverse work s |")
    print("|---|---|---|---|")
    total = {}
    for name, ts in times.items():
        a_s = statistics.median(t for t, _ in ts)
        b_s = statistics.median(t for _, t in ts)
        total[name] = statistics.median(t + u for t, u in ts)
        print(f"| {name} | {a_s:.3f} | {b_s:.3f} | {total[name]:.3f} |")
    diff = (steps["two passes"] - steps["three passes"]).abs().max().item()
    print(f"\ntwo / three passes: {total['two passes'] / total['three passes']:.2f}; "
          f"largest difference of the two steps {diff:.1e} (float32 θ)")


if __name__ == "__main__":
    main()
