"""Smoke tests of every ``ssse`` subcommand on tiny settings; bad arguments exit 2, one line."""

import json

import pytest

from ssse.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    assert main(["train", "--data", "digits", "--train-limit", "300", "--out", str(d),
                 "--quiet"]) == 0
    assert main(["fisher", "--model", str(d / "model.safetensors"), "--layout", "rows",
                 "--out", str(d), "--quiet"]) == 0
    return d


def test_info(capsys):
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert "build" in info and info["devices"][0] == "cpu"


def _flat(model_or_state):
    import torch
    params = model_or_state.values() if isinstance(model_or_state, dict) else \
        [p.detach() for p in model_or_state.parameters()]
    return torch.cat([p.reshape(-1) for p in params])


def test_erase_applies_the_step_of_the_request(capsys, trained):
    import ssse
    from ssse.experiments.tasks import make_task
    from ssse.io import load_inverse_fisher, load_model

    code, out, _ = run(capsys, "erase", "--model", str(trained / "model.safetensors"),
                       "--fisher", str(trained / "inverse_fisher.safetensors"),
                       "--indices", "0-4,9", "--epsilon", "0.5", "--out", str(trained))
    assert code == 0 and "erased 6 of 300" in out
    erased, meta = load_model(trained / "erased.safetensors")
    assert meta["erased"] == [0, 1, 2, 3, 4, 9] and meta["epsilon"] == 0.5
    # the library's SSSE step for the same samples, epsilon, n and weight decay, on the
    # training set rebuilt from the model file's record of it (digits, its first 300 samples)
    model, mmeta = load_model(trained / "model.safetensors")
    inv, _ = load_inverse_fisher(trained / "inverse_fisher.safetensors")
    task = make_task("digits", seed=mmeta["data"]["seed"], train_limit=300)
    idx = [0, 1, 2, 3, 4, 9]
    want = ssse.ssse_update(model, task.loss_fn, task.data(idx), inv_fisher=inv, epsilon=0.5,
                            n_total=300, weight_decay=mmeta["weight_decay"])
    step = _flat(want) - _flat(model)
    assert step.norm() > 0
    assert (_flat(erased) - _flat(want)).norm() <= 1e-12 * step.norm()


