"""Stores regrouping their blocks into a store of another layout
(:meth:`ssse_ext.blocks.BlockStore.regrouped`, how a saved inverse moves to another number of
ranks): the blocks come over exactly, from one or several stores; stores that disagree, and
stores that cannot give their blocks apart, are refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssse
import ssse_ext
from ssse_ext import BlockLayout

SIZES = [7, 5, 11]


def built(representation, dtype, seed=0, rows=40):
    g = torch.randn(rows, sum(SIZES), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64).to(dtype)
    layout = BlockLayout.from_dict({"dim": sum(SIZES), "sizes": SIZES})
    return ssse_ext.build_inverse_fisher(g, damping=0.1, layout=layout, normalizer=40.0,
                                         representation=representation)


def layout_of(*sizes):
    return BlockLayout.from_dict({"dim": sum(sizes), "sizes": list(sizes)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("representation", ["dense", "dense64"])
def test_dense_blocks_come_over_exactly_from_several_stores(representation, dtype):
    a, b = built(representation, dtype, 0).stores[0], built(representation, dtype, 1).stores[0]
    assert a.name == representation
    new = type(a).regrouped([(b, 2), (a, 0), (a, 1)], layout=layout_of(11, 7, 5),
                            block_ids=[0, 1, 2])
    assert new.name == representation and new.dtype == dtype
    for i, (src, j) in enumerate([(b, 2), (a, 0), (a, 1)]):
        assert torch.equal(new.dense_block(i), src.dense_block(j))
    inv = ssse_ext.BlockInverseFisher([new], ssse_ext.FisherConfig(
        0.1, 40.0, layout_of(11, 7, 5)), 40)
    v = torch.randn(23, 2, dtype=dtype, generator=torch.Generator().manual_seed(3))
    expect = torch.cat([b.dense_block(2) @ v[:11], a.dense_block(0) @ v[11:18],
                        a.dense_block(1) @ v[18:]])
    assert torch.allclose(inv.matvec(v), expect, rtol=0, atol=1e-5 if dtype == torch.float32
                          else 1e-12)


def test_a_dense64_store_keeps_its_float64_blocks():
    a = built("dense64", torch.float32).stores[0]
    new = type(a).regrouped([(a, 1)], layout=layout_of(5), block_ids=[0])
    assert new.exact[0].dtype == torch.float64
    assert torch.equal(new.exact[0], a.exact[0][49:74])


def test_stores_that_disagree_are_refused():
    a, b = built("dense", torch.float32).stores[0], built("dense", torch.float64).stores[0]
    with pytest.raises(ValueError, match="differ in kind, dtype, device, damping or normaliser"):
        type(a).regrouped([(a, 0), (b, 1)], layout=layout_of(7, 5), block_ids=[0, 1])


@pytest.mark.parametrize("representation", ["gram", "dual"])
def test_stores_that_cannot_give_their_blocks_apart_refuse_in_one_line(representation):
    store = built(representation, torch.float64, rows=4).stores[0]
    assert store.name == representation
    with pytest.raises(ValueError) as err:
        type(store).regrouped([(store, 0)], layout=layout_of(7), block_ids=[0])
    assert str(err.value) == (f"the {representation} blocks cannot be moved to another "
                              f"partition: load the inverse on as many ranks as saved it")


def mlp_inverse(curvature, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    return ssse.fit_inverse_fisher(model, nn.CrossEntropyLoss(reduction="none"), [(X, y)],
                                   damping=0.1, curvature=curvature, progress=False,
                                   layout="per_parameter", **kw)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_kronecker_blocks_come_over_exactly(curvature):
    inv = mlp_inverse(curvature)
    store = next(st for st in inv.stores if st.name == curvature)
    assert list(store.block_ids) == [0, 2]  # the two weights
    new = type(store).regrouped([(store, 2), (store, 0)], layout=layout_of(12, 20),
                                block_ids=[0, 1])
    assert torch.equal(new.dense_block(0), store.dense_block(2))
    assert torch.equal(new.dense_block(1), store.dense_block(0))
    assert (new.refresh, new.tolerance, new.storage) == \
        (store.refresh, store.tolerance, store.storage)
    only = type(store).regrouped([(store, 2)], layout=layout_of(3, 12), block_ids=[1])
    assert torch.equal(only.dense_block(1), store.dense_block(2))


def test_kronecker_stores_of_other_options_are_refused():
    a = next(st for st in mlp_inverse("ekfac").stores if st.name == "ekfac")
    b = a.clone()
    b.refresh = "exact"
    with pytest.raises(ValueError, match="differ in refresh, tolerance or storage"):
        type(a).regrouped([(a, 0), (b, 2)], layout=layout_of(20, 12), block_ids=[0, 1])


def test_a_save_is_re_sharded_by_its_blocks_bytes():
    """A Kronecker block costs its factors' bytes, not the s^2 of a dense block."""
    from ssse.partition import Sharding

    layout = layout_of(60, 10, 10, 10, 10)
    names = ["kfac"] + ["dense"] * 4
    assert Sharding.by_store_bytes(layout, 2, names, torch.float64).bounds == \
        (0, 2, 5)  # 1440 + 800 | 2400
    assert Sharding.balanced(layout, 2).bounds == (0, 1, 5)  # 3600 | 400


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_a_share_of_a_whole_inverse_keeps_each_block_in_its_store(curvature):
    from ssse import resharding
    from ssse.partition import Sharding

    inv = mlp_inverse(curvature)
    for world in (2, 3, 5):  # 5: more ranks than blocks
        sharding = Sharding.balanced(inv.layout, world)
        for r in range(world):
            first, last = sharding.blocks(r)
            share = resharding.share_of(inv, sharding, r)
            assert share.representation == inv.representation[first:last]
            for b in range(first, last):
                got = share.dense_block(b - first)
                assert torch.equal(got, inv.dense_block(b))
            source = next(s for s in inv.stores if s.name == curvature)
            for st in share.stores:  # copies, not views
                if st.name == curvature:
                    assert all(x.qa.data_ptr() != y.qa.data_ptr() for x in st.blocks
                               for y in source.blocks)


def test_a_kronecker_stores_rebase_count_goes_with_its_first_block():
    """Split and joined again, the count of basis changes is neither lost nor multiplied."""
    store = next(st for st in mlp_inverse("ekfac").stores if st.name == "ekfac")
    store.rebased = 3
    kind = type(store)
    first = kind.regrouped([(store, 0)], layout=layout_of(20), block_ids=[0])
    second = kind.regrouped([(store, 2)], layout=layout_of(12), block_ids=[0])
    assert (first.rebased, second.rebased) == (3, 0)
    again = kind.regrouped([(first, 0), (second, 0)], layout=layout_of(20, 12), block_ids=[0, 1])
    assert again.rebased == 3
