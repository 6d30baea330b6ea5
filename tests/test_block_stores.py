"""Every registered block store through the one protocol (ssse_ext.blocks.BlockStore), against
the float64 reference (ssse_ext/reference.py); and the extension point: a store defined in this
file only, registered, then built, applied, changed and saved through BlockInverseFisher."""

import itertools
import json
import math

import pytest
import torch

import ssse_ext
from ssse_ext import (BlockInverseFisher, BlockLayout, FisherConfig, NotPositiveDefiniteError,
                      RowNotFoundError, build_inverse_fisher, reference)
from ssse_ext.blocks import (BlockStore, BuildCost, ChangeFactors, StoreBuilder, choose_stores,
                             get_store, register_store, resolve_representation)
from ssse_ext.budget import AVAILABLE_MEMORY_ENV, check_memory
from ssse_ext.errors import InsufficientMemoryError
from ssse_ext.lowrank import checked_cholesky

from .testing import CHAIN, DEVICES, DTYPES, SOLVE, STABLE, rel_err


# ---- a store defined here: blocks kept exactly in float64 ------------------------------------

class Float64Store(BlockStore):
    r"""Each block's Fisher :math:`F_b` and its inverse, both in float64 whatever the dtype of
    the vectors: the few ill-conditioned blocks of a float32 inverse could live here. A change
    refactors :math:`F_b \pm R_b^\top R_b / N`, so it never drifts."""

    name = "float64"
    auto = False  # never smaller than dense: only chosen by name

    def __init__(self, layout, block_ids, fishers, *, dtype, device, damping, normalizer):
        super().__init__(layout, block_ids, damping=damping, normalizer=normalizer)
        self._dtype, self._device = dtype, torch.device(device)
        self.fishers = [f.to(device=self._device, dtype=torch.float64) for f in fishers]
        self.inverses = [torch.cholesky_inverse(torch.linalg.cholesky(f)) for f in self.fishers]

    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._device)
    nbytes = property(lambda self: 16 * sum(s * s for s in self.sizes))

    def apply_into(self, v, base, scale, out):
        for b, inv in zip(self.block_ids, self.inverses):
            sl = self.layout.slice(b)
            y = scale * (inv @ v[sl].to(torch.float64))
            out[sl] = (y if base is None else base[sl].to(torch.float64) + y).to(self.dtype)

    def dense_block(self, b):
        return self.inverses[self.position(b)].to(self.dtype)

    def _changed(self, rows, sign, shift, what):
        """Per block, the checked Cholesky factor of F_b + sign R_b^T R_b / N - shift I."""
        out = []
        for b, f in zip(self.block_ids, self.fishers):
            r = rows[:, self.layout.slice(b)].to(torch.float64)
            m = f + sign * r.T @ r / self.normalizer - \
                shift * torch.eye(f.shape[0], dtype=torch.float64, device=f.device)
            lf = torch.linalg.cholesky(f)
            # the pivots of L^-1 M L^-T measure M against F, as the margin means everywhere
            a = torch.linalg.solve_triangular(lf, torch.linalg.solve_triangular(
                lf, m, upper=False).T, upper=False)
            checked_cholesky((0.5 * (a + a.T))[None], what, self.layout, (b,))
            out.append((m, torch.linalg.cholesky(m)))
        return out

    def check_change(self, rows, sign, *, method, chunk_size, what):
        return self._changed(rows, sign, 0.0, what)

    def write(self, plan):
        self.fishers = [m for m, _ in plan]
        self.inverses = [torch.cholesky_inverse(c) for _, c in plan]

    def change_nbytes(self, k, *, method="woodbury", keep=False, shift=0.0):
        return 32 * max((s * s for s in self.sizes), default=0), self.nbytes

    def without(self, rows, sign, *, what):
        return _Float64Factors(self, [torch.cholesky_inverse(c)
                                      for _, c in self._changed(rows, sign, 0.0, what)])

    def solve_changed(self, rows, rhs, out, *, sign, shift, what):
        for b, (_, c) in zip(self.block_ids, self._changed(rows, sign, shift, what)):
            sl = self.layout.slice(b)
            out[sl] = torch.cholesky_solve(rhs[sl], c)

    def copy_nbytes(self, dtype=None):
        return self.nbytes

    def to(self, device=None, dtype=None, *, max_memory=None):
        check_memory("Float64Store.to", self.nbytes, device or self.device,
                     max_memory=max_memory)
        return Float64Store(self.layout, self.block_ids, [f.clone() for f in self.fishers],
                            dtype=dtype or self.dtype, device=device or self.device,
                            damping=self.damping, normalizer=self.normalizer)

    def clone(self, *, max_memory=None):
        return self.to(max_memory=max_memory)

    def state(self):
        return {f"fisher.{i}": f for i, f in enumerate(self.fishers)}, {}

    @classmethod
    def from_state(cls, tensors, meta, *, layout, block_ids, damping, normalizer, dtype):
        fishers = [tensors[f"fisher.{i}"] for i in range(len(block_ids))]
        return cls(layout, block_ids, fishers, dtype=dtype, device=fishers[0].device if fishers
                   else "cpu", damping=damping, normalizer=normalizer)

    @classmethod
    def nbytes_for(cls, size, rows, dtype):
        return 16 * size * size

    @classmethod
    def state_nbytes(cls, sizes, meta, dtype):
        return sum(16 * s * s for s in sizes)

    @classmethod
    def build_cost(cls, layout, block_ids, *, rows, dtype, device, method):
        held = sum(16 * layout.sizes[b] ** 2 for b in block_ids)
        return BuildCost(held // 2, held, held, f"{len(block_ids)} float64 blocks")

    @classmethod
    def builder(cls, layout, block_ids, *, dtype, device, method, damping, normalizer, rows,
                probe=None, max_memory=None):
        return _Float64Builder(layout, block_ids, dtype, device, damping, probe)


class _Float64Factors(ChangeFactors):
    def __init__(self, store, inverses):
        self.store, self.inverses = store, inverses

    def solve(self, v, out):
        for b, inv in zip(self.store.block_ids, self.inverses):
            out[self.store.layout.slice(b)] = inv @ v[self.store.layout.slice(b)]


class _Float64Builder(StoreBuilder):
    def __init__(self, layout, block_ids, dtype, device, damping, probe):
        self.layout, self.ids, self.dtype, self.device, self.damping, self.probe = \
            layout, tuple(block_ids), dtype, device, damping, probe
        self.grams = [torch.zeros(layout.sizes[b], layout.sizes[b], dtype=torch.float64,
                                  device=device) for b in self.ids]

    def add(self, rows):
        for b, g in zip(self.ids, self.grams):
            r = rows[:, self.layout.slice(b)].to(torch.float64)
            g += r.T @ r
        if self.probe is not None:
            self.probe.add(rows, blocks=self.ids)

    def finish(self, normalizer):
        fishers = [self.damping * torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
                   + g / normalizer for g in self.grams]
        return Float64Store(self.layout, self.ids, fishers, dtype=self.dtype,
                            device=self.device, damping=self.damping, normalizer=normalizer)


register_store(Float64Store)

# ---- the protocol suite, over every registered store ------------------------------------------

# the stores whose Fisher the rows define; those that read a side payload (the
# Kronecker-factored ones, tests/test_kfac.py) hold another matrix than the reference's
NAMES = [n for n in ssse_ext.STORES if not get_store(n).takes_side]
PRODUCT = list(itertools.product(NAMES, DTYPES, DEVICES))
LAYOUT = BlockLayout.fixed(37, 8)  # 8, 8, 8, 8 and a last block of 5
SUBSETS = {"all": None, "some": (0, 2, 4), "none": ()}
DAMPING, N_ROWS = 0.5, 6


def rows_of(n, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, LAYOUT.dim, generator=gen, dtype=torch.float64)).to(
        dtype).to(device)


