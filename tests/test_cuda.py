"""CUDA kernels against the float64 reference and the CPU kernels (skipped without a GPU).

Block layouts are chosen so that sizes are not multiples of the 64-wide tiles, the last block is
smaller than B, and one block is smaller than a tile; gradients are fresh random per case. Every
test runs under each CUDA kernel set (simt, tc).
"""

import pytest
import torch

import ssse_ext
from ssse_ext import BlockLayout, NotPositiveDefiniteError, _ops, build_inverse_fisher, reference

from .testing import DTYPES, TOL, rel_err

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ssse_ext.build_info()["cuda_compiled"]),
    reason="needs a CUDA device and an extension built with CUDA")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True, params=["simt", "tc"])
def kernels(request):
    with ssse_ext.use_cuda_kernels(request.param):
        yield request.param

LAYOUTS = {
    "fixed-130-of-300": lambda: BlockLayout.fixed(300, 130),   # 130, 130, 40
    "one-block-70": lambda: BlockLayout.fixed(70, 70),
    "mixed": lambda: BlockLayout((0, 5, 69, 134, 263), (5, 64, 65, 129, 1), 264),
}

# float32 tolerances. Build: float64 Gram and float64 inverse, so only the final rounding (and
# float32 gradients) remain: TOL. Recurrences: float32 storage of F^{-1} between steps and float32
# products on well-conditioned blocks (condition number < 10 here) give ~1e-6; 2e-5 leaves room
# for sums over up to 130 terms per step.
REC_TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def _grads(n, d, dtype, scale=1.0):
    return (scale * torch.randn(n, d, dtype=torch.float64)).to(dtype)


def _closed_form(grads, layout, damping, normalizer):
    g = grads.double().cpu()
    return torch.block_diag(*reference.block_closed_form(g, layout, damping, normalizer))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_build_matches_reference_and_cpu(dtype, layout_name):
    layout = LAYOUTS[layout_name]()
    g = _grads(157, layout.dim, dtype)
    inv = build_inverse_fisher(g.to(CUDA), damping=0.3, layout=layout, representation="dense")
    assert inv.device.type == "cuda" and inv.dtype == dtype
    ref = _closed_form(g, layout, 0.3, 157.0)
    assert rel_err(inv.dense(), ref) <= TOL[dtype]
    cpu = build_inverse_fisher(g, damping=0.3, layout=layout, representation="dense")
    assert rel_err(inv.dense(), cpu.dense()) <= TOL[dtype]
    for blk in inv.blocks:
        assert torch.equal(blk, blk.T)  # both triangles come from the same stored values


@pytest.mark.parametrize("dtype", DTYPES)
def test_build_streamed_chunks_equal_one_pass(dtype):
    layout = BlockLayout.fixed(200, 96)
    g = _grads(300, 200, dtype).to(CUDA)
    whole = build_inverse_fisher(g, damping=0.1, layout=layout, representation="dense")
    parts = build_inverse_fisher(iter([g[:17], g[17:200], g[200:]]), damping=0.1, layout=layout,
                                 representation="dense")
    assert rel_err(parts.dense(), whole.dense()) <= TOL[dtype]


def test_build_float32_small_damping_meets_contract():
    # The stable build's contract: float32 relative error <= 1e-4 whenever cond(F_b) <= 1e3.
    # Fewer rows than the block size and large gradients against a small damping put the
    # condition number near that bound (the float32 recurrence fails it by orders of magnitude).
    layout = BlockLayout.fixed(256, 128)
    g = _grads(100, 256, torch.float32, scale=3.0)
    damping = 0.05
    ref = _closed_form(g, layout, damping, 100.0)
    for st, s in zip(layout.starts, layout.sizes):
        eig = torch.linalg.eigvalsh(ref[st:st + s, st:st + s])
        assert 100 <= (eig.max() / eig.min()).item() <= 1e3
    inv = build_inverse_fisher(g.to(CUDA), damping=damping, layout=layout, representation="dense")
    assert rel_err(inv.dense(), ref) <= 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["woodbury", "sherman_morrison"])
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_recurrence_build_matches_reference_and_cpu(dtype, method, layout_name):
    layout = LAYOUTS[layout_name]()
    n = 150 if method == "woodbury" else 40
    g = _grads(n, layout.dim, dtype, scale=0.5)
    inv = build_inverse_fisher(g.to(CUDA), damping=1.0, layout=layout, method=method,
                               representation="dense")
    ref = _closed_form(g, layout, 1.0, float(n))
    assert rel_err(inv.dense(), ref) <= REC_TOL[dtype]
    cpu = build_inverse_fisher(g, damping=1.0, layout=layout, method=method, representation="dense")
    assert rel_err(inv.dense(), cpu.dense()) <= REC_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 64, 150, None])
