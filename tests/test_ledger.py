"""Requests with sample ids and the append-only ledger (issue 13 §2): Eraser refuses samples
never trained on or already erased and repeated request ids; ``ssse erase --ledger`` survives a
real SIGKILL between any two of its writes."""

import json
import shutil
import signal

import pytest
import torch
from torch import nn

import ssse
from ssse.cli import main
from ssse.io import fingerprint, load_inverse_fisher, load_model, read_metadata, save_model
from ssse.ledger import (Ledger, LedgerBusyError, LedgerError, check_ids, ids_sha256,
                         pending_path, recover)

from .test_resume import forked

F64 = torch.float64
CE = nn.CrossEntropyLoss(reduction="none")


def problem():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    X = torch.randn(60, 5, dtype=F64)
    y = torch.randint(0, 3, (60,))
    return model, X, y


def snapshot(eraser):
    return (eraser.inv_fisher.packed.clone(), eraser.theta.clone(), eraser.n,
            eraser.inv_fisher.probe.sketch.clone())


def unchanged(eraser, snap):
    a, b, n, s = snap
    return (torch.equal(eraser.inv_fisher.packed, a) and torch.equal(eraser.theta, b)
            and eraser.n == n and torch.equal(eraser.inv_fisher.probe.sketch, s))


def test_eraser_refuses_strangers_repeats_and_bad_ids_before_anything_changes():
    model, X, y = problem()
    eraser = ssse.Eraser(model, CE, damping=0.1, weight_decay=1e-2).fit((X, y))
    eraser.erase((X[:10], y[:10]), ids=list(range(10)), epsilon=1.0)
    snap = snapshot(eraser)
    # the same 10 twice (the case): gradients cannot tell, the ids can
    with pytest.raises(ValueError, match="10 of the ids were already erased"):
        eraser.erase((X[:10], y[:10]), ids=list(range(10)), epsilon=1.0)
    with pytest.raises(ValueError, match="never part of the training set .*60"):
        eraser.erase((X[10:12], y[10:12]), ids=[11, 60], epsilon=1.0)
    with pytest.raises(ValueError, match=r"one id per removed sample \(2\), got 3"):
        eraser.erase((X[10:12], y[10:12]), ids=[10, 11, 12], epsilon=1.0)
    with pytest.raises(TypeError, match="ids must hold ints or strings, got bool True"):
        eraser.erase((X[10:12], y[10:12]), ids=[True, 11], epsilon=1.0)
    with pytest.raises(ValueError, match="ids must be distinct, got 11 twice"):
        eraser.erase((X[10:12], y[10:12]), ids=[11, 11], epsilon=1.0)
    with pytest.raises(ValueError, match="request_id needs ids"):
        eraser.erase((X[10:12], y[10:12]), request_id="r", epsilon=1.0)
    assert unchanged(eraser, snap)
    # ids of the caller's choosing
    named = ssse.Eraser(model, CE, damping=0.1).fit((X, y), ids=[f"user-{i}" for i in range(60)])
    named.erase((X[:1], y[:1]), ids=["user-0"], epsilon=1.0)
    with pytest.raises(ValueError, match="never part of the training set"):
        named.erase((X[1:2], y[1:2]), ids=["user-60"], epsilon=1.0)
    with pytest.raises(ValueError, match=r"one id per training sample \(60\), got 2"):
        ssse.Eraser(model, CE, damping=0.1).fit((X, y), ids=[1, 2])


def test_the_ledger_records_every_request_and_refuses_repeats_across_processes(tmp_path):
    model, X, y = problem()
    path = tmp_path / "ledger.jsonl"
    eraser = ssse.Eraser(model, CE, damping=0.1, weight_decay=1e-2, ledger=path).fit((X, y))
    inverse_before = fingerprint(eraser.inv_fisher.to_state()[0])
    model_before = fingerprint(eraser.state_dict())
    state = eraser.erase((X[:3], y[:3]), ids=[2, 0, 1], request_id="r1", epsilon=0.5)
    eraser.erase((X[5:6], y[5:6]), ids=[5], request_id="r2", epsilon=0.5, fisher="leave_k_out")
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["request"] == "r1" and first["k"] == 3 and first["ids_sha256"] == \
        ids_sha256([0, 1, 2]) and "0" not in json.dumps(first["id_digests"][:0])
    assert (first["method"], first["epsilon"], first["fisher"], first["curvature"]) == \
        ("ssse", 0.5, "full", "empirical")
    assert (first["n_before"], first["n_after"]) == (60, 57)
    assert first["model_before"] == model_before and first["model_after"] == fingerprint(state)
    assert first["inverse_before"] == inverse_before
    second = json.loads(lines[1])
    assert second["inverse_before"] == first["inverse_after"]
    assert second["inverse_after"] == fingerprint(eraser.inv_fisher.to_state()[0])
    assert second["health"]["residual"] < 1e-12 and second["health"]["vectors"] == 3
    assert second["time"].endswith("+00:00")
    # a new process with the same ledger refuses what it records
    again = ssse.Eraser(model, CE, damping=0.1, weight_decay=1e-2, ledger=path).fit((X, y))
    snap = snapshot(again)
    with pytest.raises(ValueError, match="request 'r1' is already in the ledger"):
        again.erase((X[7:8], y[7:8]), ids=[7], request_id="r1", epsilon=0.5)
    with pytest.raises(ValueError, match=r"1 of the ids were already erased \(the ledger"):
        again.erase((X[5:6], y[5:6]), ids=[5], request_id="r3", epsilon=0.5)
    with pytest.raises(ValueError, match="ids must be given"):
        again.erase((X[7:8], y[7:8]), epsilon=0.5)
    assert unchanged(again, snap) and len(path.read_text().splitlines()) == 2


