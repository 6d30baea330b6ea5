"""The CPU kernels against float64 references on fresh random inputs: the Gram accumulation,
the Cholesky-based inverse (with its failure codes), the Sherman-Morrison / Woodbury updates
and downdates, the apply and the dual blocks, in both dtypes, at sizes around every blocking
boundary of the kernels (register tiles of 4, 8, 12 and 24, the 48-wide leaves of the recursive
factorisations, the 64-row Woodbury steps, the 256-deep cache slabs), with empty and
non-contiguous inputs, on one and several threads, and under every instruction set the CPU
supports (SSSE_CPU_ISA, in subprocesses)."""

from __future__ import annotations

import pytest
import torch

import ssse_ext
from ssse_ext import BlockLayout, _C, _ops, reference

from .testing import CHAIN, SOLVE, STABLE, rel_err, worst_under_isa

DTYPES = [torch.float32, torch.float64]
CODE = {torch.float32: 0, torch.float64: 1}
U64 = torch.finfo(torch.float64).eps / 2

# Block sizes on both sides of the kernels' boundaries (tiles 4/8/12/24, leaves of 48, slabs of
# 256) and the row counts of the Gram tests (slabs of 256 rows).
SIZES = [1, 5, 23, 25, 47, 49, 97, 130, 257, 300]
ROWS = [1, 3, 255, 257, 600]


def gram_tolerance(x: torch.Tensor) -> float:
    """A bound on the relative Frobenius error of a float64 Gram matrix X^T X of ``x``
    (m rows): float32 products are exact in float64 and every sum of m terms carries at most
    m*u of the sum of its absolute values, so |error| <= m*u*|X|^T|X| entrywise; twice that
    for the reference's own rounding."""
    x = x.double()
    m = max(x.shape[0], 1)
    return 2 * m * U64 * ((x.abs().T @ x.abs()).norm() / (x.T @ x).norm()).item() + 1e-300


def lower_blocks(gram: torch.Tensor, layout: BlockLayout) -> list[torch.Tensor]:
    return [torch.tril(gram[o:o + s * s].view(s, s)) for o, s in zip(layout.offsets, layout.sizes)]


def run_gram(g: torch.Tensor, layout: BlockLayout, threads: int,
             gram: torch.Tensor | None = None) -> torch.Tensor:
    host = layout.table()
    if gram is None:
        gram = torch.zeros(layout.numel, dtype=torch.float64)
    _C.gram_accumulate(CODE[g.dtype], g.data_ptr(), g.shape[0], g.shape[1], host.data_ptr(),
                       host.shape[0], gram.data_ptr(), threads)
    return gram


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gram_accumulate(dtype, m, threads):
    torch.manual_seed(m * 10 + threads)
    sizes = [1, 24, 25, 49, 300, 8, 513]  # one block wide enough to be split across threads
    layout = BlockLayout.from_boundaries([0, *torch.tensor(sizes).cumsum(0).tolist()])
    g = torch.randn(m, layout.dim, dtype=torch.float64).to(dtype)
    gram = run_gram(g, layout, threads)
    for b, got in enumerate(lower_blocks(gram, layout)):
        x = g[:, layout.slice(b)]
        expect = torch.tril(x.double().T @ x.double())
        assert rel_err(got, expect) <= gram_tolerance(x), (b, layout.sizes[b])
    # the upper triangles are never written
    for o, s in zip(layout.offsets, layout.sizes):
        assert not torch.triu(gram[o:o + s * s].view(s, s), 1).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_accumulates_and_ignores_empty_chunks(dtype):
    torch.manual_seed(1)
    layout = BlockLayout.fixed(130, 61)
    g = torch.randn(70, 130, dtype=torch.float64).to(dtype)
    gram = run_gram(g[:30].contiguous(), layout, 2)
    gram = run_gram(g[:0].contiguous(), layout, 2, gram)
    gram = run_gram(g[30:].contiguous(), layout, 2, gram)
    for b, got in enumerate(lower_blocks(gram, layout)):
        x = g[:, layout.slice(b)]
        assert rel_err(got, torch.tril(x.double().T @ x.double())) <= gram_tolerance(x)