def build(name, g, ids=None, normalizer=None, *, chunks=2):
    """A store of the blocks ``ids`` from the rows ``g``, through the protocol's builder."""
    cls = get_store(name)
    ids = tuple(range(LAYOUT.num_blocks)) if ids is None else ids
    builder = cls.builder(LAYOUT, ids, dtype=g.dtype, device=g.device, method=cls.methods[0],
                          damping=DAMPING, normalizer=None, rows=g.shape[0])
    for chunk in g.tensor_split(chunks):
        builder.add(chunk.contiguous())
    return builder.finish(float(normalizer or max(g.shape[0], 1)))


def ref_block(g, b, normalizer):
    return reference.closed_form_inverse(g[:, LAYOUT.slice(b)].double().cpu(), DAMPING,
                                         normalizer)


def assert_blocks(store, g, normalizer, tol):
    for b in store.block_ids:
        assert rel_err(store.dense_block(b), ref_block(g, b, normalizer)) <= tol, b


def snapshot(store):
    tensors, meta = store.state()
    return {k: t.clone() for k, t in tensors.items()}, json.loads(json.dumps(meta)), \
        [store.dense_block(b).clone() for b in store.block_ids]


def assert_unchanged(store, before):
    tensors, meta = store.state()
    assert meta == before[1] and tensors.keys() == before[0].keys()
    assert all(torch.equal(t, before[0][k]) for k, t in tensors.items())
    assert all(torch.equal(store.dense_block(b), blk)
               for b, blk in zip(store.block_ids, before[2]))


