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


def test_erase_and_sweep(capsys, trained):
    code, out, _ = run(capsys, "erase", "--model", str(trained / "model.safetensors"),
                       "--fisher", str(trained / "inverse_fisher.safetensors"),
                       "--indices", "0-4,9", "--epsilon", "0.5", "--out", str(trained))
    assert code == 0 and "erased 6 of 300" in out
    from ssse.io import load_model
    _, meta = load_model(trained / "erased.safetensors")
    assert meta["erased"] == [0, 1, 2, 3, 4, 9] and meta["epsilon"] == 0.5
    code, out, _ = run(capsys, "sweep", "--model", str(trained / "model.safetensors"),
                       "--fisher", str(trained / "inverse_fisher.safetensors"),
                       "--remove-class", "2", "--eps", "0.1:10:3", "--out",
                       str(trained / "sweep"), "--quiet")
    assert code == 0
    report = json.loads((trained / "sweep" / "sweep.json").read_text())
    assert len(report["ssse"]) == 3 and report["criterion"] == "delta"
    for png in report["plots"]:
        assert (trained / "sweep" / png).stat().st_size > 1000


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