def spd_gram(s: int, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, s, generator=gen, dtype=torch.float64)
    return x.T @ x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_inverse_from_gram(dtype, threads):
    # damping 0.5 against unit-scale rows (2 s of them, normaliser 2 s): condition numbers <= 7,
    # so kappa * B * u <= 2.3e-13 (STABLE) for every size.
    layout = BlockLayout.from_boundaries([0, *torch.tensor(SIZES + [48, 513]).cumsum(0).tolist()])
    blocks = [spd_gram(s, 2 * s, s) / (2 * s) for s in layout.sizes]
    packed = torch.cat([torch.tril(b).reshape(-1) for b in blocks])
    host = layout.table()
    out = torch.empty(layout.numel, dtype=dtype)
    info = torch.zeros(layout.num_blocks, dtype=torch.int64)
    work = packed.clone()
    _C.inverse_from_gram(CODE[dtype], work.data_ptr(), host.data_ptr(), host.shape[0], 0.5,
                         1.0, out.data_ptr(), info.data_ptr(), threads)
    assert not info.any()
    for b, (o, s) in enumerate(zip(layout.offsets, layout.sizes)):
        expect = torch.linalg.inv(0.5 * torch.eye(s, dtype=torch.float64) + blocks[b])
        got = out[o:o + s * s].view(s, s)
        assert rel_err(got, expect) <= STABLE[dtype], s
        assert torch.equal(got, got.T)  # written in full, exactly symmetric


@pytest.mark.parametrize("s,p", [(5, 3), (47, 0), (49, 48), (300, 200), (300, 299)])
def test_inverse_from_gram_reports_the_failing_pivot(s, p):
    # the identity with a negative entry at pivot p: the leading minors of order <= p are
    # positive definite, that of order p + 1 is not (LAPACK's info = p + 1)
    bad = torch.eye(s, dtype=torch.float64)
    bad[p, p] = -1.0  # -0.75 once damped
    good = spd_gram(7, 14, 0)
    layout = BlockLayout.from_boundaries([0, s, s + 7])
    packed = torch.cat([bad.reshape(-1), torch.tril(good).reshape(-1)])
    host = layout.table()
    out = torch.zeros(layout.numel, dtype=torch.float64)
    info = torch.zeros(2, dtype=torch.int64)
    _C.inverse_from_gram(1, packed.data_ptr(), host.data_ptr(), 2, 0.25, 1.0, out.data_ptr(),
                         info.data_ptr(), 2)
    assert info.tolist() == [p + 1, 0]
    assert not out[:s * s].any()  # the failing block's output is left untouched
    expect = torch.linalg.inv(good + 0.25 * torch.eye(7, dtype=torch.float64))
    assert rel_err(out[s * s:].view(7, 7), expect) <= STABLE[torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", [5, 47, 49, 130, 257])
@pytest.mark.parametrize("m", [1, 63, 65, 130])
@pytest.mark.parametrize("chunked", [True, False])
def test_sherman_morrison_update_and_downdate(dtype, s, m, chunked):
    if not chunked and s * m > 130 * 65:
        pytest.skip("the per-row recurrence is checked on the smaller cases")
    torch.manual_seed(s + m)
    n0 = 2 * s
    d = 2 * s + 3  # two blocks of s and one of 3
    layout = BlockLayout.fixed(d, s)
    g = torch.randn(n0 + m, d, dtype=torch.float64)
    normalizer = float(n0 + m)
    base = ssse_ext.build_inverse_fisher(g[:n0].to(dtype), damping=0.5, layout=layout,
                                         normalizer=normalizer, representation="dense")
    packed = base.packed.clone()
    host = layout.table()
    rows = g[n0:].to(dtype).contiguous()
    info = _ops.call(_ops.sherman_morrison_, packed, host, host, rows, normalizer, 1, chunked)
    assert not info.any()
    g = g.to(dtype).double()  # the reference of the rows the kernels saw
    full = reference.block_closed_form(g, layout, 0.5, normalizer)
    for b, (o, sb) in enumerate(zip(layout.offsets, layout.sizes)):
        assert rel_err(packed[o:o + sb * sb].view(sb, sb), full[b]) <= CHAIN[dtype], b
    # and back: the downdate returns to the first rows' inverse
    info = _ops.call(_ops.sherman_morrison_, packed, host, host, rows, normalizer, -1, chunked)
    assert not info.any()
    first = reference.block_closed_form(g[:n0], layout, 0.5, normalizer)
    for b, (o, sb) in enumerate(zip(layout.offsets, layout.sizes)):
        assert rel_err(packed[o:o + sb * sb].view(sb, sb), first[b]) <= CHAIN[dtype], b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s,m", [(s, m) for s in (5, 47, 130, 257, 300) for m in (1, 3, 5, 30)]
                         # a write whose packed rows exceed the kernel's 8 MiB: tiled instead
                         + [(1100, 480)])
