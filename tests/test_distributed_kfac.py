"""The Kronecker-factored curvatures over several processes (gloo on CPU): with 2 and 3 ranks
the sharded fit, the erasures (SSSE, the Newton step, an Eraser's requests) and the saved
files give the single-process results; what is not offered is refused in one line on every
rank. Also, in one process, the side payloads' summing protocol that carries the factor sums
to the owners of their blocks."""

from __future__ import annotations

import os
import shutil

import torch
import pytest
from torch import nn

import ssse
import ssse.comm
import ssse.sharded_side
import ssse.sharding
from ssse.partition import Sharding
from ssse.curvature import unregister_curvature
from ssse.curvature.kfac import ekfac
from ssse_ext import BlockLayout
from ssse_ext.blocks import get_store
from ssse_ext.budget import AVAILABLE_MEMORY_ENV
from ssse_ext.blocks.kronecker import KroneckerFactors
from ssse_ext.side import side_type

from .test_distributed import check_completed, spawn
from .testing import SOLVE, rel_err

N, DAMPING, WD, EPS = 36, 0.1, 1e-2, 0.5
REMOVED_1 = [1, 7, 8, 20, 33]
REMOVED_2 = [3, 25, 30]
LOSS = nn.CrossEntropyLoss(reduction="none")
LAYOUT = dict(layout="per_parameter")  # blocks: W1 (20), b1 (4), W2 (12), b2 (3)
EXACT = "ekfac_exact_sharded"  # registered while the requests run
D = 39


def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    return X, y, model


