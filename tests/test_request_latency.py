"""What a deletion request served by ssse.Eraser costs, checked by counting instead of timing:
its rows come from one batched pass when they fit its budget, the dense downdate converts a
bounded batch of blocks to float64 at a time (never the store), the health probe after a
request reads ``probe_blocks`` blocks and not the inverse, and an inverse is still probed in
full before it is written. Speed itself is measured by ``ssse bench --model`` (docs/api.md)."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ssse
import ssse_ext
from ssse.io import save_inverse_fisher
from ssse.requests import DEFAULT_PROBE_BLOCKS, STAGES
from ssse_ext import BlockInverseFisher, BlockLayout, HealthError, build_inverse_fisher
from ssse_ext.health import FisherProbe

from .testing import SAME, rel_err

CE = nn.CrossEntropyLoss(reduction="none")


def mlp():
    """A model of 1,002 parameters in 63 per-parameter blocks of at most 16, and its data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    x = torch.randn(80, 20, dtype=torch.float64)
    y = torch.randint(0, 10, (80,))
    return model, x, y


def fitted(**kwargs):
    model, x, y = mlp()
    eraser = ssse.Eraser(model, CE, damping=0.1, block_size=16, **kwargs).fit((x, y))
    return eraser, x, y


class CountingMatvec:
    """Counts the products with the whole inverse (what a full probe makes three of)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = BlockInverseFisher.matvec

        def matvec(inv, v):
            self.calls += 1
            return real(inv, v)
        monkeypatch.setattr(BlockInverseFisher, "matvec", matvec)


# ---- rows -----------------------------------------------------------------------------------

def test_the_rows_of_a_request_are_one_pass_when_they_fit_the_budget(monkeypatch):
    eraser, x, y = fitted()
    source, _ = eraser._curvature.for_removal(mc_samples=1)
    calls = []
    real = type(source).rows

    def rows(self, fm, params, frozen, xb, *args, **kwargs):
        calls.append(xb.shape[0])
        return real(self, fm, params, frozen, xb, *args, **kwargs)
    monkeypatch.setattr(type(source), "rows", rows)
    removed = [(x[:12], y[:12])]
    one, v = eraser.rows_and_gradient(removed)  # the default budget: 64 MiB at least
    assert calls == [12]
    # a budget of a few samples' rows: chunks, and the same rows
    calls.clear()
    eraser.max_memory = 50_000  # about 19 kB a row with what vmap keeps: 2 rows a chunk
    chunked, v2 = eraser.rows_and_gradient(removed)
    assert len(calls) > 1 and sum(calls) == 12
    assert rel_err(chunked, one) <= SAME[torch.float64] and rel_err(v2, v) <= SAME[torch.float64]


# ---- the dense downdate --------------------------------------------------------------------

class Float64Sizes(TorchDispatchMode):
    """The largest float64 tensor any operation makes while it is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype,sign", [(torch.float32, -1), (torch.float64, 1)])
def test_the_dense_change_converts_a_batch_of_blocks_at_a_time(dtype, sign):
    layout = BlockLayout.fixed(150 * 256 + 96, 256)  # 150 blocks of 256 and one of 96
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(64, layout.dim, generator=gen, dtype=torch.float64).to(dtype)
    inv = build_inverse_fisher(g, damping=0.1, layout=layout, representation="dense")
    rows = g[:8] if sign < 0 else torch.randn(8, layout.dim, generator=gen,
                                              dtype=torch.float64).to(dtype)
    store = inv.stores[0]
    numel = sum(t.numel() for t in store.segments)
    with Float64Sizes() as seen:
        inv.downdate(rows) if sign < 0 else inv.update(rows)
    # batches of at most 4M float64 elements (32 MiB: 61 blocks of 256 here), never the 9.8M of
    # the store
    assert 0 < seen.largest <= numel // 2, (seen.largest, numel)
    kept = g[8:] if sign < 0 else torch.cat([g, rows])
    want = build_inverse_fisher(kept.double(), damping=0.1, layout=layout, normalizer=64.0,
                                probe_vectors=0)
    for b in (0, 77, 150):
        got = inv.blocks[b]
        assert torch.equal(got, got.T)  # the rank-k term keeps the blocks bitwise symmetric
        assert rel_err(got, want.blocks[b]) <= (1e-6 if dtype == torch.float32 else 1e-12)


