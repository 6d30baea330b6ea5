"""Inverse files written by version 0.3.0, before the stores were recorded by name: they load,
hold the same matrix, keep working, and are written back under the same tensor names (so the
fingerprints a ledger recorded for them still match).

tests/data/inverse_v030_*.safetensors were written by ``ssse.io.save_inverse_fisher`` of version
0.3.0: ``mixed`` is float32, blocks 6, 3, 21, 10, 25 of 8 rows (``rows.float()``), damping 0.2,
the dense blocks in two segments and blocks 2 and 4 dual, with a 2-column health probe;
``dense`` is float64, ``rows[:, :40]`` in blocks of 16, damping 0.5, normaliser 10, curvature
"ggn", no probe. ``inverse_v030_expected`` holds the rows, and the fingerprints and probe
residual that version computed."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ssse.io import fingerprint
from ssse_ext import BlockInverseFisher, BlockLayout, reference

from .testing import CHAIN, STABLE, rel_err

DATA = Path(__file__).resolve().parent / "data"


def read(name: str) -> tuple[dict, dict]:
    """The tensors and the inverse's state metadata of an ssse inverse file."""
    path = str(DATA / name)
    with safe_open(path, "pt") as f:
        header = f.metadata()
    return load_file(path), json.loads(header["ssse"])["state"]


def expected() -> tuple[torch.Tensor, dict]:
    path = str(DATA / "inverse_v030_expected.safetensors")
    with safe_open(path, "pt") as f:
        return f.get_tensor("rows"), f.metadata()


def reference_inverse(rows, layout, damping, normalizer):
    return torch.block_diag(*reference.block_closed_form(rows.double(), layout, damping,
                                                         normalizer))


def test_a_mixed_file_of_version_0_3_loads_and_keeps_working():
    rows, info = expected()
    tensors, meta = read("inverse_v030_mixed.safetensors")
    assert "stores" not in meta and meta["segments"] == 2 and meta["dual"]["blocks"] == [2, 4]
    inv = BlockInverseFisher.from_state(tensors, meta)
    assert inv.representation == ("dense", "dense", "dual", "dense", "dual")
    assert len(inv.segments) == 2 and inv.dual.num_rows == 8 and inv.dtype == torch.float32
    assert inv.nbytes == int(info["mixed.nbytes"])
    assert BlockInverseFisher.state_nbytes(meta) == inv.nbytes + 2 * 65 * 8
    g = rows.float()
    assert rel_err(inv.dense(), reference_inverse(g, inv.layout, 0.2, 8.0)) <= \
        STABLE[torch.float32]
    assert inv.health(warn=False).residual == float(info["mixed.health"])
    written, new_meta = inv.to_state()
    assert written.keys() == tensors.keys()
    assert fingerprint(written) == fingerprint(tensors) == info["mixed.fingerprint"]
    assert [s["name"] for s in new_meta["stores"]] == ["dense", "dual"]
    inv.downdate(g[:3])
    assert rel_err(inv.dense(), reference_inverse(g[3:], inv.layout, 0.2, 8.0)) <= \
        CHAIN[torch.float32]
    again = BlockInverseFisher.from_state(*inv.to_state())
    assert torch.equal(again.dense(), inv.dense())


def test_a_dense_file_of_version_0_3_loads_with_its_curvature():
    rows, info = expected()
    tensors, meta = read("inverse_v030_dense.safetensors")
    inv = BlockInverseFisher.from_state(tensors, meta)
    assert inv.representation == ("dense",) * 3 and inv.curvature == "ggn"
    assert inv.probe is None and inv.dtype == torch.float64
    layout = BlockLayout.fixed(40, 16)
    assert rel_err(inv.dense(), reference_inverse(rows[:, :40], layout, 0.5, 10.0)) <= \
        STABLE[torch.float64]
    assert fingerprint(inv.to_state()[0]) == info["dense.fingerprint"]
    # the single "packed" tensor that version also read
    single = {"packed": tensors["packed.0"]}
    old = {k: v for k, v in meta.items() if k != "segments"}
    assert torch.equal(BlockInverseFisher.from_state(single, old).dense(), inv.dense())


def test_a_state_naming_an_unknown_store_is_refused():
    tensors, meta = read("inverse_v030_dense.safetensors")
    meta = BlockInverseFisher.from_state(tensors, meta).to_state()[1]
    meta["stores"][0]["name"] = "shampoo"
    with pytest.raises(ValueError, match="no block store is registered as 'shampoo'"):
        BlockInverseFisher.from_state(tensors, meta)
    with pytest.raises(ValueError, match="not a valid inverse-Fisher state"):
        BlockInverseFisher.state_nbytes(meta)