@pytest.mark.parametrize("name,dtype,device", PRODUCT)
@pytest.mark.parametrize("subset", sorted(SUBSETS))
def test_build_holds_the_reference_blocks(name, dtype, device, subset):
    g = rows_of(N_ROWS, dtype, device, 0)
    store = build(name, g, SUBSETS[subset])
    assert store.name == name and store.dtype == dtype and store.device == torch.device(device)
    assert store.block_ids == (SUBSETS[subset] if SUBSETS[subset] is not None
                               else tuple(range(5)))
    assert store.sizes == tuple(LAYOUT.sizes[b] for b in store.block_ids)
    assert_blocks(store, g, N_ROWS, STABLE[dtype])
    for b in store.block_ids:
        assert torch.equal(store.block(b), store.dense_block(b))
    cls = get_store(name)
    assert cls.build_cost(LAYOUT, store.block_ids, rows=N_ROWS, dtype=dtype,
                          device=torch.device(device), method=cls.methods[0]).stored == \
        store.nbytes
    assert cls.state_nbytes(store.sizes, store.state()[1], dtype) == store.nbytes
    if 1 not in store.block_ids:
        with pytest.raises(IndexError, match=f"not one of the {name} blocks"):
            store.dense_block(1)


@pytest.mark.parametrize("name,dtype,device", PRODUCT)
def test_no_rows_is_the_damping_alone(name, dtype, device):
    store = build(name, rows_of(0, dtype, device, 0))
    for b in store.block_ids:
        s = LAYOUT.sizes[b]
        assert rel_err(store.dense_block(b), torch.eye(s, dtype=torch.float64) / DAMPING) <= \
            STABLE[dtype]


@pytest.mark.parametrize("name,dtype,device", PRODUCT)
@pytest.mark.parametrize("r", [None, 0, 1, 3, 20])
def test_apply_writes_its_own_rows(name, dtype, device, r):
    g = rows_of(N_ROWS, dtype, device, 1)
    store = build(name, g, SUBSETS["some"])
    if r is None:
        v, theta = rows_of(2, dtype, device, 2)
    else:  # transposed: non-contiguous for r > 1
        v, theta = rows_of(r, dtype, device, 2).T, rows_of(r, dtype, device, 3).T
        assert r < 2 or not v.is_contiguous()
    out = torch.full(v.shape, 7.0, dtype=dtype, device=device)
    assert store.apply(v, base=theta, scale=-0.7, out=out) is out
    blocks = [ref_block(g, b, N_ROWS) if b in store.block_ids else None for b in range(5)]
    for b, blk in enumerate(blocks):
        sl = LAYOUT.slice(b)
        if blk is None:  # another store's rows: untouched
            assert torch.all(out[sl] == 7.0)
        else:
            want = theta[sl].double().cpu() - 0.7 * blk @ v[sl].double().cpu()
            assert rel_err(out[sl], want) <= SOLVE[dtype]
    fresh = store @ v  # a new tensor: zero outside the store's blocks
    assert fresh.shape == v.shape and torch.all(fresh[LAYOUT.slice(1)] == 0)
    with pytest.raises(ValueError, match="v must have shape"):
        store @ torch.ones(LAYOUT.dim + 1, dtype=dtype, device=device)