def test_the_factors_write_and_the_kernel_agree_to_a_rounding():
    # a change of many rows is written by the kernel (its factors would take more than half
    # the store); a change of a few rows from the factors of its check
    layout = BlockLayout.fixed(8 * 128, 128)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(300, layout.dim, generator=gen, dtype=torch.float64).float()
    a = build_inverse_fisher(g, damping=0.1, layout=layout, representation="dense")
    b = a.clone()
    a.downdate(g[:70])  # 70 rows: the kernel, in rank-64 steps
    for i in range(0, 70, 10):
        b.downdate(g[i:i + 10])  # 10 rows at a time: from the factors
    assert rel_err(b.packed, a.packed) <= 1e-6


# ---- the health probe after a request --------------------------------------------------------

def test_a_request_probes_probe_blocks_blocks_not_the_inverse(monkeypatch):
    eraser, x, y = fitted(probe_blocks=4)
    inv = eraser.inv_fisher
    sizes = inv.layout.sizes
    read = []
    for cls in {type(store) for store in inv.stores}:  # the blocks the probe reads
        monkeypatch.setattr(cls, "block", lambda self, b, real=cls.block: read.append(b) or
                            real(self, b))
    full = CountingMatvec(monkeypatch)
    eraser.erase((x[:5], y[:5]), ids=[0, 1, 2, 3, 4], epsilon=0.5)
    health = eraser.last_request["health"]
    assert health["blocks"] == 4 and len(read) == 4 and full.calls == 0
    # the probe's share: the elements it reads, against a full probe's three passes
    share = sum(sizes[b] ** 2 for b in read) / (3 * sum(s * s for s in sizes))
    assert share <= 4 * max(sizes) ** 2 / (3 * sum(s * s for s in sizes)) < 0.05
    # the same blocks probed in full: the same residuals, to the order of their sums (float64
    # residuals of a sound inverse are a few u = 1.1e-16; the threshold is 1.5e-8)
    picked = list(read)
    res, scale = inv.probe.residuals(inv)
    some, some_scale = inv.probe.block_residuals(inv, picked)
    assert torch.allclose(some, res[picked], rtol=1e-6, atol=100 * 1.1e-16)
    assert torch.allclose(some_scale, scale[picked], rtol=1e-12)
    # every block: probe_blocks=None
    eraser.probe_blocks, full.calls = None, 0
    eraser.erase((x[5:7], y[5:7]), ids=[5, 6], epsilon=0.5)
    assert "blocks" not in eraser.last_request["health"] and full.calls == 3


def test_the_sampled_blocks_are_the_worst_first_then_a_seeded_draw():
    eraser, _, _ = fitted()
    inv = eraser.inv_fisher
    probe = inv.probe
    assert len(probe.watch) > 0  # the fit's full probe
    picks = probe.sample(6, 3)
    assert picks == probe.sample(6, 3) and picks != probe.sample(6, 4)
    assert set(probe.watch[:3]) <= set(picks) and list(picks) == sorted(picks)
    assert probe.sample(1000, 0) == tuple(range(inv.layout.num_blocks))
    twin = FisherProbe(inv.layout, columns=probe.columns, seed=probe.seed)
    twin.watch = probe.watch
    assert twin.sample(6, 3) == picks


def test_probe_blocks_is_checked():
    model, _, _ = mlp()
    for bad in (0, -3, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="probe_blocks"):
            ssse.Eraser(model, CE, damping=0.1, probe_blocks=bad)
    assert ssse.Eraser(model, CE, damping=0.1).probe_blocks == DEFAULT_PROBE_BLOCKS


