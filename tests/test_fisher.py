"""The block inverse Fisher against the float64 closed form and the reference recurrence."""

import itertools

import pytest
import torch

import ssse_ext
from ssse_ext import BlockLayout, NotPositiveDefiniteError, build_inverse_fisher, reference

from .testing import CHAIN, CONTRACT, DEVICES, DTYPES, SOLVE, STABLE, rel_err

PRODUCT = list(itertools.product(DTYPES, DEVICES))


def grads_of(n, d, dtype, device, scale=1.0, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return (scale * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype).to(device)


def closed_form(g, layout, damping, normalizer=None):
    return reference.block_closed_form(g.double().cpu(), layout, damping, normalizer)


def max_block_err(inv, ref):
    return max((rel_err(a, b) for a, b in zip(inv.blocks, ref)), default=0.0)


# Accumulation is float64 and the result is rounded once: STABLE.
@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("n,d,B", [(1, 7, 3), (5, 13, 13), (40, 37, 10), (300, 130, 64),
                                   (700, 301, 97)])
def test_build_auto_matches_closed_form(dtype, device, n, d, B):
    g = grads_of(n, d, dtype, device)
    layout = BlockLayout.fixed(d, B)
    inv = build_inverse_fisher(g, damping=0.05, block_size=B, representation="dense")
    assert inv.dtype == dtype and inv.device == device and inv.num_samples == n
    assert inv.layout == layout and inv.normalizer == n
    assert max_block_err(inv, closed_form(g, layout, 0.05)) < STABLE[dtype]


# The recurrences accumulate rounding over n steps: CHAIN (measured 3e-7 in float32 for the
# rank-1 form at n=150, B=16).
@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("method", ["sherman_morrison", "woodbury"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_build_recurrences_match_closed_form(dtype, device, method, chunk):
    n, d, B = 150, 45, 16
    g = grads_of(n, d, dtype, device)
    inv = build_inverse_fisher(g, damping=0.1, block_size=B, method=method, chunk_size=chunk)
    ref = closed_form(g, inv.layout, 0.1)
    assert max_block_err(inv, ref) < CHAIN[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_literal_recurrence_equals_reference_loop(dtype):
    g = grads_of(60, 9, dtype, "cpu")
    inv = build_inverse_fisher(g, damping=0.3, block_size=9, method="sherman_morrison")
    ref = reference.sherman_morrison_inverse(g.double(), 0.3)
    assert rel_err(inv.dense(), ref) < CHAIN[dtype]


def test_ill_conditioned_recurrence_regime():
    # lambda = 1e-4 (the paper's value) and gradients of scale 3: the literal float32 recurrence
    # passes through inverses with condition numbers ~1e9 and loses all accuracy, while the final
    # matrix is well conditioned (condition number 12); the default build rounds a float64
    # result once, whatever the intermediate inverses.
    n, B = 1200, 128
    g = grads_of(n, B, torch.float32, "cpu", scale=3.0, seed=1)
    ref = closed_form(g, BlockLayout.fixed(B, B), 1e-4)
    auto = build_inverse_fisher(g, damping=1e-4)
    assert max_block_err(auto, ref) < STABLE[torch.float32]
    literal = build_inverse_fisher(g, damping=1e-4, method="sherman_morrison")
    assert max_block_err(literal, ref) > 1e-3  # the regime really is hard for eq. 7


@pytest.mark.parametrize("device", DEVICES)
def test_auto_meets_contract_at_condition_1e3(device):
    # Final condition number ~1e3 by construction: the documented float32 contract.
    n, B = 2000, 96
    gen = torch.Generator().manual_seed(7)
    scales = torch.logspace(0, -1.5, B, dtype=torch.float64)  # eigenvalues span 1e3
    g = (torch.randn(n, B, generator=gen, dtype=torch.float64) * scales * 5.0)
    fisher = 1e-6 * torch.eye(B, dtype=torch.float64) + g.T @ g / n
    cond = torch.linalg.cond(fisher).item()
    assert 3e2 < cond < 3e3
    inv = build_inverse_fisher(g.float().to(device), damping=1e-6)
    assert rel_err(inv.dense_block(0), torch.linalg.inv(fisher)) < CONTRACT[torch.float32]


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_streamed_iterable_equals_tensor(dtype, device):
    g = grads_of(123, 50, dtype, device)
    whole = build_inverse_fisher(g, damping=0.2, block_size=17)
    stream = build_inverse_fisher((c for c in g.split(10)), damping=0.2, block_size=17)
    assert stream.num_samples == 123 and stream.normalizer == 123
    assert max_block_err(stream, [b.double() for b in whole.blocks]) < STABLE[dtype]
    rec = build_inverse_fisher(iter(g.split(7)), damping=0.2, block_size=17, normalizer=123,
                               method="woodbury", chunk_size=5)
    assert max_block_err(rec, [b.double() for b in whole.blocks]) < CHAIN[dtype]


def test_iterable_recurrence_needs_normalizer():
    g = grads_of(10, 5, torch.float64, "cpu")
    with pytest.raises(ValueError, match="normalizer must be given"):
        build_inverse_fisher(iter([g]), damping=1.0, method="sherman_morrison")


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_explicit_normalizer_and_layout(dtype, device):
    g = grads_of(30, 12, dtype, device)
    layout = BlockLayout.from_boundaries([0, 5, 6, 12])
    inv = build_inverse_fisher(g, damping=0.5, layout=layout, normalizer=7.5)
    assert max_block_err(inv, closed_form(g, layout, 0.5, 7.5)) < STABLE[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("method", ["woodbury", "sherman_morrison"])
def test_update_then_downdate_returns_earlier_inverse(dtype, device, method):
    g = grads_of(200, 40, dtype, device)
    extra = grads_of(13, 40, dtype, device)
    inv = build_inverse_fisher(g, damping=0.1, block_size=15)
    before = [b.clone() for b in inv.blocks]
    inv.update(extra, method=method, chunk_size=4)
    assert inv.num_samples == 213
    inv.downdate(extra, method=method, chunk_size=5)
    assert inv.num_samples == 200
    assert max(rel_err(a, b) for a, b in zip(inv.blocks, before)) < CHAIN[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_downdate_gives_leave_k_out_fisher(dtype, device):
    g = grads_of(160, 33, dtype, device)
    inv = build_inverse_fisher(g, damping=0.05, block_size=11)
    inv.downdate(g[:30])
    ref = closed_form(g[30:], inv.layout, 0.05, normalizer=160)  # N stays fixed
    assert max_block_err(inv, ref) < CHAIN[dtype]
    upd = build_inverse_fisher(g[30:], damping=0.05, block_size=11, normalizer=160)
    upd.update(g[:30], method="sherman_morrison")
    assert max_block_err(upd, closed_form(g, inv.layout, 0.05)) < CHAIN[dtype]


@pytest.mark.parametrize("method", ["woodbury", "sherman_morrison"])
def test_downdate_of_rows_never_added_raises_and_leaves_inverse(method):
    g = grads_of(20, 6, torch.float64, "cpu")
    inv = build_inverse_fisher(g, damping=1e-3, block_size=3)
    before = inv.packed.clone()
    stranger = 100.0 * grads_of(3, 6, torch.float64, "cpu")
    with pytest.raises(NotPositiveDefiniteError, match="block 0"):
        inv.downdate(torch.cat([g[:2], stranger]), method=method)
    assert torch.equal(inv.packed, before) and inv.num_samples == 20


@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("r", [None, 1, 3, 20])
def test_apply_matches_dense_product(dtype, device, r):
    d = 53
    g = grads_of(90, d, dtype, device)
    inv = build_inverse_fisher(g, damping=0.1, block_size=16)
    shape = (d,) if r is None else (d, r)
    v = torch.randn(shape, dtype=dtype, device=device)
    theta = torch.randn(shape, dtype=dtype, device=device)
    dense = inv.dense().double()
    assert rel_err(inv @ v, dense @ v.double()) < SOLVE[dtype]
    out = inv.apply_update(theta, v, scale=-0.7)
    assert out.shape == theta.shape
    assert rel_err(out, theta.double() - 0.7 * dense @ v.double()) < SOLVE[dtype]
    ref = reference.apply_inverse([b.double() for b in inv.blocks], inv.layout, v.double(),
                                  theta.double(), -0.7)
    assert rel_err(out, ref) < SOLVE[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_non_contiguous_inputs(dtype, device):
    g = grads_of(80, 60, dtype, device)
    gt = g.T.contiguous().T  # same values, column-major
    assert not gt.is_contiguous()
    a = build_inverse_fisher(gt, damping=0.1, block_size=25)
    b = build_inverse_fisher(g, damping=0.1, block_size=25)
    assert max_block_err(a, [x.double() for x in b.blocks]) < STABLE[dtype]
    v = torch.randn(2, 60, dtype=dtype, device=device).T
    assert not v.is_contiguous()
    assert rel_err(a @ v, b.dense().double() @ v.double()) < SOLVE[dtype]
    strided = torch.randn(120, 60, dtype=dtype, device=device)[::2]
    a.update(strided[:5]).downdate(strided[:5])
    assert max_block_err(a, [x.double() for x in b.blocks]) < CHAIN[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_empty_inputs(dtype, device):
    empty = torch.zeros(0, 9, dtype=dtype, device=device)
    inv = build_inverse_fisher(empty, damping=0.5, block_size=4,
                               representation="dense")  # F = lambda I
    assert inv.num_samples == 0
    assert rel_err(inv.dense(), torch.eye(9, dtype=torch.float64) / 0.5) < STABLE[dtype]
    before = inv.packed.clone()
    inv.update(empty).downdate(empty)
    assert torch.equal(inv.packed, before)
    assert (inv @ torch.zeros(9, 0, dtype=dtype, device=device)).shape == (9, 0)
    assert build_inverse_fisher(torch.zeros(5, 0, dtype=dtype), damping=1.0).dense().shape == (0, 0)


def test_to_and_dense_block():
    g = grads_of(40, 10, torch.float64, "cpu")
    inv = build_inverse_fisher(g, damping=0.1, block_size=4)
    f32 = inv.to(dtype=torch.float32)
    assert f32.dtype == torch.float32 and f32.packed.data_ptr() != inv.packed.data_ptr()
    assert rel_err(f32.dense(), inv.dense()) < STABLE[torch.float32]  # rounded once
    blk = inv.dense_block(2)
    assert blk.shape == (2, 2)
    blk.zero_()  # a copy: the inverse is unchanged
    assert inv.blocks[2].abs().sum() > 0
    with pytest.raises(IndexError):
        inv.dense_block(3)
    tensors, meta = inv.to_state()
    back = ssse_ext.BlockInverseFisher.from_state(tensors, meta)
    assert torch.equal(back.packed, inv.packed) and back.layout == inv.layout


# ---- bad inputs: every message names the argument ------------------------------------------

def test_bad_grads():
    with pytest.raises(TypeError, match="grads must be float32 or float64, got torch.int64"):
        build_inverse_fisher(torch.ones(3, 4, dtype=torch.int64), damping=1.0)
    with pytest.raises(ValueError, match=r"grads must be 2-D"):
        build_inverse_fisher(torch.ones(3), damping=1.0)
    bad = torch.ones(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="grads contains NaN or Inf"):
        build_inverse_fisher(bad, damping=1.0)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"grads\[1\] contains NaN or Inf"):
        build_inverse_fisher([torch.ones(2, 4), bad], damping=1.0)
    with pytest.raises(ValueError, match=r"grads\[1\] must have d=4"):
        build_inverse_fisher([torch.ones(2, 4), torch.ones(2, 5)], damping=1.0)
    with pytest.raises(TypeError, match=r"grads\[1\] must be torch.float32"):
        build_inverse_fisher([torch.ones(2, 4), torch.ones(2, 4, dtype=torch.float64)], damping=1.0)
    with pytest.raises(TypeError, match="grads must be a"):
        build_inverse_fisher(42, damping=1.0)
    with pytest.raises(ValueError, match="grads is empty"):
        build_inverse_fisher([], damping=1.0)


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_damping(damping):
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        build_inverse_fisher(torch.ones(3, 4), damping=damping)


def test_bad_options():
    g = torch.randn(5, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        build_inverse_fisher(g, damping=1.0, method="magic")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        build_inverse_fisher(g, damping=1.0, chunk_size=0)
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        build_inverse_fisher(g, damping=1.0, normalizer=-2)
    with pytest.raises(ValueError, match="layout.dim=5 does not match"):
        build_inverse_fisher(g, damping=1.0, layout=BlockLayout.fixed(5, 2))
    with pytest.raises(ValueError, match="block_size or layout, not both"):
        build_inverse_fisher(g, damping=1.0, layout=BlockLayout.fixed(4, 2), block_size=2)


def test_bad_vectors_and_updates():
    inv = build_inverse_fisher(torch.randn(20, 6), damping=0.1, block_size=4)
    with pytest.raises(ValueError, match=r"v must have shape \(6,\)"):
        inv @ torch.ones(5)
    with pytest.raises(TypeError, match="v must be torch.float32"):
        inv @ torch.ones(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="v contains NaN"):
        inv @ torch.full((6,), float("nan"))
    with pytest.raises(ValueError, match="theta and v must have the same shape"):
        inv.apply_update(torch.ones(6, 2), torch.ones(6), 1.0)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        inv.apply_update(torch.ones(6), torch.ones(6), float("nan"))
    with pytest.raises(ValueError, match="grads must have d=6"):
        inv.update(torch.ones(2, 5))
    with pytest.raises(TypeError, match="grads must be torch.float32"):
        inv.update(torch.ones(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="method must be one of"):
        inv.downdate(torch.ones(2, 6), method="cholesky")


def test_wrong_device():
    with pytest.raises(ValueError, match="grads must be on a CPU or CUDA device, got meta"):
        build_inverse_fisher(torch.ones(3, 4, device="meta"), damping=1.0)
    inv = build_inverse_fisher(torch.randn(20, 6), damping=0.1, block_size=4)
    with pytest.raises(ValueError, match="v must be on cpu like the inverse Fisher, got meta"):
        inv @ torch.ones(6, device="meta")
    with pytest.raises(ValueError, match="theta must be on cpu"):
        inv.apply_update(torch.ones(6, device="meta"), torch.ones(6), 1.0)
    with pytest.raises(ValueError, match=r"grads must be on a CPU or CUDA device"):
        inv.update(torch.ones(2, 6, device="meta"))


def test_the_curvature_is_an_opaque_label():
    layout = BlockLayout.fixed(4, 2)
    assert ssse_ext.FisherConfig(0.1, 1.0, layout, "kfac-rows").curvature == "kfac-rows"
    inv = build_inverse_fisher(torch.randn(5, 4), damping=0.1, curvature="my-rows")
    assert inv.curvature == "my-rows"
    assert ssse_ext.BlockInverseFisher.from_state(*inv.to_state()).curvature == "my-rows"
    with pytest.raises(ValueError, match="curvature must be a non-empty string"):
        ssse_ext.FisherConfig(0.1, 1.0, layout, "")
    with pytest.raises(TypeError, match="curvature must be a string"):
        build_inverse_fisher(torch.randn(5, 4), damping=0.1, curvature=3)
    with pytest.warns(DeprecationWarning, match="ssse.curvature"):
        assert "ggn" in ssse_ext.fisher.CURVATURES