def test_update_then_downdate(dtype, chunk_size):
    # chunk_size 150 (> 64) runs the fused sub-chunk pipeline inside one call, with a last
    # sub-chunk of 22 rows; None sends all rows of a call at once (default 64 for woodbury).
    layout = LAYOUTS["mixed"]()
    n, k = 200, 37
    g = _grads(n, layout.dim, dtype, scale=0.5)
    base = build_inverse_fisher(g[:120].to(CUDA), damping=0.5, layout=layout, normalizer=float(n),
                                representation="dense")
    inv = base.clone().update(g[120:].to(CUDA), chunk_size=chunk_size)
    assert inv.num_samples == n
    assert rel_err(inv.dense(), _closed_form(g, layout, 0.5, float(n))) <= REC_TOL[dtype]
    for blk in inv.blocks:  # the rank-m term is bitwise symmetric
        assert torch.equal(blk, blk.T)
    inv.downdate(g[:k].to(CUDA), chunk_size=chunk_size)
    assert rel_err(inv.dense(), _closed_form(g[k:], layout, 0.5, float(n))) <= REC_TOL[dtype]
    cpu = build_inverse_fisher(g, damping=0.5, layout=layout,
                               representation="dense").downdate(g[:k], chunk_size=chunk_size)
    assert rel_err(inv.dense(), cpu.dense()) <= REC_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank1_update_and_downdate_match_cpu(dtype):
    layout = LAYOUTS["fixed-130-of-300"]()
    g = _grads(50, layout.dim, dtype, scale=0.5)
    base = build_inverse_fisher(g[:30], damping=0.5, layout=layout, normalizer=50.0,
                                representation="dense")
    gpu = base.to(CUDA).update(g[30:].to(CUDA), method="sherman_morrison")
    cpu = base.clone().update(g[30:], method="sherman_morrison")
    assert rel_err(gpu.dense(), cpu.dense()) <= REC_TOL[dtype]
    gpu.downdate(g[:10].to(CUDA), method="sherman_morrison")
    ref = _closed_form(g[10:], layout, 0.5, 50.0)
    assert rel_err(gpu.dense(), ref) <= REC_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["woodbury", "sherman_morrison"])
def test_downdate_of_rows_never_added_raises_and_keeps_inverse(dtype, method):
    layout = BlockLayout.fixed(100, 64)
    g = _grads(20, 100, dtype).to(CUDA)
    inv = build_inverse_fisher(g, damping=1e-3, layout=layout, representation="dense")
    before = inv.packed.clone()
    with pytest.raises(NotPositiveDefiniteError):
        inv.downdate(10.0 * _grads(80, 100, dtype).to(CUDA), method=method)
    assert torch.equal(inv.packed, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_from_gram_reports_the_potrf_pivot_like_cpu(dtype):
    # F = damping I + gram / N with one negative diagonal entry at index 69 (second pivot tile):
    # the Cholesky fails exactly there, and the CUDA info must equal the CPU one (70).
    layout = BlockLayout.fixed(200, 100)
    host = layout.table()
    gram = torch.zeros(layout.numel, dtype=torch.float64)
    for o, s in zip(layout.offsets, layout.sizes):
        gram[o:o + s * s].view(s, s).diagonal().fill_(1.0)
    gram[layout.offsets[1]:layout.offsets[1] + 100 * 100].view(100, 100)[69, 69] = -5.0
    _, info_cpu = _ops.inverse_from_gram(gram.clone(), host, host, 0.5, 1.0, dtype)
    out, info_gpu = _ops.inverse_from_gram(gram.to(CUDA), host, host.to(CUDA), 0.5, 1.0, dtype)
    assert info_cpu.tolist() == [0, 70]
    assert info_gpu.cpu().tolist() == [0, 70]
    good = out[:100 * 100].view(100, 100).cpu().double()
    assert rel_err(good, torch.eye(100, dtype=torch.float64) / 1.5) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [None, 1, 3, 4, 9])
