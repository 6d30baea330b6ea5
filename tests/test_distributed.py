"""The block-sharded inverse Fisher and erasure over torch.distributed (gloo on CPU): with 2
and 3 processes the inverse, the erased models and the files equal the single-process ones; a
rank that fails makes every rank raise, naming it, within the timeout; a missing shard is
refused naming its rank.

The multi-process tests start their ranks with torch.multiprocessing (spawn); each scenario
runs many checks in one start of the processes, since starting a process with torch is the
dominant cost."""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ssse
import ssse.comm
import ssse.distributed as D
import ssse.sharding
from ssse.sharded_fit import choose_exchange
from ssse.comm import IN_FLIGHT, InFlight
from ssse.io import load_inverse_fisher, load_model
from ssse_ext import BlockLayout

from .testing import SOLVE, STABLE, rel_err

N, FEATURES, CLASSES = 36, 5, 3
DAMPING, WD, EPS = 0.1, 1e-2, 0.5
REMOVED_1 = [1, 7, 8, 20, 33]
REMOVED_2 = [3, 25, 30]
# The seconds a collective of the failure scenarios waits: long enough for a loaded CI
# machine to compute a chunk, short enough to keep the test short.
HANG_TIMEOUT = 6.0
# Generous bound on a whole scenario (process start-up included) before the test gives up: a
# guard against a hang, not a measurement.
JOIN_TIMEOUT = 300.0


# ---- the problem ---------------------------------------------------------------------------------

def problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, CLASSES).double().eval()
    with torch.no_grad():  # near an optimum is not needed: both sides compute the same maths
        model.weight.mul_(0.5)
    return X.to(dtype), y, model.to(dtype)


LOSS = nn.CrossEntropyLoss(reduction="none")
LAYOUT = dict(layout="fixed", block_size=4)  # blocks 4, 4, 4, 4, 2 of d = 18


def local(idx, data):
    X, y = data
    idx = [i for i in idx if i in ssse.comm.TorchComm().share(N)]
    return [(X[idx], y[idx])] if idx else []


def flat(state, model):
    return torch.cat([state[k].reshape(-1) for k, _ in model.named_parameters()])


# ---- starting ranks -----------------------------------------------------------------------------

def _function(target: str):
    """A function of this file by name, or of another module as ``"module:function"``."""
    if ":" not in target:
        return globals()[target]
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _label(target: str) -> str:
    return target.rpartition(":")[2]


def _child(target: str, rank: int, world: int, init: str, out: str, opts: dict):
    torch.set_num_threads(1)
    result = {}
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        _function(target)(rank, world, Path(out), opts, result)
    except BaseException:
        result["crash"] = traceback.format_exc()
    torch.save(result, Path(out) / f"{_label(target)}-{rank}.pt")
    if "then" in opts:  # more collectives, the last thing before the process exits
        globals()[opts["then"]](rank, world)
    elif dist.is_initialized():
        dist.destroy_process_group()  # as the command does on every way out


def spawn(target: str, world: int, out: Path, opts: dict | None = None, *,
          kill_after: list[int] = ()):
    """Runs ``target(rank, world, out, opts, result)`` on ``world`` ranks (``target``: a
    function of this file, or ``"module:function"``); returns ``(results, exit codes)``. The
    ranks in ``kill_after`` are killed once the others ended."""
    ctx = mp.get_context("spawn")
    init = f"file://{out}/pg-{_label(target)}-{time.monotonic_ns()}"
    procs = [ctx.Process(target=_child, args=(target, r, world, init, str(out), opts or {}))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for r, p in enumerate(procs):
        if r not in kill_after:
            p.join(max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive() and r not in kill_after]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} did not end within {JOIN_TIMEOUT} s"
    results = []
    for r in range(world):
        f = out / f"{_label(target)}-{r}.pt"
        results.append(torch.load(f, weights_only=False) if f.exists() else None)
    return results, [p.exitcode for p in procs]


