"""Offline data sets: digits, idx files, Yeast, removal sets and the four splits."""

import numpy as np
import pytest
import torch

from ssse.data import (DataUnavailableError, attribute_removal, class_removal, four_splits,
                       load_digits, load_fashion_mnist, read_idx, write_idx)


def _fake_fashion(directory, n_train=30, n_test=12, compress=True):
    rng = np.random.default_rng(0)
    suffix = ""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{stem}-images-idx3-ubyte{'.gz' if compress else suffix}",
                  rng.integers(0, 256, (n, 28, 28)), compress=compress)
        write_idx(directory / f"{stem}-labels-idx1-ubyte{'.gz' if compress else suffix}",
                  np.arange(n) % 10, compress=compress)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip_and_fashion_loader(tmp_path, compress):
    _fake_fashion(tmp_path, compress=compress)
    ds = load_fashion_mnist(tmp_path, train_limit=20)
    assert ds.x_train.shape == (20, 784) and ds.x_test.shape == (12, 784)
    assert ds.image_shape == (1, 28, 28) and ds.y_train.dtype == torch.int64
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr)
    assert np.array_equal(read_idx(tmp_path / "a"), arr)


def test_missing_fashion_gives_install_hint(tmp_path):
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_digits_removal_and_splits():
    ds = load_digits(seed=0)
    removed = class_removal(ds.y_train, 3, 0.5, seed=0)
    assert torch.all(ds.y_train[removed] == 3)
    assert removed.numel() == round(0.5 * int((ds.y_train == 3).sum()))
    splits = four_splits(ds, removed, classes=[3])
    assert splits["S"][0].shape[0] == removed.numel()
    assert splits["D-S"][0].shape[0] == ds.n_train - removed.numel()
    assert torch.all(splits["Ta"][1] == 3) and not torch.any(splits["T-Ta"][1] == 3)
    assert torch.equal(removed, class_removal(ds.y_train, 3, 0.5, seed=0))


def test_attribute_removal():
    y = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.float64)
    idx = attribute_removal(y, 1, 1.0)
    assert idx.tolist() == [1, 2]
