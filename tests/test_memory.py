"""Every call that allocates memory proportional to the inverse checks first that it fits: a
call that does not is refused with one line naming the bytes it needs, the bytes available and
what would make it fit, before anything of that size is allocated and without changing what
the caller holds. The "machine" is made small with SSSE_AVAILABLE_MEMORY (or max_memory=), so
no test allocates more than a few megabytes."""

import pytest
import torch
from torch import nn

import ssse
import ssse_ext
from ssse.io import read_metadata, save_inverse_fisher
from ssse_ext import BlockInverseFisher, BlockLayout, GramAccumulator, budget
from ssse_ext import build as build_module
from ssse_ext.errors import InsufficientMemoryError
from ssse_ext.fisher import build_peak_bytes

ENV = budget.AVAILABLE_MEMORY_ENV
# A scaled-down copy of 1000 rows x 120000 parameters in blocks of 40000: more parameters per
# block than rows, so "auto" stores every block in the exact low-rank form.
N, D, B = 50, 1200, 400
SMALL = 5_000_000  # bytes: the dense build needs about 12 MB, "auto" about 2 MB


def grads(n=N, d=D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)


def assert_refusal(exc: InsufficientMemoryError, *remedies: str):
    """One line, naming both byte counts and every remedy."""
    text = str(exc)
    assert isinstance(exc, MemoryError)
    assert "\n" not in text
    assert exc.needed > exc.available
    assert f"{exc.needed:,} bytes" in text and f"{exc.available:,} bytes" in text
    assert "nothing was allocated or changed" in text
    for remedy in remedies:
        assert remedy in text, (remedy, text)


def snapshot(inv: BlockInverseFisher):
    state, meta = inv.to_state()
    return {k: v.clone() for k, v in state.items()}, meta


def assert_unchanged(inv: BlockInverseFisher, before):
    state, meta = inv.to_state()
    assert meta == before[1]
    assert state.keys() == before[0].keys()
    for k, v in state.items():
        assert v.dtype == before[0][k].dtype and torch.equal(v, before[0][k]), k


@pytest.fixture
def small_machine(monkeypatch):
    monkeypatch.setenv(ENV, str(SMALL))
    return SMALL


@pytest.fixture
def mixed():
    """An inverse of dense and dual blocks, with a health probe (built before the machine is
    made small)."""
    layout = BlockLayout.from_boundaries([64, 69, 144, 147], 224)
    return ssse_ext.build_inverse_fisher(grads(30, 224, torch.float32, seed=1), damping=0.1,
                                         layout=layout)


# ---- the build ------------------------------------------------------------------------------

def test_the_full_size_call_needs_far_more_dense_than_auto():
    # 1000 x 120000 float32 in blocks of 40000: the dense build holds three 40000^2 float32
    # inverses (19.2 GB) and their float64 accumulators (38.4 GB); "auto" stores the rows
    layout = BlockLayout.fixed(120_000, 40_000)
    dense = build_peak_bytes(layout, torch.float32, rows=1000, representation="dense")
    auto = build_peak_bytes(layout, torch.float32, rows=1000)
    assert dense >= 3 * 40_000 ** 2 * (4 + 8)
    assert auto < 10 ** 9
    assert auto == build_peak_bytes(layout, torch.float32, rows=1000, representation="dual")


def test_the_full_size_dense_call_is_refused_before_the_stream_is_read(monkeypatch):
    # the real shapes, streamed: only the first chunk (8 rows) is ever made
    monkeypatch.setenv(ENV, str(24 << 30))
    read = []

    def stream():
        for i in range(125):
            read.append(i)
            assert i == 0, "the build read past the first chunk"
            yield torch.zeros(8, 120_000)

    with pytest.raises(InsufficientMemoryError) as err:
        ssse_ext.build_inverse_fisher(stream(), damping=1e-3, block_size=40_000,
                                      representation="dense", num_rows=1000)
    assert_refusal(err.value, 'representation="auto"', "max_memory=")
    assert err.value.available == 24 << 30 and read == [0]


