"""Model and inverse-Fisher files: round trips, metadata, atomic writes, refusal of bad files."""

import json

import pytest
import torch

import ssse_ext
from ssse.models import build_model
from ssse.io import (FileFormatError, atomic_path, load_inverse_fisher, load_model,
                     read_metadata, save_inverse_fisher, save_model, write_json)


def test_model_round_trip(tmp_path):
    spec = {"arch": "linear", "in_features": 5, "out_features": 3, "bias": True}
    model = build_model(spec).double()
    path = save_model(tmp_path / "m.safetensors", model, spec=spec, loss="cross_entropy")
    loaded, meta = load_model(path)
    assert meta["spec"] == spec and meta["loss"] == "cross_entropy" and meta["dtype"] == "float64"
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b) and b.dtype == torch.float64
    fmt, _ = read_metadata(path)
    assert fmt == "ssse-model"


def test_inverse_fisher_round_trip(tmp_path):
    g = torch.randn(20, 7, dtype=torch.float64)
    inv = ssse_ext.build_inverse_fisher(g, damping=0.1, block_size=3)
    path = save_inverse_fisher(tmp_path / "f.safetensors", inv, minibatch=1)
    back, meta = load_inverse_fisher(path)
    assert meta["minibatch"] == 1 and meta["state"]["damping"] == 0.1
    assert torch.equal(back.packed, inv.packed)
    assert back.layout == inv.layout and back.normalizer == inv.normalizer
    with pytest.raises(FileFormatError, match="expected an ssse-model"):
        load_model(path)


def test_refuses_foreign_and_corrupt_files(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(FileFormatError):
        read_metadata(bad)
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FileFormatError, match="not an ssse file"):
        read_metadata(tmp_path / "plain.safetensors")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def _rewrite(path, target, *, meta=None, tensors=None):
    """A copy of the safetensors file ``path`` with its ssse metadata or tensors replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}
    if meta is not None:
        header = {**header, "ssse": json.dumps(meta)}
    save_file({**data, **(tensors or {})}, str(target), metadata=header)
    return target


def test_refuses_tampered_files(tmp_path):
    spec = {"arch": "linear", "in_features": 5, "out_features": 3, "bias": True}
    path = save_model(tmp_path / "m.safetensors", build_model(spec), spec=spec)
    _, meta = read_metadata(path)
    # a spec that disagrees with the tensors is refused before allocating its (huge) model
    huge = {**meta, "spec": {**spec, "in_features": 10 ** 12}}
    with pytest.raises(FileFormatError, match="does not match its spec"):
        load_model(_rewrite(path, tmp_path / "huge.safetensors", meta=huge))
    with pytest.raises(FileFormatError, match="invalid model spec"):
        load_model(_rewrite(path, tmp_path / "arch.safetensors",
                            meta={**meta, "spec": {"arch": "mlp"}}))
    with pytest.raises(FileFormatError, match="no model spec"):
        load_model(_rewrite(path, tmp_path / "nospec.safetensors", meta={**meta, "spec": 3}))
    nan = torch.full((3,), float("nan"))
    with pytest.raises(FileFormatError, match="'bias' holds NaN"):
        load_model(_rewrite(path, tmp_path / "nan.safetensors", tensors={"bias": nan}))
    inv = ssse_ext.build_inverse_fisher(torch.randn(10, 4, dtype=torch.float64), damping=0.1)
    fpath = save_inverse_fisher(tmp_path / "f.safetensors", inv)
    bad = inv.packed.clone()
    bad[1] = float("inf")
    with pytest.raises(FileFormatError, match="'packed' holds NaN or Inf"):
        load_inverse_fisher(_rewrite(fpath, tmp_path / "finf.safetensors",
                                     tensors={"packed": bad}))
    with pytest.raises(FileFormatError, match="not a JSON object"):
        read_metadata(_rewrite(fpath, tmp_path / "list.safetensors", meta=[1, 2]))
    # a truncated file
    (tmp_path / "cut.safetensors").write_bytes(fpath.read_bytes()[:-9])
    with pytest.raises(FileFormatError, match="not a safetensors file"):
        load_inverse_fisher(tmp_path / "cut.safetensors")


def test_stale_temporary_files_of_dead_writers_are_cleaned_on_the_next_write(tmp_path):
    # issue 13: a kill -9 during a save leaves .NAME.ssse-tmp-PID-XXXX files behind (a real
    # kill during a checkpoint's write is in tests/test_resume.py)
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    names = {
        "dead": f".model.safetensors.ssse-tmp-{dead_pid}-abc_12xy.safetensors",
        "mine": f".other.json.ssse-tmp-{os.getpid()}-zz9_0000.json",
        "alive": f".x.json.ssse-tmp-{os.getppid()}-q1w2e3r4.json",
        "not ours": ".model.safetensors.tmp12345.safetensors",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    write_json(tmp_path / "out.json", {"a": 1})
    left = {p.name for p in tmp_path.iterdir()}
    assert names["dead"] not in left
    assert {names["mine"], names["alive"], names["not ours"], "out.json"} <= left


def test_a_set_of_outputs_is_swapped_in_whole_and_a_dead_writers_stage_is_cleaned(tmp_path):
    import os
    import subprocess
    import sys

    from ssse.io import atomic_folder

    out = tmp_path / "results"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as stage:
            write_json(stage / "results.json", {"a": 1})
            raise RuntimeError("the run failed before its last file")
    assert list(tmp_path.iterdir()) == []  # neither the outputs nor the stage
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    left_behind = tmp_path / f".results.ssse-tmp-{int(dead.stdout)}-k1ll3d0"
    (left_behind / "sub").mkdir(parents=True)
    (left_behind / "sub" / "plot.png").write_bytes(b"partial")
    with atomic_folder(out) as stage:
        write_json(stage / "results.json", {"a": 2})
        (stage / "plots").mkdir()
        (stage / "plots" / "a.png").write_bytes(b"png")
        assert stage.parent == tmp_path and str(os.getpid()) in stage.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert json.loads((out / "results.json").read_text()) == {"a": 2}
    assert (out / "plots" / "a.png").read_bytes() == b"png"
