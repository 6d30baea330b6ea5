"""Every CUDA kernel under each kernel set (simt, tc) against the CPU kernels and the float64
reference (skipped without a GPU).

Fresh random inputs per case, both dtypes; layouts with sizes that are not multiples of any tile,
a last block smaller than B, blocks of 1..5, groups of small blocks next to large ones, and layout
tables that are a sub-range of the full table (offsets still indexing the full buffers) or
shuffled; misaligned gradient and vector buffers; empty inputs; indefinite blocks.
"""

import math
import random

import pytest
import torch

import ssse_ext
from ssse_ext import BlockLayout, _C, _ops, build_inverse_fisher, reference

from .testing import DTYPES, TOL, rel_err

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ssse_ext.build_info()["cuda_compiled"]),
    reason="needs a CUDA device and an extension built with CUDA")

CUDA = torch.device("cuda")
KERNELS = ["simt", "tc"]
# float32 recurrences: float32 storage between (sub-)steps on well-conditioned blocks; see
# tests/test_cuda.py for the reasoning behind 2e-5.
REC_TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def _small_sizes(n):
    return [1 + i % 5 for i in range(n)]


def _resnet_like():
    # per_parameter layout of a small CNN: conv weights, norm scales and biases, a classifier.
    shapes = [(16, 3, 3, 3), (16,), (16,), (32, 16, 3, 3), (32,), (32,), (32, 32, 1, 1), (32,),
              (10, 32), (10,)]
    return BlockLayout.per_parameter(shapes, 256)


LAYOUTS = {
    "fixed-130-of-300": lambda: BlockLayout.fixed(300, 130),
    "mixed": lambda: BlockLayout((0, 5, 69, 134, 263), (5, 64, 65, 129, 1), 264),
    "blocks-of-1..5": lambda: BlockLayout.from_boundaries(
        list(itertools_accumulate(_small_sizes(150)))),
    "small-big-small": lambda: BlockLayout.from_boundaries(
        list(itertools_accumulate([3, 64, 40, 200, 64, 64, 7, 129]))),
    "one-big-many-small": lambda: BlockLayout.from_boundaries(
        list(itertools_accumulate([300] + [1 + i % 7 for i in range(40)]))),
    "resnet-like": _resnet_like,
}


def itertools_accumulate(sizes):
    total = 0
    for s in sizes:
        total += s
        yield total


def _tables(layout, how):
    """The host table of `layout`, all rows, a sub-range of rows, or the rows shuffled."""
    host = layout.table()
    if how == "sub-range" and layout.num_blocks > 2:
        host = host[1:-1]
    elif how == "shuffled":
        perm = torch.randperm(layout.num_blocks)
        host = host[perm].contiguous()
    return host, host.to(CUDA)


def _misaligned(shape, dtype, device):
    """A contiguous tensor whose data starts one element past an aligned address."""
    flat = torch.empty(math.prod(shape) + 1, dtype=dtype, device=device)
    return flat[1:].view(shape)


def _covered(layout, host):
    """Mask of the packed storage covered by the blocks of the table `host`."""
    mask = torch.zeros(layout.numel, dtype=torch.bool)
    for _, size, offset in host.tolist():
        mask[offset:offset + size * size] = True
    return mask


@pytest.fixture(params=KERNELS)
def kernels(request):
    with ssse_ext.use_cuda_kernels(request.param):
        yield request.param