def test_a_ledger_that_cannot_be_written_undoes_the_request(tmp_path, monkeypatch):
    model, X, y = problem()
    eraser = ssse.Eraser(model, CE, damping=0.1, ledger=tmp_path / "l.jsonl").fit((X, y))
    theta, n = eraser.theta.clone(), eraser.n
    before = eraser.inv_fisher.packed.clone()

    def full_disk(entry):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(eraser.ledger, "append", full_disk)
    with pytest.raises(OSError, match="the request was undone"):
        eraser.erase((X[:2], y[:2]), ids=[0, 1], epsilon=1.0, inplace=True)
    assert torch.equal(eraser.theta, theta) and eraser.n == n and not eraser.erased_ids
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), theta)
    assert (eraser.inv_fisher.packed - before).abs().max() < 1e-12 * before.abs().max()


def test_a_request_whose_inverse_fails_its_health_probe_is_never_recorded(tmp_path,
                                                                           monkeypatch):
    import ssse_ext

    model, X, y = problem()
    path = tmp_path / "l.jsonl"
    eraser = ssse.Eraser(model, CE, damping=0.1, ledger=path).fit((X, y))
    eraser.erase((X[:2], y[:2]), ids=[0, 1], request_id="r1", epsilon=1.0)
    # an inverse broken before the request: refused before anything changes
    snap = snapshot(eraser)
    saved = eraser.inv_fisher.packed.clone()
    eraser.inv_fisher.blocks[0].zero_()
    broken = snapshot(eraser)
    with pytest.raises(ssse_ext.HealthError, match="before request 'r2'.*nothing was changed"):
        eraser.erase((X[2:4], y[2:4]), ids=[2, 3], request_id="r2", epsilon=1.0)
    assert unchanged(eraser, broken) and len(path.read_text().splitlines()) == 1
    eraser.inv_fisher.blocks[0].copy_(saved[:eraser.layout.sizes[0] ** 2].view(
        eraser.layout.sizes[0], -1))
    assert unchanged(eraser, snap)
    # a probe that fails after the downdate: the request is undone and not recorded
    real = type(eraser.inv_fisher).health
    calls = []

    def failing_after(inv, **kwargs):
        health = real(inv, **kwargs)
        calls.append(health)
        if len(calls) == 2:
            health = type(health)(1.0, health.block, health.tolerance, health.columns)
        return health
    monkeypatch.setattr(type(eraser.inv_fisher), "health", failing_after)
    with pytest.raises(ssse_ext.HealthError, match="after request 'r2'.*undone and not recorded"):
        eraser.erase((X[2:4], y[2:4]), ids=[2, 3], request_id="r2", epsilon=1.0, inplace=True)
    assert len(path.read_text().splitlines()) == 1 and eraser.n == 58
    assert torch.equal(eraser.theta, snap[1]) and 2 not in eraser.erased_ids


