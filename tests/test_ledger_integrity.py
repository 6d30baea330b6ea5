"""A deletion is never reported done when it was lost or never applied, careless paths destroy
nothing, and the ledger's chain catches every edit: each refusal is one line, exit 2 (exit 1 for
a file in use), and leaves the model, the inverse, the ledger and the folder as they were."""

import hashlib
import json
import os
import shutil
import signal

import pytest
import torch

import ssse.ledger
from ssse.cli import main
from ssse.io import read_metadata
from ssse.ledger import GENESIS, Ledger, LedgerError, entry_digest, lock_file

from .test_io import _rewrite
from .test_resume import forked

MODEL, FISHER = "model.safetensors", "inverse_fisher.safetensors"


@pytest.fixture(scope="module")
def trained(served_digits):
    """Two models of the same shape (seeds 0 and 1), each with its inverse."""
    return {"seed0": served_digits(0), "seed1": served_digits(1)}


@pytest.fixture
def svc(trained, tmp_path):
    """A fresh copy of the seed-0 model and its inverse in ``tmp_path / "svc"``."""
    d = tmp_path / "svc"
    d.mkdir()
    for name in (MODEL, FISHER):
        shutil.copy(trained["seed0"] / name, d / name)
    return d


def erase(where, rid, indices, ledger="ledger.jsonl", model=MODEL, fisher=FISHER, *extra):
    threads = torch.get_num_threads()
    try:
        return main(["erase", "--model", str(where / model), "--fisher", str(where / fisher),
                     "--indices", indices, "--epsilon", "0.5", "--ledger", str(where / ledger),
                     "--request-id", rid, "--threads", "1", "--quiet", *extra])
    finally:
        torch.set_num_threads(threads)