# ---- Gram --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("how", ["all", "sub-range", "shuffled"])
def test_gram_matches_cpu(kernels, dtype, layout_name, how):
    layout = LAYOUTS[layout_name]()
    host, dev = _tables(layout, how)
    m = random.choice([1, 17, 130])
    g = torch.randn(m, layout.dim, dtype=torch.float64).to(dtype)
    start = torch.randn(layout.numel, dtype=torch.float64)
    cpu = start.clone()
    _ops.gram_accumulate_(g, host, host, cpu)
    gpu = start.to(CUDA)
    _ops.gram_accumulate_(g.to(CUDA), host, dev, gpu)
    gpu = gpu.cpu()
    # Lower triangles accumulate, float64 sums of exact products; everything else is untouched.
    assert rel_err(gpu, cpu) <= 1e-13
    for _, size, offset in host.tolist():
        blk = (gpu[offset:offset + size * size] - start[offset:offset + size * size]).view(size, size)
        assert torch.equal(blk.triu(1), torch.zeros_like(blk))
    outside = ~_covered(layout, host)
    assert torch.equal(gpu[outside], start[outside])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_misaligned_and_odd_strides(kernels, dtype):
    # d = 263 (odd) and a base one element past an aligned address: the scalar-load paths.
    layout = BlockLayout((0, 5, 69, 134), (5, 64, 65, 129), 263)
    g = _misaligned((77, 263), dtype, CUDA)
    g.copy_(torch.randn(77, 263, dtype=torch.float64).to(dtype))
    host = layout.table()
    gpu = torch.zeros(layout.numel, dtype=torch.float64, device=CUDA)
    _ops.gram_accumulate_(g, host, host.to(CUDA), gpu)
    cpu = torch.zeros(layout.numel, dtype=torch.float64)
    _ops.gram_accumulate_(g.cpu(), host, host, cpu)
    assert rel_err(gpu, cpu) <= 1e-13


# ---- inverse -------------------------------------------------------------------------------------

def _spd_gram(layout, m):
    gram = torch.zeros(layout.numel, dtype=torch.float64)
    for o, s in zip(layout.offsets, layout.sizes):
        x = torch.randn(m, s, dtype=torch.float64)
        gram[o:o + s * s] = (x.T @ x).reshape(-1)
    return gram


def _inverse_raw(gram, host, dev, damping, normalizer, dtype, out):
    """The CUDA inverse through the raw binding, into a caller's `out` (to check what is left
    untouched); returns info."""
    nb = host.shape[0]
    info = torch.full((nb,), -3, dtype=torch.int64, device=CUDA)
    work = torch.empty(_C.inverse_from_gram_workspace_bytes(host.data_ptr(), nb), dtype=torch.uint8,
                       device=CUDA)
    _C.inverse_from_gram_cuda(0 if dtype == torch.float32 else 1, gram.data_ptr(), host.data_ptr(),
                              dev.data_ptr(), nb, damping, normalizer, out.data_ptr(),
                              info.data_ptr(), work.data_ptr(), work.numel(),
                              torch.cuda.current_stream().cuda_stream)
    return info


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("how", ["all", "sub-range", "shuffled"])
def test_inverse_matches_cpu_and_reference(kernels, dtype, layout_name, how):
    layout = LAYOUTS[layout_name]()
    host, dev = _tables(layout, how)
    gram = _spd_gram(layout, random.choice([20, 97]))
    cpu, info_cpu = _ops.inverse_from_gram(gram.clone(), host, host, 0.3, 50.0, dtype)
    out = torch.full((layout.numel,), -7.0, dtype=dtype, device=CUDA)
    info = _inverse_raw(gram.to(CUDA), host, dev, 0.3, 50.0, dtype, out)
    assert info.count_nonzero().item() == 0 and info_cpu.count_nonzero().item() == 0
    out = out.cpu()
    covered = _covered(layout, host)
    assert rel_err(out[covered], cpu[covered]) <= TOL[dtype]
    assert torch.all(out[~covered] == -7.0)
    for _, size, offset in host.tolist():
        f = gram[offset:offset + size * size].view(size, size) / 50.0 + 0.3 * torch.eye(
            size, dtype=torch.float64)
        ref = torch.linalg.inv(f)
        blk = out[offset:offset + size * size].view(size, size)
        assert rel_err(blk, ref) <= TOL[dtype]
        assert torch.equal(blk, blk.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [(1, 69), (0, 3), (1, 64), (3, 128), (6, 0)])
def test_inverse_reports_the_potrf_pivot_like_cpu(kernels, dtype, bad):
    # Block `bad[0]` gets a negative diagonal entry at `bad[1]`: its Cholesky fails exactly there
    # (potrf's 1-based pivot), the other blocks are inverted, the failed block's out is untouched.
    layout = BlockLayout.from_boundaries(list(itertools_accumulate([100, 130, 5, 200, 64, 1, 3])))
    host = layout.table()
    gram = _spd_gram(layout, 150)
    o, s = layout.offsets[bad[0]], layout.sizes[bad[0]]
    gram[o:o + s * s].view(s, s)[bad[1], bad[1]] = -1e4
    _, info_cpu = _ops.inverse_from_gram(gram.clone(), host, host, 0.5, 150.0, dtype)
    out = torch.full((layout.numel,), -7.0, dtype=dtype, device=CUDA)
    info = _inverse_raw(gram.to(CUDA), host, host.to(CUDA), 0.5, 150.0, dtype, out)
    expect = [0] * layout.num_blocks
    expect[bad[0]] = bad[1] + 1
    assert info_cpu.tolist() == expect
    assert info.cpu().tolist() == expect
    assert torch.all(out[o:o + s * s].cpu() == -7.0)