def test_sweep_reports_and_plots_the_numbers_of_its_json(capsys, trained, monkeypatch):
    from ssse import plots

    drawn = {}
    real_curves, real_panels = plots.eps_curves, plots.eps_panels

    def curves(path, eps, series, **kw):
        drawn["curves"] = (list(eps), {k: list(v) for k, v in series.items()}, kw)
        return real_curves(path, eps, series, **kw)

    def panels(path, eps, data, **kw):
        drawn["panels"] = {s: {k: list(v) for k, v in d.items()} for s, d in data.items()}
        return real_panels(path, eps, data, **kw)
    monkeypatch.setattr(plots, "eps_curves", curves)
    monkeypatch.setattr(plots, "eps_panels", panels)
    code, out, _ = run(capsys, "sweep", "--model", str(trained / "model.safetensors"),
                       "--fisher", str(trained / "inverse_fisher.safetensors"),
                       "--remove-class", "2", "--eps", "0.1:10:3", "--out",
                       str(trained / "sweep"), "--quiet")
    assert code == 0
    report = json.loads((trained / "sweep" / "sweep.json").read_text())
    assert report["criterion"] == "delta" and report["eps"] == pytest.approx([0.1, 1.0, 10.0])
    deltas = [r["delta"] for r in report["ssse"]]
    # the best epsilon is the first argmin of the recorded deltas
    assert report["best_eps"] == report["eps"][deltas.index(min(deltas))]
    # the figures plot the recorded numbers, the best epsilon marked
    eps, series, kw = drawn["curves"]
    assert eps == report["eps"] and series == {"SSSE": deltas}
    assert kw["vline"] == report["best_eps"]
    for split, lines in drawn["panels"].items():
        assert lines["SSSE"] == [r["accuracy"][split] for r in report["ssse"]]
        assert lines["retrained"] == [report["retrained"]["accuracy"][split]] * 3
    for png in report["plots"]:
        assert (trained / "sweep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the printed table holds them too: one SSSE row per epsilon, the best one marked
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| SSSE")]
    assert [float(r[1]) for r in rows] == pytest.approx(report["eps"], rel=1e-3)
    assert [float(r[2]) for r in rows] == pytest.approx(deltas, abs=5e-5)
    assert [r[0] == "SSSE (best)" for r in rows] == [e == report["best_eps"]
                                                    for e in report["eps"]]


def test_fisher_representations_erase_alike(capsys, trained, tmp_path):
    """300 samples against a 640-wide weight block: --representation auto stores it in the
    low-rank form (and the 10-wide bias block dense); erasing with it gives the dense result."""
    import torch

    from ssse.io import load_inverse_fisher, load_model

    model = str(trained / "model.safetensors")
    erased = {}
    for rep in ("dense", "auto"):
        code, out, _ = run(capsys, "fisher", "--model", model, "--representation", rep,
                           "--output", str(tmp_path / f"{rep}.safetensors"), "--quiet")
        assert code == 0 and ("in the low-rank form" in out) == (rep == "auto"), out
        inv, _ = load_inverse_fisher(tmp_path / f"{rep}.safetensors")
        assert inv.representation == (("dual", "dense") if rep == "auto" else ("dense",) * 2)
        code, out, _ = run(capsys, "erase", "--model", model, "--fisher",
                           str(tmp_path / f"{rep}.safetensors"), "--indices", "0-9",
                           "--epsilon", "0.5", "--output", str(tmp_path / f"e-{rep}.safetensors"))
        assert code == 0, out
        m, _ = load_model(tmp_path / f"e-{rep}.safetensors")
        erased[rep] = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    assert ((erased["auto"] - erased["dense"]).norm() / erased["dense"].norm()) < 1e-12
    code, _, err = run(capsys, "fisher", "--model", model, "--representation", "dual",
                       "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path))
    assert code == 2 and "cannot be checkpointed" in err and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("argv", [
    ["demo", "--fraction", "2"],
    ["demo", "--eps", "bad"],
    ["erase", "--model", "nope.safetensors", "--fisher", "x", "--indices", "1",
     "--epsilon", "1"],
    ["fisher", "--model", "nope.safetensors", "--damping", "-1"],
    ["nosuchcommand"],
    ["experiment", "nosuch"],
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_bad_indices_exit_2(capsys, trained):
    code, _, err = run(capsys, "erase", "--model", str(trained / "model.safetensors"),
                       "--fisher", str(trained / "inverse_fisher.safetensors"),
                       "--indices", "100000", "--epsilon", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_help_on_every_subcommand(capsys):
    for cmd in ("demo", "train", "fisher", "erase", "sweep", "experiment", "info"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: ssse " + cmd in capsys.readouterr().out


def test_library_value_errors_exit_2_with_one_line(capsys):
    code, _, err = run(capsys, "demo", "--remove-class", "12", "--quiet")
    assert code == 2 and err.strip() == "ssse demo: error: --remove-class must be in 0..9"


def test_erase_refuses_other_data_and_counts_earlier_requests(capsys, trained, tmp_path):
    model = str(trained / "model.safetensors")
    fisher = str(trained / "inverse_fisher.safetensors")
    # another subset of digits: index i would be another sample than the one trained on
    code, _, err = run(capsys, "erase", "--model", model, "--fisher", fisher, "--indices", "1",
                       "--epsilon", "1", "--train-limit", "200")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "300 samples" in err
    code, _, err = run(capsys, "erase", "--model", model, "--fisher", fisher, "--indices", "1",
                       "--epsilon", "1", "--data", "yeast")
    assert code == 2 and len(err.strip().splitlines()) == 1
    first = tmp_path / "first.safetensors"
    assert run(capsys, "erase", "--model", model, "--fisher", fisher, "--indices", "0-4",
               "--epsilon", "1", "--output", str(first), "--quiet")[0] == 0
    code, _, err = run(capsys, "erase", "--model", str(first), "--fisher", fisher, "--indices",
                       "3-6", "--epsilon", "1", "--output", str(tmp_path / "again.safetensors"))
    assert code == 2 and "already erased" in err
    assert not (tmp_path / "again.safetensors").exists()
    code, out, _ = run(capsys, "erase", "--model", str(first), "--fisher", fisher, "--indices",
                       "5-6", "--epsilon", "1", "--output", str(tmp_path / "second.safetensors"),
                       "--quiet")
    assert code == 0 and "erased 2 of 295 samples" in out  # n - k of the earlier request
    from ssse.io import load_model
    assert load_model(tmp_path / "second.safetensors")[1]["erased"] == list(range(7))
    code, _, err = run(capsys, "sweep", "--model", str(first), "--fisher", fisher, "--indices",
                       "9", "--out", str(tmp_path))
    assert code == 2 and "already had samples erased" in err


# ---- write failures, grid cap, interrupts, indices files, messages -------------------------

def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
def test_unwritable_destinations_fail_before_the_work(capsys, tmp_path, monkeypatch):
    from ssse.experiments.tasks import Task

    def never(*args, **kwargs):
        raise AssertionError("trained before the destination was checked")
    monkeypatch.setattr(Task, "train", never)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    for argv, message in [
        (["--out", "/proc/ssse-no-such-dir"], "--out: cannot write in /proc"),  # even as root
        (["--out", str(tmp_path / "a-file")], "a-file is a file, not a folder"),
        (["--output", str(tmp_path / "a-folder")], "a-folder is a folder, expected a file"),
        (["--output", str(tmp_path / "a-file" / "m.safetensors")], "is a file, not a folder"),
    ]:
        code, _, err = run(capsys, "train", "--train-limit", "50", "--quiet", *argv)
        assert code == 2 and one_line(err) and message in err, err
    code, _, err = run(capsys, "sweep", "--model", "m", "--fisher", "f", "--indices", "1",
                       "--out", str(tmp_path / "a-file"))
    assert code == 2 and "a-file is a file, not a folder" in err


def test_an_endless_eps_grid_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--model", "m", "--fisher", "f", "--indices", "1", "--eps",
              "1:1:1000000000"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and one_line(err) and "at most 1000 grid points" in err


def test_negative_epsilon_is_reported_as_needing_a_positive_number(capsys):
    import torch
    from torch import nn

    import ssse
    for argv in (["erase", "--model", "m", "--fisher", "f", "--indices", "1", "--epsilon", "-1"],
                 ["erase", "--model", "m", "--fisher", "f", "--indices", "1", "--epsilon",
                  "-1e-3"],
                 ["demo", "--eps", "-1:1:3"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and one_line(err) and ("> 0" in err or "0 < LO" in err)
        assert ">= 0" not in err and "≥" not in err
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    loss = nn.CrossEntropyLoss(reduction="none")
    inv = ssse.fit_inverse_fisher(model, loss, (X, y), damping=0.1, progress=False)
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0, got -1.0"):
        ssse.ssse_update(model, loss, (X[:2], y[:2]), inv_fisher=inv, epsilon=-1, n_total=10)
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0, got -1.0"):
        ssse.Eraser(model, loss, damping=0.1).fit((X, y)).erase((X[:2], y[:2]), epsilon=-1)


def test_indices_files_hold_integers_only(capsys, trained, tmp_path):
    common = ["erase", "--model", str(trained / "model.safetensors"), "--fisher",
              str(trained / "inverse_fisher.safetensors"), "--epsilon", "1", "--output",
              str(tmp_path / "e.safetensors"), "--quiet"]
    for text, bad in [("[1.9]", "1.9"), ("[true, 3]", "True"), ('["1"]', "'1'"),
                      ("1 2.5", "'2.5'"), ("{}", None)]:
        f = tmp_path / "idx.txt"
        f.write_text(text)
        code, _, err = run(capsys, *common, "--indices-file", str(f))
        assert code == 2 and one_line(err) and "--indices-file" in err, (text, err)
        assert bad is None or f"integers only, got {bad}" in err
    assert not (tmp_path / "e.safetensors").exists()
    f.write_text("[4, 2]")
    code, out, _ = run(capsys, *common, "--indices-file", str(f))
    assert code == 0 and "erased 2 of 300" in out


def test_an_edited_header_is_reported_with_the_file_name(capsys, trained, tmp_path):
    from .test_io import _rewrite
    from ssse.io import FileFormatError, load_model, read_metadata

    src = trained / "model.safetensors"
    _, meta = read_metadata(src)
    edited = _rewrite(src, tmp_path / "edited.safetensors", meta={**meta, "weight_decay": "x"})
    with pytest.raises(FileFormatError, match=r"edited.safetensors: header field 'weight_decay' "
                                              r"must be a number >= 0, got 'x'"):
        load_model(edited)
    code, _, err = run(capsys, "fisher", "--model", str(edited), "--out", str(tmp_path))
    assert code == 2 and one_line(err) and str(edited) in err and "weight_decay" in err


def test_ctrl_c_during_sweep_leaves_the_output_folder_as_it_was(capsys, trained, tmp_path,
                                                               monkeypatch):
    from ssse import plots

    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text("old")
    (out / "sweep_delta.png").write_bytes(b"old")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(plots, "eps_panels", interrupted)  # after sweep_delta.png was drawn
    code, _, err = run(capsys, "sweep", "--model", str(trained / "model.safetensors"),
                       "--fisher", str(trained / "inverse_fisher.safetensors"),
                       "--remove-class", "2", "--eps", "0.1:10:2", "--out", str(out),
                       "--quiet", "--reference", str(trained / "model.safetensors"))
    assert code == 130 and err.strip() == "ssse sweep: interrupted (no partial files were " \
        "written)"
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep_delta.png"]
    assert (out / "sweep.json").read_text() == "old"
    assert (out / "sweep_delta.png").read_bytes() == b"old"  # not a new plot next to old json
    assert [p.name for p in tmp_path.iterdir()] == ["sweep"]  # no staging folder left


def test_ctrl_c_while_outputs_are_swapped_in_is_deferred(tmp_path, request):
    import os
    import signal

    from ssse.cli import _staged

    # as from a terminal: a shell that starts a job in the background ignores SIGINT in it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    with pytest.raises(KeyboardInterrupt):
        with _staged(tmp_path / "out") as stage:
            for name in ("a", "b", "c"):
                (stage / name).write_text(name)
            os.kill(os.getpid(), signal.SIGINT)  # arrives before the swap: raised at once
    assert not (tmp_path / "out").exists()
    real_replace = os.replace

    def replace_and_interrupt(src, dst):
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)  # in the middle of the swap: held until its end
    try:
        os.replace = replace_and_interrupt
        with pytest.raises(KeyboardInterrupt):
            with _staged(tmp_path / "out") as stage:
                for name in ("a", "b", "c"):
                    (stage / name).write_text(name)
    finally:
        os.replace = real_replace
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b", "c"]


def test_ctrl_c_during_the_imports_prints_one_line(tmp_path):
    import subprocess
    import sys

    # SIGINT delivered while torch is being imported by the console script's entry point
    script = (
        "import builtins, os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as from a terminal
        "real = builtins.__import__\n"
        "def hook(name, *a, **k):\n"
        "    if name == 'torch':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = hook\n"
        "import ssse_entry\n"
        "sys.exit(ssse_entry.main(['info']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "ssse: interrupted"


@pytest.mark.parametrize("curvature", ["ggn", "kfac_ggn"])
def test_the_newton_erase_takes_every_gauss_newton_curvature(capsys, trained, tmp_path,
                                                             curvature):
    """Without --epsilon, an inverse of any curvature that serves the Newton step erases with
    the library's Newton step (and serves a ledger request); another is refused, naming
    --epsilon and the curvatures that would do."""
    import shutil

    import ssse
    from ssse.experiments.tasks import make_task
    from ssse.io import load_inverse_fisher, load_model

    shutil.copy(trained / "model.safetensors", tmp_path / "model.safetensors")
    model_file, fisher = tmp_path / "model.safetensors", tmp_path / "inverse_fisher.safetensors"
    code, _, err = run(capsys, "erase", "--model", str(model_file), "--fisher",
                       str(trained / "inverse_fisher.safetensors"), "--indices", "3-7",
                       "--out", str(tmp_path))
    assert code == 2 and "--epsilon is needed" in err and "kfac_ggn" in err and \
        "empirical" in err and one_line(err)
    assert main(["fisher", "--model", str(model_file), "--curvature", curvature,
                 "--out", str(tmp_path), "--quiet"]) == 0
    code, out, _ = run(capsys, "erase", "--model", str(model_file), "--fisher", str(fisher),
                       "--indices", "3-7", "--out", str(tmp_path))
    assert code == 0 and "Newton step" in out
    erased, _ = load_model(tmp_path / "erased.safetensors")
    model, meta = load_model(model_file)
    inv, _ = load_inverse_fisher(fisher)
    assert inv.curvature == curvature
    task = make_task("digits", seed=meta["data"]["seed"], train_limit=300)
    want = ssse.newton_erase(model, task.loss_fn, task.data([3, 4, 5, 6, 7]), inv_fisher=inv,
                             n_total=300, weight_decay=meta["weight_decay"])
    step = _flat(want) - _flat(model)
    assert step.norm() > 0
    assert (_flat(erased) - _flat(want)).norm() <= 1e-10 * step.norm()
    code, out, _ = run(capsys, "erase", "--model", str(model_file), "--fisher", str(fisher),
                       "--ledger", str(tmp_path / "ledger.jsonl"), "--indices", "3-7")
    assert code == 0 and "recorded in" in out
    served, _ = load_model(model_file)
    assert (_flat(served) - _flat(want)).norm() <= 1e-10 * step.norm()


def test_compact_kronecker_curvature_by_name(capsys, trained, tmp_path):
    """`--curvature ekfac_compact` fits the compact EK-FAC, and its file erases by that name
    (the library's SSSE step with the same inverse)."""
    import shutil

    import ssse
    from ssse.experiments.tasks import make_task
    from ssse.io import load_inverse_fisher, load_model

    shutil.copy(trained / "model.safetensors", tmp_path / "model.safetensors")
    model_file, fisher = tmp_path / "model.safetensors", tmp_path / "inverse_fisher.safetensors"
    assert main(["fisher", "--model", str(model_file), "--curvature", "ekfac_compact",
                 "--out", str(tmp_path), "--quiet"]) == 0
    inv, _ = load_inverse_fisher(fisher)
    assert inv.curvature == "ekfac_compact" and "ekfac" in inv.representation
    code, _, _ = run(capsys, "erase", "--model", str(model_file), "--fisher", str(fisher),
                     "--indices", "3-7", "--epsilon", "0.5", "--out", str(tmp_path))
    assert code == 0
    erased, _ = load_model(tmp_path / "erased.safetensors")
    model, meta = load_model(model_file)
    task = make_task("digits", seed=meta["data"]["seed"], train_limit=300)
    want = ssse.ssse_update(model, task.loss_fn, task.data([3, 4, 5, 6, 7]), inv_fisher=inv,
                            epsilon=0.5, n_total=300, weight_decay=meta["weight_decay"])
    step = _flat(want) - _flat(model)
    assert step.norm() > 0
    assert (_flat(erased) - _flat(want)).norm() <= 1e-10 * step.norm()
