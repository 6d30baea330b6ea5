"""A sharded inverse (ssse.sharding.ShardedInverseFisher) through the checks of the block-store
protocol suite (tests/test_block_stores.py), against the same float64 reference blocks: built
from an inverse of every registered store, it applies, changes, solves, copies and saves as the
unsharded BlockInverseFisher does. Each check runs with the one-process comm (ssse.comm.Comm),
and on 2 gloo ranks (the helpers of tests/test_distributed.py), where every rank passes its
share of the rows, owns some of the blocks and gets the whole results, the same bits on every
rank."""

from __future__ import annotations

import itertools
import os
import traceback

import pytest
import torch

import ssse.comm
from ssse.comm import DistributedError
from ssse.sharding import ShardedInverseFisher, load_sharded, save_sharded
from ssse_ext import NotPositiveDefiniteError, RowNotFoundError, build_inverse_fisher
from ssse_ext.budget import AVAILABLE_MEMORY_ENV
from ssse_ext.errors import InsufficientMemoryError

from .test_block_stores import DAMPING, LAYOUT, N_ROWS, NAMES, ref_block, rows_of
from .testing import CHAIN, DEVICES, DTYPES, SOLVE, STABLE, rel_err

PRODUCT = list(itertools.product(NAMES, DTYPES, DEVICES))
CHANGES = [("woodbury", None), ("woodbury", 1), ("sherman_morrison", 2)]


def share(comm, rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of ``rows``."""
    part = comm.share(rows.shape[0])
    return rows[part.start:part.stop]


def sharded(name, g, comm, normalizer=None) -> tuple[ShardedInverseFisher, object]:
    """This rank's share of the inverse built from ``g`` by store ``name``, and that inverse."""
    full = build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT, representation=name,
                                normalizer=normalizer)
    return ShardedInverseFisher.from_full(full, comm=comm), full


def dense_ref(g, normalizer) -> torch.Tensor:
    return torch.block_diag(*[ref_block(g, b, normalizer) for b in range(LAYOUT.num_blocks)])


def assert_blocks(inv, g, normalizer, tol):
    assert inv.block_ids  # every rank holds blocks here
    for b in inv.block_ids:
        assert rel_err(inv.dense_block(b), ref_block(g, b, normalizer)) <= tol, b


# ---- the checks: each returns the whole results it computed (equal on every rank) -------------

def check_build(name, dtype, device, comm, out):
    g = rows_of(N_ROWS, dtype, device, 0)
    inv, full = sharded(name, g, comm)
    assert inv.dtype == dtype and inv.device == torch.device(device) and inv.dim == LAYOUT.dim
    assert (inv.damping, inv.normalizer, inv.num_samples) == (DAMPING, N_ROWS, N_ROWS)
    assert inv.block_ids == tuple(range(*inv.block_range))
    assert_blocks(inv, g, N_ROWS, STABLE[dtype])
    for b in inv.block_ids:  # the blocks of the store it was made from, bit for bit
        assert torch.equal(inv.dense_block(b), full.dense_block(b))
    if 4 in inv.block_ids:
        assert torch.equal(inv.dense_block(-1), inv.dense_block(4))
    # the blocks held by another rank (block -1 is block 4), and one past the last block
    missing = [b for b in range(-1, LAYOUT.num_blocks + 1) if b not in inv.block_ids and
               b + LAYOUT.num_blocks not in inv.block_ids]
    for b in missing:
        with pytest.raises(IndexError, match=f"block {b} is not one of this rank's blocks"):
            inv.dense_block(b)
    whole = inv.gather().dense()
    assert torch.equal(whole, torch.block_diag(*[full.dense_block(b) for b in range(5)]))
    return [whole, torch.tensor(inv.block_ids)]


def check_apply(name, dtype, device, comm, out, r):
    g = rows_of(N_ROWS, dtype, device, 1)
    inv, full = sharded(name, g, comm)
    if r is None:
        v, theta = rows_of(2, dtype, device, 2)
    else:  # transposed: non-contiguous for r > 1
        v, theta = rows_of(r, dtype, device, 2).T, rows_of(r, dtype, device, 3).T
    dense = dense_ref(g, N_ROWS)
    step = inv.apply_update(theta, v, -0.7)
    assert step.shape == v.shape and step.dtype == dtype
    assert rel_err(step, theta.double().cpu() - 0.7 * dense @ v.double().cpu()) <= SOLVE[dtype]
    product = inv @ v
    assert torch.equal(product, inv.matvec(v)) and product.shape == v.shape
    assert rel_err(product, dense @ v.double().cpu()) <= SOLVE[dtype]
    assert rel_err(product, full @ v) <= SOLVE[dtype]
    with pytest.raises(ValueError, match="v must have shape"):
        inv @ torch.ones(LAYOUT.dim + 1, dtype=dtype, device=device)
    return [step, product]


