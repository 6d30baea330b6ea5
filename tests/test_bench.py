"""The kernel benchmark: checks before it times, and refuses to time wrong results; its rates
are the flop and byte counts of the method over the measured times, and its errors are those of
what it built against an oracle computed here another way."""

import json

import numpy as np
import pytest
import torch

import ssse_ext
from ssse_ext import bench

from .testing import CHAIN, SOLVE, STABLE, load_benchmark

F64 = torch.float64
N, BLOCKS, B, DAMPING = 64, 2, 16, 1e-3


def _oracle_blocks() -> list[np.ndarray]:
    """The case's exact inverse blocks, (lambda I + G_b^T G_b / n)^-1 by numpy's LU inverse
    (the benchmark's oracle is a Cholesky inverse in torch), from the same seeded gradients."""
    g = torch.randn(N, BLOCKS * B, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).numpy()
    return [np.linalg.inv(DAMPING * np.eye(B) + g[:, b * B:(b + 1) * B].T
                          @ g[:, b * B:(b + 1) * B] / N) for b in range(BLOCKS)], g


def _error(inv, oracle) -> float:
    got = np.stack([blk.double().numpy() for blk in inv.blocks])
    ref = np.stack(oracle)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _errors_recomputed(dtype) -> dict:
    """The build's and the update's relative errors, recomputed from the same inputs: the
    build from all rows; the update of an inverse built from the first half (normalised by
    n) with the second half."""
    oracle, g = _oracle_blocks()
    g = torch.from_numpy(g).to(dtype)
    layout = ssse_ext.BlockLayout.fixed(BLOCKS * B, B)
    built = ssse_ext.build_inverse_fisher(g, damping=DAMPING, layout=layout,
                                          representation="dense")
    half = ssse_ext.build_inverse_fisher(g[:N // 2], damping=DAMPING, layout=layout,
                                         normalizer=float(N), representation="dense")
    return {"build": _error(built, oracle), "update": _error(half.update(g[N // 2:]), oracle)}


def _case(dtype):
    return bench.run_case(N, BLOCKS, B, dtype, torch.device("cpu"), repeats=1, loop_rows=4,
                          damping=DAMPING, matmul_rate=2.0, seed=0)


def test_small_case_is_checked_then_timed():
    row = _case(F64)
    # the update is a chain of Woodbury steps on an inverse built from half the rows
    assert row["build_rel_err"] < STABLE[F64] and row["update_rel_err"] < CHAIN[F64]
    assert row["apply_rel_err"] < SOLVE[F64]
    # the rates are the method's counts over the measured times: 4 n d B flops for the build,
    # 4 (n - n/2) d B for the update of the second half, the inverse's bytes (B^2 per block
    # in float64) read once for the apply, twice (read and write) for the copy
    d = BLOCKS * B
    assert row["build_gflops"] == pytest.approx(4 * N * d * B / row["build_s"] / 1e9, rel=1e-12)
    assert row["build_vs_matmul"] == pytest.approx(row["build_gflops"] / 2.0, rel=1e-12)
    assert row["update_gflops"] == pytest.approx(4 * (N - N // 2) * d * B / row["update_s"]
                                                 / 1e9, rel=1e-12)
    nbytes = BLOCKS * B * B * 8
    assert row["apply_gbs"] == pytest.approx(nbytes / row["apply_s"] / 1e9, rel=1e-12)
    assert row["apply_vs_copy"] == pytest.approx(row["apply_gbs"] / row["copy_gbs"], rel=1e-12)
    # the loop is timed on loop_rows rows and scaled to n; the speed-ups are ratios of times
    assert row["loop_rows_timed"] == 4
    assert row["speedup_vs_loop"] == pytest.approx(row["loop_s_est"] / row["build_s"],
                                                   rel=1e-12)
    assert row["speedup_vs_closed_form"] == pytest.approx(row["closed_form_s"] / row["build_s"],
                                                          rel=1e-12)
    assert "refused" not in bench.format_table([row])


def test_reported_errors_are_those_of_what_was_built():
    # float32: errors of about 1e-7, so that a recomputation against an oracle computed
    # another way (agreeing with the benchmark's to about 1e-16) pins them to many digits
    row = _case(torch.float32)
    mine = _errors_recomputed(torch.float32)
    assert row["build_rel_err"] == pytest.approx(mine["build"], rel=1e-6)
    assert row["update_rel_err"] == pytest.approx(mine["update"], rel=1e-6)
    assert 1e-9 < mine["build"] < bench.TOLERANCE[torch.float32]


def test_result_above_tolerance_is_not_timed(monkeypatch):
    monkeypatch.setitem(bench.TOLERANCE, torch.float32, 0.0)  # no result can pass
    row = _case(torch.float32)
    assert row["build_rel_err"] == pytest.approx(_errors_recomputed(torch.float32)["build"],
                                                 rel=1e-6)
    assert "build_s" not in row and "update_rel_err" not in row
    assert "refused" in bench.format_table([row])


def test_main_prints_the_table(capsys):
    assert bench.main(["--cases", "32:2:8", "--dtype", "float64", "--repeats", "1",
                       "--loop-rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 2x8, n=32 | float64 |" in out


def test_model_benchmark_checks_its_fit_and_erase_on_a_small_cnn():
    from ssse.experiments import model_bench
    from ssse.models import build_model

    n, block = 24, 64
    r = model_bench.run(width=4, n=n, k=4, block_size=block, damping=1e-3)
    # the fit against a float64 closed form and the erase step against a float64 product:
    # measured 3e-8 and 1e-7 here, float32 rounding; a wrong block or step is off by O(1)
    assert r["fit_rel_err"] < 1e-5 and r["erase_rel_err"] < 1e-5
    # the layout and the stores, from the model's tensors: blocks of at most 64 within each
    # tensor, held as an Eraser serves requests: in the exact low-rank form (n s float32 rows
    # and an n x n float64 factor) where that is no larger than a float64 block (8 bytes per
    # element), else by the block's condition as gram (12), dense64 (8) or dense (4 bytes)
    sizes = [s for p in build_model(r["spec"]).parameters()
             for s in [block] * (p.numel() // block) + [p.numel() % block] if s]
    assert r["d"] == sum(sizes) and r["blocks"] == len(sizes)
    dual = [4 * n * s + 8 * n * n <= 8 * s * s for s in sizes]
    assert r["stores"].get("dual", 0) == sum(dual)
    assert set(r["stores"]) <= {"dual", "dense", "dense64", "gram"}
    low, high = (sum(4 * n * s + 8 * n * n if d else e * s * s for s, d in zip(sizes, dual))
                 for e in (4, 12))
    assert low <= r["inverse_bytes"] <= high
    # three requests; the peak reported is the largest of the three
    assert r["erase_requests"] == len(r["erase_peaks"]) == 3
    assert r["erase_peak_bytes"] == max(r["erase_peaks"])
    table = model_bench.format_table(r)
    assert "median of 3 requests" in table
    assert f"fit / epoch = {r['fit_s'] / r['epoch_s']:.1f}" in table
    assert f"inverse {r['inverse_bytes'] / 2**30:.2f} GiB float32" in table


@pytest.mark.parametrize("args", [["--dry-run-cpu", "--resnet18", "--resnet18-rows", "32",
                                   "--resnet18-chunk", "16"],
                                  ["--device", "cpu", "--dtype", "float32"]])
def test_time_split_runs_every_piece_it_reports(args, tmp_path):
    """The per-kernel split (its dry run, as the device check runs it, and the CPU split):
    every piece of every kernel set is checked and timed, none fails, and each case names its
    machine."""
    time_split = load_benchmark("time_split")
    out = tmp_path / "split.json"
    assert time_split.main(["--cases", "64:2:16,24:2:40", "--repeats", "1",
                            "--update-rows", "16", "--json", str(out), *args]) == 0
    report = json.loads(out.read_text())
    sets = [(c, r) for c in report["cases"] for r in c["sets"].values()]
    assert len(report["cases"]) == (4 if "--dry-run-cpu" in args else 2)
    for case, r in sets:
        assert "error" not in r, r["error"]
        assert r["build_err"] <= time_split.TOLERANCE[getattr(torch, case["dtype"])]
        assert "gram_ms" in r and r["gram_ms"] > 0
        assert ssse_ext.build_info()["cpu_isa"] in case["machine"]
    full = [r for _, r in sets if "inverse_ms" in r]
    assert full and all(r["update_err"] <= time_split.UPDATE_TOLERANCE[torch.float32]
                        and r["apply_err"] < 1e-5 and r["build_vs_closed_form"] > 0
                        for r in full)
    if "--resnet18" in args:
        assert all("error" not in r and r["max_block_err"] < 1e-6
                   for r in report["resnet18"]["sets"].values())
