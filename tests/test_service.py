"""The ledger-served erase as a library call (:mod:`ssse.service`): requests served without the
command write the same files and ledger lines as ``ssse erase --ledger``, are refused with
typed errors that leave everything as it was, and are checked by ``check_ledger``."""

import json
import shutil

import pytest
import torch

from ssse.cli import main
from ssse.io import fingerprint, load_inverse_fisher, load_model, read_metadata
from ssse.ledger import Ledger, entry_digest, pending_path
from ssse.service import (LedgerReport, ServedRequest, ServiceError, check_ledger,
                          recover_ledger, serve_request)

MODEL, FISHER, LEDGER = "model.safetensors", "inverse_fisher.safetensors", "ledger.jsonl"


@pytest.fixture(scope="module")
def trained(served_digits):
    """The small digits model and its inverse (seed 0)."""
    return served_digits(0)


@pytest.fixture
def svc(trained, tmp_path):
    d = tmp_path / "svc"
    d.mkdir()
    for name in (MODEL, FISHER):
        shutil.copy(trained / name, d / name)
    return d


def serve(where, indices, rid, **kwargs):
    return serve_request(where / MODEL, where / FISHER, where / LEDGER, indices, request_id=rid,
                         **{"epsilon": 0.5, **kwargs})


def tensors_of(where):
    model, _ = load_model(where / MODEL)
    inv, _ = load_inverse_fisher(where / FISHER)
    return model.state_dict(), inv.to_state()[0]


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_two_requests_served_without_the_command(trained, svc, tmp_path, one_thread):
    first = serve(svc, [7, 3, 4, 5, 6], "r1")
    assert isinstance(first, ServedRequest)
    assert (first.request_id, first.ids, first.n_before, first.n_after) == \
        ("r1", [3, 4, 5, 6, 7], 200, 195)
    assert first.recovered == [] and first.health["residual"] <= first.health["tolerance"]
    assert first.model_path == (svc / MODEL).resolve()
    # the command serves the same request to the same files
    cli = tmp_path / "cli"
    cli.mkdir()
    for name in (MODEL, FISHER):
        shutil.copy(trained / name, cli / name)
    assert main(["erase", "--model", str(cli / MODEL), "--fisher", str(cli / FISHER),
                 "--indices", "3-7", "--epsilon", "0.5", "--ledger", str(cli / LEDGER),
                 "--request-id", "r1", "--threads", "1", "--quiet"]) == 0
    for ours, theirs in zip(tensors_of(svc), tensors_of(cli)):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k])
                                                    for k in ours)
    # the second request chooses its samples once the training set is loaded
    seen = []

    def choose(ds):
        seen.append(ds.n_train)
        return torch.tensor([9, 8])
    second = serve(svc, choose, "r2", variant="leave_k_out")
    assert seen == [200] and (second.ids, second.n_before, second.n_after) == ([8, 9], 195, 193)
    entries = Ledger(svc / LEDGER).entries()
    assert [e["request"] for e in entries] == ["r1", "r2"]
    assert entries[0] == first.entry and entries[1] == second.entry
    assert entries[1]["prev"] == entry_digest(entries[0])
    assert entries[1]["model_before"] == entries[0]["model_after"]
    assert entries[1]["fisher"] == "leave_k_out" and entries[1]["k"] == 2
    state, inverse = tensors_of(svc)
    assert fingerprint(state) == entries[1]["model_after"]
    assert fingerprint(inverse) == entries[1]["inverse_after"]
    _, meta = read_metadata(svc / MODEL)
    assert meta["erased"] == list(range(3, 10)) and meta["ledger_request"] == "r2"
    assert meta["ledger_entry"] == entry_digest(entries[1])
    assert meta["origin"] == read_metadata(cli / MODEL)[1]["origin"]
    _, fmeta = read_metadata(svc / FISHER)
    assert fmeta["n_remaining"] == 193 and fmeta["ledger_entry"] == meta["ledger_entry"]
    assert sorted(p.name for p in svc.iterdir()) == [FISHER, LEDGER, MODEL]  # no locks left
    report = check_ledger(svc / LEDGER, svc / MODEL, svc / FISHER)
    assert isinstance(report, LedgerReport) and report.recovered is None
    assert [e["request"] for e in report.state.entries] == ["r1", "r2"]
    assert report.files["model"].fingerprint == entries[1]["model_after"]
    assert report.files["inverse"].fingerprint == entries[1]["inverse_after"]
    assert report.health.residual <= report.health.tolerance


def test_refused_requests_raise_typed_errors_and_change_nothing(svc, one_thread):
    serve(svc, [3, 4], "r1")
    before = files(svc)
    for indices, rid, kwargs, error, words in [
        ([5], "r1", {}, ServiceError, "request 'r1' is already in the ledger"),
        ([4, 5], "r2", {}, ServiceError, "1 of these samples were already erased"),
        ([5, 200], "r2", {}, ServiceError, r"out of range \[0, 200\): \[200\]"),
        ([5], "r2", {"epsilon": None}, ServiceError,
         r"epsilon is needed unless fisher_path holds a Gauss-Newton matrix \(ssse fisher "
         r"--curvature ggn or kfac_ggn or ekfac_ggn\); it holds empirical"),
        ([5, 5], "r2", {}, ServiceError, "indices must be distinct"),
        ([True], "r2", {}, TypeError, "indices must hold ints or strings, got bool"),
        (["a"], "r2", {}, TypeError, "indices must be training-set indices"),
    ]:
        with pytest.raises(error, match=words):
            serve(svc, indices, rid, **kwargs)
        assert files(svc) == before
    with pytest.raises(FileNotFoundError, match="model_path: no such file"):
        serve_request(svc / "nope.safetensors", svc / FISHER, svc / LEDGER, [5], epsilon=0.5)
    with pytest.raises(FileNotFoundError, match="ledger_path: no such file"):
        check_ledger(svc / "nope.jsonl")
    assert files(svc) == before


def test_what_a_crash_left_is_settled_first_and_reported(svc, one_thread):
    serve(svc, [3], "r1")
    # a request that never reached its ledger line: its pending model is rolled back
    shutil.copy(svc / MODEL, pending_path(svc / MODEL))
    lines = []
    served = serve(svc, [4], "r2", on_recover=lines.append)
    assert len(lines) == 1 and "rolled back a request interrupted before it was recorded" in \
        lines[0] and served.recovered == lines
    assert not pending_path(svc / MODEL).exists()
    shutil.copy(svc / FISHER, pending_path(svc / FISHER))
    with pytest.raises(ServiceError, match="awaits recovery"):
        check_ledger(svc / LEDGER, svc / MODEL, svc / FISHER)
    report = recover_ledger(svc / LEDGER, svc / MODEL, svc / FISHER)
    assert len(report.recovered) == 1 and "rolled back" in report.recovered[0]
    assert [e["request"] for e in report.state.entries] == ["r1", "r2"]
    assert recover_ledger(svc / LEDGER, svc / MODEL, svc / FISHER).recovered == []
    assert [json.loads(line)["request"] for line in (svc / LEDGER).read_text().splitlines()] \
        == ["r1", "r2"]