def _error(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


# ---- scenario: everything a user does, on P ranks -----------------------------------------------

def scenario(rank, world, out: Path, opts, res):
    X, y, model = problem()
    comm = ssse.comm.TorchComm()
    mine = [(X[list(comm.share(N))], y[list(comm.share(N))])]
    inv_a = ssse.fit_inverse_fisher(model, LOSS, mine, damping=DAMPING, weight_decay=WD,
                                    chunk_size=3, **LAYOUT,
                                    comm=ssse.comm.TorchComm(exchange="reduce_scatter"))
    inv_b = ssse.fit_inverse_fisher(model, LOSS, mine, damping=DAMPING, weight_decay=WD,
                                    chunk_size=5, **LAYOUT,
                                    comm=ssse.comm.TorchComm(exchange="all_to_all"))
    res["fit_a"], res["fit_b"] = inv_a.gather().dense(), inv_b.gather().dense()
    res["stats_a"], res["stats_b"] = inv_a.fit_stats, inv_b.fit_stats
    res["bounds"] = inv_b.sharding.bounds
    X32, y32, model32 = problem(torch.float32)
    inv32 = ssse.fit_inverse_fisher(model32, LOSS, [(X32[list(comm.share(N))],
                                                   y32[list(comm.share(N))])],
                                    damping=DAMPING, weight_decay=WD, chunk_size=4, **LAYOUT,
                                    comm=comm)
    res["fit_f32"] = inv32.gather().dense()
    res["auto"] = inv32.fit_stats["exchange"]

    data = (X, y)
    res["ssse_full"] = flat(ssse.ssse_update(model, LOSS, local(REMOVED_1, data), inv_fisher=inv_b,
                                          epsilon=EPS, n_total=N, weight_decay=WD, comm=comm), model)
    res["ssse_lko"] = flat(ssse.ssse_update(model, LOSS, local(REMOVED_1, data), inv_fisher=inv_a,
                                         epsilon=EPS, n_total=N, weight_decay=WD,
                                         fisher="leave_k_out", comm=comm), model)
    kept = [i for i in range(N) if i not in REMOVED_1]
    res["ssse_retained"] = flat(ssse.ssse_update(model, LOSS, local(REMOVED_1, data),
                                              inv_fisher=inv_b, epsilon=EPS, n_total=N,
                                              weight_decay=WD, gradient="retained",
                                              retained=local(kept, data), comm=comm), model)
    inv_g = ssse.fit_inverse_fisher(model, LOSS, mine, damping=WD, weight_decay=WD,
                                    curvature="ggn", **LAYOUT, comm=comm)
    res["newton"] = flat(ssse.newton_erase(model, LOSS, local(REMOVED_1, data), inv_fisher=inv_g,
                                        n_total=N, weight_decay=WD, comm=comm), model)

    er = ssse.Eraser(model, LOSS, damping=DAMPING, weight_decay=WD, chunk_size=4, **LAYOUT,
                     comm=comm)
    er.fit(mine)
    state_1 = er.erase(local(REMOVED_1, data), epsilon=EPS)
    res["eraser_1"] = flat(state_1, model)
    # the state an Eraser is restored from: its inverse (saved), n, and theta* (the model's)
    saved = out / f"eraser{world}" / "inverse_fisher.index.json"
    ssse.sharding.save_sharded(saved, er.inv_fisher)
    n_1 = er.n
    res["eraser_2"] = flat(er.erase(local(REMOVED_2, data), epsilon=EPS, fisher="leave_k_out"),
                           model)
    res["eraser_inv"] = er.inv_fisher.gather().dense()
    model_1 = copy.deepcopy(model)
    model_1.load_state_dict(state_1)
    again = ssse.Eraser.restore(model_1, LOSS, ssse.sharding.load_sharded(saved, comm=comm)[0],
                                n=n_1, theta_star=flat(model.state_dict(), model),
                                weight_decay=WD, comm=comm)
    res["restored_2"] = flat(again.erase(local(REMOVED_2, data), epsilon=EPS,
                                         fisher="leave_k_out"), model)
    res["restored_inv"] = again.inv_fisher.gather().dense()
    # a request for samples that were never trained on (scaled far out): some owner's
    # downdate is not positive definite, and nothing may change on any rank
    theta, n = er.theta.clone(), er.n
    bad = [(X[:2] * 100, y[:2])] if rank == world - 1 else []
    try:
        er.erase(bad, epsilon=EPS)
        res["eraser_bad"] = None
    except Exception as exc:
        res["eraser_bad"] = _error(exc)
    res["eraser_unchanged"] = (torch.equal(er.theta, theta) and er.n == n and
                               torch.equal(er.inv_fisher.gather().dense(), res["eraser_inv"]))

    eg = ssse.Eraser(model, LOSS, damping=WD, weight_decay=WD, curvature="ggn", **LAYOUT,
                     comm=comm)
    eg.fit(mine)
    res["newton_1"] = flat(eg.erase(local(REMOVED_1, data)), model)
    res["newton_2"] = flat(eg.erase(local(REMOVED_2, data), epsilon=EPS), model)

    # more ranks than blocks (18 parameters in blocks of 10 and 8): a rank holds none
    few = ssse.Eraser(model, LOSS, damping=DAMPING, weight_decay=WD, layout="fixed",
                      block_size=10, comm=comm).fit(mine)
    res["few_blocks"] = few.inv_fisher.block_range
    few.erase(local(REMOVED_1, data), epsilon=EPS)
    res["few_1"] = flat(few.erase(local(REMOVED_2, data), epsilon=EPS), model)

    index = out / f"save{world}" / "inverse_fisher.index.json"
    ssse.sharding.save_sharded(index, inv_b, note=world)
    again, meta = ssse.sharding.load_sharded(index, comm=comm)
    res["reload"] = again.gather().dense()
    res["reload_meta"] = meta
    if "reshard_from" in opts:
        other, _ = ssse.sharding.load_sharded(opts["reshard_from"], comm=comm)
        res["resharded"] = other.gather().dense()
        res["resharded_bounds"] = other.sharding.bounds
    if "missing" in opts:
        try:
            ssse.sharding.load_sharded(opts["missing"], comm=comm)
            res["missing"] = None
        except Exception as exc:
            res["missing"] = _error(exc)


def single_process():
    """The single-process results the scenario must reproduce."""
    X, y, model = problem()
    data = [(X, y)]
    ref = {}
    inv = ssse.fit_inverse_fisher(model, LOSS, data, damping=DAMPING, weight_decay=WD,
                                  progress=False, **LAYOUT)
    ref["fit"] = inv.dense()
    X32, y32, model32 = problem(torch.float32)
    ref["fit_f32"] = ssse.fit_inverse_fisher(model32, LOSS, [(X32, y32)], damping=DAMPING,
                                             weight_decay=WD, progress=False, **LAYOUT).dense()
    rem = lambda idx: [(X[idx], y[idx])]  # noqa: E731
    ref["ssse_full"] = flat(ssse.ssse_update(model, LOSS, rem(REMOVED_1), inv_fisher=inv,
                                             epsilon=EPS, n_total=N, weight_decay=WD), model)
    ref["ssse_lko"] = flat(ssse.ssse_update(model, LOSS, rem(REMOVED_1), inv_fisher=inv,
                                            epsilon=EPS, n_total=N, weight_decay=WD,
                                            fisher="leave_k_out"), model)
    kept = [i for i in range(N) if i not in REMOVED_1]
    ref["ssse_retained"] = flat(ssse.ssse_update(model, LOSS, rem(REMOVED_1), inv_fisher=inv,
                                                 epsilon=EPS, n_total=N, weight_decay=WD,
                                                 gradient="retained", retained=rem(kept)),
                                model)
    inv_g = ssse.fit_inverse_fisher(model, LOSS, data, damping=WD, weight_decay=WD,
                                    curvature="ggn", progress=False, **LAYOUT)
    ref["newton"] = flat(ssse.newton_erase(model, LOSS, rem(REMOVED_1), inv_fisher=inv_g,
                                           n_total=N, weight_decay=WD), model)
    er = ssse.Eraser(model, LOSS, damping=DAMPING, weight_decay=WD, **LAYOUT).fit(data)
    ref["eraser_1"] = flat(er.erase(rem(REMOVED_1), epsilon=EPS), model)
    ref["eraser_2"] = flat(er.erase(rem(REMOVED_2), epsilon=EPS, fisher="leave_k_out"), model)
    ref["eraser_inv"] = er.inv_fisher.dense()
    eg = ssse.Eraser(model, LOSS, damping=WD, weight_decay=WD, curvature="ggn", **LAYOUT)
    eg.fit(data)
    ref["newton_1"] = flat(eg.erase(rem(REMOVED_1)), model)
    ref["newton_2"] = flat(eg.erase(rem(REMOVED_2), epsilon=EPS), model)
    few = ssse.Eraser(model, LOSS, damping=DAMPING, weight_decay=WD, layout="fixed",
                      block_size=10).fit(data)
    few.erase(rem(REMOVED_1), epsilon=EPS)
    ref["few_1"] = flat(few.erase(rem(REMOVED_2), epsilon=EPS), model)
    ref["numel"] = [s * s for s in inv.layout.sizes]
    return ref


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The scenario on 2 ranks, then on 3 (re-sharding the 2-rank save, and loading a copy of
    it without rank 1's shard)."""
    out = tmp_path_factory.mktemp("dist")
    two, codes2 = spawn("scenario", 2, out)
    saved = out / "save2" / "inverse_fisher.index.json"
    gone = out / "missing"
    shutil.copytree(saved.parent, gone)
    entry = json.loads(saved.read_text())["shards"][1]
    (gone / entry["file"]).unlink()
    three, codes3 = spawn("scenario", 3, out, {"reshard_from": str(saved),
                                               "missing": str(gone / saved.name)})
    return {2: (two, codes2), 3: (three, codes3), "ref": single_process(), "out": out}


def check_completed(results: list, codes: list) -> None:
    """Every rank of a :func:`spawn` wrote its results without a crash and exited with 0."""
    for r, res in enumerate(results):
        assert res is not None and "crash" not in res, (r, res and res.get("crash"))
    assert codes == [0] * len(results)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_completes(runs, world):
    check_completed(*runs[world])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("key", ["fit_a", "fit_b"])
def test_the_sharded_inverse_equals_the_single_process_one(runs, world, key):
    results, _ = runs[world]
    assert len(set(results[0]["bounds"])) == world + 1  # every rank owns blocks
    for res in results:
        assert rel_err(res[key], runs["ref"]["fit"]) <= STABLE[torch.float64]


@pytest.mark.parametrize("world", [2, 3])
def test_the_float32_sharded_inverse_equals_the_single_process_one(runs, world):
    for res in runs[world][0]:
        assert res["fit_f32"].dtype == torch.float32
        assert rel_err(res["fit_f32"], runs["ref"]["fit_f32"]) <= STABLE[torch.float32]


@pytest.mark.parametrize("world", [2, 3])
def test_the_exchanges_account_for_their_bytes_and_memory(runs, world):
    results, _ = runs[world]
    numel = runs["ref"]["numel"]
    bounds = results[0]["bounds"]
    for r, res in enumerate(results):
        a, b = res["stats_a"], res["stats_b"]
        own = sum(numel[bounds[r]:bounds[r + 1]])
        assert (a["exchange"], b["exchange"]) == ("reduce_scatter", "all_to_all")
        assert a["accumulator_bytes"] == 8 * sum(numel)      # all blocks: d B
        assert b["accumulator_bytes"] == 8 * own             # this rank's blocks: d B / P
        # (a) sends this rank's sums of the others' blocks; (b) the others' columns of its rows
        assert a["bytes_sent"] == 8 * (sum(numel) - own)
        lo, hi = _share(N, r, world)
        sizes = _sizes(numel)
        width = sum(sizes[bounds[r]:bounds[r + 1]])
        assert b["bytes_sent"] == 8 * (hi - lo) * (sum(sizes) - width)
        assert a["rows"] == b["rows"] == N


@pytest.mark.parametrize("world", [2, 3])
def test_auto_takes_the_reduce_scatter_when_it_fits_and_sends_less(runs, world):
    assert {res["auto"] for res in runs[world][0]} == {"reduce_scatter"}


@pytest.mark.parametrize("requested, size, fits, rows, expected", [
    ("auto", 2, True, None, "reduce_scatter"),     # a training set of unknown size: large
    ("auto", 2, True, 10_000, "reduce_scatter"),   # 8 numel P < n d e
    ("auto", 2, True, 100, "all_to_all"),          # few rows: their slices are fewer bytes
    ("auto", 2, False, 10_000, "all_to_all"),      # the accumulators do not fit everywhere
    ("auto", 1, True, 10_000, "all_to_all"),       # one rank: nothing to exchange
    ("reduce_scatter", 2, False, 100, "reduce_scatter"),
])
def test_the_exchange_auto_stands_for(requested, size, fits, rows, expected):
    # d = 1024 in blocks of 256 (numel = 1024 * 256), float32: the crossover is 8 B P / 4 rows
    assert choose_exchange(requested, size, fits, rows, 1024 * 256, 1024, 4) == expected
    if requested == "auto" and fits and size == 2 and rows:
        assert (expected == "reduce_scatter") == (rows > 8 * 256 * size / 4)


def _share(n, rank, world):
    lo = rank * (n // world) + min(rank, n % world)
    return lo, lo + n // world + (rank < n % world)


def _sizes(numel):
    return [int(round(v ** 0.5)) for v in numel]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("key", ["ssse_full", "ssse_lko", "ssse_retained", "newton",
                                 "eraser_1", "eraser_2", "newton_1", "newton_2"])
def test_the_erased_model_equals_the_single_process_one_with_the_same_bits_on_every_rank(
        runs, world, key):
    results, _ = runs[world]
    for res in results:
        assert torch.equal(res[key], results[0][key])
    assert rel_err(results[0][key], runs["ref"][key]) <= SOLVE[torch.float64]
    assert not torch.equal(results[0][key], flat(problem()[2].state_dict(), problem()[2]))


def test_sequential_requests_work_with_more_ranks_than_blocks(runs):
    results, _ = runs[3]
    assert [res["few_blocks"] for res in results] == [(0, 1), (1, 2), (2, 2)]
    for res in results:
        assert torch.equal(res["few_1"], results[0]["few_1"])
    assert rel_err(results[0]["few_1"], runs["ref"]["few_1"]) <= SOLVE[torch.float64]


@pytest.mark.parametrize("world", [2, 3])
def test_sequential_requests_downdate_the_sharded_inverse(runs, world):
    for res in runs[world][0]:
        assert rel_err(res["eraser_inv"], runs["ref"]["eraser_inv"]) <= SOLVE[torch.float64]
    assert rel_err(runs["ref"]["eraser_inv"], runs["ref"]["fit"]) > 1e-3


@pytest.mark.parametrize("world", [2, 3])
def test_a_sharded_eraser_restored_from_its_saved_state_carries_on_as_the_original(runs, world):
    for res in runs[world][0]:
        assert torch.equal(res["restored_2"], res["eraser_2"])
        assert torch.equal(res["restored_inv"], res["eraser_inv"])


@pytest.mark.parametrize("world", [2, 3])
def test_a_failed_request_changes_nothing_on_any_rank(runs, world):
    results, _ = runs[world]
    kinds = {res["eraser_bad"][0] for res in results}
    assert None not in [res["eraser_bad"] for res in results]
    assert "NotPositiveDefiniteError" in kinds or all(
        "NotPositiveDefiniteError" in res["eraser_bad"][1] for res in results)
    for res in results:
        if res["eraser_bad"][0] == "DistributedError":
            assert "failed in the erasure" in res["eraser_bad"][1]
        assert res["eraser_unchanged"]


@pytest.mark.parametrize("world", [2, 3])
def test_save_and_load_on_the_same_world_size(runs, world):
    results, _ = runs[world]
    out = runs["out"] / f"save{world}"
    index = json.loads((out / "inverse_fisher.index.json").read_text())
    assert index["world_size"] == world and index["owners"] == list(results[0]["bounds"])
    assert index["meta"] == {"note": world}
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([e["file"] for e in index["shards"]] + ["inverse_fisher.index.json"])
    for res in results:
        assert torch.equal(res["reload"], res["fit_b"])


def test_loading_on_another_world_size_reshards(runs):
    results, _ = runs[3]
    for res in results:
        assert torch.equal(res["resharded"], runs[2][0][0]["fit_b"])
        assert res["resharded_bounds"] == res["bounds"]  # balanced for 3, not the saved 2


def test_a_missing_shard_is_refused_on_every_rank_naming_the_rank(runs):
    for res in runs[3][0]:
        kind, text = res["missing"]
        assert kind == "FileNotFoundError"
        assert "shard of rank 1" in text and "rank00001-of-00002" in text


# ---- failures: a rank that raises, dies or hangs -------------------------------------------------

class Failing:
    """The cross-entropy loss, failing at its ``at``-th call with ``action``."""

    def __init__(self, at: int, action: str):
        self.calls, self.at, self.action = 0, at, action

    def __call__(self, out, y):
        self.calls += 1
        if self.calls == self.at:
            if self.action == "raise":
                raise ValueError("the loss failed on purpose")
            if self.action == "die":
                os._exit(3)
            time.sleep(600)  # hang
        return LOSS(out, y)


def failures(rank, world, out: Path, opts, res):
    X, y, model = problem()
    share = list(ssse.comm.TorchComm().share(N))
    mine = [(X[share], y[share])]
    # the groups' timeouts bound the collectives (and the wait at exit for gloo's pending
    # operation after one failed)
    g02 = dist.new_group([0, 2], timeout=datetime.timedelta(seconds=60))
    g01 = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=HANG_TIMEOUT))

    def fit(loss, group=None, timeout=None, exchange="auto"):
        try:
            ssse.fit_inverse_fisher(model, loss, mine, damping=DAMPING, chunk_size=3, **LAYOUT,
                                    comm=ssse.comm.TorchComm(group, timeout, exchange))
            return None
        except Exception as exc:
            return _error(exc)

    for exchange in ("all_to_all", "reduce_scatter"):
        res[f"raise_{exchange}"] = fit(Failing(2, "raise") if rank == 1 else LOSS,
                                       exchange=exchange, timeout=60)
    torch.save(res, out / f"failures-{rank}.pt")  # rank 1 will hang below
    # rank 2 dies mid-fit: its partner, rank 0, must raise
    if rank in (0, 2):
        res["die"] = fit(Failing(2, "die") if rank == 2 else LOSS, group=g02,
                         exchange="all_to_all")
    # rank 1 hangs mid-fit: its partner, rank 0, must raise after the timeout
    if rank in (0, 1):
        res["hang"] = fit(Failing(2, "hang") if rank == 1 else LOSS, group=g01,
                          exchange="all_to_all")


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    out = tmp_path_factory.mktemp("fail")
    return spawn("failures", 3, out, kill_after=[1])


@pytest.mark.parametrize("exchange", ["all_to_all", "reduce_scatter"])
def test_a_rank_that_raises_mid_fit_makes_every_rank_raise_naming_it(failed, exchange):
    results, _ = failed
    key = f"raise_{exchange}"
    assert results[1][key] == ("ValueError", "the loss failed on purpose")
    for r in (0, 2):
        kind, text = results[r][key]
        assert kind == "DistributedError"
        assert f"rank {r} of 3: rank 1 failed in fit_inverse_fisher" in text
        assert "the loss failed on purpose" in text


def test_a_rank_that_dies_mid_fit_makes_its_partners_raise(failed):
    results, codes = failed
    assert codes[2] == 3 and "crash" not in results[0]
    kind, text = results[0]["die"]
    assert kind == "DistributedError" and "rank 0 of 2" in text and "exited" in text


def test_a_rank_that_hangs_mid_fit_makes_its_partners_raise_at_the_timeout(failed):
    results, codes = failed
    assert codes[0] == 0
    kind, text = results[0]["hang"]
    assert kind == "DistributedError" and f"timeout of {HANG_TIMEOUT:g} s" in text


def test_the_watchdog_ends_a_process_stuck_past_its_timeout():
    calls = []
    dog = ssse.comm.Watchdog(grace=0.05, exit_fn=calls.append, poll=0.02)
    token = dog.enter("a collective that finished", 0.05)
    dog.leave(token)
    dog.enter("a collective that never returns", 0.05)
    for _ in range(500):
        if calls:
            break
        time.sleep(0.02)
    assert calls == [ssse.comm.WATCHDOG_EXIT_CODE]


def test_the_watchdog_leaves_collectives_that_return_alone():
    calls = []
    dog = ssse.comm.Watchdog(grace=0.05, exit_fn=calls.append, poll=0.01)
    for _ in range(20):
        dog.leave(dog.enter("a quick collective", 0.05))
    time.sleep(0.3)
    assert calls == []


# ---- the backend's references to the tensors of collectives -------------------------------------

RELEASE_ROUNDS = 300


def releases(rank, world, out: Path, opts, res):
    """Collectives whose tensors the caller drops as soon as they return."""
    comm = ssse.comm.TorchComm()
    kept = 0
    for i in range(RELEASE_ROUNDS):
        buf = torch.full((8,), float(rank + i))
        comm._run("a collective", dist.all_reduce, buf)
        dropped = weakref.ref(buf)
        del buf
        kept += dropped() is not None
    res["kept"] = kept
    res["held"] = len(IN_FLIGHT)


def last_collectives(rank, world):
    """Collectives of every kind with their results dropped, then the process exits with the
    group still open (as a script that never closes it)."""
    comm = ssse.comm.TorchComm()
    sharding = ssse.sharding.Sharding.balanced(BlockLayout.fixed(8, 4), world)
    for i in range(30):
        comm.ints([rank, i], "the last collectives")
        comm.all_reduce_sum(torch.full((4,), float(i)), "the last collectives")
        comm.broadcast(torch.full((3,), float(rank)), 0, "the last collectives")
        comm.all_to_all_rows(torch.ones(2, 8), sharding, [2] * world, "the last collectives")


def test_a_collective_returns_with_its_tensors_free_and_every_rank_exits_cleanly(tmp_path):
    # The backend drops its references on its own thread after the wait returns; when that
    # is the last reference besides Python's, that thread needs the GIL, and if the
    # interpreter is finalising by then the process aborts. A tensor dropped right after a
    # collective must be freed at once, and ranks that exit right after collectives, without
    # closing the group, must exit with status 0.
    for attempt in range(2):
        out = tmp_path / str(attempt)
        out.mkdir()
        results, codes = spawn("releases", 2, out, {"then": "last_collectives"})
        for res in results:
            assert res is not None and "crash" not in res, res and res.get("crash")
            assert res["kept"] == 0 and res["held"] == 0, res
        assert codes == [0, 0]


def test_a_hold_outlives_the_interpreter_while_the_backend_references_its_tensors():
    dropped = []
    for backend_lets_go in (True, False):
        flight = InFlight()
        t = torch.ones(3)
        held = flight.hold([t, [t.reshape(-1)], 7])
        backend = torch.ScriptList([t])  # a reference such as a backend's worker holds
        assert not held.released() and flight.drop_released() == 1
        if backend_lets_go:
            backend = None
            assert flight.wait(held, 1.0) and len(flight) == 0
        flight._at_exit()  # the exit functions run
        ref = weakref.ref(t)
        del t, held
        backend = None  # the backend lets go only now, during finalisation
        dropped.append(ref() is None)
    assert dropped == [True, False]


# ---- one process (no process group) -------------------------------------------------------------

def test_one_process_without_a_group_equals_the_single_process_fit():
    X, y, model = problem()
    ref = ssse.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING, weight_decay=WD,
                                  progress=False, **LAYOUT)
    for exchange in ("reduce_scatter", "all_to_all", "auto"):
        with pytest.warns(DeprecationWarning, match=r"ssse\.distributed\.fit_inverse_fisher is "
                          r"deprecated .*: use ssse\.fit_inverse_fisher\(\.\.\., comm=comm\)"):
            inv = D.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING, weight_decay=WD,
                                       chunk_size=7, exchange=exchange, **LAYOUT)
        assert inv.world_size == 1 and inv.block_range == (0, 5)
        assert rel_err(inv.gather().dense(), ref.dense()) <= STABLE[torch.float64]
        assert inv.fit_stats["bytes_sent"] == 0