def check_changes(name, dtype, device, comm, out, method, chunk):
    g = rows_of(N_ROWS + 3, dtype, device, 4)
    inv, _ = sharded(name, g[:N_ROWS], comm, normalizer=N_ROWS + 3)
    assert inv.update(share(comm, g[N_ROWS:]), method=method, chunk_size=chunk) is inv
    removed = share(comm, g[:4:2])  # non-contiguous rows (in one process)
    gone = torch.zeros(0, LAYOUT.dim, dtype=dtype, device=device)
    inv.downdate([removed, gone], method=method, chunk_size=chunk)  # an iterable of chunks
    kept = [i for i in range(N_ROWS + 3) if i not in (0, 2)]
    assert inv.num_samples == len(kept)
    assert_blocks(inv, g[kept], N_ROWS + 3, CHAIN[dtype])
    return [inv.gather().dense()]


def check_refusals(name, dtype, device, comm, out):
    g = rows_of(N_ROWS, dtype, device, 5)
    inv, _ = sharded(name, g, comm)
    before = inv.gather().dense()
    stranger = g[:2].clone()
    stranger[:, LAYOUT.slice(4)] = rows_of(2, dtype, device, 6, scale=50.0)[:, LAYOUT.slice(4)]
    # only block 4's owner refuses; every rank raises, the owner its own error
    owner = 4 in inv.block_ids
    expected = (NotPositiveDefiniteError, RowNotFoundError) if owner else DistributedError
    text = "failed in downdate" if not owner else r"(?i)block 4 .*nothing was changed" \
        if comm.size == 1 else "(?i)nothing was changed"  # an owner numbers its own blocks
    with pytest.raises(expected, match=text):
        inv.downdate(share(comm, stranger))
    with pytest.raises(NotPositiveDefiniteError if owner else DistributedError):
        inv.without(share(comm, stranger))
    assert torch.equal(inv.gather().dense(), before) and inv.num_samples == N_ROWS
    other = torch.float64 if dtype == torch.float32 else torch.float32
    os.environ[AVAILABLE_MEMORY_ENV] = "16"
    try:
        for copy in (inv.clone, lambda: inv.to(dtype=other)):
            with pytest.raises(InsufficientMemoryError):
                copy()
    finally:
        del os.environ[AVAILABLE_MEMORY_ENV]
    assert torch.equal(inv.gather().dense(), before)
    inv.downdate(share(comm, g[:2]))  # still usable
    assert_blocks(inv, g[2:], N_ROWS, CHAIN[dtype])
    return [before, inv.gather().dense()]


def check_without_and_solve(name, dtype, device, comm, out, sign):
    g = rows_of(N_ROWS, dtype, device, 7)
    inv, _ = sharded(name, g, comm)
    rows = (g[:3] if sign < 0 else rows_of(3, dtype, device, 8)).contiguous()
    v = rows_of(2, dtype, device, 9).T.contiguous()
    theta = rows_of(2, dtype, device, 10).T.contiguous()
    v64, r = v.double(), rows.double().cpu()
    before = inv.gather().dense()
    change = inv.without(share(comm, rows), sign=sign)
    solved, shift = change.solve(v), 0.05
    shifted = inv.solve_changed(share(comm, rows), v64, sign=sign, shift=shift)
    assert solved.dtype == shifted.dtype == torch.float64 and solved.shape == v.shape
    fisher = torch.block_diag(*[  # per block: F_b + sign R_b^T R_b / N
        torch.linalg.inv(ref_block(g, b, N_ROWS)) + sign * r[:, sl].T @ r[:, sl] / N_ROWS
        for b, sl in enumerate(map(LAYOUT.slice, range(LAYOUT.num_blocks)))])
    assert rel_err(solved, torch.linalg.solve(fisher, v64.cpu())) <= SOLVE[dtype]
    eye = torch.eye(LAYOUT.dim, dtype=torch.float64)
    assert rel_err(shifted, torch.linalg.solve(fisher - shift * eye, v64.cpu())) <= SOLVE[dtype]
    assert torch.equal(change @ v, solved.to(dtype))
    step = change.apply_update(theta, v, 0.3)
    if sign < 0:  # the leave-k-out step
        assert torch.equal(inv.apply_update(theta, v, 0.3, without=share(comm, rows)), step)
    with pytest.raises(ValueError, match="sign must be"):
        inv.without(share(comm, rows), sign=0)
    assert torch.equal(inv.gather().dense(), before)  # nothing was modified
    return [solved, shifted, step]