def test_woodbury_check_and_write(dtype, s, m):
    torch.manual_seed(7 * s + m)
    n0 = 2 * s
    layout = BlockLayout.from_boundaries([0, s, s + 5, 2 * s + 5])  # blocks of s, 5 and s
    d = layout.dim
    g = torch.randn(n0 + m, d, dtype=torch.float64)
    normalizer = float(n0 + m)
    full = ssse_ext.build_inverse_fisher(g.to(dtype), damping=0.5, layout=layout,
                                         representation="dense")
    packed = full.packed.clone()
    host = layout.table()
    rows = g[n0:].to(dtype)
    # the rows strided in a wider buffer, copied contiguous as the stores pass them
    wide = torch.zeros(m, d + 7, dtype=dtype)
    wide[:, 3:3 + d] = rows
    rows = wide[:, 3:3 + d].contiguous()
    wt, piv, info, _ = _ops.call(_ops.woodbury_check, packed, host, rows, normalizer, -1)
    assert torch.equal(packed, full.packed)  # the check writes nothing
    assert not info.any() and bool((piv > 0).all()) and piv.shape == (3, m)
    assert wt.shape == (m * d,)
    _ops.call(_ops.woodbury_write_, packed, host, wt, m, -1)
    gs = g.to(dtype).double()
    expect = reference.block_closed_form(gs[:n0], layout, 0.5, normalizer)
    for b, (o, sb) in enumerate(zip(layout.offsets, layout.sizes)):
        blk = packed[o:o + sb * sb].view(sb, sb)
        assert torch.equal(blk, blk.T), b  # bitwise symmetric
        assert rel_err(blk, expect[b]) <= CHAIN[dtype], b
    # adding the rows back returns to the full inverse
    wt, piv, info, _ = _ops.call(_ops.woodbury_check, packed, host, rows, normalizer, 1)
    assert not info.any()
    _ops.call(_ops.woodbury_write_, packed, host, wt, m, 1)
    ref = reference.block_closed_form(gs, layout, 0.5, normalizer)
    for b, (o, sb) in enumerate(zip(layout.offsets, layout.sizes)):
        assert rel_err(packed[o:o + sb * sb].view(sb, sb), ref[b]) <= CHAIN[dtype], b


