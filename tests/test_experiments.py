"""The experiments on quick settings: results.json schema, plots written, same seed, same
numbers; the demo's verdict."""

import json

import pytest
import torch

from ssse.experiments import illustration, multinomial, nonconvex
from ssse.experiments.demo import run_demo


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds contention (on a busy 2-core
    machine it doubles the wall time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _numbers(obj):
    """``obj`` without wall times (the only values allowed to differ between runs)."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return obj


def _check_schema(out):
    res = json.loads((out / "results.json").read_text())
    assert {"experiment", "schema_version", "config", "machine", "results", "plots"} <= set(res)
    assert (out / "results.md").read_text().startswith("# ")
    for png in res["plots"]:
        assert (out / png).stat().st_size > 1000
    return res


def test_illustration_is_reproducible(tmp_path):
    illustration.run(quick=True, seed=1, out=tmp_path / "a", progress=False)
    illustration.run(quick=True, seed=1, out=tmp_path / "b", progress=False)
    a, b = _check_schema(tmp_path / "a"), _check_schema(tmp_path / "b")
    assert _numbers(a["results"]) == _numbers(b["results"])


def test_multinomial_quick(tmp_path):
    multinomial.run(quick=True, seed=0, out=tmp_path, progress=False)
    res = _check_schema(tmp_path)
    summary = res["results"]["summary"]
    assert set(summary) == {"50%", "100%"}
    for s in summary.values():
        assert 0.0 <= s["delta_chosen"]["mean"] <= 1.0
        assert s["erase_seconds"]["mean"] < s["retrain_seconds"]["mean"]


def test_demo_verdict(tmp_path):
    out = run_demo(train_limit=500, eps=(0.05, 5.0, 5), out=tmp_path, progress=False)
    assert "VERDICT" in out["text"]
    assert (tmp_path / "demo_delta.png").stat().st_size > 1000
    assert 0.0 <= out["results"]["models"]["retrained"]["delta"] <= 0.5


def test_nonconvex_quick_is_reproducible(tmp_path):
    nonconvex.run(quick=True, seed=0, out=tmp_path / "a", progress=False)
    nonconvex.run(quick=True, seed=0, out=tmp_path / "b", progress=False)
    a, b = _check_schema(tmp_path / "a"), _check_schema(tmp_path / "b")
    assert _numbers(a["results"]) == _numbers(b["results"])
    assert len(a["plots"]) == 4
    res, methods = a["results"], set(nonconvex.METHODS)
    assert set(res["settings"]) == set(res["chosen"]) == {"100%", "50%"}
    for setting, s in res["settings"].items():
        assert set(res["chosen"][setting]) == methods
        for run in s["runs"]:
            assert set(run["methods"]) == methods
            assert run["retrained"]["delta"] <= 0.5 <= run["original"]["delta"]
            for name, m in run["methods"].items():
                grid = a["config"]["grids"][name]
                assert len(m["delta"]) == len(grid)
                assert all(0.0 <= d <= 1.0 for d in m["delta"])
                assert set(m["accuracy"]) == {"D-S", "S", "T-Ta", "Ta"}
                assert m["best_unguarded"]["delta"] == min(m["delta"]) <= m["best"]["delta"]
                # the smallest value of every grid barely moves the model: some value passes
                assert m["best"]["accuracy"]["D-S"] >= run["accuracy_floor"]
        assert set(res["summary"][setting]) >= methods | {"original", "retrained"}
