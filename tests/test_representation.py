"""An inverse whose blocks mix the dense and the dual (low-rank) representation: every operation
of :class:`ssse_ext.BlockInverseFisher` against the float64 reference, and the model-level
paths (fit, SSSE, Eraser, files) against the all-dense inverse."""

import itertools

import pytest
import torch
from torch import nn

import ssse
from ssse.io import load_inverse_fisher, save_inverse_fisher
from ssse_ext import (BlockLayout, NotPositiveDefiniteError, RowNotFoundError,
                      build_inverse_fisher, choose_representation, reference)

from .testing import CHAIN, DEVICES, DTYPES, SOLVE, STABLE, flat_state, rel_err

PRODUCT = list(itertools.product(DTYPES, DEVICES))
N_ROWS, DAMPING = 30, 0.1
# blocks of 64, 5, 75, 3 and 77 columns against 30 rows: "auto" stores 64, 75 and 77 in the dual
# form (30 rows and a float64 30 x 30 factor take fewer bytes than the s x s inverse, in float64
# once s > 47, in float32 once s > 60) and 5 and 3 dense
LAYOUT = BlockLayout.from_boundaries([64, 69, 144, 147], 224)
AUTO = ("dual", "dense", "dual", "dense", "dual")


def rows_of(n, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, LAYOUT.dim, generator=gen, dtype=torch.float64).to(dtype).to(device)


def reference_inverse(g, normalizer=None):
    """The float64 block-diagonal inverse of the damped Fisher of the rows ``g``."""
    return torch.block_diag(*reference.block_closed_form(g.double().cpu(), LAYOUT, DAMPING,
                                                         normalizer))


def build(g, representation, **kw):
    return build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT,
                                representation=representation, **kw)


def test_auto_mixes_the_representations_as_the_rule_says():
    g = rows_of(N_ROWS, torch.float64, "cpu", 0)
    assert build(g, "auto").representation == AUTO
    for dtype in DTYPES:
        mask = choose_representation(LAYOUT.sizes, N_ROWS, dtype)
        assert tuple("dual" if m else "dense" for m in mask) == AUTO
    assert choose_representation([60], N_ROWS, torch.float32) == [False]
    assert choose_representation([60], N_ROWS, torch.float64) == [True]
    assert build(g, "dual").representation == ("dual",) * 5
    assert build(g, "dense").representation == ("dense",) * 5