def test_apply_matches_reference_and_cpu(dtype, r):
    layout = LAYOUTS["mixed"]()
    g = _grads(90, layout.dim, dtype)
    inv = build_inverse_fisher(g, damping=0.2, layout=layout, representation="dense")
    shape = (layout.dim,) if r is None else (layout.dim, r)
    v = torch.randn(shape, dtype=torch.float64).to(dtype)
    theta = torch.randn(shape, dtype=torch.float64).to(dtype)
    gpu = inv.to(CUDA)
    ref_blocks = [b.double() for b in inv.blocks]
    expect = reference.apply_inverse(ref_blocks, layout, v.double(), theta.double(), -0.7)
    got = gpu.apply_update(theta.to(CUDA), v.to(CUDA), -0.7)
    assert rel_err(got, expect) <= TOL[dtype]
    assert rel_err(got, inv.apply_update(theta, v, -0.7)) <= TOL[dtype]
    assert rel_err(gpu @ v.to(CUDA), reference.apply_inverse(ref_blocks, layout, v.double())) \
        <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_and_empty_inputs(dtype):
    layout = BlockLayout.fixed(70, 33)
    gt = _grads(70, 50, dtype).to(CUDA).T  # (50, 70), not contiguous
    inv = build_inverse_fisher(gt, damping=0.4, layout=layout, representation="dense")
    ref = _closed_form(gt.cpu(), layout, 0.4, 50.0)
    assert rel_err(inv.dense(), ref) <= TOL[dtype]
    before = inv.packed.clone()
    inv.update(torch.zeros(0, 70, dtype=dtype, device=CUDA))
    assert torch.equal(inv.packed, before)


def test_runs_on_the_current_stream():
    # The side stream first spins for a while, then writes the gradients; every kernel is queued
    # through the op layer (no validation, hence no host synchronisation) behind it. A kernel
    # launched on any other stream runs at once and reads NaN gradients or a stale Gram.
    layout = BlockLayout.fixed(150, 64)
    host = layout.table()
    dev = host.to(CUDA)
    g = _grads(100, 150, torch.float64).to(CUDA)
    ones = torch.ones(150, 1, dtype=torch.float64, device=CUDA)
    expect = build_inverse_fisher(g, damping=0.3, layout=layout, representation="dense")
    expect.update(g[:40]).downdate(g[:40])
    late = torch.full_like(g, float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the side stream
        late.copy_(g)
        gram = torch.zeros(layout.numel, dtype=torch.float64, device=CUDA)
        _ops.gram_accumulate_(late, host, dev, gram)
        packed, info = _ops.inverse_from_gram(gram, host, dev, 0.3, 100.0, torch.float64)
        info_up = _ops.sherman_morrison_(packed, host, dev, late[:40], 100.0, 1, True)
        info_down = _ops.sherman_morrison_(packed, host, dev, late[:40], 100.0, -1, True)
        out = _ops.apply_inverse(packed, host, dev, ones, None, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    assert info.count_nonzero().item() == 0
    assert info_up.count_nonzero().item() == 0 and info_down.count_nonzero().item() == 0
    assert rel_err(packed, expect.packed) <= 1e-10
    assert rel_err(out, expect.dense() @ ones) <= 1e-10