class Elementwise(nn.Module):
    """Logits ``x[:, :3] * w + b``: no weight the Kronecker curvatures factor."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        return x[:, :3] * self.w + self.b


def probe_vectors():
    return torch.randn(D, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def flat(state, model):
    return torch.cat([state[k].reshape(-1) for k, _ in model.named_parameters()])


def requests(model, X, y, share, comm, res, out=None):
    """Everything compared between the ranks and one process (``share``: this rank's samples;
    ``comm`` None in one process)."""
    V = probe_vectors()

    def mine(idx):
        idx = [i for i in idx if i in share]
        return [(X[idx], y[idx])]

    data = mine(range(N))
    for curvature in ("kfac", "ekfac", "ekfac_ggn"):
        inv = ssse.fit_inverse_fisher(model, LOSS, data, damping=DAMPING, weight_decay=WD,
                                      curvature=curvature, chunk_size=5, progress=False,
                                      comm=comm, **LAYOUT)
        res[f"fit_{curvature}"] = inv.matvec(V)
    plain = Elementwise()  # nothing to factor: dense blocks of the rows, every exchange
    for exchange in ("reduce_scatter", "all_to_all"):
        other = None if comm is None else ssse.comm.TorchComm(exchange=exchange)
        res[f"plain_{exchange}"] = ssse.fit_inverse_fisher(
            plain, LOSS, data, damping=DAMPING, curvature="kfac", progress=False, comm=other,
            **LAYOUT).matvec(torch.eye(6, dtype=torch.float64))
    inv = ssse.fit_inverse_fisher(model, LOSS, data, damping=DAMPING, weight_decay=WD,
                                  curvature="ekfac", progress=False, comm=comm, **LAYOUT)
    res["ssse"] = flat(ssse.ssse_update(model, LOSS, mine(REMOVED_1), inv_fisher=inv,
                                        epsilon=EPS, n_total=N, weight_decay=WD, comm=comm),
                       model)
    ekfac(EXACT, refresh="exact")  # EK-FAC that keeps its blocks' rows: an owner holds its
    try:                           # columns of every rank's rows
        for curvature, eps in (("ekfac", EPS), (EXACT, EPS), ("kfac_ggn", None)):
            er = _requests_of(curvature, eps, model, data, mine, comm, res, out)
    finally:
        unregister_curvature(EXACT)
    return er


def _requests_of(curvature, eps, model, data, mine, comm, res, out):
    """Two requests to an Eraser with ``curvature``; returns the Eraser."""
    V = probe_vectors()
    er = ssse.Eraser(model, LOSS, damping=DAMPING if eps else WD, weight_decay=WD,
                     curvature=curvature, comm=comm, **LAYOUT).fit(data)
    res[f"{curvature}_1"] = flat(er.erase(mine(REMOVED_1), epsilon=eps), model)
    res[f"{curvature}_2"] = flat(er.erase(mine(REMOVED_2), epsilon=EPS,
                                          fisher="leave_k_out"), model)
    res[f"{curvature}_inv"] = er.inv_fisher.matvec(V)
    if out is not None:
        index = out / f"{curvature}{comm.size}" / "inverse_fisher.index.json"
        ssse.sharding.save_sharded(index, er.inv_fisher)
        back, _ = ssse.sharding.load_sharded(index, comm=comm)
        res[f"{curvature}_reload"] = back.matvec(V)
        res[f"{curvature}_index"] = str(index)
    return er


def kfac_scenario(rank, world, out, opts, res):
    X, y, model = problem()
    comm = ssse.comm.TorchComm()
    er = requests(model, X, y, comm.share(N), comm, res, out)
    res["stores"] = er.inv_fisher.local.representation
    res["bounds"] = er.inv_fisher.sharding.bounds
    whole = er.inv_fisher.gather()  # the whole inverse on every rank, blocks in their stores
    res["gather"] = whole.matvec(probe_vectors())
    res["gather_stores"] = whole.representation
    os.environ[AVAILABLE_MEMORY_ENV] = "1000"  # the states do not fit: refused on every rank
    try:
        res["gather_small"] = refusal(er.inv_fisher.gather)
    finally:
        del os.environ[AVAILABLE_MEMORY_ENV]
    res["reduce_scatter"] = refusal(lambda: ssse.fit_inverse_fisher(
        model, LOSS, [(X, y)], damping=DAMPING, curvature="kfac",
        comm=ssse.comm.TorchComm(exchange="reduce_scatter"), **LAYOUT))
    X, y, model = problem()  # from_full: each rank's blocks of one process's fit, in their
    whole = ssse.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING, weight_decay=WD,
                                    curvature="ekfac", progress=False, **LAYOUT)  # stores
    share = ssse.sharding.ShardedInverseFisher.from_full(whole, comm=comm)
    res["from_full_stores"] = share.local.representation
    mixed = ssse.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING, curvature="kfac",
                                    representation="gram", progress=False, **LAYOUT)
    res["from_full_gram"] = (mixed.representation, refusal(
        lambda: ssse.sharding.ShardedInverseFisher.from_full(mixed, comm=comm)))
    res["from_full"] = share.matvec(probe_vectors())
    removed = [i for i in REMOVED_1 if i in comm.share(N)]
    res["from_full_ssse"] = flat(ssse.ssse_update(
        model, LOSS, [(X[removed], y[removed])], inv_fisher=share, epsilon=EPS, n_total=N,
        weight_decay=WD, comm=comm), model)
    if "other_world" in opts:  # a save of 2 ranks, re-sharded onto these
        back, _ = ssse.sharding.load_sharded(opts["other_world"], comm=comm)
        res["other_world"] = back.matvec(probe_vectors())
        res["other_world_stores"] = back.local.representation
        res["other_world_bounds"] = back.sharding.bounds


def refusal(call):
    """``None`` when ``call()`` returns, else its exception's type name and message."""
    try:
        call()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_kfac")
    two, codes2 = spawn("tests.test_distributed_kfac:kfac_scenario", 2, out)
    saved = out / "kfac_ggn2" / "inverse_fisher.index.json"
    three, codes3 = spawn("tests.test_distributed_kfac:kfac_scenario", 3, out,
                          {"other_world": str(saved)})
    X, y, model = problem()
    ref: dict = {}
    requests(model, X, y, range(N), None, ref)
    one, _ = ssse.sharding.load_sharded(saved)  # the save of 2 ranks in this one process
    ref["one_process"] = one.gather().matvec(probe_vectors())
    ref["one_process_stores"] = one.local.representation
    return {2: (two, codes2), 3: (three, codes3), "ref": ref, "saved": saved}


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_completes(runs, world):
    check_completed(*runs[world])