# ---- Woodbury update -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("m", [1, 70, 150])
def test_update_and_downdate_match_cpu_and_reference(kernels, dtype, layout_name, m):
    layout = LAYOUTS[layout_name]()
    n = 120
    g = (0.5 * torch.randn(n + m, layout.dim, dtype=torch.float64)).to(dtype)
    base = build_inverse_fisher(g[:n], damping=0.5, layout=layout, normalizer=float(n + m),
                                representation="dense")
    gpu = base.to(CUDA).update(g[n:].to(CUDA), chunk_size=m)
    cpu = base.clone().update(g[n:], chunk_size=m)
    ref = torch.block_diag(*reference.block_closed_form(g.double(), layout, 0.5, float(n + m)))
    assert rel_err(gpu.dense(), ref) <= REC_TOL[dtype]
    assert rel_err(gpu.dense(), cpu.dense()) <= REC_TOL[dtype]
    for blk in gpu.blocks:
        assert torch.equal(blk, blk.T)  # the rank-m term is bitwise symmetric
    gpu.downdate(g[n:].to(CUDA), chunk_size=m)
    assert rel_err(gpu.dense(), base.dense()) <= REC_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_failed_downdate_reports_rows_like_cpu(kernels, dtype):
    layout = LAYOUTS["small-big-small"]()
    g = torch.randn(50, layout.dim, dtype=torch.float64).to(dtype)
    inv = build_inverse_fisher(g, damping=1e-2, layout=layout, representation="dense")
    foreign = (10.0 * torch.randn(90, layout.dim, dtype=torch.float64)).to(dtype)
    host = layout.table()
    info_cpu = _ops.sherman_morrison_(inv.packed.clone(), host, host, foreign, inv.normalizer, -1,
                                      True)
    gpu = inv.packed.to(CUDA)
    info = _ops.sherman_morrison_(gpu, host, host.to(CUDA), foreign.to(CUDA), inv.normalizer, -1,
                                  True)
    assert info_cpu.count_nonzero().item() > 0
    assert info.cpu().tolist() == info_cpu.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_in_groups_of_blocks(kernels, dtype, monkeypatch):
    # A tiny workspace cap makes the tc update process the table in many groups of blocks.
    layout = LAYOUTS["resnet-like"]()
    g = (0.5 * torch.randn(100, layout.dim, dtype=torch.float64)).to(dtype)
    base = build_inverse_fisher(g[:60], damping=0.5, layout=layout, normalizer=100.0,
                                representation="dense").to(CUDA)
    whole = base.clone().update(g[60:].to(CUDA))
    monkeypatch.setenv("SSSE_CUDA_WOODBURY_WORKSPACE_CAP", "300000")
    grouped = base.clone().update(g[60:].to(CUDA))
    assert rel_err(grouped.dense(), whole.dense()) <= REC_TOL[dtype]


# ---- apply ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("r,base_mode", [(1, "none"), (1, "separate"), (1, "misaligned-v"),
                                         (3, "none"), (9, "separate")])