def test_save_load_round_trip_and_a_changed_shard_is_refused(tmp_path):
    X, y, model = problem()
    inv = ssse.sharding.ShardedInverseFisher.from_full(
        ssse.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING, progress=False,
                                **LAYOUT))
    index = tmp_path / "inv.index.json"
    ssse.sharding.save_sharded(index, inv)
    first = json.loads(index.read_text())["shards"][0]["file"]
    ssse.sharding.save_sharded(index, inv)  # a second save replaces the first one's shard
    shards = [p.name for p in tmp_path.glob("*.safetensors")]
    assert len(shards) == 1 and shards[0] != first
    assert ssse.sharding.is_index(index) and not ssse.sharding.is_index(tmp_path / shards[0])
    back, meta = ssse.sharding.load_sharded(index, dtype=torch.float32)
    assert meta == {} and back.dtype == torch.float32
    assert rel_err(back.gather().dense(), inv.gather().dense()) <= STABLE[torch.float32]
    data = bytearray((tmp_path / shards[0]).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / shards[0]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard of rank 0 .* does not match its fingerprint"):
        ssse.sharding.load_sharded(index)


def test_a_missing_shard_is_refused_naming_the_rank_in_one_process(runs, tmp_path):
    saved = runs["out"] / "save3"
    shutil.copytree(saved, tmp_path / "s")
    index = tmp_path / "s" / "inverse_fisher.index.json"
    entry = json.loads(index.read_text())["shards"][2]
    (tmp_path / "s" / entry["file"]).unlink()
    with pytest.raises(FileNotFoundError, match="the shard of rank 2 of the saved inverse is "
                                                "missing"):
        ssse.sharding.load_sharded(index)
    whole = ssse.sharding.load_sharded(saved / "inverse_fisher.index.json")[0].gather()
    assert torch.equal(whole.dense(), runs[3][0][0]["fit_b"])


def test_restore_takes_comm_as_the_constructor_does(tmp_path):
    X, y, model = problem()
    er = ssse.Eraser(model, LOSS, damping=DAMPING, weight_decay=WD, **LAYOUT).fit([(X, y)])
    star = flat(model.state_dict(), model)
    state_1 = er.erase([(X[REMOVED_1], y[REMOVED_1])], epsilon=EPS)
    model_1 = copy.deepcopy(model)
    model_1.load_state_dict(state_1)
    # one process: the local path, carrying on as the original Eraser
    again = ssse.Eraser.restore(model_1, LOSS, er.inv_fisher.clone(), n=er.n, theta_star=star,
                                weight_decay=WD, comm=ssse.comm.Comm())
    assert again.comm is None and again.n == er.n
    removed = [(X[REMOVED_2], y[REMOVED_2])]
    assert torch.equal(flat(again.erase(removed, epsilon=EPS), model),
                       flat(er.erase(removed, epsilon=EPS), model))
    assert torch.equal(again.inv_fisher.dense(), er.inv_fisher.dense())
    with pytest.raises(TypeError, match="inv_fisher must be a ssse_ext.BlockInverseFisher, got "
                                        "ShardedInverseFisher"):
        ssse.Eraser.restore(model, LOSS, ssse.sharding.ShardedInverseFisher.from_full(
            er.inv_fisher), n=N, comm=ssse.comm.Comm())
    with pytest.raises(TypeError, match="comm must be a ssse.comm.Comm"):
        ssse.Eraser.restore(model, LOSS, er.inv_fisher, n=N, comm=object())
    # rank 0 of two (no collective runs while restoring): the sharded Eraser
    two = ssse.comm.Comm()
    two.size = 2
    part = ssse.sharding.ShardedInverseFisher.from_full(er.inv_fisher, comm=two)
    sharded = ssse.Eraser.restore(model_1, LOSS, part, n=er.n, theta_star=star,
                                  weight_decay=WD, comm=two)
    assert sharded.comm is two and sharded.inv_fisher is part and sharded.n == er.n
    assert torch.equal(sharded.theta, flat(state_1, model))
    assert (sharded.layout, sharded.damping) == (er.inv_fisher.layout, DAMPING)
    for kwargs, kind, text in [
            (dict(inv_fisher=er.inv_fisher), TypeError,
             "inv_fisher must be a ShardedInverseFisher, got BlockInverseFisher"),
            (dict(train_ids=range(N)), ValueError, "train_ids and erased are not offered by an "
                                                   "Eraser over several processes"),
            (dict(erased=[3]), ValueError, "train_ids and erased are not offered"),
            (dict(ledger=str(tmp_path / "ledger.jsonl")), ValueError,
             "ledger is not offered by an Eraser over several processes")]:
        with pytest.raises(kind, match=text):
            ssse.Eraser.restore(model_1, LOSS, **{"inv_fisher": part, "n": er.n, "comm": two,
                                                  **kwargs})
    assert not (tmp_path / "ledger.jsonl").exists()


def test_from_full_keeps_this_ranks_blocks():
    X, y, model = problem()
    inv = ssse.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING, progress=False,
                                  **LAYOUT)
    part = ssse.sharding.ShardedInverseFisher.from_full(inv)
    assert torch.equal(part.gather().dense(), inv.dense())