@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("representation", ["dense", "dual", "auto"])
@pytest.mark.parametrize("streamed", [False, True])
def test_build_and_apply_match_the_reference(dtype, device, representation, streamed):
    g = rows_of(N_ROWS, dtype, device, 1)
    inv = build(iter(g.split(7)), representation, num_rows=N_ROWS) if streamed \
        else build(g, representation)
    assert inv.representation == (AUTO if representation == "auto" else (representation,) * 5)
    ref = reference_inverse(g)
    assert rel_err(inv.dense(), ref) <= STABLE[dtype]
    v = rows_of(3, dtype, device, 2).T.contiguous()
    theta = rows_of(3, dtype, device, 3).T.contiguous()
    assert rel_err(inv @ v, ref @ v.double().cpu()) <= SOLVE[dtype]
    assert rel_err(inv.apply_update(theta, v, -0.7),
                   theta.double().cpu() - 0.7 * ref @ v.double().cpu()) <= SOLVE[dtype]
    assert rel_err(inv @ v[:, 0], ref @ v[:, 0].double().cpu()) <= SOLVE[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_the_dual_part_takes_fewer_bytes(dtype, device):
    g = rows_of(N_ROWS, dtype, device, 4)
    dense, auto, dual = (build(g, r).nbytes for r in ("dense", "auto", "dual"))
    assert auto < dense
    # the two small blocks are cheaper dense than as 30 rows and a 30 x 30 factor
    assert auto < dual


@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("representation", ["dual", "auto"])
def test_downdate_update_and_without_match_the_remaining_rows(dtype, device, representation):
    g = rows_of(N_ROWS, dtype, device, 5)
    removed, kept = g[:6], g[6:]
    ref_kept = reference_inverse(kept, normalizer=N_ROWS)
    inv = build(g, representation)
    v = rows_of(1, dtype, device, 6)[0]
    # on the fly: the inverse is not modified
    before = inv.dense().clone()
    assert rel_err(inv.without(removed) @ v, ref_kept @ v.double().cpu()) <= SOLVE[dtype]
    assert rel_err(inv.apply_update(torch.zeros_like(v), v, 1.0, without=removed),
                   ref_kept @ v.double().cpu()) <= SOLVE[dtype]
    assert torch.equal(inv.dense(), before)
    # in place
    inv.downdate(removed)
    assert inv.representation == build(g, representation).representation
    assert rel_err(inv.dense(), ref_kept) <= CHAIN[dtype]
    inv.update(removed)
    assert rel_err(inv.dense(), reference_inverse(g)) <= CHAIN[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("representation", ["dense", "dual", "auto"])
@pytest.mark.parametrize("sign", [-1, 1])
def test_solve_changed_with_a_shift(dtype, device, representation, sign):
    g = rows_of(N_ROWS, dtype, device, 7)
    rows = g[:4] if sign < 0 else rows_of(4, dtype, device, 8)
    inv = build(g, representation)
    rhs = rows_of(2, dtype, device, 9).T.contiguous()
    shift = 0.03
    fisher = torch.linalg.inv(reference_inverse(g))
    r = rows.double().cpu()
    changed = fisher + sign * torch.block_diag(*[
        r[:, LAYOUT.slice(b)].T @ r[:, LAYOUT.slice(b)] for b in range(LAYOUT.num_blocks)]
    ) / N_ROWS - shift * torch.eye(LAYOUT.dim, dtype=torch.float64)
    expected = torch.linalg.solve(changed, rhs.double().cpu())
    out = inv.solve_changed(rows, rhs, sign=sign, shift=shift)
    assert out.dtype == torch.float64 and out.shape == rhs.shape
    assert rel_err(out, expected) <= SOLVE[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
@pytest.mark.parametrize("representation", ["dense", "dual", "auto"])
def test_rows_never_added_are_refused_and_nothing_changes(dtype, device, representation):
    g = rows_of(N_ROWS, dtype, device, 10)
    inv = build(g, representation)
    before = inv.dense().clone()
    # rows that were added, except in the columns of block 2 (dual under "auto"): every other
    # block, dense or dual, would accept them
    rows = g[:2].clone()
    rows[:, LAYOUT.slice(2)] = 50 * rows_of(2, dtype, device, 11)[:, LAYOUT.slice(2)]
    kind = NotPositiveDefiniteError if representation == "dense" else RowNotFoundError
    with pytest.raises(kind, match=r"(?i)block 2 .*nothing was changed"):
        inv.downdate(rows)
    assert torch.equal(inv.dense(), before)
    assert inv.representation == build(g, representation).representation
    inv.downdate(g[:2])  # still usable, and the genuine rows go
    assert rel_err(inv.dense(), reference_inverse(g[2:], normalizer=N_ROWS)) <= CHAIN[dtype]


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_state_files_clone_and_conversion(dtype, device, tmp_path):
    g = rows_of(N_ROWS, dtype, device, 12)
    inv = build(g, "auto")
    path = save_inverse_fisher(tmp_path / "inv.safetensors", inv)
    back, _ = load_inverse_fisher(path, device=device)
    assert back.representation == AUTO and back.dtype == dtype
    assert torch.equal(back.dense(), inv.dense())
    copy = inv.clone()
    copy.downdate(g[:3])
    assert torch.equal(back.dense(), inv.dense())  # the clone shares nothing
    other = torch.float64 if dtype == torch.float32 else torch.float32
    moved = inv.to(dtype=other)
    assert moved.representation == AUTO and moved.dtype == other
    assert rel_err(moved.dense(), reference_inverse(g)) <= STABLE[
        torch.float32 if torch.float32 in (dtype, other) else torch.float64]


# ---- model level ---------------------------------------------------------------------------------

def linear_problem(dtype):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(24, 30, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (24,), generator=gen)
    torch.manual_seed(0)
    model = nn.Linear(30, 3).to(dtype).eval()  # weight 90 > 24 rows: dual; bias 3: dense
    return X, y, model


LOSS = nn.CrossEntropyLoss(reduction="none")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fit_and_ssse_update_agree_across_representations(dtype):
    X, y, model = linear_problem(dtype)
    invs = {r: ssse.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING,
                                       representation=r, progress=False)
            for r in ("dense", "auto", "dual")}
    assert invs["auto"].representation == ("dual", "dense")
    states = {r: ssse.ssse_update(model, LOSS, [(X[:4], y[:4])], inv_fisher=inv, epsilon=0.5,
                                  n_total=24) for r, inv in invs.items()}
    ref = flat_state(ssse.ssse_update(model, LOSS, [(X[:4], y[:4])],
                                inv_fisher=invs["dense"].to(dtype=torch.float64), epsilon=0.5,
                                n_total=24), model)
    for r, state in states.items():
        assert rel_err(flat_state(state, model), ref) <= SOLVE[dtype], r
    leave = {r: flat_state(ssse.ssse_update(model, LOSS, [(X[:4], y[:4])], inv_fisher=inv,
                                      epsilon=0.5, n_total=24, fisher="leave_k_out"), model)
             for r, inv in invs.items()}
    assert rel_err(leave["auto"], leave["dense"]) <= SOLVE[dtype]
    assert rel_err(leave["dual"], leave["dense"]) <= SOLVE[dtype]


@pytest.mark.parametrize("representation", ["auto", "dual"])
def test_eraser_serves_requests_like_the_dense_one(representation):
    X, y, model = linear_problem(torch.float64)
    erasers = {r: ssse.Eraser(model, LOSS, damping=DAMPING, representation=r).fit([(X, y)])
               for r in ("dense", representation)}
    for ids in ([0, 5], [7, 8, 9]):
        for er in erasers.values():
            er.erase([(X[ids], y[ids])], epsilon=0.5, ids=ids)
    dense, other = erasers["dense"], erasers[representation]
    assert other.inv_fisher.representation[0] == "dual"
    assert rel_err(other.theta, dense.theta) <= CHAIN[torch.float64]
    assert rel_err(other.inv_fisher.dense(), dense.inv_fisher.dense()) <= CHAIN[torch.float64]
    assert other.n == dense.n == 19
