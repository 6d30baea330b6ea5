"""Real-model scale: chunking by memory, the build in groups of blocks (segments), requests
without a copy of the inverse, and the leave-k-out Fisher applied on the fly."""

import pytest
import torch
from torch import nn

import ssse
import ssse_ext
from ssse_ext import BlockLayout, NotPositiveDefiniteError, build_inverse_fisher, reference
from ssse_ext.blocks import dense_gram

from .testing import DEVICES, DTYPES, TOL, rel_err

PRODUCT = [(dt, dev) for dt in DTYPES for dev in DEVICES]
CE = nn.CrossEntropyLoss(reduction="none")


def closed_form(g, layout, damping, normalizer=None):
    return torch.block_diag(*reference.block_closed_form(g.double().cpu(), layout, damping,
                                                         normalizer))


def uneven_chunks(g, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(g[i:i + s])
        i += s
    out.append(g[i:])
    return out


@pytest.fixture
def small_groups(monkeypatch):
    """Forces the stable build to hold its accumulators (and the result) in many segments."""
    monkeypatch.setattr(dense_gram, "_MIN_GROUP_NUMEL", 1)
    monkeypatch.setattr(dense_gram, "_GROUPS", 5)


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_any_chunking_gives_the_same_inverse(dtype, device, small_groups):
    torch.manual_seed(0)
    layout = BlockLayout.per_parameter([(7, 5), (3,), (40,), (2, 2)], 9)
    g = torch.randn(83, layout.dim, dtype=dtype, device=device)
    ref = closed_form(g, layout, 0.3)
    whole = build_inverse_fisher(g, damping=0.3, layout=layout)
    assert len(whole.segments) > 1  # the fixture's groups
    for chunks in (list(g.split(1)), uneven_chunks(g, [1, 3, 50, 2, 1, 1]),
                   [g[i:i + 7] for i in range(0, 83, 7)]):
        inv = build_inverse_fisher(iter(chunks), damping=0.3, layout=layout)
        assert inv.num_samples == 83
        assert rel_err(inv.dense(), ref) < TOL[dtype]
        assert rel_err(inv.dense(), whole.dense()) < TOL[dtype]


def test_small_chunks_are_gathered_before_the_gram(monkeypatch):
    seen = []
    original = ssse_ext._ops._gram_accumulate__impl

    def spy(grads, layout, layout_dev, gram):
        seen.append(grads.shape[0])
        return original(grads, layout, layout_dev, gram)

    monkeypatch.setitem(ssse_ext._ops._EAGER, ssse_ext._ops.gram_accumulate_, spy)
    g = torch.randn(600, 12, dtype=torch.float64)
    inv = build_inverse_fisher(iter(g.split(5)), damping=0.1, block_size=4)
    # 5-row chunks reach the kernel (one group of blocks here) as calls of 255 rows (51
    # chunks), then the rest
    assert seen == [255, 255, 90]
    assert rel_err(inv.dense(), closed_form(g, inv.layout, 0.1)) < TOL[torch.float64]


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_segments_support_every_operation(dtype, device, small_groups, tmp_path):
    torch.manual_seed(1)
    layout = BlockLayout.fixed(23, 4)
    g = torch.randn(60, 23, dtype=dtype, device=device)
    inv = build_inverse_fisher(g[:50], damping=0.5, layout=layout, normalizer=60.0)
    one = ssse_ext.BlockInverseFisher(inv.packed, inv.config, inv.num_samples)
    assert len(inv.segments) > 1 and len(one.segments) == 1
    v = torch.randn(23, 3, dtype=dtype, device=device)
    assert torch.equal(inv @ v, one @ v)
    assert torch.equal(inv.apply_update(v, v, 0.5), one.apply_update(v, v, 0.5))
    inv.update(g[50:])
    one.update(g[50:])
    assert torch.equal(inv.packed, one.packed)
    assert rel_err(inv.dense(), closed_form(g, layout, 0.5, 60.0)) < TOL[dtype]
    inv.downdate(g[:7])
    assert rel_err(inv.dense(), closed_form(g[7:], layout, 0.5, 60.0)) < TOL[dtype]
    from ssse.io import load_inverse_fisher, save_inverse_fisher
    save_inverse_fisher(tmp_path / "inv.safetensors", inv)
    back, _ = load_inverse_fisher(tmp_path / "inv.safetensors", device=device)
    assert len(back.segments) == len(inv.segments)
    assert torch.equal(back.packed, inv.packed)


def test_segments_must_end_on_block_boundaries():
    inv = build_inverse_fisher(torch.randn(10, 6, dtype=torch.float64), damping=1.0,
                               block_size=3)
    p = inv.packed
    with pytest.raises(ValueError, match="block boundary"):
        ssse_ext.BlockInverseFisher([p[:5], p[5:]], inv.config, 10)
    with pytest.raises(ValueError, match="blocks of the layout need"):
        ssse_ext.BlockInverseFisher([p[:9]], inv.config, 10)
    with pytest.raises(ValueError, match=r"packed\[1\] is torch.float32"):
        ssse_ext.BlockInverseFisher([p[:9], p[9:].float()], inv.config, 10)


@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("k", [3, 9])  # k <= s (the k x k test) and k > s (the s x s test)
def test_leave_k_out_apply_on_the_fly_equals_a_downdated_copy(dtype, device, k):
    torch.manual_seed(2)
    layout = BlockLayout.per_parameter([(5,), (12,), (6,)], 5)
    g = torch.randn(40, layout.dim, dtype=dtype, device=device)
    inv = build_inverse_fisher(g, damping=0.2, layout=layout)
    before = [t.clone() for t in inv.segments]
    theta = torch.randn(layout.dim, dtype=dtype, device=device)
    v = torch.randn(layout.dim, dtype=dtype, device=device)
    got = inv.apply_update(theta, v, -0.3, without=g[:k])
    expect = theta.double() - 0.3 * closed_form(g[k:], layout, 0.2, 40.0).to(device) @ v.double()
    assert rel_err(got, expect) < TOL[dtype]
    assert all(torch.equal(a, b) for a, b in zip(inv.segments, before))  # not modified
    with pytest.raises(NotPositiveDefiniteError, match="ever added"):
        inv.apply_update(theta, v, 1.0, without=30 * g[:k])


@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("k", [2, 11])
def test_failed_downdate_is_refused_before_any_block_is_written(dtype, device, k, monkeypatch,
                                                               small_groups):
    torch.manual_seed(3)
    layout = BlockLayout.fixed(30, 6)
    g = torch.randn(50, 30, dtype=dtype, device=device)
    inv = build_inverse_fisher(g, damping=0.1, layout=layout)
    storage = [t.data_ptr() for t in inv.segments]
    before = [t.clone() for t in inv.segments]
    clones = []
    real_clone = torch.Tensor.clone

    def counting_clone(t, *a, **kw):
        if t.numel() >= min(s.numel() for s in inv.segments):
            clones.append(t.numel())
        return real_clone(t, *a, **kw)

    bad = g[:k].clone()
    bad[:, 25:] *= 40  # only the last block's rows were never added
    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    with pytest.raises(NotPositiveDefiniteError, match="block 4"):
        inv.downdate(bad)
    assert all(torch.equal(a, b) for a, b in zip(inv.segments, before))
    inv.downdate(g[:k])  # in place: the same storage, no copy of a segment
    assert [t.data_ptr() for t in inv.segments] == storage and clones == []
    assert inv.num_samples == 50 - k
    assert rel_err(inv.dense(), closed_form(g[k:], layout, 0.1, 50.0)) < TOL[dtype]


def _setup(n=60, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    return model, X, y


def test_tiny_memory_budget_gives_one_row_chunks_and_the_same_inverse():
    model, X, y = _setup()
    rows = [c.shape[0] for c in ssse.per_sample_grads(model, CE, (X, y), max_memory=1)]
    assert rows == [1] * 60
    budgeted = ssse.fit_inverse_fisher(model, CE, (X, y), damping=0.1, max_memory=1,
                                       progress=False)
    default = ssse.fit_inverse_fisher(model, CE, (X, y), damping=0.1, progress=False)
    G = torch.cat(list(ssse.per_sample_grads(model, CE, (X, y), chunk_size=7)))
    ref = closed_form(G, default.layout, 0.1)
    assert rel_err(budgeted.dense(), ref) < TOL[torch.float64]
    assert rel_err(default.dense(), ref) < TOL[torch.float64]


def test_memory_budget_sets_the_rows_per_chunk():
    model, X, y = _setup(n=500)
    d = sum(p.numel() for p in model.parameters())
    # each row costs at least three float64 copies of the d-vector
    budget = 40 * 3 * 8 * d
    rows = [c.shape[0] for c in ssse.per_sample_grads(model, CE, (X, y), max_memory=budget)]
    assert 1 < rows[0] < 40 and sum(rows) == 500 and len(set(rows[:-1])) == 1


@pytest.mark.parametrize("curvature", ["empirical", "ggn"])
def test_requests_under_a_tiny_budget_are_computed_in_one_row_chunks_and_agree(curvature,
                                                                              monkeypatch):
    from ssse import rows
    model, X, y = _setup()
    kw = dict(damping=1e-2, weight_decay=1e-2, curvature=curvature)
    default = ssse.Eraser(model, CE, **kw).fit((X, y))
    tiny = ssse.Eraser(model, CE, max_memory=1, **kw).fit((X, y))
    chunks = []
    real = rows.row_stream

    def spy(*args, **kwargs):
        for c in real(*args, **kwargs):
            chunks.append(c.shape[0])
            yield c
    for mod in ("rows", "fit", "newton"):  # erasure reads its rows through newton.rows_of
        monkeypatch.setattr(f"ssse.{mod}.row_stream", spy)
    eps = None if curvature == "ggn" else 0.5
    got = tiny.erase((X[:7], y[:7]), epsilon=eps)
    rows_per_sample = 3 if curvature == "ggn" else 1
    assert chunks[:7] == [rows_per_sample] * 7  # one sample per chunk, written into one tensor
    expected = default.erase((X[:7], y[:7]), epsilon=eps)
    for name in expected:
        assert rel_err(got[name], expected[name]) < 1e-12
    assert rel_err(tiny.inv_fisher.dense(), default.inv_fisher.dense()) < 1e-12


def test_erase_refused_leaves_the_eraser_unchanged_without_a_copy(monkeypatch):
    model, X, y = _setup()
    eraser = ssse.Eraser(model, CE, damping=1e-3).fit((X, y))
    segs = [t.data_ptr() for t in eraser.inv_fisher.segments]
    before = eraser.inv_fisher.packed.clone()
    monkeypatch.setattr(ssse_ext.BlockInverseFisher, "clone",
                        lambda self: pytest.fail("the inverse was copied"))
    for fisher_variant in ("full", "leave_k_out"):
        with pytest.raises(NotPositiveDefiniteError):
            eraser.erase((100 * X[:2], y[:2]), epsilon=1.0, fisher=fisher_variant)
        assert torch.equal(eraser.inv_fisher.packed, before) and eraser.n == 60
    eraser.erase((X[:4], y[:4]), epsilon=1.0, fisher="leave_k_out")
    assert [t.data_ptr() for t in eraser.inv_fisher.segments] == segs
    assert eraser.n == 56