@pytest.mark.parametrize("world", [2, 3])
def test_the_sharded_fit_and_requests_equal_one_process(runs, world):
    ref = runs["ref"]
    for res in runs[world][0]:
        for key in ("fit_kfac", "fit_ekfac", "fit_ekfac_ggn", "ssse", "ekfac_1", "ekfac_2",
                    "ekfac_inv", "kfac_ggn_1", "kfac_ggn_2", "kfac_ggn_inv",
                    "plain_reduce_scatter", "plain_all_to_all", f"{EXACT}_1", f"{EXACT}_2",
                    f"{EXACT}_inv"):
            assert rel_err(res[key], ref[key]) <= SOLVE[torch.float64], key
        for key in ("ekfac_reload", "kfac_ggn_reload", f"{EXACT}_reload"):  # bit for bit
            assert torch.equal(res[key], res[key.replace("reload", "inv")]), key


@pytest.mark.parametrize("world", [2, 3])
def test_from_full_keeps_each_block_in_its_store(runs, world):
    """A whole EK-FAC inverse shared by from_full over the ranks: each rank holds its blocks
    in their stores, and the SSSE step over the ranks is the one-process step."""
    ref = runs["ref"]
    stores = [res["from_full_stores"] for res in runs[world][0]]
    assert sum(names.count("ekfac") for names in stores) == 2
    for res in runs[world][0]:  # blocks that cannot be shared: refused alike on every rank
        assert res["from_full_gram"] == (("kfac", "gram", "kfac", "gram"), (
            "ValueError", "inv keeps blocks in the kfac store, whose changes read the rows' "
            "side payload, and in the gram store, whose blocks cannot be shared: fit with "
            "comm= instead"))
    for res in runs[world][0]:
        assert rel_err(res["from_full"], ref["fit_ekfac"]) <= SOLVE[torch.float64]
        assert rel_err(res["from_full_ssse"], ref["ssse"]) <= SOLVE[torch.float64]


def test_the_requests_change_the_kronecker_blocks(runs):
    """The owners downdate their Kronecker blocks (from the summed side payloads): the
    inverse after the requests is not the one fitted."""
    ref = runs["ref"]
    for res in runs[2][0]:
        assert rel_err(res["ekfac_inv"], ref["fit_ekfac"]) > 1e-3


@pytest.mark.parametrize("world", [2, 3])
def test_the_kronecker_blocks_are_owned_by_one_rank_each(runs, world):
    stores = [res["stores"] for res in runs[world][0]]
    assert sum(names.count("kfac") for names in stores) == 2
    assert any("kfac" not in names for names in stores) == (world == 3)


@pytest.mark.parametrize("world", [2, 3])
def test_what_is_not_offered_is_refused_in_one_line_on_every_rank(runs, world):
    for res in runs[world][0]:
        assert res["reduce_scatter"] == ("ValueError", "exchange='reduce_scatter' is not "
                                         "offered for curvature='kfac': its blocks are built by "
                                         "their owners from the rows' column slices (pass "
                                         "exchange='all_to_all' or 'auto')")


@pytest.mark.parametrize("world", [2, 3])
def test_gather_gives_every_rank_the_whole_inverse_in_its_stores(runs, world):
    """The Eraser's inverse after its requests (kfac_ggn; float64 blocks for the rest)."""
    for res in runs[world][0]:
        assert torch.equal(res["gather"], res["kfac_ggn_inv"])
        assert res["gather_stores"].count("kfac") == 2
        assert res["gather_stores"] == runs[world][0][0]["gather_stores"]
    kinds = [res["gather_small"][0] for res in runs[world][0]]
    assert set(kinds) <= {"InsufficientMemoryError", "DistributedError"} and \
        "InsufficientMemoryError" in kinds
    assert all("gather of the inverse" in res["gather_small"][1] for res in runs[world][0])


