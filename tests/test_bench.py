"""The kernel benchmark: checks before it times, and refuses to time wrong results."""

import torch

from ssse_ext import bench

from .testing import CHAIN, SOLVE, STABLE

F64 = torch.float64


def test_small_case_is_checked_then_timed():
    row = bench.run_case(64, 2, 16, torch.float64, torch.device("cpu"), repeats=1, loop_rows=4,
                         damping=1e-3, matmul_rate=1.0, seed=0)
    # the update is a chain of Woodbury steps on an inverse built from half the rows
    assert row["build_rel_err"] < STABLE[F64] and row["update_rel_err"] < CHAIN[F64]
    assert row["apply_rel_err"] < SOLVE[F64]
    assert row["build_s"] > 0 and row["speedup_vs_loop"] > 0 and row["apply_vs_copy"] > 0
    assert "refused" not in bench.format_table([row])


def test_result_above_tolerance_is_not_timed(monkeypatch):
    monkeypatch.setitem(bench.TOLERANCE, torch.float32, 0.0)  # no result can pass
    row = bench.run_case(64, 2, 16, torch.float32, torch.device("cpu"), repeats=1, loop_rows=4,
                         damping=1e-3, matmul_rate=1.0, seed=0)
    assert row["build_rel_err"] > 0 and "build_s" not in row
    assert "refused" in bench.format_table([row])


def test_main_prints_the_table(capsys):
    assert bench.main(["--cases", "32:2:8", "--dtype", "float64", "--repeats", "1",
                       "--loop-rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 2x8, n=32 | float64 |" in out


def test_model_benchmark_checks_its_fit_and_erase_on_a_small_cnn():
    from ssse.experiments import model_bench

    r = model_bench.run(width=4, n=24, k=4, block_size=64, damping=1e-3)
    # the fit against a float64 closed form and the erase step against a float64 product:
    # measured 3e-8 and 1e-7 here, float32 rounding; a wrong block or step is off by O(1)
    assert r["fit_rel_err"] < 1e-5 and r["erase_rel_err"] < 1e-5
    assert r["erase_requests"] == 3 and r["erase_peak_bytes"] >= 0
    assert r["fit_s"] > 0 and r["inverse_bytes"] > 0 and r["blocks"] > 1
    table = model_bench.format_table(r)
    assert "median of 3 requests" in table and "fit / epoch" in table
