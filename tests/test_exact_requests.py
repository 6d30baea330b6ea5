"""Requests that do not drift (DESIGN §2): the "gram" store keeps each block's float64 Gram, so
after any sequence of downdates its inverse equals a fresh fit on the remaining rows; the
dense store, on the same sequence, drifts (the control that lets the contract test fail)."""

import json
import warnings

import pytest
import torch

from ssse_ext import (BlockInverseFisher, BlockLayout, GramStore, NotPositiveDefiniteError,
                      build_inverse_fisher)
from ssse_ext.blocks import representation_for_requests

from .testing import rel_err

# Rank-deficient blocks: 64 unit-scale rows over blocks of 64 at a small damping, where a
# Woodbury downdate amplifies the rounding of a float32 inverse by the condition number.
LAYOUT = BlockLayout.fixed(256, 64)
ROWS, DAMPING, REQUESTS, REMOVED = 64, 1e-4, 20, 0.8
#: The contract: the stored inverse against a float64 fit on the remaining rows, per dtype.
EXACT = {torch.float32: 1e-5, torch.float64: 1e-10}
U64 = torch.finfo(torch.float64).eps / 2


def rows_of(n, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, LAYOUT.dim, generator=gen, dtype=torch.float64).to(dtype)


def requests(seed):
    """The rows removed by each of the REQUESTS requests (80 % of the rows in all)."""
    order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(seed))
    m = int(ROWS * REMOVED)
    return [order[t * m // REQUESTS:(t + 1) * m // REQUESTS] for t in range(REQUESTS)]


def drift(inv, g, keep, v):
    """Relative error of ``inv @ v`` against a float64 fit on the rows kept (same N)."""
    fresh = build_inverse_fisher(g[keep].double(), damping=DAMPING, layout=LAYOUT,
                                 normalizer=float(ROWS), probe_vectors=0)
    want = fresh @ v
    return rel_err((inv @ v.to(inv.dtype)).double(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_requests_match_a_fresh_fit_where_dense_drifts(dtype):
    g = rows_of(ROWS, 0, dtype)
    v = rows_of(8, 1, torch.float64).T.contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no condition or health warning anywhere
        exact = build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT, representation="gram")
        dense = build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT, representation="dense")
    assert exact.representation == ("gram",) * LAYOUT.num_blocks
    keep = torch.ones(ROWS, dtype=torch.bool)
    worst_dense, refused = 0.0, False
    for t, idx in enumerate(requests(2)):
        exact.downdate(g[idx])
        if not refused:
            try:
                dense.downdate(g[idx])
            except NotPositiveDefiniteError:  # its drift made a valid request look invalid
                refused = True
        keep[idx] = False
        if t % 5 == 4 or t == REQUESTS - 1:
            assert drift(exact, g, keep, v) <= EXACT[dtype], t
            if not refused:
                worst_dense = max(worst_dense, drift(dense, g, keep, v))
    assert exact.num_samples == int(keep.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert exact.health().ok
    # the control: the dense store on the same sequence is far outside the contract (in
    # float64 its drift is about 1e-8 whichever order its products round in)
    assert worst_dense > 50 * EXACT[dtype], (worst_dense, refused)
    if dtype == torch.float32:
        assert worst_dense > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_leave_k_out_products_and_updates_use_the_exact_gram(dtype):
    g = rows_of(ROWS, 3, dtype)
    inv = build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT, representation="gram")
    v = rows_of(3, 4, torch.float64).T.contiguous()
    gone = torch.arange(40)
    keep = torch.ones(ROWS, dtype=torch.bool)
    keep[gone] = False
    fresh = build_inverse_fisher(g[keep].double(), damping=DAMPING, layout=LAYOUT,
                                 normalizer=float(ROWS), probe_vectors=0)
    # solve_changed works from the Gram alone: float64 accuracy whatever the dtype
    assert rel_err(inv.solve_changed(g[gone], v), fresh @ v) <= 1e-10
    # without() corrects the stored product exactly: only its rounding remains
    assert rel_err(inv.without(g[gone]).solve(v.to(dtype)), fresh @ v) <= EXACT[dtype]
    theta = rows_of(1, 5, dtype)[0]
    step = inv.apply_update(theta, v[:, 0].to(dtype), 0.1, without=g[gone])
    assert rel_err(step, theta.double() + 0.1 * (fresh @ v[:, 0])) <= EXACT[dtype]
    inv.downdate(g[gone]).update(g[gone[:10]])
    keep[gone[:10]] = True
    assert drift(inv, g, keep, v) <= EXACT[dtype]
    store = inv.stores[0]
    for b in store.block_ids:  # the Gram is the exact sum of the rows held
        r = g[keep][:, LAYOUT.slice(b)].double()
        assert rel_err(store.gram_block(b), r.T @ r) <= 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_refused_request_leaves_the_store_bit_identical(dtype):
    g = rows_of(ROWS, 6, dtype)
    inv = build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT, representation="gram")
    inv.downdate(g[:5])
    before, meta = inv.to_state()
    before = {k: t.clone() for k, t in before.items()}
    stranger = g[5:7].clone()
    stranger[:, LAYOUT.slice(3)] = rows_of(2, 7, dtype)[:, LAYOUT.slice(3)]  # never added
    for rows in (stranger, g[:5]):  # rows never added, or removed already
        with pytest.raises(NotPositiveDefiniteError, match="(?i)nothing was changed"):
            inv.downdate(rows)
        with pytest.raises(NotPositiveDefiniteError):
            inv.without(rows)
        after, meta_after = inv.to_state()
        assert meta_after == meta and after.keys() == before.keys()
        assert all(torch.equal(after[k], t) for k, t in before.items())
    assert inv.num_samples == ROWS - 5
    inv.downdate(g[5:7])  # still usable
    keep = torch.ones(ROWS, dtype=torch.bool)
    keep[:7] = False
    assert drift(inv, g, keep, rows_of(2, 8, torch.float64).T) <= EXACT[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_files_copies_and_dtypes_round_trip(dtype, tmp_path):
    from safetensors.torch import load_file, save_file
    g = rows_of(ROWS, 9, dtype)
    inv = build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT, representation="gram")
    inv.downdate(g[:30])
    tensors, meta = inv.to_state()
    assert [s["name"] for s in meta["stores"]] == ["gram"]
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp_path / "inv.safetensors"))
    back = BlockInverseFisher.from_state(load_file(str(tmp_path / "inv.safetensors")),
                                         json.loads(json.dumps(meta)))
    assert back.representation == inv.representation and back.num_samples == ROWS - 30
    assert BlockInverseFisher.state_nbytes(meta) == back.nbytes + back.probe.sketch.numel() * 8
    assert torch.equal(back.dense(), inv.dense())
    assert all(torch.equal(a, b) for a, b in zip(back.stores[0].grams, inv.stores[0].grams))
    # the loaded copy serves requests exactly as the original does, and shares nothing
    twin = inv.clone()
    for x in (back, inv):
        x.downdate(g[30:40])
    assert torch.equal(back.dense(), inv.dense())
    assert not torch.equal(twin.dense(), inv.dense())
    keep = torch.ones(ROWS, dtype=torch.bool)
    keep[:40] = False
    # another dtype is inverted again from the Gram, not rounded from this one
    wide = inv.to(dtype=torch.float64)
    assert wide.representation == inv.representation and wide.dtype == torch.float64
    v = rows_of(4, 10, torch.float64).T.contiguous()
    assert drift(wide, g, keep, v) <= EXACT[torch.float64]
    assert drift(wide.to(dtype=torch.float32), g, keep, v) <= EXACT[torch.float32]
    assert wide.nbytes == wide.stores[0].copy_nbytes() == 16 * 4 * 64 * 64
    assert inv.nbytes == GramStore.nbytes_for(64, None, dtype) * LAYOUT.num_blocks