# ---- the partition and the arguments ------------------------------------------------------------

def _best(costs, parts):
    """The smallest largest cost of ``parts`` consecutive ranges (brute force)."""
    from itertools import combinations
    n, best = len(costs), float("inf")
    for cuts in combinations(range(1, n), min(parts, n) - 1):
        b = (0,) + cuts + (n,)
        best = min(best, max(sum(costs[i:j]) for i, j in zip(b, b[1:])))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_balanced_sharding_minimises_the_largest_cost(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 20, (int(torch.randint(1, 9, (1,), generator=g)),),
                          generator=g).tolist()
    layout = BlockLayout.from_dict({"dim": sum(sizes), "sizes": sizes})
    for world in (1, 2, 3, 5):
        sh = ssse.sharding.Sharding.balanced(layout, world)
        costs = [sh.numel(r) for r in range(world)]
        assert sum(costs) == layout.numel and sh.world_size == world
        assert max(costs) == _best([s * s for s in sizes], world)
        assert all(sh.blocks(r)[1] > sh.blocks(r)[0] for r in range(min(world, len(sizes))))
        for r in range(world):
            cols = sh.columns(r)
            assert sh.width(r) == cols.stop - cols.start == sum(sh.sub_layout(r).sizes)
            for b in range(*sh.blocks(r)):
                assert sh.owner(b) == r