def check_copies_and_state(name, dtype, device, comm, out):
    g = rows_of(N_ROWS, dtype, device, 10)
    inv, _ = sharded(name, g, comm)
    copy = inv.clone()
    assert (copy.sharding, copy.rank, copy.comm) == (inv.sharding, inv.rank, inv.comm)
    copy.downdate(share(comm, g[:2]))
    assert_blocks(copy, g[2:], N_ROWS, CHAIN[dtype])
    assert_blocks(inv, g, N_ROWS, STABLE[dtype])  # the clone shares nothing
    other = torch.float64 if dtype == torch.float32 else torch.float32
    moved = inv.to(dtype=other)
    assert moved.dtype == other and moved.block_range == inv.block_range
    assert moved.nbytes == inv.local.to(dtype=other).nbytes
    assert_blocks(moved, g, N_ROWS, STABLE[torch.float32])
    index = out / f"{name}-{str(dtype)[6:]}" / "inverse_fisher.index.json"
    save_sharded(index, inv)
    back, meta = load_sharded(index, comm=comm, device=device)
    assert meta == {} and back.block_range == inv.block_range and back.dtype == dtype
    for b in inv.block_ids:
        assert torch.equal(back.dense_block(b), inv.dense_block(b))
    v = rows_of(1, dtype, device, 11)[0]
    assert torch.equal(back @ v, inv @ v)
    return [copy.gather().dense(), moved.gather().dense(), back.gather().dense()]


#: Every check with its extra parameters.
CHECKS = {"build": (check_build, [()]),
          "apply": (check_apply, [(None,), (1,), (3,)]),
          "changes": (check_changes, CHANGES),
          "refusals": (check_refusals, [()]),
          "without_and_solve": (check_without_and_solve, [(-1,), (1,)]),
          "copies_and_state": (check_copies_and_state, [()])}


# ---- one process ------------------------------------------------------------------------------

@pytest.mark.parametrize("check,extra", [(c, e) for c, (_, extras) in CHECKS.items()
                                         for e in extras])
@pytest.mark.parametrize("name,dtype,device", PRODUCT)
def test_one_process(check, extra, name, dtype, device, tmp_path):
    run = CHECKS[check][0]
    run(name, dtype, device, ssse.comm.Comm(), tmp_path, *extra)


# ---- two gloo ranks ---------------------------------------------------------------------------

#: The stores and dtypes the ranks run every check with (one start of the processes).
RANKED = [("dense", torch.float64), ("dual", torch.float32), ("gram", torch.float64)]


def ranks_scenario(rank, world, out, opts, res):
    """Every check with every parameter on this rank (started by the spawn helper of
    tests/test_distributed.py); the outcome of each in ``res``."""
    torch.set_num_threads(1)
    comm = ssse.comm.TorchComm(timeout=60)
    for (check, (fn, extras)), (name, dtype) in itertools.product(CHECKS.items(), RANKED):
        for extra in extras:
            key = (check, extra, name, str(dtype))
            try:
                res[key] = ("ok", fn(name, dtype, "cpu", comm, out, *extra))
            except BaseException:
                res[key] = ("failed", traceback.format_exc())
                return  # the ranks may be out of step now


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from .test_distributed import spawn

    return spawn("tests.test_sharded_store:ranks_scenario", 2, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize("check,extra", [(c, e) for c, (_, extras) in CHECKS.items()
                                         for e in extras])
@pytest.mark.parametrize("name,dtype", RANKED)
def test_two_gloo_ranks(ranks, check, extra, name, dtype):
    results, codes = ranks
    assert codes == [0, 0]
    key = (check, extra, name, str(dtype))
    for res in results:
        assert res is not None and "crash" not in res, res and res.get("crash")
    failed = [f"rank {r}: " + (res[key][1] if key in res else "did not reach the check "
                               "(an earlier one failed)")
              for r, res in enumerate(results) if res.get(key, ("failed",))[0] != "ok"]
    assert not failed, "\n".join(failed)
    outcomes = [res[key][1] for res in results]
    if check == "build":  # the ranks hold different blocks, all of them together
        held = sorted(b for value in outcomes for b in value.pop().tolist())
        assert held == list(range(LAYOUT.num_blocks))
    for mine, theirs in zip(*outcomes):  # the whole results: the same bits on every rank
        assert torch.equal(mine, theirs)