def test_a_kronecker_save_loads_on_another_number_of_ranks(runs):
    """The save of 2 ranks (its Kronecker blocks, the float64 blocks of the requests'
    representation) on 3 ranks and in one process: the inverse the 2 ranks held."""
    saved = runs[2][0][0]["kfac_ggn_inv"]
    stores = [res["other_world_stores"] for res in runs[3][0]]
    assert sum(names.count("kfac") for names in stores) == 2
    for res in runs[3][0]:
        assert rel_err(res["other_world"], saved) <= SOLVE[torch.float64]
        assert res["other_world_bounds"] == runs[3][0][0]["bounds"]  # balanced as the fit
    ref = runs["ref"]
    assert rel_err(ref["one_process"], saved) <= SOLVE[torch.float64]
    assert ref["one_process_stores"].count("kfac") == 2


def _copy_of_save(runs, tmp_path):
    src = runs["saved"].parent
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    index = tmp_path / runs["saved"].name
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) == 2
    return index, shards


def test_re_sharding_a_save_with_a_missing_or_damaged_shard_is_refused(runs, tmp_path):
    index, shards = _copy_of_save(runs, tmp_path)
    shards[1].write_bytes(shards[1].read_bytes()[:5])
    with pytest.raises(ValueError, match=r"the shard of rank 1 \(.*\) does not list its stores"):
        ssse.sharding.load_sharded(index)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match="the shard of rank 1 of the saved inverse is "
                                                "missing"):
        ssse.sharding.load_sharded(index)


def test_re_sharding_blocks_that_cannot_move_is_refused_in_one_line(runs, tmp_path):
    """A store that cannot give its blocks apart (here the header of rank 0's shard names the
    low-rank store) is refused before any shard is read."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index, shards = _copy_of_save(runs, tmp_path)
    with safe_open(str(shards[0]), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["ssse"] = meta["ssse"].replace('"name": "kfac"', '"name": "dual"')
    assert '"dual"' in meta["ssse"]
    save_file(tensors, str(shards[0]), metadata=meta)
    with pytest.raises(ValueError) as err:
        ssse.sharding.load_sharded(index)
    assert str(err.value) == (f"{index} keeps blocks in the dual store, whose blocks cannot "
                              f"move to another partition: load it on 2 ranks")


@pytest.mark.parametrize("world", [2, 3])
def test_the_blocks_are_balanced_by_their_stores_bytes(runs, world):
    """A Kronecker block costs its factors' bytes, not the s^2 of a dense block."""
    X, y, model = problem()
    inv = ssse.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING, curvature="kfac",
                                  progress=False, **LAYOUT)
    costs = [get_store(name).nbytes_for(s, None, torch.float64)
             for name, s in zip(inv.representation, inv.layout.sizes)]
    assert costs != [8 * s * s for s in inv.layout.sizes]
    expected = Sharding.balanced(inv.layout, world, costs)
    for res in runs[world][0]:
        assert res["bounds"] == expected.bounds


@pytest.mark.parametrize("seed", range(4))
def test_balanced_with_costs_minimises_the_largest_sum(seed):
    g = torch.Generator().manual_seed(seed)
    nb = int(torch.randint(1, 9, (1,), generator=g))
    sizes = torch.randint(1, 20, (nb,), generator=g).tolist()
    costs = torch.randint(0, 1000, (nb,), generator=g).tolist()
    layout = BlockLayout.from_dict({"dim": sum(sizes), "sizes": sizes})
    for world in (1, 2, 3, 5):
        sh = Sharding.balanced(layout, world, costs)
        largest = max(sum(costs[slice(*sh.blocks(r))]) for r in range(world))
        best = min(max(sum(costs[i:j]) for i, j in zip(b, b[1:]))
                   for b in _cuts(nb, world))
        assert largest == best


def _cuts(nb: int, world: int):
    """Every partition of ``nb`` blocks into ``world`` consecutive (possibly empty) ranges."""
    if world == 1:
        yield [0, nb]
        return
    for first in range(nb + 1):
        for rest in _cuts(nb - first, world - 1):
            yield [0] + [first + c for c in rest]