def refused(capsys, code, *words, exit_code=2):
    err = capsys.readouterr().err
    assert code == exit_code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def files(folder):
    """Every file under ``folder`` with its bytes: what a refusal must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def ledger_check(capsys, where, ledger="ledger.jsonl", served=True):
    argv = ["ledger", "check", "--ledger", str(where / ledger)]
    if served:
        argv += ["--model", str(where / MODEL), "--fisher", str(where / FISHER)]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---- one ledger per served model ------------------------------------------------------------

def test_a_second_ledger_is_refused_while_the_first_serves_the_model(svc, capsys, monkeypatch):
    real_commit, second = ssse.ledger.commit, []

    def commit_during_another_request(*args, **kwargs):
        second.append(erase(svc, "other", "20-21", "other.jsonl"))
        second.append(capsys.readouterr().err)
        return real_commit(*args, **kwargs)
    monkeypatch.setattr(ssse.ledger, "commit", commit_during_another_request)
    assert erase(svc, "r1", "3-7") == 0
    code, err = second
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "the model" in err and "is in use by another process" in err
    assert not (svc / "other.jsonl").exists()
    assert [e["request"] for e in Ledger(svc / "ledger.jsonl").entries()] == ["r1"]
    assert not [p.name for p in svc.iterdir() if "ssse-lock" in p.name]


def test_a_second_ledger_is_refused_after_the_first_served_the_model(svc, capsys):
    assert erase(svc, "r1", "3-7") == 0
    capsys.readouterr()
    before = files(svc)
    err = refused(capsys, erase(svc, "other", "20-21", "other.jsonl"),
                  "records request 'r1' of a ledger", "does not exist",
                  "the model is ahead of the ledger")
    assert str(svc / "other.jsonl") in err
    assert files(svc) == before  # no other.jsonl, no lock file, the model as it was
    _, meta = read_metadata(svc / MODEL)
    assert meta["ledger_entry"] == hashlib.sha256(
        (svc / "ledger.jsonl").read_bytes().rstrip(b"\n")).hexdigest()


def test_lock_files_are_exclusive_and_removed(tmp_path):
    target = tmp_path / "m.safetensors"
    with lock_file(target, "the model") as held:
        assert held == target.resolve() and (tmp_path / ".m.safetensors.ssse-lock").exists()
        with pytest.raises(ssse.ledger.LedgerBusyError, match="the model .* is in use"):
            with lock_file(target, "the model"):
                pass
        os.symlink(target, tmp_path / "link.safetensors")  # another path to the same file
        with pytest.raises(ssse.ledger.LedgerBusyError):
            with lock_file(tmp_path / "link.safetensors", "the model"):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors"]
    with lock_file(tmp_path / "new" / "deeper" / "l.jsonl", "the ledger"):
        assert (tmp_path / "new" / "deeper").is_dir()
    assert not (tmp_path / "new").exists()


# ---- the inverse belongs to the model --------------------------------------------------------

def test_an_inverse_fitted_on_another_model_is_refused(trained, svc, tmp_path, capsys):
    other = trained["seed1"] / FISHER
    shutil.copy(other, svc / "other.safetensors")
    before = files(svc)
    refused(capsys, erase(svc, "r1", "3-7", fisher="other.safetensors"),
                  "--fisher was fitted at other parameters than the ones --model descends from",
                  "ssse fisher")
    assert files(svc) == before  # no ledger, no lock files
    refused(capsys, main(["erase", "--model", str(svc / MODEL), "--fisher", str(other),
                          "--indices", "3-7", "--epsilon", "0.5", "--output",
                          str(tmp_path / "e.safetensors")]), "fitted at other parameters")
    assert not (tmp_path / "e.safetensors").exists()
    # a model moved by a request records the parameters it descends from: its own inverse
    # still serves it, the other model's does not
    first = tmp_path / "first.safetensors"
    assert main(["erase", "--model", str(svc / MODEL), "--fisher", str(svc / FISHER),
                 "--indices", "0-2", "--epsilon", "0.5", "--output", str(first), "--quiet"]) == 0
    _, meta = read_metadata(first)
    assert meta["origin"].startswith("sha256:")
    capsys.readouterr()
    refused(capsys, main(["erase", "--model", str(first), "--fisher", str(other), "--indices",
                          "3-7", "--epsilon", "0.5", "--output", str(tmp_path / "e.safetensors")]),
            "fitted at other parameters")
    assert main(["erase", "--model", str(first), "--fisher", str(svc / FISHER), "--indices",
                 "3-7", "--epsilon", "0.5", "--output", str(tmp_path / "e.safetensors"),
                 "--quiet"]) == 0
    assert read_metadata(tmp_path / "e.safetensors")[1]["origin"] == meta["origin"]
    # served in place: the origin travels with every request
    assert erase(svc, "r1", "3-7") == 0 and erase(svc, "r2", "8") == 0
    assert read_metadata(svc / MODEL)[1]["origin"] == meta["origin"]


# ---- a failing health probe aborts the request ----------------------------------------------

def test_a_request_with_a_failing_health_probe_is_not_committed(svc, tmp_path, capsys):
    from safetensors import safe_open
    with safe_open(str(svc / FISHER), framework="pt") as f:
        zeroed = {k: torch.zeros_like(f.get_tensor(k)) for k in f.keys()
                  if k.startswith("packed.")}
    _rewrite(svc / FISHER, tmp_path / "zero.safetensors", tensors=zeroed)
    shutil.copy(tmp_path / "zero.safetensors", svc / FISHER)
    before = files(svc)
    err = refused(capsys, erase(svc, "r1", "3-7"), "--fisher: the inverse fails its health probe",
                  "residual 1.0e+00", "refit it with ssse fisher", "nothing was changed")
    assert "Warning" not in err
    assert files(svc) == before and not (svc / "ledger.jsonl").exists()
    refused(capsys, main(["erase", "--model", str(svc / MODEL), "--fisher", str(svc / FISHER),
                          "--indices", "3-7", "--epsilon", "0.5", "--output",
                          str(tmp_path / "e.safetensors")]), "fails its health probe")
    assert not (tmp_path / "e.safetensors").exists()


def test_a_probe_that_fails_after_the_downdate_aborts_before_the_commit(svc, capsys,
                                                                       monkeypatch):
    from ssse_ext import BlockInverseFisher
    from ssse_ext.health import Health

    real = BlockInverseFisher.health
    calls = []

    def fails_after_the_downdate(self, **kwargs):
        calls.append(kwargs)
        health = real(self, **kwargs)
        return health if len(calls) == 1 else Health(1.0, 0, health.tolerance, health.columns)
    monkeypatch.setattr(BlockInverseFisher, "health", fails_after_the_downdate)
    before = files(svc)
    refused(capsys, erase(svc, "r1", "3-7"), "fails its health probe after this request's "
            "downdate", "residual 1.0e+00", "refit")
    assert files(svc) == before


# ---- outputs that are inputs -----------------------------------------------------------------

def test_an_output_that_is_an_input_or_a_checkpoint_is_refused(svc, tmp_path, capsys):
    model, fisher = str(svc / MODEL), str(svc / FISHER)
    os.symlink(svc / MODEL, tmp_path / "link.safetensors")
    os.link(svc / MODEL, tmp_path / "hard.safetensors")
    (svc / "out").mkdir()
    shutil.copy(svc / MODEL, svc / "out" / "erased.safetensors")
    (svc / "out" / "sweep.md").write_text("3 4")
    before = files(svc)
    for argv, words in [
        (["fisher", "--model", model, "--output", model], ["--output", "is also --model"]),
        (["fisher", "--model", model, "--output", str(tmp_path / "x"), "--checkpoint",
          str(tmp_path / "x")], ["--checkpoint", "is also --output"]),
        (["fisher", "--model", model, "--checkpoint", model], ["--checkpoint", "is also --model"]),
        (["fisher", "--model", model, "--output", str(tmp_path / "link.safetensors")],
         ["is also --model"]),
        (["erase", "--model", model, "--fisher", fisher, "--indices", "1", "--epsilon", "1",
          "--output", str(tmp_path / "hard.safetensors")], ["is also --model"]),
        (["erase", "--model", model, "--fisher", fisher, "--indices", "1", "--epsilon", "1",
          "--output", fisher], ["is also --fisher"]),
        (["erase", "--model", str(svc / "out" / "erased.safetensors"), "--fisher", fisher,
          "--indices", "1", "--epsilon", "1", "--out", str(svc / "out")],
         ["--out", "is also --model"]),
        (["erase", "--model", model, "--fisher", fisher, "--indices", "1", "--epsilon", "1",
          "--ledger", model], ["--model", "is also --ledger"]),
        (["erase", "--model", model, "--fisher", model, "--indices", "1", "--epsilon", "1",
          "--ledger", str(svc / "l.jsonl")], ["--fisher", "is also --model"]),
        (["erase", "--model", model, "--fisher", fisher, "--indices-file", model, "--epsilon",
          "1", "--ledger", str(svc / "l.jsonl")], ["is also --indices-file"]),
        (["ledger", "recover", "--ledger", fisher, "--model", model, "--fisher", fisher],
         ["--fisher", "is also --ledger"]),
        (["sweep", "--model", model, "--fisher", fisher, "--indices-file",
          str(svc / "out" / "sweep.md"), "--out", str(svc / "out")],
         ["--indices-file", "where this command writes a file of that name"]),
    ]:
        refused(capsys, main(argv), *words)
    assert files(svc) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.safetensors", "link.safetensors",
                                                          "svc"]


# ---- the ledger's chain ----------------------------------------------------------------------

def test_a_final_line_without_its_newline_is_complete(svc, capsys):
    assert erase(svc, "r1", "3-7") == 0
    path = svc / "ledger.jsonl"
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert [e["request"] for e in Ledger(path).entries()] == ["r1"]
    assert not Ledger(path).verify().torn
    assert erase(svc, "r2", "8-9") == 0
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 3 and lines[2] == b""
    assert json.loads(lines[1])["prev"] == hashlib.sha256(lines[0]).hexdigest()
    assert json.loads(lines[0])["prev"] == GENESIS
    capsys.readouterr()
    code, out, err = ledger_check(capsys, svc)
    assert code == 0 and "2 requests, chain intact" in out and "at request 'r2'" in out, err


def test_a_ledger_emptied_or_missing_is_refused(svc, capsys):
    assert erase(svc, "r1", "3-7") == 0
    capsys.readouterr()
    path = svc / "ledger.jsonl"
    path.write_bytes(b"")
    before = files(svc)
    refused(capsys, erase(svc, "r2", "8-9"), "records request 'r1' of a ledger", "is empty",
            "the model is ahead of the ledger")
    assert files(svc) == before
    code, _, err = ledger_check(capsys, svc)
    assert code == 2 and "the model is ahead of the ledger" in err
    path.unlink()
    refused(capsys, erase(svc, "r2", "8-9"), "does not exist", "ahead of the ledger")
    assert not path.exists()


@pytest.mark.parametrize("edit, line, words", [
    ("duplicate-last", 4, "it does not follow line 3"),
    ("duplicate-middle", 2, "it does not follow line 1"),
    ("rename-first", 2, "it does not follow line 1"),
    ("drop-middle", 2, "it does not follow line 1"),
    ("swap", 1, "it does not follow the start of a ledger"),
])
def test_lines_edited_removed_or_duplicated_break_the_chain(svc, capsys, edit, line, words):
    for rid, indices in (("r1", "3-7"), ("r2", "8"), ("r3", "9")):
        assert erase(svc, rid, indices) == 0
    path = svc / "ledger.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    if edit == "duplicate-last":
        lines.append(lines[0])
    elif edit == "duplicate-middle":
        lines.insert(1, lines[0])
    elif edit == "rename-first":
        lines[0] = lines[0].replace(b'"request": "r1"', b'"request": "r0"')
    elif edit == "drop-middle":
        del lines[1]
    else:
        lines[0], lines[1] = lines[1], lines[0]
    path.write_bytes(b"".join(lines))
    capsys.readouterr()
    before = files(svc)
    refused(capsys, erase(svc, "r4", "10"), f"is broken at line {line}", words,
            "restore it from a copy")
    assert files(svc) == before
    code, _, err = ledger_check(capsys, svc)
    assert code == 2 and f"broken at line {line}" in err
    with pytest.raises(LedgerError, match=f"broken at line {line}"):
        Ledger(path).entries()


def test_the_last_line_is_vouched_for_by_the_files_it_served(svc, capsys):
    for rid, indices in (("r1", "3-7"), ("r2", "8")):
        assert erase(svc, rid, indices) == 0
    path = svc / "ledger.jsonl"
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"request": "r2"', b'"request": "r9"'))
    capsys.readouterr()
    refused(capsys, erase(svc, "r3", "9"), "records request 'r2', which the ledger does not hold",
            "ahead of the ledger")
    path.write_bytes(data.replace(b'"k": 1,', b'"k": 2,'))
    refused(capsys, erase(svc, "r3", "9"), "the ledger was edited at its end")
    path.write_bytes(data[:data.index(b"\n") + 1])  # the last request cut off
    refused(capsys, erase(svc, "r3", "9"), "which the ledger does not hold", "ahead")
    path.write_bytes(data)
    shutil.copy(svc / MODEL, svc / "at-r2.safetensors")
    assert erase(svc, "r3", "9") == 0
    shutil.copy(svc / "at-r2.safetensors", svc / MODEL)  # an older copy of the model
    capsys.readouterr()
    refused(capsys, erase(svc, "r4", "10"), "records request 'r2' (line 2)",
            "ends with request 'r3' (line 3)", "the model is behind the ledger")


def test_a_refused_request_leaves_no_new_ledger_behind(svc, capsys):
    before = files(svc)
    refused(capsys, erase(svc, "r1", "100000"), "out of range")
    assert files(svc) == before and sorted(p.name for p in svc.iterdir()) == [FISHER, MODEL]
    refused(capsys, erase(svc, "r1", "100000", "sub/dir/ledger.jsonl"), "out of range")
    assert sorted(p.name for p in svc.iterdir()) == [FISHER, MODEL]


def test_a_torn_last_line_is_only_one_that_does_not_parse(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    ledger.append({"request": "a", "id_digests": []})
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"request": "b", "prev": "')  # a crash while appending
    state = ledger.verify()
    assert state.torn and [e["request"] for e in state.entries] == ["a"]
    digest = ledger.append({"request": "b", "id_digests": []})  # cut off first
    assert [e["request"] for e in ledger.entries()] == ["a", "b"] and ledger.head() == digest
    path.write_bytes(path.read_bytes() + b"not json\n" + b'{"request": "c"')
    with pytest.raises(LedgerError, match="broken at line 3: not a JSON line"):
        ledger.verify()


def test_unchained_lines_are_read_as_a_prefix_and_covered_by_the_next_line(tmp_path):
    path = tmp_path / "l.jsonl"
    old = b"".join(json.dumps({"ledger": 1, "request": r, "id_digests": [d]}).encode() + b"\n"
                   for r, d in (("a", "01"), ("b", "02")))
    path.write_bytes(old)
    ledger = Ledger(path)
    assert ledger.verify().unchained == 2 and ledger.erased_digests() == {"01", "02"}
    sealed = ledger.seal({"request": "c", "id_digests": []})
    assert sealed["prev"] == hashlib.sha256(old).hexdigest() and sealed["ledger"] == 2
    assert ledger.append(sealed) == entry_digest(sealed)
    ledger.append({"request": "d", "id_digests": []})
    assert [e["request"] for e in ledger.entries()] == ["a", "b", "c", "d"]
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"01"', b'"03"'))  # an unchained line edited
    with pytest.raises(LedgerError, match="broken at line 3: it does not follow line 2"):
        ledger.entries()
    path.write_bytes(data + json.dumps({"ledger": 1, "request": "e"}).encode() + b"\n")
    with pytest.raises(LedgerError, match="broken at line 5: it has no chain hash"):
        ledger.entries()
    with pytest.raises(LedgerError, match="changed since the request was prepared"):
        path.write_bytes(data)
        ledger.append(sealed)


def test_ledger_recover_settles_an_interrupted_request(svc, capsys):
    code = forked(lambda: erase(svc, "r1", "3-7"), "ledger-appended")
    assert code == -signal.SIGKILL
    capsys.readouterr()
    code, _, err = ledger_check(capsys, svc)
    assert code == 2 and "awaits recovery" in err and "ssse ledger recover" in err
    assert main(["ledger", "recover", "--ledger", str(svc / "ledger.jsonl"), "--model",
                 str(svc / MODEL), "--fisher", str(svc / FISHER)]) == 0
    out = capsys.readouterr().out
    assert "completed request 'r1' interrupted by a crash" in out
    assert "1 request, chain intact" in out
    code, out, err = ledger_check(capsys, svc)
    assert code == 0 and "at request 'r1'" in out and "health" in out, err
    assert main(["ledger", "recover", "--ledger", str(svc / "ledger.jsonl"), "--model",
                 str(svc / MODEL), "--fisher", str(svc / FISHER)]) == 0
    assert "nothing to recover" in capsys.readouterr().out
    # rolled back: the line was never written
    assert forked(lambda: erase(svc, "r2", "8"), "ledger-pending-model") == -signal.SIGKILL
    capsys.readouterr()
    assert main(["ledger", "recover", "--ledger", str(svc / "ledger.jsonl"), "--model",
                 str(svc / MODEL), "--fisher", str(svc / FISHER)]) == 0
    assert "rolled back" in capsys.readouterr().out
    assert [e["request"] for e in Ledger(svc / "ledger.jsonl").entries()] == ["r1"]
    assert not [p for p in svc.iterdir() if "pending" in p.name or "ssse-lock" in p.name]
    code, _, err = ledger_check(capsys, svc, ledger="nope.jsonl", served=False)
    assert code == 2 and "no such file" in err


def test_files_served_before_the_chain_are_still_served(svc, tmp_path, capsys):
    assert erase(svc, "r1", "3-7") == 0
    # as the previous format left them: an unchained line, headers without the line's digest
    # and without the parameters the model descends from
    path = svc / "ledger.jsonl"
    line = json.loads(path.read_bytes())
    del line["prev"]
    path.write_bytes(json.dumps({**line, "ledger": 1}).encode() + b"\n")
    for name, drop in ((MODEL, ("ledger_entry", "origin")), (FISHER, ("ledger_entry",))):
        _, meta = read_metadata(svc / name)
        _rewrite(svc / name, tmp_path / name, meta={k: v for k, v in meta.items()
                                                    if k not in drop})
        shutil.copy(tmp_path / name, svc / name)
    old = path.read_bytes()
    assert erase(svc, "r2", "8") == 0
    second = json.loads(path.read_bytes()[len(old):])
    assert second["prev"] == hashlib.sha256(old).hexdigest()
    _, meta = read_metadata(svc / MODEL)
    assert meta["ledger_entry"] == entry_digest(second) and meta["origin"].startswith("sha256:")
    capsys.readouterr()
    code, out, err = ledger_check(capsys, svc)
    assert code == 0 and "the first 1 of ledger version 1, unchained" in out, err


def test_the_ledger_command_parses_like_the_others(capsys):
    for argv in (["ledger", "check", "--help"], ["ledger", "recover", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0 and f"usage: ssse ledger {argv[1]}" in capsys.readouterr().out
    for argv in (["ledger"], ["ledger", "recover", "--ledger", "l.jsonl"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