@pytest.mark.parametrize("name,dtype,device", PRODUCT)
@pytest.mark.parametrize("method,chunk", [("woodbury", None), ("woodbury", 1),
                                          ("sherman_morrison", 2)])
def test_changes_match_the_remaining_rows(name, dtype, device, method, chunk):
    g = rows_of(N_ROWS + 3, dtype, device, 4)
    store = build(name, g[:N_ROWS], normalizer=N_ROWS + 3)
    for sign, rows in ((+1, g[N_ROWS:]), (-1, g[:2])):
        plan = store.check_change(rows.contiguous(), sign, method=method, chunk_size=chunk,
                                  what="change")
        store.write(plan)
    assert_blocks(store, g[2:], N_ROWS + 3, CHAIN[dtype])


@pytest.mark.parametrize("name,dtype,device", PRODUCT)
def test_refusals_leave_the_store_bit_identical(name, dtype, device, monkeypatch):
    g = rows_of(N_ROWS, dtype, device, 5)
    store = build(name, g)
    before = snapshot(store)
    stranger = g[:2].clone()
    stranger[:, LAYOUT.slice(4)] = rows_of(2, dtype, device, 6, scale=50.0)[:, LAYOUT.slice(4)]
    with pytest.raises((NotPositiveDefiniteError, RowNotFoundError),
                       match=r"(?i)block 4 .*nothing was changed"):
        store.check_change(stranger, -1, method="woodbury", chunk_size=None, what="downdate")
    with pytest.raises(NotPositiveDefiniteError):
        store.without(stranger, -1, what="leave-k-out apply")
    assert_unchanged(store, before)
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, "16")
    other = torch.float64 if dtype == torch.float32 else torch.float32
    for copy in (store.clone, lambda: store.to(dtype=other)):
        with pytest.raises(InsufficientMemoryError):
            copy()
    assert_unchanged(store, before)
    monkeypatch.delenv(AVAILABLE_MEMORY_ENV)
    store.write(store.check_change(g[:2].contiguous(), -1, method="woodbury", chunk_size=None,
                                   what="downdate"))  # still usable
    assert_blocks(store, g[2:], N_ROWS, CHAIN[dtype])


@pytest.mark.parametrize("name,dtype,device", PRODUCT)
@pytest.mark.parametrize("sign", [-1, 1])
def test_without_and_solve_changed_in_float64(name, dtype, device, sign):
    g = rows_of(N_ROWS, dtype, device, 7)
    store = build(name, g, SUBSETS["some"])
    rows = (g[:3] if sign < 0 else rows_of(3, dtype, device, 8)).contiguous()
    v = rows_of(2, dtype, device, 9).T.contiguous()
    v64 = v.double()
    out = store.apply(v).double()  # F^{-1} v: what the factors start from
    work, kept = store.change_nbytes(3, keep=True)
    assert work >= 0 and kept >= 0
    store.without(rows, sign, what="test").solve(v64, out)
    shift = 0.05
    solved = torch.full_like(v64, 3.0)
    store.solve_changed(rows, v64, solved, sign=sign, shift=shift, what="test")
    r = rows.double().cpu()
    for b in range(LAYOUT.num_blocks):
        sl = LAYOUT.slice(b)
        if b not in store.block_ids:
            assert torch.all(solved[sl] == 3.0)
            continue
        fisher = torch.linalg.inv(ref_block(g, b, N_ROWS)) + sign * r[:, sl].T @ r[:, sl] / N_ROWS
        assert rel_err(out[sl], torch.linalg.solve(fisher, v64[sl].cpu())) <= SOLVE[dtype]
        shifted = fisher - shift * torch.eye(LAYOUT.sizes[b], dtype=torch.float64)
        assert rel_err(solved[sl], torch.linalg.solve(shifted, v64[sl].cpu())) <= SOLVE[dtype]


