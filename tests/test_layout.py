import pytest
import torch

from ssse_ext import BlockLayout


def test_fixed_last_block_smaller():
    lay = BlockLayout.fixed(10, 4)
    assert lay.starts == (0, 4, 8) and lay.sizes == (4, 4, 2)
    assert lay.offsets == (0, 16, 32) and lay.numel == 36
    assert lay.table().tolist() == [[0, 4, 0], [4, 4, 16], [8, 2, 32]]


def test_fixed_empty_and_single():
    assert BlockLayout.fixed(0, 4).num_blocks == 0
    assert BlockLayout.fixed(3, 100).sizes == (3,)


def test_per_parameter_never_crosses_a_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    shapes = [p.shape for p in model.parameters()]  # 15, 3, 6, 2
    lay = BlockLayout.per_parameter(shapes, 4)
    assert lay.sizes == (4, 4, 4, 3, 3, 4, 2, 2)
    assert lay.dim == sum(p.numel() for p in model.parameters())
    cuts = {0, 15, 18, 24, 26}
    for s, z in zip(lay.starts, lay.sizes):  # each block inside one parameter
        assert not any(s < c < s + z for c in cuts)
    assert BlockLayout.per_parameter([15, torch.zeros(3)], 100).sizes == (15, 3)


def test_from_boundaries():
    lay = BlockLayout.from_boundaries([0, 3, 7, 12])
    assert lay.sizes == (3, 4, 5) and lay.dim == 12
    assert BlockLayout.from_boundaries([3, 7], dim=12).sizes == (3, 4, 5)
    with pytest.raises(ValueError, match="strictly increasing"):
        BlockLayout.from_boundaries([0, 5, 5, 9])


def test_dict_round_trip():
    lay = BlockLayout.from_boundaries([0, 3, 7, 12])
    assert BlockLayout.from_dict(lay.to_dict()) == lay


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                        (True, TypeError)])
def test_bad_block_size(bad, error):
    # the shared rule: a wrong type is a TypeError, a value out of range a ValueError
    with pytest.raises(error, match=f"block_size must be .*got .*{bad}"):
        BlockLayout.fixed(10, bad)


def test_inconsistent_layout_rejected():
    with pytest.raises(ValueError, match="expected dim"):
        BlockLayout((0, 4), (4, 4), 9)
    with pytest.raises(ValueError, match="contiguous"):
        BlockLayout((0, 5), (4, 4), 8)