def test_apply_matches_cpu(kernels, dtype, layout_name, r, base_mode):
    layout = LAYOUTS[layout_name]()
    host = layout.table()
    inv = torch.randn(layout.numel, dtype=torch.float64).to(dtype)
    v = torch.randn(layout.dim, r, dtype=torch.float64).to(dtype)
    base = torch.randn(layout.dim, r, dtype=torch.float64).to(dtype)
    use_base = base_mode == "separate"
    cpu = _ops.apply_inverse(inv, host, host, v, base if use_base else None, -0.7)
    vg = v.to(CUDA)
    if base_mode == "misaligned-v":
        vg = _misaligned(tuple(v.shape), dtype, CUDA)
        vg.copy_(v)
    gpu = _ops.apply_inverse(inv.to(CUDA), host, host.to(CUDA), vg,
                             base.to(CUDA) if use_base else None, -0.7)
    assert rel_err(gpu, cpu) <= TOL[dtype]
    blocks = [inv[o:o + s * s].view(s, s).double() for o, s in zip(layout.offsets, layout.sizes)]
    expect = reference.apply_inverse(blocks, layout, v.double(),
                                     base.double() if use_base else None, -0.7)
    assert rel_err(gpu, expect) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_in_place_over_base(kernels, dtype):
    # out may alias base (theta updated in place by the raw binding), never v.
    layout = LAYOUTS["mixed"]()
    host = layout.table()
    inv = torch.randn(layout.numel, dtype=dtype, device=CUDA)
    v = torch.randn(layout.dim, 1, dtype=dtype, device=CUDA)
    theta = torch.randn(layout.dim, 1, dtype=dtype, device=CUDA)
    expect = _ops.apply_inverse(inv, host, host.to(CUDA), v, theta, 0.5)
    dev = host.to(CUDA)
    work = torch.empty(_C.apply_inverse_workspace_bytes(host.data_ptr(), layout.num_blocks),
                       dtype=torch.uint8, device=CUDA)
    _C.apply_inverse_cuda(0 if dtype == torch.float32 else 1, inv.data_ptr(), host.data_ptr(),
                          dev.data_ptr(), layout.num_blocks, v.data_ptr(), layout.dim, 1,
                          theta.data_ptr(), 0.5, theta.data_ptr(), work.data_ptr(), work.numel(),
                          torch.cuda.current_stream().cuda_stream)
    assert torch.equal(theta, expect)


# ---- empty inputs and the whole pipeline ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_inputs(kernels, dtype):
    layout = LAYOUTS["mixed"]()
    host = layout.table()
    dev = host.to(CUDA)
    gram = torch.randn(layout.numel, dtype=torch.float64, device=CUDA)
    before = gram.clone()
    _ops.gram_accumulate_(torch.zeros(0, layout.dim, dtype=dtype, device=CUDA), host, dev, gram)
    assert torch.equal(gram, before)
    inv = torch.randn(layout.numel, dtype=dtype, device=CUDA)
    keep = inv.clone()
    info = _ops.sherman_morrison_(inv, host, dev, torch.zeros(0, layout.dim, dtype=dtype,
                                                              device=CUDA), 10.0, 1, True)
    assert info.count_nonzero().item() == 0 and torch.equal(inv, keep)
    out = _ops.apply_inverse(inv, host, dev, torch.zeros(layout.dim, 0, dtype=dtype, device=CUDA),
                             None, 1.0)
    assert out.shape == (layout.dim, 0)
    none = torch.zeros(0, 3, dtype=torch.int64)
    packed, info = _ops.inverse_from_gram(torch.zeros(0, dtype=torch.float64, device=CUDA), none,
                                          none.to(CUDA), 1.0, 1.0, dtype)
    assert packed.numel() == 0 and info.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_sets_agree_on_many_small_blocks(dtype):
    # The whole pipeline (build, update, downdate, apply) under simt and tc on a per_parameter
    # layout with hundreds of blocks, most of them tiny.
    shapes = [(7,), (3, 3), (40, 5), (5,), (1,), (2, 64)] * 40
    layout = BlockLayout.per_parameter(shapes, 64)
    g = (0.5 * torch.randn(90, layout.dim, dtype=torch.float64)).to(dtype).to(CUDA)
    v = torch.randn(layout.dim, dtype=torch.float64).to(dtype).to(CUDA)
    results = {}
    for k in KERNELS:
        with ssse_ext.use_cuda_kernels(k):
            inv = build_inverse_fisher(g[:60], damping=0.2, layout=layout, normalizer=90.0,
                                       representation="dense")
            inv.update(g[60:]).downdate(g[:10])
            results[k] = (inv.dense(), inv @ v)
    ref = torch.block_diag(*reference.block_closed_form(g[10:].double().cpu(), layout, 0.2, 90.0))
    for k in KERNELS:
        assert rel_err(results[k][0], ref) <= REC_TOL[dtype]
    assert rel_err(results["tc"][0], results["simt"][0]) <= REC_TOL[dtype]
    assert rel_err(results["tc"][1], results["simt"][1]) <= REC_TOL[dtype]