@pytest.mark.parametrize("name,dtype,device", PRODUCT)
@pytest.mark.parametrize("sign,changed", [(-1, False), (-1, True), (1, True)])
def test_check_and_apply_gives_the_products_with_the_plan(name, dtype, device, sign, changed):
    g = rows_of(N_ROWS + 3, dtype, device, 10)
    n = N_ROWS + 3
    store = build(name, g[:N_ROWS], SUBSETS["some"], normalizer=n)
    rows = (g[:2] if sign < 0 else g[N_ROWS:]).contiguous()
    v = rows_of(2, dtype, device, 11).T.contiguous()
    before = snapshot(store)
    out = torch.zeros(v.shape, dtype=torch.float64, device=device)
    plan = store.check_and_apply(rows, sign, v, out, changed=changed, method="woodbury",
                                 chunk_size=None, what="test")
    assert_unchanged(store, before)  # the check writes nothing
    r, v64 = rows.double().cpu(), v.double().cpu()
    for b in range(LAYOUT.num_blocks):
        sl = LAYOUT.slice(b)
        if b not in store.block_ids:  # another store's rows: left at zero
            assert torch.all(out[sl] == 0)
            continue
        fisher = torch.linalg.inv(ref_block(g[:N_ROWS], b, n))
        if changed:
            fisher = fisher + sign * r[:, sl].T @ r[:, sl] / n
        assert rel_err(out[sl], torch.linalg.solve(fisher, v64[sl])) <= SOLVE[dtype], b
    store.write(plan)
    assert_blocks(store, g[2:N_ROWS] if sign < 0 else g, n, CHAIN[dtype])


@pytest.mark.parametrize("name,dtype,device", PRODUCT)
def test_copies_and_state(name, dtype, device):
    g = rows_of(N_ROWS, dtype, device, 10)
    store = build(name, g, SUBSETS["some"])
    copy = store.clone()
    copy.write(copy.check_change(g[:2].contiguous(), -1, method="woodbury", chunk_size=None,
                                 what="downdate"))
    assert_blocks(store, g, N_ROWS, STABLE[dtype])  # the clone shares nothing
    other = torch.float64 if dtype == torch.float32 else torch.float32
    moved = store.to(dtype=other)
    assert moved.dtype == other and moved.nbytes == store.copy_nbytes(other)
    assert_blocks(moved, g, N_ROWS, STABLE[torch.float32])
    tensors, meta = store.state()
    back = type(store).from_state({k: t.cpu() for k, t in tensors.items()},
                                  json.loads(json.dumps(meta)), layout=LAYOUT,
                                  block_ids=store.block_ids, damping=DAMPING,
                                  normalizer=store.normalizer, dtype=dtype).to(device)
    for b in store.block_ids:
        assert torch.equal(back.dense_block(b), store.dense_block(b))


@pytest.mark.parametrize("name,dtype,device", PRODUCT)
def test_an_inverse_of_one_store_applies_changes_and_saves(name, dtype, device):
    g = rows_of(N_ROWS, dtype, device, 11)
    inv = build_inverse_fisher(g, damping=DAMPING, layout=LAYOUT, representation=name)
    assert inv.representation == (name,) * 5 and inv.stores[0].name == name
    v = rows_of(1, dtype, device, 12)[0]
    dense = torch.block_diag(*[ref_block(g, b, N_ROWS) for b in range(5)])
    assert rel_err(inv @ v, dense @ v.double().cpu()) <= SOLVE[dtype]
    assert inv.health(warn=False).ok
    strided = g[::2]  # non-contiguous rows
    inv.downdate(strided)
    kept = torch.block_diag(*[ref_block(g[1::2], b, N_ROWS) for b in range(5)])
    assert rel_err(inv.dense(), kept) <= CHAIN[dtype] and inv.num_samples == N_ROWS - 3
    tensors, meta = inv.to_state()
    assert [s["name"] for s in meta["stores"]] == [name]
    back = BlockInverseFisher.from_state({k: t.cpu() for k, t in tensors.items()},
                                         json.loads(json.dumps(meta)))
    assert back.representation == inv.representation
    assert torch.equal(back.dense(), inv.dense().cpu())
    # the file holds no spare capacity: what the loaded copy holds
    assert BlockInverseFisher.state_nbytes(meta) == back.nbytes + back.probe.sketch.numel() * 8


# ---- the extension point ----------------------------------------------------------------------