def _dense_inverse(boundaries, dtype):
    """A dense inverse of the blocks between ``boundaries`` fitted (λ = 0.5) from 2 d Gaussian
    rows: its layout, the float64 rows, the inverse, its layout table and its normaliser."""
    layout = BlockLayout.from_boundaries(boundaries)
    g = torch.randn(2 * layout.dim, layout.dim, dtype=torch.float64)
    inv = ssse_ext.build_inverse_fisher(g.to(dtype), damping=0.5, layout=layout,
                                        representation="dense")
    return layout, g, inv, layout.table(), float(2 * layout.dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("changed", [False, True])
def test_woodbury_check_applies_the_blocks_in_the_same_pass(dtype, r, changed):
    """With vectors, the check also returns F_b^{-1} V_b (or the changed blocks' inverses times
    V_b) in float64, against the stored blocks in float64; its factors are the same bits."""
    torch.manual_seed(11 * r + changed)
    layout, g, inv, host, n = _dense_inverse([0, 47, 52, 99], dtype)  # blocks of 47, 5 and 47
    d = layout.dim
    rows = g[:3].to(dtype).contiguous()
    vecs = torch.randn(d, 2 * r, dtype=dtype)[:, ::2].contiguous()
    wt, piv, info, out = _ops.call(_ops.woodbury_check, inv.packed, host, rows, n, -1, vecs,
                                   changed)
    wt0, piv0, _, none = _ops.call(_ops.woodbury_check, inv.packed, host, rows, n, -1)
    assert not info.any() and torch.equal(wt, wt0) and torch.equal(piv, piv0)
    assert out.dtype == torch.float64 and out.shape == (d, r) and none.numel() == 0
    _, _, _, plain = _ops.call(_ops.woodbury_check, inv.packed, host, rows[:0], n, -1, vecs,
                               changed)
    r64 = rows.double()
    for b, (st, sb) in enumerate(zip(layout.starts, layout.sizes)):
        blk, vb = inv.blocks[b].double(), vecs[st:st + sb].double()
        assert rel_err(plain[st:st + sb], blk @ vb) <= SOLVE[torch.float64], b
        if changed:
            rb = r64[:, st:st + sb]
            blk = torch.linalg.inv(torch.linalg.inv(blk) - rb.T @ rb / n)
        assert rel_err(out[st:st + sb], blk @ vb) <= SOLVE[torch.float64], b


@pytest.mark.parametrize("dtype", DTYPES)
def test_woodbury_check_applies_the_rows_of_its_blocks_only(dtype):
    """A table of some blocks (a store's segment) gets F_b^{-1} V_b for the rows its blocks
    span, from the first block's start: the products of the whole table, sliced."""
    torch.manual_seed(5)
    layout, g, inv, host, n = _dense_inverse([0, 9, 30, 31, 64, 70], dtype)  # 9, 21, 1, 33, 6
    d = layout.dim
    rows = g[:2].to(dtype).contiguous()
    vecs = torch.randn(d, 2, dtype=dtype)
    _, _, _, whole = _ops.call(_ops.woodbury_check, inv.packed, host, rows, n, -1, vecs)
    assert _ops.check_rows(host) == (0, d) and whole.shape == (d, 2)
    for picked in ([1, 3], [2], [4], [1, 2, 3, 4]):
        part = host[picked].contiguous()
        lo, hi = _ops.check_rows(part)
        assert (lo, hi) == (layout.starts[picked[0]],
                            layout.starts[picked[-1]] + layout.sizes[picked[-1]])
        wt, _, info, out = _ops.call(_ops.woodbury_check, inv.packed, part, rows, n, -1, vecs)
        assert not info.any() and out.shape == (hi - lo, 2)
        expect = torch.zeros(hi - lo, 2, dtype=torch.float64)
        for b in picked:
            st, sb = layout.starts[b], layout.sizes[b]
            expect[st - lo:st - lo + sb] = whole[st:st + sb]
        assert torch.equal(out, expect), picked
    assert _ops.check_rows(host[:0]) == (0, 0)
    # the binding refuses an out whose first row is past a block's start
    part = host[[1, 3]].contiguous()
    wt = torch.empty(2 * int(part[:, 1].sum()), dtype=torch.float64)
    piv, info = torch.empty(2, 2, dtype=torch.float64), torch.empty(2, dtype=torch.int64)
    out = torch.zeros(d, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="out_start"):
        _C.woodbury_check(_ops._code(inv.packed), inv.packed.data_ptr(), part.data_ptr(), 2,
                          rows.data_ptr(), 2, d, n, -1, wt.data_ptr(), piv.data_ptr(),
                          info.data_ptr(), 1, vecs.data_ptr(), 2, False, out.data_ptr(),
                          layout.starts[1] + 1)


@pytest.mark.parametrize("m", [3, 70])  # the streamed product and the packed GEMM
def test_woodbury_check_takes_float32_rows_for_float64_blocks(m):
    """float32 rows against float64 blocks: the same bits as the rows converted first (every
    product is formed in float64); float64 rows against float32 blocks are refused."""
    torch.manual_seed(9 + m)
    layout, g, inv, host, n = _dense_inverse([0, 75, 80, 157], torch.float64)
    d = layout.dim
    rows = g[:m].float()
    vecs = torch.randn(d, 1, dtype=torch.float64)
    got = _ops.call(_ops.woodbury_check, inv.packed, host, rows, n, -1, vecs)
    expect = _ops.call(_ops.woodbury_check, inv.packed, host, rows.double(), n, -1, vecs)
    for a, b in zip(got, expect):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="float32 for float64 blocks"):
        _ops.call(_ops.woodbury_check, inv.packed.float(), host, rows.double(), n, -1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_woodbury_check_reports_failures_and_overflow(dtype):
    torch.manual_seed(3)
    layout = BlockLayout.fixed(12, 6)
    g = torch.randn(30, 12, dtype=torch.float64)
    inv = ssse_ext.build_inverse_fisher(g.to(dtype), damping=0.1, layout=layout)
    host = layout.table()
    # rows never added: removing them makes both blocks indefinite
    never = (10 * torch.randn(3, 12, dtype=torch.float64)).to(dtype)
    _, piv, info, _ = _ops.call(_ops.woodbury_check, inv.packed, host, never, 30.0, -1)
    assert bool((info > 0).all())
    # a row added once: its removal's pivot equals the float64 one of C / N
    row = g[:1].to(dtype)
    _, piv, info, _ = _ops.call(_ops.woodbury_check, inv.packed, host, row, 30.0, -1)
    assert not info.any()
    for b in range(2):
        f = inv.dense_block(b).double()
        r = row[:, 6 * b:6 * b + 6].double()
        c = 30.0 - (r @ f @ r.T)
        assert abs(float(piv[b, 0]) - float(c) / 30.0) <= 1e-6 * abs(float(c) / 30.0)
    huge = torch.full((1, 12), 1e200, dtype=torch.float64)
    if dtype == torch.float64:
        _, _, info, _ = _ops.call(_ops.woodbury_check, inv.packed, host, huge, 30.0, -1)
        assert bool((info == -1).all())
    # no rows: nothing to check, nothing written
    wt, piv, info, _ = _ops.call(_ops.woodbury_check, inv.packed, host, row[:0], 30.0, -1)
    assert wt.numel() == 0 and not info.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sherman_morrison_with_no_rows_changes_nothing(dtype):
    layout = BlockLayout.fixed(60, 49)
    g = torch.randn(100, 60, dtype=dtype)
    inv = ssse_ext.build_inverse_fisher(g, damping=0.5, layout=layout)
    packed = inv.packed.clone()
    host = layout.table()
    for chunked in (True, False):
        info = _ops.call(_ops.sherman_morrison_, packed, host, host, g[:0].contiguous(), 100.0,
                         1, chunked)
        assert not info.any()
        assert torch.equal(packed, inv.packed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 3, 30])
