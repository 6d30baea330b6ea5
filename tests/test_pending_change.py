"""A change checked on every block, then committed (ssse_ext.change): the products the check
gives against float64 references, nothing written before the commit, the commit equal to a
plain downdate, stale and repeated commits refused, and the Eraser's step read in the check's
pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssse
import ssse_ext
from ssse_ext import BlockLayout, build_inverse_fisher

from .testing import DTYPES, SOLVE, rel_err

LAYOUT = BlockLayout.from_boundaries([0, 40, 45, 85, 130])  # blocks of 40, 5, 40 and 45
N, LAM = 160, 0.3


def rows(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, LAYOUT.dim, generator=g, dtype=torch.float64).to(dtype)


def fitted(dtype, representation):
    return build_inverse_fisher(rows(N, dtype, 0), damping=LAM, layout=LAYOUT,
                                representation=representation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("representation", ["dense", "requests", "dense64", "gram", "dual"])
@pytest.mark.parametrize("changed", [False, True])
@pytest.mark.parametrize("r", [None, 2])
@pytest.mark.parametrize("k", [4, 6])  # 6: more rows than the block of 5 (no kernel path)
def test_the_check_gives_the_products_and_the_commit_is_a_downdate(dtype, representation,
                                                                   changed, r, k):
    inv = fitted(dtype, representation)
    removed = rows(N, dtype, 0)[:k]
    v = rows(1 if r is None else r, dtype, 1)
    v = v[0] if r is None else v.T  # (d,), or (d, r) not contiguous
    dense_before = inv.dense().double()
    change = inv.checked_change(removed, apply=v, changed=changed)
    assert torch.equal(inv.dense().double(), dense_before) and inv.num_samples == N
    fisher = torch.linalg.inv(dense_before)
    if changed:  # block by block
        mask = torch.block_diag(*[torch.ones(s, s, dtype=torch.float64) for s in LAYOUT.sizes])
        fisher = fisher - mask * (removed.double().T @ removed.double()) / N
    assert change.applied.dtype == torch.float64 and change.applied.shape == v.shape
    assert rel_err(change.applied, torch.linalg.solve(fisher, v.double())) <= SOLVE[dtype]
    plain = fitted(dtype, representation).downdate(removed)
    assert change.commit() is inv and inv.num_samples == N - k
    assert torch.equal(inv.dense(), plain.dense())  # the same bits as a plain downdate


def test_stale_and_repeated_commits_are_refused():
    inv = fitted(torch.float64, "dense")
    first = inv.checked_change(rows(N, torch.float64, 0)[:2])
    second = inv.checked_change(rows(N, torch.float64, 0)[2:4])
    first.commit()
    after = inv.dense()
    with pytest.raises(RuntimeError, match="changed after this change was checked"):
        second.commit()
    with pytest.raises(RuntimeError, match="committed already"):
        first.commit()
    assert torch.equal(inv.dense(), after) and inv.num_samples == N - 2 and inv.changes == 1


def test_rows_modified_after_the_check_are_refused():
    inv = fitted(torch.float64, "gram")  # its write reads the rows again
    removed = rows(N, torch.float64, 0)[:3].clone()
    change = inv.checked_change(removed)
    before = inv.dense()
    removed.mul_(30)
    with pytest.raises(RuntimeError, match="rows were modified"):
        change.commit()
    assert torch.equal(inv.dense(), before) and inv.num_samples == N and inv.changes == 0


@pytest.mark.parametrize("changed", [False, True])
def test_kronecker_blocks_give_the_products_of_the_blocks_a_request_leaves(changed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    loss = nn.CrossEntropyLoss(reduction="none")
    X, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    inv = ssse.fit_inverse_fisher(model, loss, (X, y), damping=0.1, curvature="kfac",
                                  progress=False)
    eraser = ssse.Eraser(model, loss, damping=0.1, curvature="kfac")
    eraser.inv_fisher = inv
    removed, _ = eraser.rows_and_gradient([(X[:4], y[:4])])
    v = torch.randn(inv.dim, dtype=torch.float64)
    expect = inv.without(removed) @ v if changed else inv @ v
    change = inv.checked_change(removed, apply=v, changed=changed)
    assert rel_err(change.applied, expect) <= SOLVE[torch.float64]
    plain = inv.clone().downdate(removed)
    change.commit()
    assert torch.equal(inv.dense(), plain.dense())


def test_no_rows_applies_the_inverse_and_writes_nothing():
    inv = fitted(torch.float32, "dense")
    v = rows(1, torch.float32, 3)[0]
    change = inv.checked_change(rows(0, torch.float32, 0), apply=v, changed=True)
    assert rel_err(change.applied, (inv.dense().double() @ v.double())) <= SOLVE[torch.float32]
    before = inv.dense()
    change.commit()
    assert torch.equal(inv.dense(), before) and inv.changes == 0


def test_the_arguments_are_checked():
    inv = fitted(torch.float64, "dense")
    g = rows(N, torch.float64, 0)[:2]
    with pytest.raises(ValueError, match="^apply must have shape"):
        inv.checked_change(g, apply=torch.ones(LAYOUT.dim + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="^sign must be"):
        inv.checked_change(g, sign=0)
    with pytest.raises(ValueError, match="^method must be one of"):
        inv.checked_change(g, method="qr")
    with pytest.raises(TypeError, match="^changed must be a bool"):
        inv.checked_change(g, apply=g[0], changed=1)
    with pytest.raises(ssse_ext.NotPositiveDefiniteError):
        inv.checked_change(10 * rows(2, torch.float64, 9), apply=g[0])
    assert inv.num_samples == N and inv.changes == 0


@pytest.mark.parametrize("fisher", ["full", "leave_k_out"])
def test_the_erasers_step_is_read_in_the_checks_pass(fisher):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    loss = nn.CrossEntropyLoss(reduction="none")
    X, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    eraser = ssse.Eraser(model, loss, damping=0.1, block_size=16).fit((X, y), progress=False)
    before = eraser.inv_fisher.clone()
    theta = eraser.theta.clone()
    rows_s, v = eraser.rows_and_gradient([(X[:5], y[:5])])
    state = eraser.erase((X[:5], y[:5]), ids=list(range(5)), epsilon=0.7, fisher=fisher)
    after = before.clone().downdate(rows_s)
    step = (after if fisher == "leave_k_out" else before) @ v
    got = torch.cat([state[k].reshape(-1) for k, _ in model.named_parameters()])
    assert rel_err(got - theta, 0.7 / 35 * step) <= 1e-12
    assert torch.equal(eraser.inv_fisher.dense(), after.dense())
    t = eraser.last_timings
    assert {"rows", "check", "write", "apply", "probe"} <= t.keys()
    assert sum(s for k, s in t.items() if k != "total") <= t["total"] * (1 + 1e-9) + 1e-6


@pytest.mark.parametrize("representation", ["dense", "requests"])
def test_the_erasers_step_takes_no_pass_of_its_own_on_dense_blocks(representation,
                                                                  monkeypatch):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).float().eval()
    loss = nn.CrossEntropyLoss(reduction="none")
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    eraser = ssse.Eraser(model, loss, damping=0.1, block_size=16,
                         representation=representation).fit((X, y), progress=False)
    assert set(eraser.inv_fisher.representation) <= {"dense", "dense64"}

    def no_pass(*args, **kwargs):
        raise AssertionError("a separate pass over the blocks for the step")

    for cls in (ssse_ext.DenseStore, ssse_ext.Dense64Store):
        monkeypatch.setattr(cls, "apply_into", no_pass)
        monkeypatch.setattr(cls, "solve_changed", no_pass)
    # the health probe after the request reads sampled blocks: not the step's pass
    monkeypatch.setattr(ssse_ext.BlockInverseFisher, "health", lambda self, **kw: None)
    for fisher in ("full", "leave_k_out"):
        eraser.erase((X[:2], y[:2]) if fisher == "full" else (X[2:4], y[2:4]),
                     epsilon=1.0, fisher=fisher, ids=[0, 1] if fisher == "full" else [2, 3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_change_wider_than_some_blocks_runs_the_kernels_on_the_others(dtype, monkeypatch):
    """Six rows against blocks of 40, 5, 40 and 45: the kernels check and write the three wide
    blocks, torch's batched products the block of 5, and the result is the fit of the rows
    left (every block against the float64 closed form)."""
    from ssse_ext import _ops, reference

    from .testing import CHAIN

    widths, real = [], _ops.call

    def spy(op, *args):
        if op is _ops.woodbury_check:
            widths.extend(args[1][:, 1].tolist())  # the sizes in the kernel's table
        return real(op, *args)

    monkeypatch.setattr(_ops, "call", spy)
    inv = fitted(dtype, "dense")
    g = rows(N, dtype, 0)
    v = rows(1, dtype, 1)[0]
    change = inv.checked_change(g[:6], apply=v)
    assert sorted(widths) == [40, 40, 45]
    assert rel_err(change.applied, inv.dense().double() @ v.double()) <= SOLVE[dtype]
    change.commit()
    want = reference.block_closed_form(g[6:].double(), LAYOUT, LAM, N)
    for b in range(LAYOUT.num_blocks):
        got = inv.dense_block(b)
        assert torch.equal(got, got.T), b  # both paths keep their blocks bitwise symmetric
        assert rel_err(got.double(), want[b]) <= CHAIN[dtype], b