def test_the_store_defined_here_is_registered_and_chosen_by_name_only():
    assert "float64" in ssse_ext.STORES and "float64" in ssse_ext.REPRESENTATIONS
    assert get_store("float64") is Float64Store
    assert "float64" not in resolve_representation("auto")
    assert choose_stores([3, 64], 2, torch.float32, representation=("dense", "float64")) == \
        ["dense", "dense"]
    assert choose_stores([3, 64], 2, torch.float32, representation="float64") == \
        ["float64", "float64"]
    register_store(Float64Store)  # the same class again: nothing changes
    twin = type("Twin", (Float64Store,), {})
    with pytest.raises(ValueError, match="registered already"):
        register_store(twin)
    with pytest.raises(ValueError, match="no block store is registered as 'shampoo'"):
        get_store("shampoo")
    with pytest.raises(ValueError, match="representation must be"):
        build_inverse_fisher(torch.ones(2, 3), damping=1.0, representation="shampoo")
    with pytest.raises(ValueError, match="needs a build method"):
        build_inverse_fisher(torch.ones(2, 3), damping=1.0, representation="float64",
                             method="woodbury")


@pytest.mark.parametrize("dtype,device", list(itertools.product(DTYPES, DEVICES)))
def test_a_mixed_inverse_dispatches_to_the_store_defined_here(dtype, device, tmp_path):
    g = rows_of(N_ROWS, dtype, device, 13)
    config = FisherConfig(DAMPING, float(N_ROWS), LAYOUT)
    stores = [build("dense", g, (0, 1, 3)), build("float64", g, (2, 4))]
    inv = BlockInverseFisher(stores, config, N_ROWS)
    assert inv.representation == ("dense", "dense", "float64", "dense", "float64")
    dense = torch.block_diag(*[ref_block(g, b, N_ROWS) for b in range(5)])
    theta, v = rows_of(2, dtype, device, 14)
    assert rel_err(inv.apply_update(theta, v, 0.3),
                   theta.double().cpu() + 0.3 * dense @ v.double().cpu()) <= SOLVE[dtype]
    leave = torch.block_diag(*[ref_block(g[2:], b, N_ROWS) for b in range(5)])
    assert rel_err(inv.without(g[:2]) @ v, leave @ v.double().cpu()) <= SOLVE[dtype]
    before = inv.dense().clone()
    stranger = g[:2].clone()
    stranger[:, LAYOUT.slice(2)] *= 40  # only the float64 store's block refuses
    with pytest.raises(NotPositiveDefiniteError, match="block 2"):
        inv.downdate(stranger)
    assert torch.equal(inv.dense(), before)
    inv.downdate(g[:2])
    assert rel_err(inv.dense(), leave) <= CHAIN[dtype]
    from safetensors.torch import load_file, save_file
    tensors, meta = inv.to_state()
    save_file({k: t.cpu().contiguous() for k, t in tensors.items()},
              str(tmp_path / "inv.safetensors"))
    back = BlockInverseFisher.from_state(load_file(str(tmp_path / "inv.safetensors")),
                                         json.loads(json.dumps(meta))).to(device)
    assert back.representation == inv.representation
    assert torch.equal(back.dense(), inv.dense())
    with pytest.raises(ValueError, match="block 2 is held by two stores"):
        BlockInverseFisher(stores + [build("float64", g, (2,))], config, N_ROWS)
    with pytest.raises(ValueError, match=r"blocks \[2, 4\] are held by no store"):
        BlockInverseFisher(stores[:1], config, N_ROWS)


def test_costs_are_asked_of_every_store_class():
    for name in NAMES:
        cls = get_store(name)
        for dtype in DTYPES:
            cost = cls.nbytes_for(40, 10, dtype)
            assert cost > 0 and (cls.nbytes_for(40, None, dtype) == cost or
                                 math.isinf(cls.nbytes_for(40, None, dtype)))
    rows = 50
    names = choose_stores([10, 100, 1000], rows, torch.float32)
    assert names == [min(("dense", "dual"), key=lambda n: get_store(n).nbytes_for(s, rows,
                                                                                torch.float32))
                     for s in (10, 100, 1000)] == ["dense", "dense", "dual"]
    assert choose_stores([1000], None, torch.float32) == ["dense"]  # rows unknown