def test_share_splits_the_items_in_rank_order():
    assert list(ssse.comm.Comm().share(7)) == list(range(7))
    with pytest.warns(DeprecationWarning, match=r"use comm\.share\(n\)"):
        assert list(D.share(7)) == list(range(7))
    assert [_share(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


@pytest.mark.parametrize("call, kind, text", [
    (lambda: ssse.sharding.Sharding.balanced(BlockLayout.fixed(8, 4), 0), ValueError,
     "world_size must be"),
    (lambda: ssse.sharding.Sharding(BlockLayout.fixed(8, 4), (0, 3)), ValueError,
     r"bounds must rise from 0 to the layout's 2 blocks .* got \[0, 3\]"),
    (lambda: ssse.sharding.Sharding.balanced(BlockLayout.fixed(8, 4), 2).blocks(2), ValueError,
     r"rank must be in \[0, 2\), got 2"),
    (lambda: ssse.comm.TorchComm(exchange="ring"), ValueError, "exchange must be one of"),
    (lambda: ssse.comm.TorchComm(timeout=-1), ValueError, "timeout must be"),
    (lambda: ssse.fit_inverse_fisher(problem()[2], LOSS, [], damping=DAMPING, comm=object()),
     TypeError, "comm must be a ssse.comm.Comm"),
    (lambda: D.fit_inverse_fisher(problem()[2], LOSS, [], damping=DAMPING), ValueError,
     "data is empty on every rank"),
    (lambda: D.ssse_update(problem()[2], LOSS, [], inv_fisher="x", epsilon=1.0, n_total=3),
     TypeError, "inv_fisher must be a ShardedInverseFisher, got str"),
    (lambda: ssse.sharding.load_sharded("/nonexistent/x.index.json"), FileNotFoundError,
     "no such inverse-Fisher index"),
    (lambda: ssse.comm.init(), RuntimeError, "needs the environment of a launcher"),
])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the shim shards one process too
def test_arguments_are_checked_with_named_messages(call, kind, text, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(kind, match=text):
        call()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_empty_removal_on_every_rank_is_refused():
    X, y, model = problem()
    inv = D.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING, **LAYOUT)
    with pytest.raises(ValueError, match="removed is empty on every rank"):
        D.ssse_update(model, LOSS, [], inv_fisher=inv, epsilon=1.0, n_total=N)
    er = D.Eraser(model, LOSS, damping=DAMPING, **LAYOUT).fit([(X, y)])
    with pytest.raises(ValueError, match=f"removed has {N} samples.*, but only {N} remain"):
        er.erase([(X, y)], epsilon=1.0)


# ---- the command under torchrun ----------------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """A model trained and erased with ``ssse`` in one process, and with ``torchrun
    --nproc-per-node=2 -m ssse`` (the Gauss-Newton inverse and the Newton erasure)."""
    from ssse.cli import main

    d = tmp_path_factory.mktemp("cli")
    model = str(d / "model.safetensors")
    fit = ["--layout", "fixed", "--block-size", "100", "--curvature", "ggn", "--quiet"]
    erase = ["--indices", "0-9,42", "--quiet"]
    assert main(["train", "--data", "digits", "--train-limit", "120", "--out", str(d),
                 "--quiet"]) == 0
    assert main(["fisher", "--model", model, *fit, "--out", str(d / "one")]) == 0
    assert main(["erase", "--model", model, "--fisher",
                 str(d / "one" / "inverse_fisher.safetensors"), *erase,
                 "--out", str(d / "one")]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", "-m", "ssse"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run(torchrun + argv, capture_output=True, text=True, env=env,
                           timeout=JOIN_TIMEOUT) for argv in (
        ["fisher", "--model", model, *fit, "--exchange", "all_to_all", "--out", str(d / "two")],
        ["erase", "--model", model, "--fisher", str(d / "two" / "inverse_fisher.index.json"),
         *erase, "--out", str(d / "two")])]
    return d, runs


def test_torchrun_fits_and_erases_like_one_process(cli_runs):
    d, (fit, erase) = cli_runs
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert erase.returncode == 0, erase.stderr[-3000:]
    assert "on 2 ranks" in fit.stdout and "erased 11 of 120 samples" in erase.stdout
    index = json.loads((d / "two" / "inverse_fisher.index.json").read_text())
    assert index["world_size"] == 2 and index["meta"]["n_train"] == 120
    inv, _ = ssse.sharding.load_sharded(d / "two" / "inverse_fisher.index.json")
    one, _ = load_inverse_fisher(d / "one" / "inverse_fisher.safetensors")
    assert rel_err(inv.gather().dense(), one.dense()) <= STABLE[torch.float64]
    original, _ = load_model(d / "model.safetensors")
    single, _ = load_model(d / "one" / "erased.safetensors")
    sharded, meta = load_model(d / "two" / "erased.safetensors")
    assert meta["erased"] == list(range(10)) + [42]
    flat_of = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa
    assert rel_err(flat_of(sharded), flat_of(single)) <= SOLVE[torch.float64]
    assert rel_err(flat_of(single), flat_of(original)) > 1e-4


@pytest.mark.parametrize("extra, text", [
    (["erase", "--ledger", "LEDGER", "--indices", "1"], "--ledger: requests are served by one "
     "process"),
    (["fisher", "--checkpoint", "CKPT"], "--checkpoint: the sharded fit under torchrun is not "
     "resumable"),
    (["fisher", "--representation", "dual"], "--representation dual: the sharded fit under "
     "torchrun stores dense blocks"),
])
def test_the_command_refuses_what_it_cannot_shard(cli_runs, extra, text, monkeypatch, capsys):
    import socket

    from ssse.cli import main

    d, _ = cli_runs
    with socket.socket() as s:  # a world of one rank, in this process
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        monkeypatch.setenv(key, value)
    model = d / "model.safetensors"
    before = model.read_bytes()
    command, *rest = extra
    rest = [str(d / "refused.jsonl") if a == "LEDGER" else str(d / "ckpt") if a == "CKPT"
            else a for a in rest]
    fisher = ["--fisher", str(d / "one" / "inverse_fisher.safetensors")] \
        if command == "erase" else []
    assert main([command, "--model", str(model), *fisher, *rest, "--quiet",
                 "--out", str(d / "refused")]) == 2
    assert text in capsys.readouterr().err
    assert not dist.is_initialized()  # the process group is closed on the way out
    assert model.read_bytes() == before and not (d / "refused.jsonl").exists()
    assert not (d / "ckpt").exists()