def test_balanced_refuses_costs_that_do_not_fit_the_layout():
    layout = BlockLayout.from_dict({"dim": 5, "sizes": [2, 3]})
    with pytest.raises(ValueError, match="costs must give the layout's 2 blocks"):
        Sharding.balanced(layout, 2, [1])
    with pytest.raises(ValueError, match="costs must give"):
        Sharding.balanced(layout, 2, [1, -1])


# ---- one process: the side payloads' protocol ----------------------------------------------

def _payload(seed: int, starts=(0, 30)) -> KroneckerFactors:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for start, (inn, out) in zip(starts, ((5, 4), (4, 3))):
        a = torch.randn(inn, inn, generator=g, dtype=torch.float64)
        s = torch.randn(out, out, generator=g, dtype=torch.float64)
        factors[start] = (a @ a.T, s @ s.T, start == 30)
    return KroneckerFactors(factors, refresh="exact", tolerance=0.125)


def test_zeros_from_the_skeleton_add_to_the_same_payload():
    p = _payload(0)
    zeros = side_type("kronecker").zeros(p.skeleton(), "cpu")
    assert zeros.options() == p.options()
    total = zeros + p
    assert [s for s, _ in total.parts()] == [0, 0, 30, 30]
    for (s0, t0), (s1, t1) in zip(total.parts(), p.parts()):
        assert s0 == s1 and torch.equal(t0, t1)
        assert t0.data_ptr() != t1.data_ptr()  # summed in place without touching the input


def test_restricted_keeps_the_blocks_of_the_columns_counted_from_their_start():
    p = _payload(1)
    cut = p.restricted(20, 39)
    assert list(cut.factors) == [10]
    assert torch.equal(cut.factors[10][0], p.factors[30][0]) and cut.factors[10][2] is True
    assert p.restricted(0, 20).factors.keys() == {0}


def test_a_payload_of_many_layers_travels_whole():
    """The skeleton of 150 factored weights is far longer than a short control message."""
    g = torch.Generator().manual_seed(3)
    factors = {10 * i: (torch.rand(3, 3, generator=g, dtype=torch.float64),
                        torch.rand(2, 2, generator=g, dtype=torch.float64), False)
               for i in range(150)}
    side = {"kronecker": KroneckerFactors(factors)}
    layout = BlockLayout.from_dict({"dim": 1500, "sizes": [10] * 150})
    got = ssse.sharded_side.owned_side(ssse.comm.Comm(), Sharding.balanced(layout, 1), side,
                                       "test")
    assert len(got["kronecker"].skeleton()["factors"]) == 150
    for (s0, t0), (s1, t1) in zip(got["kronecker"].parts(), side["kronecker"].parts()):
        assert s0 == s1 and torch.equal(t0, t1)


def test_one_process_owns_every_part_of_the_payload():
    side = {"kronecker": _payload(2)}
    sharding = Sharding.balanced(BlockLayout.from_dict({"dim": 42, "sizes": [20, 10, 12]}), 1)
    got = ssse.sharded_side.owned_side(ssse.comm.Comm(), sharding, side, "test")
    for (s0, t0), (s1, t1) in zip(got["kronecker"].parts(), side["kronecker"].parts()):
        assert s0 == s1 and torch.equal(t0, t1)
    assert ssse.sharded_side.owned_side(ssse.comm.Comm(), sharding, None, "test") is None


def test_one_process_holds_and_gives_back_the_whole_kronecker_inverse(tmp_path):
    X, y, model = problem()
    inv = ssse.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING, curvature="kfac",
                                  progress=False, **LAYOUT)
    one = ssse.sharding.ShardedInverseFisher.from_full(inv)
    V = probe_vectors()
    assert torch.equal(one.matvec(V), inv.matvec(V))
    assert torch.equal(one.gather().matvec(V), inv.matvec(V))
    index = ssse.sharding.save_sharded(tmp_path / "inv.index.json", one)
    again, _ = ssse.sharding.load_sharded(index)
    assert again.local.representation == inv.representation
    assert torch.equal(again.gather().matvec(V), inv.matvec(V))