def test_apply(dtype, r):
    torch.manual_seed(r)
    layout = BlockLayout.from_boundaries([0, 1, 25, 74, 331, 361])
    g = torch.randn(700, layout.dim, dtype=torch.float64)
    inv = ssse_ext.build_inverse_fisher(g.to(dtype), damping=0.5, layout=layout)
    blocks = reference.block_closed_form(g, layout, 0.5)
    v = torch.randn(layout.dim, r, dtype=torch.float64)
    base = torch.randn(layout.dim, r, dtype=torch.float64)
    out = inv.apply_update(base.to(dtype), v.to(dtype), -0.75)
    expect = base - 0.75 * reference.apply_inverse(blocks, layout, v)
    assert rel_err(out, expect) <= SOLVE[dtype]
    assert rel_err(inv.matvec(v.to(dtype)), reference.apply_inverse(blocks, layout, v)) \
        <= SOLVE[dtype]


@pytest.mark.parametrize("r", [0, 1, 3, 9])
@pytest.mark.parametrize("threads", [1, 2])
def test_gram_product_reads_the_lower_triangles_only(r, threads):
    torch.manual_seed(r + 10 * threads)
    layout = BlockLayout.from_boundaries([0] + list(torch.tensor(SIZES).cumsum(0).tolist()))
    grams, dense = [], []
    for s in layout.sizes:
        a = torch.randn(s, s, dtype=torch.float64)
        full = a + a.T
        stored = torch.tril(full) + torch.triu(torch.full((s, s), float("nan"),
                                                           dtype=torch.float64), 1)
        grams.append(stored.reshape(-1))
        dense.append(full)
    gram = torch.cat(grams)
    x = torch.randn(layout.dim, r, dtype=torch.float64)
    out = torch.randn(layout.dim, r, dtype=torch.float64)
    expect = out + torch.block_diag(*dense) @ x
    magnitude = torch.block_diag(*dense).abs() @ x.abs()
    table = layout.table()
    _C.gram_product(gram.data_ptr(), table.data_ptr(), layout.num_blocks, x.data_ptr(), r,
                    out.data_ptr(), threads)
    # each entry is a float64 sum of at most max(SIZES) + 1 products
    bound = 2 * (max(SIZES) + 1) * U64 * magnitude
    assert torch.all((out - expect).abs() <= bound + 1e-300)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, r", [(0, 3), (1, 1), (5, 3), (70, 2), (4, 0)])