def test_ledger_file_torn_line_corruption_and_lock(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    ledger.append({"request": "a", "id_digests": []})
    with open(path, "ab") as f:
        f.write(b'{"request": "b", "id_dig')  # a crash while appending
    assert [e["request"] for e in ledger.entries()] == ["a"]
    # the next run cuts it off before appending after it
    assert any("torn last line" in line for line in recover(ledger, {}))
    assert not ledger.repair() and path.read_bytes().endswith(b"}\n")
    ledger.append({"request": "c", "id_digests": []})
    assert [e["request"] for e in ledger.entries()] == ["a", "c"]
    with open(path, "ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(LedgerError, match="broken at line 3: not a JSON line"):
        ledger.entries()
    with Ledger(tmp_path / "m.jsonl").lock():
        with pytest.raises(LedgerBusyError, match="in use by another process"):
            with Ledger(tmp_path / "m.jsonl").lock():
                pass
    with pytest.raises(ValueError, match="is a directory"):
        Ledger(tmp_path)
    assert check_ids(torch.tensor([3, 1])) == [3, 1]


# ---- the CLI: the crash rule, with real SIGKILLs -------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A trained model, its inverse, and the files one uninterrupted request leaves."""
    d = tmp_path_factory.mktemp("ledger")
    assert main(["train", "--data", "digits", "--train-limit", "200", "--out", str(d),
                 "--quiet"]) == 0
    assert main(["fisher", "--model", str(d / "model.safetensors"), "--layout", "rows",
                 "--out", str(d), "--quiet"]) == 0
    ref = d / "reference"
    ref.mkdir()
    for name in ("model.safetensors", "inverse_fisher.safetensors"):
        shutil.copy(d / name, ref / name)
    assert request(ref) == 0
    return d


def request(where, rid="r1", indices="3-7"):
    threads = torch.get_num_threads()
    try:
        return main(["erase", "--model", str(where / "model.safetensors"),
                     "--fisher", str(where / "inverse_fisher.safetensors"), "--indices", indices,
                     "--epsilon", "0.5", "--ledger", str(where / "ledger.jsonl"),
                     "--request-id", rid, "--threads", "1", "--quiet"])
    finally:
        torch.set_num_threads(threads)


def tensors_of(where):
    model, _ = load_model(where / "model.safetensors")
    inv, _ = load_inverse_fisher(where / "inverse_fisher.safetensors")
    return model.state_dict(), inv.to_state()[0]


@pytest.mark.parametrize("point, settled", [
    ("ledger-pending-inverse", "rolled back"),
    ("ledger-pending-model", "rolled back"),
    ("ledger-appended", "completed"),
    ("ledger-renamed-inverse", "completed"),
    ("ledger-renamed-model", None),
])
def test_a_request_killed_between_any_two_writes_is_settled_by_the_next_run(
        served, tmp_path, capsys, point, settled):
    for name in ("model.safetensors", "inverse_fisher.safetensors"):
        shutil.copy(served / name, tmp_path / name)
    assert forked(lambda: request(tmp_path), point) == -signal.SIGKILL
    capsys.readouterr()
    code = request(tmp_path)  # the same command again: recovery, then the request itself
    err = capsys.readouterr().err
    if settled == "rolled back":  # the ledger had no line: the request is served now
        assert code == 0 and "rolled back a request interrupted before it was recorded" in err
    else:  # the ledger had the line: completed, and the repeated id refused
        assert code == 2 and "request 'r1' is already in the ledger" in err
        assert settled is None or "completed request 'r1' interrupted by a crash" in err
    entries = Ledger(tmp_path / "ledger.jsonl").entries()
    assert [e["request"] for e in entries] == ["r1"]
    got, want = tensors_of(tmp_path), tensors_of(served / "reference")
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fingerprint(got[0]) == entries[0]["model_after"]
    assert fingerprint(got[1]) == entries[0]["inverse_after"]
    assert not any("pending" in p.name or ".ssse-tmp-" in p.name for p in tmp_path.iterdir())
    assert request(tmp_path, "r2", "8-9") == 0  # and the service goes on


def test_files_changed_outside_the_ledger_are_refused(served, tmp_path, capsys):
    for name in ("model.safetensors", "inverse_fisher.safetensors"):
        shutil.copy(served / name, tmp_path / name)
    assert request(tmp_path) == 0
    model = tmp_path / "model.safetensors"
    _, served_meta = read_metadata(model)
    # a request served without the ledger, copied over the served model
    assert main(["erase", "--model", str(model), "--fisher",
                 str(tmp_path / "inverse_fisher.safetensors"), "--indices", "20", "--epsilon",
                 "1", "--output", str(tmp_path / "outside.safetensors"), "--quiet"]) == 0
    shutil.copy(tmp_path / "outside.safetensors", model)
    capsys.readouterr()
    assert request(tmp_path, "r2", "30") == 2
    err = capsys.readouterr().err
    assert "records no request, but the ledger" in err and "the model is behind" in err
    # the same tensors with the served header: only the fingerprint tells
    outside, _ = load_model(tmp_path / "outside.safetensors")
    save_model(model, outside, **served_meta)
    assert request(tmp_path, "r2", "30") == 2
    err = capsys.readouterr().err
    assert "is not the model the ledger's last request ('r1') left" in err
    assert len(Ledger(tmp_path / "ledger.jsonl").entries()) == 1
    assert not pending_path(tmp_path / "model.safetensors").exists()
