"""Dual (low-rank) blocks against the dense blocks and the float64 reference (DESIGN §1)."""

import itertools
import math

import pytest
import torch

import ssse_ext
from ssse_ext import (BlockLayout, DualBlocks, NotPositiveDefiniteError, RowNotFoundError, _ops,
                      build_dual_blocks, build_inverse_fisher, choose_representation, reference)
from ssse_ext.dual import MATCH_RTOL, dual_nbytes

from .testing import DEVICES, DTYPES, TOL, load_benchmark, rel_err

PRODUCT = list(itertools.product(DTYPES, DEVICES))

# Dual blocks keep G in the input dtype (float32 rows are used as given: their products are exact
# in float64), the kernel Gram matrix, its factor and every product in float64; the only float32
# rounding is the final one of the result (unit roundoff 6e-8 per entry). With the kernels'
# condition numbers here (< 100) the float32 result is within ~1e-7 of the float64 reference, so
# 1e-6 keeps a margin of ten. float64: rounding of O(s) sums and of an R x R Cholesky solve.
DUAL_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def grads_of(n, d, dtype, device, scale=1.0, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return (scale * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype).to(device)


def ref_block(g, layout, b, damping, normalizer):
    """The float64 reference inverse of block b, from the dual reference form."""
    rows = g[:, layout.slice(b)].double().cpu()
    G, L = reference.dual_factor(rows, damping, normalizer)
    return reference.dual_dense(G, L, damping)


def max_err(dual, g, damping, normalizer):
    return max((rel_err(dual.dense_block(b), ref_block(g, dual.layout, b, damping, normalizer))
                for b in dual.block_ids), default=0.0)


def same_blocks(a, b, tol):
    assert a.block_ids == b.block_ids and a.num_rows == b.num_rows
    for blk in a.block_ids:
        assert rel_err(a.dense_block(blk), b.dense_block(blk).double()) <= tol, blk


LAYOUTS = {
    "fixed-64-of-130": lambda: BlockLayout.fixed(130, 64),        # 64, 64, 2 (last < B)
    "odd-45-of-101": lambda: BlockLayout.fixed(101, 45),          # 45, 45, 11
    "sizes-1-to-5": lambda: BlockLayout.from_boundaries([0, 1, 3, 6, 10, 15]),
    "one-block-37": lambda: BlockLayout.fixed(37, 37),
}


# ---- build: dual against the reference and against the dense blocks ---------------------------

@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("n", [1, 3, 20])
def test_build_matches_reference_and_dense(dtype, device, layout_name, n):
    layout = LAYOUTS[layout_name]()
    g = grads_of(n, layout.dim, dtype, device)
    dual = build_dual_blocks(g, damping=0.5, layout=layout, normalizer=11.0)
    assert dual.dtype == dtype and dual.device == device and dual.num_rows == n
    assert dual.block_ids == tuple(range(layout.num_blocks)) and dual.capacity == n
    assert max_err(dual, g, 0.5, 11.0) <= DUAL_TOL[dtype]
    # The dense build of the same blocks (lambda = 0.5: every F_b is well conditioned, so the
    # dense Cholesky inverse is accurate too; float32: the dense build's own contract, TOL).
    dense = build_inverse_fisher(g, damping=0.5, layout=layout, normalizer=11.0)
    for b in range(layout.num_blocks):
        assert rel_err(dual.dense_block(b), dense.dense_block(b).double()) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_dual_equals_dense_when_block_not_larger_than_rows(device):
    # s <= R: the dual form is not the smaller one, but it must still be the same matrix.
    g = grads_of(50, 47, torch.float64, device)
    layout = BlockLayout.fixed(47, 16)  # 16, 16, 15, all <= 50 rows
    dual = build_dual_blocks(g, damping=0.05, layout=layout)
    dense = build_inverse_fisher(g, damping=0.05, layout=layout)
    assert dual.normalizer == dense.normalizer == 50
    for b in range(layout.num_blocks):
        assert rel_err(dual.dense_block(b), dense.dense_block(b)) <= 1e-10


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_streamed_chunks_equal_one_tensor(dtype, device):
    layout = BlockLayout.fixed(150, 70)
    g = grads_of(41, 150, dtype, device)
    whole = build_dual_blocks(g, damping=0.1, layout=layout)
    parts = build_dual_blocks(iter(g.split(6)), damping=0.1, layout=layout)
    assert parts.num_rows == 41 and parts.normalizer == 41 and parts.capacity == 41
    same_blocks(parts, whole, DUAL_TOL[dtype])
    for b in whole.block_ids:  # G is the rows themselves, bit for bit
        assert torch.equal(parts.rows_of(b), whole.rows_of(b))
    reserved = build_dual_blocks(iter(g.split(17)), damping=0.1, layout=layout, capacity=64,
                                 chunk_size=5)
    assert reserved.capacity == 64 and reserved.num_rows == 41
    same_blocks(reserved, whole, DUAL_TOL[dtype])


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_normalizer_is_not_the_row_count(dtype, device):
    g = grads_of(9, 40, dtype, device)
    dual = build_dual_blocks(g, damping=0.3, block_size=13, normalizer=1000.0)
    assert dual.normalizer == 1000.0 and dual.layout == BlockLayout.fixed(40, 13)
    assert max_err(dual, g, 0.3, 1000.0) <= DUAL_TOL[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_empty_inputs(dtype, device):
    empty = torch.zeros(0, 9, dtype=dtype, device=device)
    dual = build_dual_blocks(empty, damping=0.5, block_size=4)  # F = lambda I
    assert dual.num_rows == 0 and dual.nbytes == 0
    for b in dual.block_ids:
        s = dual.layout.sizes[b]
        assert torch.equal(dual.dense_block(b).cpu(), torch.eye(s, dtype=dtype) / 0.5)
    v = torch.randn(9, dtype=dtype, device=device)
    assert rel_err(dual @ v, v.double() / 0.5) <= DUAL_TOL[dtype]
    assert (dual @ torch.zeros(9, 0, dtype=dtype, device=device)).shape == (9, 0)
    dual.update(empty).downdate(empty)
    assert dual.num_rows == 0
    g = grads_of(4, 9, dtype, device)
    dual.update(g)  # from no rows at all
    assert max_err(dual, g, 0.5, 1.0) <= DUAL_TOL[dtype]
    none = build_dual_blocks(torch.zeros(5, 0, dtype=dtype, device=device), damping=1.0)
    assert none.num_blocks == 0 and (none @ torch.zeros(0, dtype=dtype, device=device)).numel() == 0


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_non_contiguous_inputs(dtype, device):
    g = grads_of(60, 25, dtype, device).T  # (25, 60), column-major
    assert not g.is_contiguous()
    layout = BlockLayout.fixed(60, 32)
    dual = build_dual_blocks(g, damping=0.2, layout=layout)
    ref = build_dual_blocks(g.contiguous(), damping=0.2, layout=layout)
    same_blocks(dual, ref, 0.0)
    v = torch.randn(3, 60, dtype=dtype, device=device).T
    assert not v.is_contiguous()
    assert torch.equal(dual @ v, ref @ v.contiguous())
    strided = grads_of(10, 60, dtype, device)[::2]
    assert not strided.is_contiguous()
    dual.update(strided).downdate(strided)
    same_blocks(dual, ref, DUAL_TOL[dtype])


# ---- the apply ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("r", [None, 1, 3, 20])
def test_apply_with_base_and_many_columns(dtype, device, r):
    # r = 20 takes the CPU's GEMM path, r < 16 its dot-product path.
    layout = LAYOUTS["odd-45-of-101"]()
    g = grads_of(30, layout.dim, dtype, device)
    dual = build_dual_blocks(g, damping=0.1, layout=layout, normalizer=30.0)
    shape = (layout.dim,) if r is None else (layout.dim, r)
    v = torch.randn(shape, dtype=dtype, device=device)
    theta = torch.randn(shape, dtype=dtype, device=device)
    blocks = [ref_block(g, layout, b, 0.1, 30.0) for b in range(layout.num_blocks)]
    expect = reference.apply_inverse(blocks, layout, v.double().cpu(), theta.double().cpu(), -0.7)
    out = dual.apply(v, base=theta, scale=-0.7)
    assert out.shape == v.shape and rel_err(out, expect) <= DUAL_TOL[dtype]
    assert rel_err(dual @ v, reference.apply_inverse(blocks, layout, v.double().cpu())) <= \
        DUAL_TOL[dtype]
    for b in range(layout.num_blocks):  # the reference's own apply
        sl = layout.slice(b)
        G, L = reference.dual_factor(g[:, sl].double().cpu(), 0.1, 30.0)
        ref = reference.dual_apply(G, L, 0.1, v[sl].double().cpu(), theta[sl].double().cpu(), -0.7)
        assert rel_err(out[sl], ref) <= DUAL_TOL[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_apply_into_given_rows_of_a_mixed_inverse(dtype, device):
    # Blocks chosen by memory: the dual ones overwrite their rows of out, the dense ones stay.
    layout = BlockLayout((0, 10, 110, 120), (10, 100, 10, 90), 210)
    g = grads_of(12, 210, dtype, device)
    mask = choose_representation(layout.sizes, 12, dtype)
    assert mask == [False, True, False, True]
    dual = build_dual_blocks(g, damping=0.2, layout=layout, blocks=mask)
    dense = build_inverse_fisher(g, damping=0.2, layout=layout)
    theta = torch.randn(210, 2, dtype=dtype, device=device)
    v = torch.randn(210, 2, dtype=dtype, device=device)
    out = dense.apply_update(theta, v, 0.5)
    before = out.clone()
    assert dual.apply(v, base=theta, scale=0.5, out=out) is out
    for b in (0, 2):
        assert torch.equal(out[layout.slice(b)], before[layout.slice(b)])
    blocks = [ref_block(g, layout, b, 0.2, 12.0) for b in range(4)]
    expect = reference.apply_inverse(blocks, layout, v.double().cpu(), theta.double().cpu(), 0.5)
    # The dense rows carry the dense build's float32 contract (TOL: float64 Gram and inverse,
    # one final rounding of the stored inverse, then a float64-accumulated apply).
    assert rel_err(out, expect) <= TOL[dtype]
    alone = dual @ v  # rows of dense blocks are zero
    assert torch.equal(alone[layout.slice(0)], torch.zeros_like(alone[layout.slice(0)]))


# ---- the ill-conditioned case -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ill_conditioned():
    """One block of 60 with 30 gradient rows of scale 1e4 and lambda = 1e-6 (N = 30): cond(F) is
    about 5e14, cond(K) about 20. The rows are float32 numbers, so that one exact inverse serves
    both dtypes."""
    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(30, 60, generator=gen, dtype=torch.float64) * 1e4).float().double()
    damping, n = 1e-6, 30
    try:
        import mpmath
    except ImportError:  # pragma: no cover - mpmath comes with torch (through sympy)
        # Woodbury in float64 on the original rows: accurate here, since it only inverts the
        # kernel K (condition number ~20), never the ill-conditioned F.
        G, L = reference.dual_factor(g, damping, n)
        return g, damping, reference.dual_dense(G, L, damping)
    with mpmath.workdps(50):  # the full 60 x 60 inverse of F at 50 digits
        G = mpmath.matrix(g.tolist())
        F = mpmath.eye(60) * mpmath.mpf(damping) + (G.T * G) / n
        inv = F ** -1
        exact = torch.tensor([[float(inv[i, j]) for j in range(60)] for i in range(60)],
                             dtype=torch.float64)
    return g, damping, exact


@pytest.mark.parametrize("device", DEVICES)
def test_ill_conditioned_block_is_accurate(device, ill_conditioned):
    g, damping, exact = ill_conditioned
    cond = torch.linalg.cond(damping * torch.eye(60, dtype=torch.float64) + g.T @ g / 30).item()
    assert cond > 1e14
    # The dense build (Gram, then a Cholesky of F itself) cannot be accurate at cond(F) ~ 5e14:
    # measured 2.6e-2 relative error on this block, in float64 and in float32 alike.
    dense = build_inverse_fisher(g.to(device), damping=damping, representation="dense")
    assert rel_err(dense.dense_block(0), exact) > 1e-3
    # The dual form factorises only K (cond ~ 20) and meets float64 precision: measured 8e-16.
    dual = build_dual_blocks(g.to(device), damping=damping)
    assert rel_err(dual.dense_block(0), exact) <= 1e-12
    # float32 rows (exactly the rows above), float64 kernel and products: the only error is the
    # final rounding to float32 (6e-8 per entry), measured 2.4e-8; the contract is 1e-6.
    dual32 = build_dual_blocks(g.float().to(device), damping=damping)
    assert rel_err(dual32.dense_block(0), exact) <= 1e-6
    v = torch.randn(60, 3, dtype=torch.float64)
    assert rel_err(dual @ v.to(device), exact @ v) <= 1e-12
    assert rel_err(dual32 @ v.float().to(device), exact @ v.float().double()) <= 1e-6


# ---- update and downdate ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("removed", [[0], [29], [3, 4, 5], [0, 7, 13, 21, 29], list(range(1, 30))])
def test_downdate_equals_build_from_remaining_rows(dtype, device, removed):
    layout = LAYOUTS["fixed-64-of-130"]()
    g = grads_of(30, layout.dim, dtype, device)
    dual = build_dual_blocks(g, damping=0.1, layout=layout)
    order = torch.randperm(len(removed)).tolist()  # any order of the rows to remove
    dual.downdate(g[[removed[i] for i in order]])
    kept = [i for i in range(30) if i not in removed]
    fresh = build_dual_blocks(g[kept], damping=0.1, layout=layout, normalizer=30.0)
    assert dual.num_rows == len(kept) and dual.normalizer == 30.0
    for b in dual.block_ids:
        assert torch.equal(dual.rows_of(b), fresh.rows_of(b))  # rows deleted, order kept
    same_blocks(dual, fresh, DUAL_TOL[dtype])
    assert max_err(dual, g[kept], 0.1, 30.0) <= DUAL_TOL[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_update_then_downdate_round_trip(dtype, device):
    layout = BlockLayout.fixed(200, 90)
    g = grads_of(70, 200, dtype, device)
    base = build_dual_blocks(g[:40], damping=0.05, layout=layout, normalizer=70.0)
    saved = base.clone()
    base.update(g[40:55]).update(iter(g[55:].split(4)), chunk_size=3)
    whole = build_dual_blocks(g, damping=0.05, layout=layout)
    assert base.num_rows == 70
    same_blocks(base, whole, DUAL_TOL[dtype])
    base.downdate(g[40:])
    same_blocks(base, saved, DUAL_TOL[dtype])
    for b in base.block_ids:
        assert torch.equal(base.rows_of(b), saved.rows_of(b))


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_row_never_added_is_refused_and_changes_nothing(dtype, device):
    layout = BlockLayout.fixed(100, 40)
    g = grads_of(25, 100, dtype, device)
    dual = build_dual_blocks(g, damping=0.1, layout=layout)
    g_before, l_before = dual.g.clone(), dual.l.clone()
    stranger = g[5].clone()
    stranger[85] += 0.01 * stranger.abs().max()  # differs in the last block only
    with pytest.raises(RowNotFoundError, match=r"row 2 of grads .* dual block 2 \(parameters 80"):
        dual.downdate(torch.stack([g[1], g[2], stranger]))
    assert torch.equal(dual.g, g_before) and torch.equal(dual.l, l_before)
    assert dual.num_rows == 25
    with pytest.raises(RowNotFoundError, match="cannot remove 26 rows"):
        dual.downdate(torch.cat([g, g[:1]]))
    assert torch.equal(dual.g, g_before) and torch.equal(dual.l, l_before)


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_matching_tolerates_recomputation_rounding(dtype, device):
    g = grads_of(12, 50, dtype, device)
    dual = build_dual_blocks(g, damping=0.1, block_size=25)
    # The same gradients with their last bits changed, as a recomputation gives.
    eps = torch.finfo(dtype).eps
    noisy = g * (1 + 8 * eps * torch.randn_like(g))
    dual.clone().downdate(noisy[:4])
    assert MATCH_RTOL[dtype] == math.sqrt(eps)
    far = g[:1] * (1 + 10 * MATCH_RTOL[dtype])
    with pytest.raises(RowNotFoundError, match="within rtol"):
        dual.downdate(far)
    dual.downdate(far, rtol=0.5)  # an explicit tolerance
    assert dual.num_rows == 11


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_duplicates_are_removed_once_each_and_blocks_match_separately(dtype, device):
    layout = BlockLayout.fixed(40, 20)
    g = grads_of(8, 40, dtype, device)
    g[3, :20] = g[6, :20]  # rows 3 and 6 agree on block 0 only
    g = torch.cat([g, g[1:2]])  # row 1 added twice (rows 1 and 8)
    dual = build_dual_blocks(g, damping=0.2, layout=layout)
    dual.downdate(torch.stack([g[6], g[1], g[1]]))
    kept = [0, 2, 3, 4, 5, 7]
    fresh = build_dual_blocks(g[kept], damping=0.2, layout=layout, normalizer=9.0)
    same_blocks(dual, fresh, DUAL_TOL[dtype])
    with pytest.raises(RowNotFoundError, match="row 0 of grads"):
        dual.downdate(g[1:2])  # both copies are gone


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_blocks_subset_update_downdate(dtype, device):
    layout = BlockLayout.fixed(120, 30)
    g = grads_of(10, 120, dtype, device)
    dual = build_dual_blocks(g[:6], damping=0.3, layout=layout, blocks=[1, 3], normalizer=10.0)
    assert dual.block_ids == (1, 3) and dual.sizes == (30, 30)
    dual.update(g[6:])
    assert max_err(dual, g, 0.3, 10.0) <= DUAL_TOL[dtype]
    dual.downdate(g[2:5])
    assert max_err(dual, g[[0, 1, 5, 6, 7, 8, 9]], 0.3, 10.0) <= DUAL_TOL[dtype]
    with pytest.raises(IndexError, match="block 0 is not one of the dual blocks"):
        dual.dense_block(0)


# ---- memory, copies, state ----------------------------------------------------------------------

def test_choose_representation_rule():
    f32, f64 = torch.float32, torch.float64
    # R s e + 8 R^2 < s^2 e; ties and s <= R go dense.
    assert choose_representation([10, 100, 1000], 50, f32) == [False, False, True]
    # s = 150, R = 50, float32: 50*150*4 + 8*2500 = 50000 < 90000
    assert choose_representation([150], 50, f32) == [True]
    # s = 2R, float32: 8 R^2 + 8 R^2 = 16 R^2 = s^2 e: a tie, dense
    assert choose_representation([100], 50, f32) == [False]
    assert choose_representation([101], 50, f32) == [True]
    assert choose_representation([5], 0, f64) == [True]  # no rows: nothing to store
    # The paper's ResNet20 blocks: B = 70000, R = 4500 rows.
    assert choose_representation([70000], 4500, f32) == [True]
    assert dual_nbytes(70000, 4500, f32) == 4500 * 70000 * 4 + 4500**2 * 8
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        choose_representation([3], 1, torch.int64)
    with pytest.raises(ValueError, match="rows must be a non-negative integer"):
        choose_representation([3], -1, f32)


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_to_state_and_memory(dtype, device, tmp_path):
    g = grads_of(20, 70, dtype, device)
    layout = BlockLayout.fixed(70, 30)
    dual = build_dual_blocks(iter(g.split(7)), damping=0.1, layout=layout, capacity=32)
    assert dual.nbytes == 32 * 70 * dual.g.element_size() + 3 * 32 * 32 * 8
    dual.compact()
    assert dual.capacity == 20
    assert dual.nbytes == sum(dual_nbytes(s, 20, dtype) for s in layout.sizes)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    moved = dual.to(dtype=other)
    assert moved.dtype == other and moved.g.data_ptr() != dual.g.data_ptr()
    # Rounding the rows to float32 (6e-8 relative) moves the blocks by about cond(K) times that
    # (cond(K) < 10 here); float32 to float64 is exact, leaving the float32 result's rounding.
    same_blocks(moved, dual, 1e-6)
    cpu = dual.to("cpu")
    same_blocks(cpu, dual, 0.0)
    tensors, meta = dual.to_state()
    from safetensors.torch import load_file, save_file
    save_file({k: t.cpu() for k, t in tensors.items()}, str(tmp_path / "d.safetensors"))
    import json
    back = DualBlocks.from_state(load_file(str(tmp_path / "d.safetensors")),
                                 json.loads(json.dumps(meta)))
    assert back.block_ids == dual.block_ids and back.layout == layout
    assert back.damping == 0.1 and back.normalizer == 20.0 and back.num_rows == 20
    same_blocks(back, cpu, 0.0)
    back.downdate(g[3:4].cpu())  # a loaded state keeps working
    with pytest.raises(ValueError, match="not a valid dual-blocks state"):
        DualBlocks.from_state(tensors, {"damping": 1.0})
    with pytest.raises(ValueError, match="g must have capacity"):
        DualBlocks.from_state({"g": tensors["g"][1:], "l": tensors["l"]}, meta)
    assert "DualBlocks(dim=70" in repr(dual)


# ---- the ops and bad inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_opcheck_dual_ops(dtype, device):
    dual = build_dual_blocks(grads_of(6, 20, dtype, device), damping=0.5, block_size=7)
    host = dual.table()
    dev = host.to(device)
    c = dual.capacity
    rows = grads_of(2, 20, dtype, device)
    g = torch.zeros(8 * 20, dtype=dtype, device=device)
    l = torch.zeros(3 * 64, dtype=torch.float64, device=device)
    big = torch.tensor([[0, 7, 0, 0], [7, 7, 56, 64], [14, 6, 112, 128]], dtype=torch.int64)
    torch.library.opcheck(_ops.dual_gram_, (rows, big, big.to(device), 0, g, l, 8))
    torch.library.opcheck(_ops.dual_cholesky_, (l, big, big.to(device), 0, 2, 8, 1.0, False))
    v = torch.randn(20, 2, dtype=dtype, device=device)
    torch.library.opcheck(_ops.dual_apply_, (dual.g, dual.l, host, dev, 6, c, 0.5, v, None, 1.0,
                                             torch.zeros_like(v)))
    torch.library.opcheck(_ops.dual_apply_, (dual.g, dual.l, host, dev, 6, c, 0.5, v, v.clone(),
                                             -2.0, torch.zeros_like(v)))
    keep = torch.tensor([[0, 2, 3, 4, 5]] * 3, device=device)
    removed = torch.tensor([[1]] * 3, device=device)
    torch.library.opcheck(_ops.dual_remove_rows_, (dual.g.clone(), dual.l.clone(), host, dev, 6,
                                                   c, keep, removed, 1))


def test_apply_under_torch_compile():
    dual = build_dual_blocks(grads_of(5, 12, torch.float64, "cpu"), damping=0.5, block_size=6)
    v = torch.randn(12, dtype=torch.float64)
    compiled = torch.compile(lambda x: dual.apply(v, base=x, scale=0.5), backend="eager")
    assert rel_err(compiled(v), dual.apply(v, base=v, scale=0.5)) <= 1e-15


def test_kernel_reports_the_potrf_row():
    # A kernel strip whose second row is not positive definite: info is LAPACK's 1-based row.
    table = torch.tensor([[0, 3, 0, 0], [3, 3, 9, 4]], dtype=torch.int64)
    l = torch.zeros(8, dtype=torch.float64)
    l[0], l[2], l[3] = 1.0, 1.0, -5.0  # block 0: K = diag(1, -5) + shift 1 -> fails at row 2
    l[4 + 0], l[4 + 3] = 1.0, 1.0
    info = _ops.dual_cholesky_(l, table, table, 0, 2, 2, 1.0, False)
    assert info.tolist() == [2, 0]


def test_bad_inputs():
    g = torch.randn(4, 10)
    with pytest.raises(TypeError, match="grads must be float32 or float64, got torch.int64"):
        build_dual_blocks(torch.ones(3, 4, dtype=torch.int64), damping=1.0)
    with pytest.raises(ValueError, match="damping must be a finite number > 0, got nan"):
        build_dual_blocks(g, damping=float("nan"))
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        build_dual_blocks(g, damping=1.0, normalizer=0)
    with pytest.raises(ValueError, match=r"grads\[1\] must have d=10"):
        build_dual_blocks([g, torch.randn(2, 9)], damping=1.0)
    with pytest.raises(ValueError, match="grads contains NaN or Inf"):
        build_dual_blocks(torch.full((2, 3), float("inf")), damping=1.0)
    with pytest.raises(ValueError, match="grads is empty"):
        build_dual_blocks([], damping=1.0)
    with pytest.raises(ValueError, match="layout.dim=5 does not match"):
        build_dual_blocks(g, damping=1.0, layout=BlockLayout.fixed(5, 2))
    with pytest.raises(ValueError, match=r"blocks must hold block indices in \[0, 2\)"):
        build_dual_blocks(g, damping=1.0, block_size=5, blocks=[2])
    with pytest.raises(ValueError, match="one entry per block"):
        build_dual_blocks(g, damping=1.0, block_size=5, blocks=[True])
    dual = build_dual_blocks(g, damping=1.0, block_size=5)
    with pytest.raises(ValueError, match=r"v must have shape \(10,\)"):
        dual @ torch.ones(9)
    with pytest.raises(TypeError, match="v must be torch.float32"):
        dual @ torch.ones(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="v contains NaN"):
        dual @ torch.full((10,), float("nan"))
    with pytest.raises(ValueError, match="base and v must have the same shape"):
        dual.apply(torch.ones(10), base=torch.ones(10, 2))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        dual.apply(torch.ones(10), scale=float("inf"))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        dual.apply(torch.ones(10), out=torch.ones(10, 1))
    with pytest.raises(TypeError, match="grads must be torch.float32 like the dual blocks"):
        dual.update(torch.ones(2, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="rtol must be a number in"):
        dual.downdate(g[:1], rtol=2.0)
    # The kernels' own checks name the value.
    host = dual.table()
    with pytest.raises(ValueError, match="ldl must be >= rows = 4, got 3"):
        ssse_ext._C.dual_apply(0, dual.g.data_ptr(), dual.l.data_ptr(), host.data_ptr(), 2, 4,
                               3, 1.0, 0, 10, 1, 0, 1.0, 0, 1)
    with pytest.raises(ValueError, match="damping must be a finite number > 0, got -1"):
        ssse_ext._C.dual_apply(0, 0, 0, host.data_ptr(), 2, 4, 4, -1.0, 0, 10, 1, 0, 1.0, 0, 1)
    with pytest.raises(ValueError, match=r"r1 must be in \[r0, ldl\] = \[2, 4\], got 5"):
        ssse_ext._C.dual_cholesky(0, host.data_ptr(), 2, 2, 5, 4, 1.0, False, 0, 1)
    with pytest.raises(ValueError, match="k must be in"):
        ssse_ext._C.dual_remove_rows(0, 0, 0, host.data_ptr(), 2, 4, 4, 0, 0, 5, 0, 0, 1)
    assert not isinstance(NotPositiveDefiniteError("x"), RowNotFoundError)


# ---- the benchmark ------------------------------------------------------------------------------

def test_benchmark_checks_then_times(capsys):
    bench = load_benchmark("bench_dual")
    row = bench.run_case(12, 2, 40, torch.float64, torch.device("cpu"), repeats=1, damping=1e-3,
                         seed=0)
    assert row["factor_rel_err"] < 1e-12 and row["apply_rel_err"] < 1e-12
    assert row["build_s"] > 0 and row["apply_vs_copy"] > 0 and row["dual_chosen"]
    paper = bench.paper_scale()
    assert paper["dense_full_blocks_bytes"] > 78e9 and paper["dual_bytes"] < 6e9
    assert all(paper["dual_chosen"])
    assert bench.main(["--cases", "8:2:20", "--dtype", "float32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 2x20, R=8 | float32 |" in out and "refused" not in out