def test_rows_product(dtype, m, r):
    torch.manual_seed(m + 7 * r)
    layout = BlockLayout.from_boundaries([0] + list(torch.tensor(SIZES).cumsum(0).tolist()))
    rows = torch.randn(m, layout.dim, dtype=torch.float64).to(dtype)
    x = torch.randn(layout.dim, r, dtype=torch.float64)
    sketch = torch.randn(layout.dim, r, dtype=torch.float64)
    # blocks 1, 3 and the last only: the others' rows of the sketch stay as they are
    ids = [1, 3, layout.num_blocks - 1]
    expect, bound = sketch.clone(), torch.zeros_like(sketch)
    for b in ids:
        sl = layout.slice(b)
        rb = rows[:, sl].double()
        expect[sl] -= 0.5 * rb.T @ (rb @ x[sl])
        # float64 sums of s_b, then m products (float32 rows are exact in float64): each
        # entry is off by at most (s_b + m + 1) u of the sum of the absolute products
        bound[sl] = 2 * (layout.sizes[b] + m + 1) * U64 * 0.5 * rb.abs().T @ (rb.abs() @
                                                                             x[sl].abs())
    _ops.call(_ops.rows_product_, rows, layout.table(blocks=ids), x, -0.5, sketch)
    assert torch.all((sketch - expect).abs() <= bound + 4 * U64 * expect.abs() + 1e-300)


@pytest.mark.parametrize("dtype", DTYPES)
def test_build_of_non_contiguous_rows(dtype):
    torch.manual_seed(5)
    layout = BlockLayout.fixed(130, 49)
    wide = torch.randn(300, 260, dtype=torch.float64)
    g = wide[:, ::2]  # every other column: a row stride of 260, a column stride of 2
    assert not g.is_contiguous()
    inv = ssse_ext.build_inverse_fisher(g.to(dtype)[:, :], damping=0.5, layout=layout)
    g_t = torch.randn(130, 300, dtype=torch.float64).T  # a transposed view
    inv_t = ssse_ext.build_inverse_fisher(g_t.to(dtype), damping=0.5, layout=layout)
    for rows, built in ((g, inv), (g_t, inv_t)):
        ref = reference.block_closed_form(rows.to(dtype).double(), layout, 0.5)
        for b in range(layout.num_blocks):
            assert rel_err(built.blocks[b], ref[b]) <= STABLE[dtype]
    # the update and the apply read strided rows and vectors too
    inv.update(g_t[:70].to(dtype))
    ref = reference.block_closed_form(torch.cat([g, g_t[:70]]).to(dtype).double(), layout, 0.5,
                                      normalizer=300.0)
    for b in range(layout.num_blocks):
        assert rel_err(inv.blocks[b], ref[b]) <= CHAIN[dtype]
    v = torch.randn(130, 2, dtype=torch.float64).to(dtype)[:, 0]  # a column: stride 2
    assert not v.is_contiguous()
    expect = reference.apply_inverse(ref, layout, v.double())
    assert rel_err(inv.matvec(v), expect) <= SOLVE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [30, 49, 97, 300])
