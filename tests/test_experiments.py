"""The experiments on quick settings: results.json schema, plots written, same seed, same
numbers; the demo's verdict."""

import json

import pytest

from ssse.experiments import illustration, multinomial
from ssse.experiments.demo import run_demo


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