def test_a_ledger_request_is_probed_in_full_before_and_after(tmp_path, monkeypatch):
    eraser, x, y = fitted(probe_blocks=2, ledger=tmp_path / "ledger.jsonl")
    full = CountingMatvec(monkeypatch)
    eraser.erase((x[:3], y[:3]), ids=[0, 1, 2], epsilon=0.5)
    assert full.calls == 6 and "blocks" not in eraser.last_request["health"]


# ---- before a save ---------------------------------------------------------------------------

def test_a_damaged_block_the_requests_did_not_probe_is_caught_before_a_save(tmp_path):
    eraser, x, y = fitted(probe_blocks=2)
    inv = eraser.inv_fisher
    eraser.erase((x[:4], y[:4]), ids=[0, 1, 2, 3], epsilon=0.5)
    # damage a block that the next request's probe does not read
    nxt = inv.probe.sample(2, inv.probe.changes + 1)
    b = next(b for b in range(inv.layout.num_blocks) if b not in nxt and inv.layout.sizes[b] > 4)
    inv.blocks[b].mul_(1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ssse_ext.HealthWarning)
        eraser.erase((x[4:6], y[4:6]), ids=[4, 5], epsilon=0.5)
    assert eraser.last_request["health"]["residual"] <= eraser.last_request["health"][
        "tolerance"]  # the request's probe did not see it
    path = tmp_path / "inverse.safetensors"
    with pytest.raises(HealthError, match=f"block {b}, .*it is not written"):
        save_inverse_fisher(path, inv)
    assert not path.exists()
    with pytest.raises(HealthError):
        inv.clone().to_state()  # a copy too
    tensors, _ = inv.to_state(check=False)  # asked for as it is
    assert tensors


def test_a_save_probes_once_after_a_change_and_not_otherwise(tmp_path, monkeypatch):
    eraser, x, y = fitted()
    inv = eraser.inv_fisher
    full = CountingMatvec(monkeypatch)
    save_inverse_fisher(tmp_path / "a.safetensors", inv)  # as fitted: not probed again
    assert full.calls == 0
    eraser.erase((x[:4], y[:4]), epsilon=0.5)
    save_inverse_fisher(tmp_path / "b.safetensors", inv)  # changed: one full probe
    assert full.calls == 3
    save_inverse_fisher(tmp_path / "c.safetensors", inv)  # that probe still holds
    assert full.calls == 3
    eraser.erase((x[4:6], y[4:6]), epsilon=0.5)
    assert inv.health(warn=False).ok and full.calls == 6  # a full probe made by hand counts
    save_inverse_fisher(tmp_path / "d.safetensors", inv)
    assert full.calls == 6


# ---- the time split -------------------------------------------------------------------------

def test_a_request_records_the_seconds_of_its_stages():
    eraser, x, y = fitted()
    eraser.erase((x[:4], y[:4]), epsilon=0.5)
    t = eraser.last_timings
    assert {"rows", "apply", "check", "write", "probe", "total"} <= set(t)
    assert set(t) - {"total"} <= set(STAGES) and all(v >= 0 for v in t.values())
    assert sum(v for k, v in t.items() if k != "total") <= t["total"] * (1 + 1e-9)


def test_ssse_bench_model_splits_a_request_and_names_the_cpu(capsys, tmp_path):
    import json

    from ssse.cli.commands import bench
    from ssse_ext.bench import machine

    threads = torch.get_num_threads()
    try:
        assert bench.run(["--model", "--width", "4", "--n", "24", "--k", "4", "--block-size",
                          "64", "--threads", "1", "--json", str(tmp_path / "r.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert machine()["cpu"] in head and "1 threads)" in head
    assert "| one batched forward + backward of the 4 samples (the floor) |" in out
    assert "| erase 4 samples / forward + backward | - | **" in out
    for stage in ("rows", "apply", "check", "write", "probe"):
        assert f"| - {stage} |" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert {"rows", "apply", "check", "write", "probe", "total"} <= set(r["erase_split"])
    assert r["forward_backward_s"] > 0