def test_dual_blocks(dtype, n):
    # the dual factor's Gram rows, Cholesky extension (recursive past 48 rows) and solves
    torch.manual_seed(n)
    layout = BlockLayout.fixed(2 * 301 + 7, 301)
    g = torch.randn(n, layout.dim, dtype=torch.float64)
    dual = ssse_ext.build_inverse_fisher(g[: n // 2 + 1].to(dtype), damping=0.5, layout=layout,
                                         normalizer=float(n), representation="dual")
    dual.update(g[n // 2 + 1:].to(dtype))
    ref = reference.block_closed_form(g.to(dtype).double(), layout, 0.5, normalizer=float(n))
    v = torch.randn(layout.dim, 3, dtype=torch.float64)
    expect = reference.apply_inverse(ref, layout, v)
    assert rel_err(dual.matvec(v.to(dtype)), expect) <= SOLVE[dtype]


ISA_SCRIPT = r"""
import sys
import torch, ssse_ext
from ssse_ext import BlockLayout, _C, reference
tol = {torch.float32: (float(sys.argv[1]), float(sys.argv[2])),
       torch.float64: (float(sys.argv[3]), float(sys.argv[4]))}
worst = 0.0
for dtype in (torch.float32, torch.float64):
    stable, chain = tol[dtype]
    for s, n in [(23, 60), (25, 49), (49, 300), (97, 257), (300, 600)]:
        torch.manual_seed(s)
        g = torch.randn(n, 2 * s + 5, dtype=torch.float64)
        layout = BlockLayout.fixed(2 * s + 5, s)
        # the Gram panels, split across threads
        gram = torch.zeros(layout.numel, dtype=torch.float64)
        host = layout.table()
        x = g.to(dtype)
        _C.gram_accumulate(0 if dtype == torch.float32 else 1, x.data_ptr(), n, x.shape[1],
                           host.data_ptr(), host.shape[0], gram.data_ptr(), 3)
        for b, (o, sb) in enumerate(zip(layout.offsets, layout.sizes)):
            xb = x[:, layout.slice(b)].double()
            e = torch.tril(xb.T @ xb)
            got = torch.tril(gram[o:o + sb * sb].view(sb, sb))
            bound = 2 * n * 1.2e-16 * ((xb.abs().T @ xb.abs()).norm() / e.norm()).item()
            worst = max(worst, ((got - e).norm() / e.norm()).item() / bound)
        inv = ssse_ext.build_inverse_fisher(x, damping=0.5, layout=layout)
        ref = reference.block_closed_form(x.double(), layout, 0.5)
        for a, r in zip(inv.blocks, ref):
            worst = max(worst, ((a.double() - r).norm() / r.norm()).item() / stable)
        extra = torch.randn(70, g.shape[1], dtype=torch.float64).to(dtype)
        inv.update(extra)
        ref = reference.block_closed_form(torch.cat([x, extra]).double(), layout, 0.5,
                                          normalizer=float(n))
        for a, r in zip(inv.blocks, ref):
            worst = max(worst, ((a.double() - r).norm() / r.norm()).item() / chain)
print(ssse_ext.build_info()["cpu_isa"], worst)
"""


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_instruction_set(isa):
    tols = [STABLE[torch.float32], CHAIN[torch.float32], STABLE[torch.float64],
            CHAIN[torch.float64]]
    assert worst_under_isa(ISA_SCRIPT, isa, tols, timeout=600) < 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_update_by_many_rows_needs_no_check_and_is_exact(dtype, monkeypatch):
    torch.manual_seed(11)
    layout = BlockLayout.from_boundaries([0, 8, 15, 24])  # blocks of 8, 7 and 9
    g = torch.randn(60, layout.dim, dtype=torch.float64)
    base = ssse_ext.build_inverse_fisher(g[:30].to(dtype), damping=0.3, layout=layout,
                                         normalizer=60.0, representation="dense")
    store = base.stores[0]
    # 30 rows on blocks of 7 to 9: past the factors a check would keep for the write, and
    # nothing to check (F + R^T R / N stays positive definite, no product can overflow)
    assert not store._writes_factors(30)

    def no_check(*args, **kwargs):
        raise AssertionError("the update was checked")

    monkeypatch.setattr(type(store), "woodbury", no_check)
    base.update(g[30:].to(dtype))
    ref = reference.block_closed_form(g.to(dtype).double(), layout, 0.3, 60.0)
    for b in range(layout.num_blocks):
        assert rel_err(base.dense_block(b), ref[b]) <= CHAIN[dtype], b
    monkeypatch.undo()
    # rows whose products could overflow float64 are checked first, and refused whole
    huge = torch.full((2, layout.dim), 1e160, dtype=torch.float64)
    if dtype == torch.float64:
        before = base.packed.clone()
        with pytest.raises(FloatingPointError, match="overflow"):
            base.update(huge)
        assert torch.equal(base.packed, before)