def test_dense_is_refused_and_auto_fits_and_is_the_default(small_machine, monkeypatch):
    g = grads()
    calls = []
    real = build_module._build
    monkeypatch.setattr(build_module, "_build",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(InsufficientMemoryError) as err:
        ssse_ext.build_inverse_fisher(g, damping=1e-3, block_size=B, representation="dense")
    assert_refusal(err.value, 'representation="auto"', "block_size", "max_memory=")
    assert err.value.available == SMALL and not calls  # refused before any allocation
    inv = ssse_ext.build_inverse_fisher(g, damping=1e-3, block_size=B)
    assert inv.representation == ("dual",) * 3
    assert build_peak_bytes(inv.layout, torch.float32, rows=N) <= SMALL
    # exact: the same matrix as the dense blocks (built with the limit lifted)
    auto = ssse_ext.build_inverse_fisher(g.double(), damping=1e-3, block_size=B)
    dense = ssse_ext.build_inverse_fisher(g.double(), damping=1e-3, block_size=B,
                                          representation="dense", max_memory=1 << 40)
    v = grads(1, D, torch.float64, seed=2)[0]
    want = dense @ v
    assert torch.allclose(auto @ v, want, rtol=1e-8, atol=1e-8 * float(want.abs().max()))


def test_the_recurrence_is_refused_with_the_stable_auto_build_as_remedy(small_machine):
    with pytest.raises(InsufficientMemoryError) as err:
        ssse_ext.build_inverse_fisher(grads(), damping=1e-3, block_size=B, method="woodbury")
    assert_refusal(err.value, 'method="auto", representation="auto"', "max_memory=")


def test_auto_without_num_rows_names_num_rows(small_machine):
    with pytest.raises(InsufficientMemoryError) as err:
        ssse_ext.build_inverse_fisher(iter(grads().split(10)), damping=1e-3, block_size=B)
    assert_refusal(err.value, "num_rows=", "max_memory=")
    inv = ssse_ext.build_inverse_fisher(iter(grads().split(10)), damping=1e-3, block_size=B,
                                        num_rows=N)
    assert inv.representation == ("dual",) * 3


def test_max_memory_decides_over_the_machine(small_machine):
    g = grads()
    with pytest.raises(InsufficientMemoryError) as err:
        ssse_ext.build_inverse_fisher(g, damping=1e-3, block_size=B, max_memory=1000)
    assert err.value.available == 1000 and "max_memory=1000" in str(err.value)
    inv = ssse_ext.build_inverse_fisher(g, damping=1e-3, block_size=B, representation="dense",
                                        max_memory=1 << 30)
    assert inv.representation == ("dense",) * 3
    with pytest.raises(ValueError, match="max_memory"):
        ssse_ext.build_inverse_fisher(g, damping=1e-3, max_memory=-1)


def test_gram_accumulator_refuses_before_allocating():
    layout = BlockLayout.fixed(D, B)
    with pytest.raises(InsufficientMemoryError) as err:
        GramAccumulator(layout, torch.float32, "cpu", max_memory=1_000_000)
    assert_refusal(err.value, "block_size", "max_memory=")
    GramAccumulator(layout, torch.float32, "cpu", max_memory=100_000_000)


def test_dual_blocks_build_is_refused(monkeypatch):
    monkeypatch.setenv(ENV, "1000")
    with pytest.raises(InsufficientMemoryError) as err:
        ssse_ext.build_dual_blocks(grads(), damping=0.1, block_size=B)
    assert_refusal(err.value, "blocks=")


# ---- copies and moves -----------------------------------------------------------------------

def test_clone_is_refused_and_the_inverse_unchanged(mixed, monkeypatch):
    before = snapshot(mixed)
    monkeypatch.setenv(ENV, str(mixed.nbytes // 2))
    with pytest.raises(InsufficientMemoryError) as err:
        mixed.clone()
    assert_refusal(err.value, "max_memory=")
    with pytest.raises(InsufficientMemoryError):
        mixed.dual.clone()
    assert_unchanged(mixed, before)
    monkeypatch.delenv(ENV)
    assert_unchanged(mixed.clone(), before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, None])
def test_to_is_refused_and_the_inverse_unchanged(mixed, monkeypatch, dtype):
    before = snapshot(mixed)
    monkeypatch.setenv(ENV, str(mixed.nbytes // 2))
    with pytest.raises(InsufficientMemoryError) as err:
        mixed.to(dtype=dtype)
    assert_refusal(err.value, "max_memory=")
    with pytest.raises(InsufficientMemoryError):
        mixed.to("cpu", dtype, max_memory=100)
    assert_unchanged(mixed, before)
    moved = mixed.to(dtype=dtype, max_memory=1 << 30)
    monkeypatch.delenv(ENV)
    assert moved.dtype == (dtype or torch.float32)
    assert torch.allclose(moved.dense().double(), mixed.dense().double(), rtol=1e-6)


def test_dual_blocks_to_and_growth_are_refused(mixed, monkeypatch):
    dual = mixed.dual
    rows_before, g_before = dual.num_rows, dual.g.clone()
    monkeypatch.setenv(ENV, "1000")
    with pytest.raises(InsufficientMemoryError):
        dual.to(dtype=torch.float64)
    with pytest.raises(InsufficientMemoryError) as err:
        dual.update(grads(5, 224, seed=3))  # more rows than reserved: a larger storage
    assert_refusal(err.value, "num_rows=")
    assert dual.num_rows == rows_before and torch.equal(dual.g, g_before)


def test_copying_updates_and_leave_k_out_factors_are_refused(mixed, monkeypatch):
    before = snapshot(mixed)
    rows = grads(40, 224, seed=4)  # more rows than the small dense blocks: s x s factors
    monkeypatch.setenv(ENV, "1000")
    with pytest.raises(InsufficientMemoryError):
        mixed.update(rows, method="sherman_morrison")
    with pytest.raises(InsufficientMemoryError):
        mixed.update(rows)
    with pytest.raises(InsufficientMemoryError):
        mixed.without(rows, sign=1)
    with pytest.raises(InsufficientMemoryError):
        mixed.dense()
    assert_unchanged(mixed, before)


# ---- files ----------------------------------------------------------------------------------

def test_loading_is_refused_from_the_metadata_alone(mixed, tmp_path, monkeypatch):
    path = save_inverse_fisher(tmp_path / "inv.safetensors", mixed)
    meta = read_metadata(path)[1]["state"]
    probe = mixed.probe.sketch.numel() * 8
    assert BlockInverseFisher.state_nbytes(meta) == mixed.nbytes + probe
    assert BlockInverseFisher.state_nbytes(meta, torch.float64) > mixed.nbytes + probe
    need = mixed.nbytes + probe
    BlockInverseFisher.check_load_memory(meta, max_memory=need)
    with pytest.raises(InsufficientMemoryError) as err:
        BlockInverseFisher.check_load_memory(meta, max_memory=need - 1)
    assert err.value.needed == need
    # read, then copied to float64 next to the read tensors
    with pytest.raises(InsufficientMemoryError) as err:
        BlockInverseFisher.check_load_memory(meta, dtype=torch.float64, max_memory=need + 1)
    assert err.value.needed == need + BlockInverseFisher.state_nbytes(meta, torch.float64)
    monkeypatch.setenv(ENV, str(need // 2))
    with pytest.raises(InsufficientMemoryError) as err:
        BlockInverseFisher.check_load_memory(meta)
    assert_refusal(err.value, ENV)
    with pytest.raises(ValueError, match="not a valid inverse-Fisher state"):
        BlockInverseFisher.state_nbytes({"layout": meta["layout"]})


# ---- the model-level fit --------------------------------------------------------------------

def linear_fit_data():
    torch.manual_seed(0)
    model = nn.Linear(D // 6, 6).eval()  # 1200 weights (three blocks of 400) and 6 biases
    x = torch.randn(N, D // 6)
    y = torch.randint(0, 6, (N,))
    return model, nn.CrossEntropyLoss(reduction="none"), (x, y)


def test_fit_is_refused_before_any_gradient_and_auto_fits(small_machine, monkeypatch,
                                                          tmp_path):
    model, loss, data = linear_fit_data()
    made = []
    real = ssse.rows.row_stream
    for mod in ("fit", "checkpoint"):
        monkeypatch.setattr(f"ssse.{mod}.row_stream",
                            lambda *a, **k: made.append(1) or real(*a, **k))
    with pytest.raises(InsufficientMemoryError) as err:
        ssse.fit_inverse_fisher(model, loss, data, damping=1e-3, block_size=B,
                                representation="dense", progress=False)
    assert_refusal(err.value, 'representation="auto"', "block_size", ENV)
    assert not made
    with pytest.raises(InsufficientMemoryError) as err:
        ssse.fit_inverse_fisher(model, loss, data, damping=1e-3, block_size=B,
                                checkpoint=tmp_path / "fit.ckpt", progress=False)
    assert_refusal(err.value, 'without checkpoint= (a resumable fit keeps dense blocks)')
    assert not made and not (tmp_path / "fit.ckpt").exists()
    inv = ssse.fit_inverse_fisher(model, loss, data, damping=1e-3, block_size=B,
                                  progress=False)
    assert "dual" in inv.representation and made


def test_fit_with_a_large_chunk_budget_names_it(small_machine):
    model, loss, data = linear_fit_data()
    with pytest.raises(InsufficientMemoryError) as err:
        ssse.fit_inverse_fisher(model, loss, data, damping=1e-3, block_size=B,
                                max_memory=SMALL, progress=False)
    assert_refusal(err.value, "max_memory=")


# ---- the available figure -------------------------------------------------------------------

def test_the_environment_sets_the_figure(monkeypatch):
    monkeypatch.setenv(ENV, "12_345")
    assert budget.available_memory() == 12345
    assert budget.memory_limit("cpu") == (12345, f"{ENV}=12345")
    assert budget.memory_limit("cpu", 7) == (7, "max_memory=7")
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(ValueError, match=ENV):
        budget.available_memory()
    monkeypatch.delenv(ENV)
    assert budget.available_memory() > 0


@pytest.mark.parametrize("version", [1, 2])
def test_a_cgroup_limit_lowers_the_figure(monkeypatch, tmp_path, version):
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc_cgroup"
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100000000 kB\nMemAvailable: 90000000 kB\n")
    if version == 2:
        here = root / "job" / "task"
        here.mkdir(parents=True)
        (root / "job" / "memory.max").write_text("1000000\n")
        (root / "job" / "memory.current").write_text("400000\n")
        (root / "job" / "memory.stat").write_text("anon 300000\ninactive_file 100000\n")
        (here / "memory.max").write_text("max\n")
        proc.write_text("0::/job/task\n")
    else:
        here = root / "memory" / "job"
        here.mkdir(parents=True)
        (here / "memory.limit_in_bytes").write_text("2000000\n")
        (here / "memory.usage_in_bytes").write_text("600000\n")
        (here / "memory.stat").write_text("inactive_file 5\ntotal_inactive_file 200000\n")
        (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
        proc.write_text("4:memory:/job\n1:cpu:/\n")
    monkeypatch.setattr(budget, "_CGROUP_ROOT", root)
    monkeypatch.setattr(budget, "_PROC_CGROUP", proc)
    monkeypatch.setattr(budget, "_MEMINFO", meminfo)
    monkeypatch.delenv(ENV, raising=False)
    # the limit less what is used, the reclaimable page cache counted as free
    assert budget.available_memory("cpu") == (700_000 if version == 2 else 1_600_000)
    proc.write_text("0::/\n")  # no limit anywhere: MemAvailable
    assert budget.available_memory("cpu") == 90_000_000 * 1024