def test_requests_keep_the_dual_form_where_it_is_smaller():
    layout = BlockLayout((0, 32, 544), (32, 512, 16), 560)
    g = torch.randn(40, 560, dtype=torch.float32, generator=torch.Generator().manual_seed(11))
    inv = build_inverse_fisher(g, damping=DAMPING, layout=layout, requests=True)
    assert inv.representation == ("dense64", "dual", "dense64")
    assert set(representation_for_requests("auto")) == {"dual", "dense64"}
    inv.downdate(g[:30])
    fresh = build_inverse_fisher(g[30:].double(), damping=DAMPING, layout=layout,
                                 normalizer=40.0, probe_vectors=0)
    v = torch.randn(560, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    assert rel_err((inv @ v.float()).double(), fresh @ v) <= EXACT[torch.float32]
    with pytest.raises(ValueError, match="requests=True chooses among"):
        build_inverse_fisher(g, damping=DAMPING, layout=layout, representation="dense",
                             requests=True)
    with pytest.raises(ValueError, match="needs a build method"):
        build_inverse_fisher(g, damping=DAMPING, layout=layout, method="woodbury",
                             requests=True)
    with pytest.raises(TypeError, match="requests must be a bool"):
        build_inverse_fisher(g, damping=DAMPING, layout=layout, requests="yes")
    assert not GramStore.auto  # never chosen by bytes
    assert build_inverse_fisher(g, damping=DAMPING, layout=layout).representation == \
        ("dense", "dual", "dense")


# Per-block column scales: blocks whose condition bound is far above, near and far below the
# float32 and float64 limits of representation="requests".
SCALES = (1.0, 0.2, 0.05, 0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_requests_choose_per_block_by_accuracy(dtype):
    damping = 1e-2
    g = rows_of(ROWS, 13, torch.float64)
    for b, c in enumerate(SCALES):
        g[:, LAYOUT.slice(b)] *= c
    g = g.to(dtype)
    v = rows_of(8, 14, torch.float64).T.contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv = build_inverse_fisher(g, damping=damping, layout=LAYOUT, representation="requests")
    u, names = torch.finfo(dtype).eps / 2, []
    for b in range(LAYOUT.num_blocks):
        r = g[:, LAYOUT.slice(b)].double()
        gram = r.T @ r
        bound = 1 + float(torch.linalg.matrix_norm(gram)) / (ROWS * damping)
        eig = torch.linalg.eigvalsh(gram / ROWS + damping * torch.eye(gram.shape[0],
                                                                        dtype=torch.float64))
        # the bound bounds lambda_max(F) / lambda, which bounds any downdate's amplification
        assert float(eig.max()) / damping <= bound
        names.append("dense" if bound ** 2 * u <= EXACT[dtype] else
                     "dense64" if bound ** 2 * U64 <= EXACT[dtype] else "gram")
    assert inv.representation == tuple(names)
    # the scales straddle the limits: dense and gram in float64; dense and dense64 in float32
    assert set(names) == ({"dense", "gram"} if dtype == torch.float64 else
                          {"dense", "dense64"})
    all_gram = build_inverse_fisher(g, damping=damping, layout=LAYOUT, representation="gram")
    assert inv.nbytes < all_gram.nbytes
    keep = torch.ones(ROWS, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no health warning after any request
        for t, idx in enumerate(requests(15)):
            inv.downdate(g[idx])
            keep[idx] = False
            if t % 5 == 4:
                fresh = build_inverse_fisher(g[keep].double(), damping=damping, layout=LAYOUT,
                                             normalizer=float(ROWS), probe_vectors=0)
                assert rel_err((inv @ v.to(dtype)).double(), fresh @ v) <= EXACT[dtype], t
        assert inv.health().ok
    tensors, meta = inv.to_state()
    back = BlockInverseFisher.from_state(tensors, json.loads(json.dumps(meta)))
    assert back.representation == inv.representation
    assert torch.equal(back.dense(), inv.dense())


def test_requests_as_a_representation_name():
    from ssse_ext.blocks import REPRESENTATIONS, REQUESTS, resolve_representation
    assert REQUESTS in REPRESENTATIONS
    assert set(resolve_representation(REQUESTS)) == {"dual", "dense64"}
    g = rows_of(ROWS, 16, torch.float32)
    a = build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT, requests=True)
    b = build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT, representation="requests")
    assert a.representation == b.representation == ("dense64",) * LAYOUT.num_blocks
    assert torch.equal(a.dense(), b.dense())


def test_an_eraser_serves_twenty_requests_without_drift():
    """The service's default: a float32 MLP at damping 1e-4 with blocks fitted from about as
    many samples as parameters (rank-deficient up to the damping), 20 requests removing 80 %
    of the samples: no health warning, and the inverse equals a float64 fit on the samples
    that remain (same normaliser, rows at the trained parameters) within 1e-5."""
    import ssse
    from ssse.rows import per_sample_grads
    torch.manual_seed(0)
    n = 60
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(n, 6)
    y = torch.randint(0, 3, (n,))

    def loss(out, target):
        return torch.nn.functional.cross_entropy(out, target, reduction="none")

    eraser = ssse.Eraser(model, loss, damping=DAMPING, block_size=48)
    assert eraser.representation == "requests"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eraser.fit((x, y))
        assert "dense64" in eraser.inv_fisher.representation
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
        gone = order[:int(REMOVED * n)]
        for part in gone.tensor_split(REQUESTS):
            eraser.erase((x[part], y[part]), epsilon=1.0)
    keep = torch.ones(n, dtype=torch.bool)
    keep[gone] = False
    rows = torch.cat(list(per_sample_grads(model.double(), loss, (x[keep].double(), y[keep]))))
    inv = eraser.inv_fisher
    fresh = build_inverse_fisher(rows, damping=DAMPING, layout=inv.layout,
                                 normalizer=inv.normalizer, probe_vectors=0)
    v = torch.randn(inv.layout.dim, 4, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    assert rel_err((inv @ v.float()).double(), fresh @ v) <= EXACT[torch.float32]


def test_float64_copies_keep_float32_requests_exact():
    """The "dense64" store on the contract's rank-deficient blocks (condition numbers about
    4e4): its float64 Woodbury downdates drift by about 0.05 kappa^2 u64, far inside 1e-5,
    where the float32 dense store's drift beyond 1e-3 (the first test). It holds 8 bytes per
    element."""
    g = rows_of(ROWS, 0, torch.float32)
    v = rows_of(8, 1, torch.float64).T.contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv = build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT, representation="dense64")
        assert inv.representation == ("dense64",) * LAYOUT.num_blocks
        assert inv.nbytes == 8 * LAYOUT.num_blocks * 64 * 64
        keep = torch.ones(ROWS, dtype=torch.bool)
        for idx in requests(2):
            inv.downdate(g[idx])
            keep[idx] = False
        assert drift(inv, g, keep, v) <= EXACT[torch.float32]
        assert inv.health().ok
    store = inv.stores[0]
    # the applies read the float64 blocks: only the rounding of the result to float32 remains
    wide = torch.block_diag(*[store.exact[0][o:o + 64 * 64].view(64, 64)
                              for o in range(0, 4 * 64 * 64, 64 * 64)]) @ v.float().double()
    assert rel_err((inv @ v.float()).double(), wide) <= torch.finfo(torch.float32).eps
    fresh = build_inverse_fisher(g[keep].double(), damping=DAMPING, layout=LAYOUT,
                                 normalizer=float(ROWS), probe_vectors=0)
    # the float64 blocks drift by at most (requests + 1) B^2 u64 to first order
    bound = max(1 + float(torch.linalg.matrix_norm(g[:, LAYOUT.slice(b)].double().T @
                                                   g[:, LAYOUT.slice(b)].double()))
                / (ROWS * DAMPING) for b in range(LAYOUT.num_blocks))
    exact = torch.cat(store.exact)
    assert rel_err(exact, torch.cat([fresh.dense_block(b).flatten()
                                     for b in range(LAYOUT.num_blocks)])) <= \
        (REQUESTS + 1) * bound ** 2 * U64


def test_a_resumable_fit_holds_the_blocks_as_requests_need(tmp_path):
    import ssse
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))

    def loss(out, target):
        return torch.nn.functional.cross_entropy(out, target, reduction="none")

    plain = ssse.Eraser(model, loss, damping=DAMPING, block_size=24).fit((x, y))
    resumed = ssse.Eraser(model, loss, damping=DAMPING, block_size=24).fit(
        [(x[:20], y[:20]), (x[20:], y[20:])], checkpoint=tmp_path / "fit.ckpt", every=20)
    assert resumed.inv_fisher.representation == plain.inv_fisher.representation
    assert set(plain.inv_fisher.representation) - {"dense"}  # not every block dense
    # both round the same float64 inverse (its accumulation order differs by about k u64)
    # to float32: at most one unit in the last place apart
    assert rel_err(resumed.inv_fisher.dense().double(), plain.inv_fisher.dense().double()) \
        <= torch.finfo(torch.float32).eps
    # a resumable fit keeps no dual blocks: a block larger than the samples (a weight of 90)
    # stays dense-family, where a fit without a checkpoint takes the dual form
    linear, wide_x = torch.nn.Linear(30, 3), torch.randn(40, 30)
    wide = ssse.Eraser(linear, loss, damping=DAMPING).fit(
        (wide_x, y), checkpoint=tmp_path / "wide.ckpt")
    assert "dual" not in wide.inv_fisher.representation
    assert "dual" in ssse.Eraser(linear, loss, damping=DAMPING).fit(
        (wide_x, y)).inv_fisher.representation
    with pytest.raises(ValueError, match="cannot be checkpointed"):
        ssse.fit_inverse_fisher(model, loss, (x, y), damping=DAMPING, representation="gram",
                                checkpoint=tmp_path / "other.ckpt")
