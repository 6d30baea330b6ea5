"""Arguments that would ask for more memory than there is, files whose headers were edited,
and values that used to be accepted silently: each is refused before any work, with one line
(exit 2) from the command and an exception naming the argument from the library."""

import os

import pytest
import torch
from torch import nn

import ssse
from ssse.cli import main
from ssse.io import FileFormatError, load_checkpoint, load_model, read_metadata, save_model

from .test_io import _rewrite

CE = nn.CrossEntropyLoss(reduction="none")


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(autouse=True)
def threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    assert main(["train", "--data", "digits", "--train-limit", "200", "--out", str(d),
                 "--quiet"]) == 0
    assert main(["fisher", "--model", str(d / "model.safetensors"), "--layout", "rows",
                 "--out", str(d), "--quiet"]) == 0
    return d


def erase_argv(trained, *extra, model=None, fisher=None):
    return ["erase", "--model", str(model or trained / "model.safetensors"), "--fisher",
            str(fisher or trained / "inverse_fisher.safetensors"), "--epsilon", "1", *extra]


def edited(src, target, **fields):
    _, meta = read_metadata(src)
    state = fields.pop("state", None)
    if state is not None:
        meta["state"] = {**meta["state"], **state}
    return _rewrite(src, target, meta={**meta, **fields})


# ---- memory asked for by arguments ----------------------------------------------------------

def test_index_ranges_are_checked_against_the_data_before_they_are_built(capsys, trained,
                                                                         tmp_path):
    from ssse.cli import _int_list

    huge = _int_list("0-99999999999")
    assert huge == [(0, 99999999999)] and huge.outside(200) == [99999999999]
    assert _int_list("5-7,0-5,20").expand() == [0, 1, 2, 3, 4, 5, 6, 7, 20]
    code, _, err = run(capsys, *erase_argv(trained, "--indices", "0-99999999999", "--output",
                                           str(tmp_path / "e.safetensors")))
    assert code == 2 and one_line(err) and "out of range [0, 200)" in err
    code, _, err = run(capsys, "sweep", "--model", str(trained / "model.safetensors"),
                       "--fisher", str(trained / "inverse_fisher.safetensors"),
                       "--remove-class", "0-99999999999", "--out", str(tmp_path / "s"))
    assert code == 2 and one_line(err) and "--remove-class 99999999999: classes are 0..9" in err
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "s").exists()


def test_mc_samples_that_exceed_the_chunk_budget_are_refused(capsys, trained, tmp_path,
                                                             monkeypatch):
    # plenty of memory: the refusal is the chunk budget's, not the machine's
    monkeypatch.setenv("SSSE_AVAILABLE_MEMORY", str(1 << 50))
    code, _, err = run(capsys, "fisher", "--model", str(trained / "model.safetensors"),
                       "--curvature", "mc", "--mc-samples", "1000000", "--output",
                       str(tmp_path / "f.safetensors"), "--quiet")
    assert code == 2 and one_line(err) and "--mc-samples" in err and "a chunk may use" in err
    assert not (tmp_path / "f.safetensors").exists()
    model = nn.Linear(4, 3).double().eval()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="mc_samples"):
        ssse.fit_inverse_fisher(model, CE, (X, y), damping=0.1, curvature="mc",
                                mc_samples=10_000, max_memory=1 << 20, progress=False)


def test_a_refusal_for_memory_is_one_line(capsys, trained, tmp_path, monkeypatch):
    class Refused(MemoryError):
        needed = 1 << 40

    def refuse(*args, **kwargs):
        raise Refused("fit_inverse_fisher: needs about 1 TiB\non cpu")
    monkeypatch.setattr(ssse, "fit_inverse_fisher", refuse)
    code, _, err = run(capsys, "fisher", "--model", str(trained / "model.safetensors"),
                       "--output", str(tmp_path / "f.safetensors"), "--quiet")
    assert code == 2 and one_line(err) and "needs about 1 TiB on cpu" in err


def test_bench_cases_that_do_not_fit_are_refused_before_anything_runs(capsys, monkeypatch):
    from ssse_ext import bench

    def never(*args, **kwargs):
        raise AssertionError("measured before the arguments were checked")
    monkeypatch.setattr(bench, "run_case", never)
    monkeypatch.setattr(bench, "matmul_gflops", never)
    code, _, err = run(capsys, "bench", "--cases", "1000000:100:100000")
    assert code == 2 and one_line(err) and "needs about" in err and "MemAvailable" in err
    assert bench.case_bytes(1000000, 100, 100000, torch.float64) > 8e13  # the 80 TB gradients
    monkeypatch.setattr(bench, "available_bytes", lambda device: (1 << 20, "test"))
    code, _, err = run(capsys, "bench", "--small", "--dtype", "float64")
    assert code == 2 and one_line(err) and "--cases 1024:4:256" in err


def test_threads_are_bounded_by_the_cpus(capsys, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    code, _, err = run(capsys, "train", "--threads", "4096", "--quiet")
    assert code == 2 and one_line(err)
    assert "--threads: expected at most 4 (os.cpu_count()" in err and "got 4096" in err


# ---- one line instead of a traceback --------------------------------------------------------

@pytest.mark.parametrize("dtype", ["int64", "float16", "nn"])
def test_model_and_inverse_headers_with_other_dtypes_are_refused(capsys, trained, tmp_path,
                                                                 dtype):
    model = edited(trained / "model.safetensors", tmp_path / "m.safetensors", dtype=dtype)
    with pytest.raises(FileFormatError, match="header field 'dtype'"):
        load_model(model)
    code, _, err = run(capsys, *erase_argv(trained, "--indices", "1", model=model), "--out",
                       str(tmp_path))
    assert code == 2 and one_line(err) and "'dtype'" in err and str(model) in err
    fisher = edited(trained / "inverse_fisher.safetensors", tmp_path / "f.safetensors",
                    state={"dtype": dtype})
    code, _, err = run(capsys, *erase_argv(trained, "--indices", "1", fisher=fisher),
                       "--out", str(tmp_path))
    assert code == 2 and one_line(err) and "'state.dtype'" in err and str(fisher) in err
    assert not (tmp_path / "erased.safetensors").exists()


def test_a_half_precision_model_asks_for_dtype(capsys, trained, tmp_path):
    model, meta = load_model(trained / "model.safetensors")
    half = save_model(tmp_path / "half.safetensors", model.half(), spec=meta["spec"],
                      **{k: v for k, v in meta.items() if k not in ("spec", "dtype")})
    assert load_model(half)[0].weight.dtype == torch.float16  # the library reads it back
    code, _, err = run(capsys, "fisher", "--model", str(half), "--out", str(tmp_path))
    assert code == 2 and one_line(err) and "float16 parameters" in err and "--dtype" in err


def test_sweep_refuses_a_reference_of_another_model_or_data_set(capsys, trained, tmp_path):
    from ssse.models import build_model

    spec = {"arch": "linear", "in_features": 104, "out_features": 14, "bias": False}
    yeast = save_model(tmp_path / "yeast.safetensors", build_model(spec).double(), spec=spec,
                       data={"name": "yeast"}, n_train=1500)
    common = ["sweep", "--model", str(trained / "model.safetensors"), "--fisher",
              str(trained / "inverse_fisher.safetensors"), "--indices", "1", "--eps", "1:1:1",
              "--out", str(tmp_path / "s"), "--quiet"]
    code, _, err = run(capsys, *common, "--reference", str(yeast))
    assert code == 2 and one_line(err) and "--reference" in err and "another model" in err
    _, meta = read_metadata(trained / "model.safetensors")
    other = edited(trained / "model.safetensors", tmp_path / "other.safetensors",
                   data={**meta["data"], "name": "fashion-mnist"})
    code, _, err = run(capsys, *common, "--reference", str(other))
    assert code == 2 and one_line(err) and "was trained on fashion-mnist" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, message", [
    (["--damping", "nan"], "argument --damping: expected a finite number > 0, got 'nan'"),
    (["--damping", "-1"], "argument --damping: expected a finite number > 0, got '-1'"),
    (["--seed", "1e23"], "argument --seed: expected an integer in [0, 4294967295]"),
    (["--seed", "100000000000000000000000"], "argument --seed: expected an integer in"),
    (["--repeats", "0"], "argument --repeats: expected an integer > 0"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--device", "mps"], "--device must be a CPU or CUDA device"),
    (["--model", "--bogus"], "ssse bench --model: error: unrecognized arguments: --bogus"),
    (["--model", "--k", "300", "--n", "256"], "--k (300 samples erased) must be less than"),
])
def test_bench_usage_errors_are_one_line(capsys, monkeypatch, argv, message):
    from ssse.experiments import model_bench
    from ssse_ext import bench

    def never(*args, **kwargs):
        raise AssertionError("measured before the arguments were checked")
    monkeypatch.setattr(bench, "run_case", never)
    monkeypatch.setattr(model_bench, "run", never)
    cases = [] if argv[0] == "--model" else ["--cases", "32:2:8"]
    code, _, err = run(capsys, "bench", *cases, *argv)
    assert code == 2 and one_line(err) and message in err, err


@pytest.mark.parametrize("model", [False, True])
def test_bench_json_destination_is_checked_before_the_benchmark(capsys, monkeypatch, tmp_path,
                                                                model):
    from ssse.experiments import model_bench
    from ssse_ext import bench

    def never(*args, **kwargs):
        raise AssertionError("measured before --json was checked")
    monkeypatch.setattr(bench, "run_case", never)
    monkeypatch.setattr(bench, "matmul_gflops", never)
    monkeypatch.setattr(model_bench, "run", never)
    which = ["--model"] if model else ["--cases", "32:2:8", "--dtype", "float64"]
    code, _, err = run(capsys, "bench", *which, "--json", str(tmp_path))
    assert code == 2 and one_line(err) and "is a folder, expected a file" in err
    code, _, err = run(capsys, "bench", *which, "--json", str(tmp_path / "no" / "r.json"))
    assert code == 2 and one_line(err) and "does not exist" in err


# ---- values that were accepted silently -----------------------------------------------------

def test_train_limit_above_the_data_set_is_refused(capsys, tmp_path):
    from ssse.data import load_digits

    for value, message in (("5000", "at most the 1257 training samples of digits, got 5000"),
                           ("1e23", "expected an integer > 0, got '1e23'"),
                           ("2.5", "expected an integer > 0, got '2.5'")):
        code, _, err = run(capsys, "train", "--train-limit", value, "--out", str(tmp_path),
                           "--quiet")
        assert code == 2 and one_line(err) and "train-limit" in err and message in err, err
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match="train_limit .* at most the 1257"):
        load_digits(train_limit=5000)
    with pytest.raises(TypeError, match="train_limit must be an int"):
        load_digits(train_limit=2.5)
    assert load_digits(train_limit=1257).n_train == 1257


def test_header_counts_must_fit_the_training_set(capsys, trained, tmp_path):
    fisher = edited(trained / "inverse_fisher.safetensors", tmp_path / "f.safetensors",
                    minibatch=10 ** 9)
    with pytest.raises(FileFormatError, match="'minibatch' must be at most n_train"):
        read_metadata(fisher)
    code, _, err = run(capsys, *erase_argv(trained, "--indices", "1", fisher=fisher), "--out",
                       str(tmp_path))
    assert code == 2 and one_line(err) and "'minibatch' must be at most n_train (200)" in err
    model = edited(trained / "model.safetensors", tmp_path / "m.safetensors", erased=[5, 900])
    code, _, err = run(capsys, *erase_argv(trained, "--indices", "1", model=model), "--out",
                       str(tmp_path))
    assert code == 2 and one_line(err) and "'erased' must hold indices below n_train" in err
    code, _, err = run(capsys, "fisher", "--model", str(trained / "model.safetensors"),
                       "--minibatch", "500", "--out", str(tmp_path))
    assert code == 2 and one_line(err) and "--minibatch 500" in err
    assert not (tmp_path / "erased.safetensors").exists()


@pytest.mark.parametrize("request_id", ["", "   ", "a\nb"])
def test_an_empty_request_id_is_refused(capsys, trained, tmp_path, request_id):
    code, _, err = run(capsys, *erase_argv(trained, "--indices", "1"), "--ledger",
                       str(tmp_path / "ledger.jsonl"), "--request-id", request_id)
    assert code == 2 and one_line(err) and "--request-id" in err
    assert not (tmp_path / "ledger.jsonl").exists()


def _cursors(monkeypatch):
    import ssse.io

    cursors = []
    real = ssse.io.save_checkpoint

    def recording(path, tensors, meta):
        cursors.append(meta["cursor"])
        return real(path, tensors, meta)
    monkeypatch.setattr(ssse.io, "save_checkpoint", recording)
    return cursors


def test_every_checkpoints_every_n_samples(capsys, trained, tmp_path, monkeypatch):
    cursors = _cursors(monkeypatch)
    code, _, err = run(capsys, "fisher", "--model", str(trained / "model.safetensors"),
                       "--layout", "rows", "--checkpoint", str(tmp_path / "fit.ck"), "--every",
                       "30", "--output", str(tmp_path / "f.safetensors"), "--quiet")
    assert code == 0, err
    assert cursors == [30, 60, 90, 120, 150, 180, 200]  # the last one: the fit is complete
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double().eval()
    X, y = torch.randn(50, 4, dtype=torch.float64), torch.randint(0, 3, (50,))
    cursors.clear()
    ssse.fit_inverse_fisher(model, CE, [(X[:7], y[:7]), (X[7:], y[7:])], damping=0.1,
                            minibatch=2, chunk_size=4, checkpoint=tmp_path / "lib.ck", every=6,
                            progress=False)
    assert cursors == [6, 12, 18, 24, 30, 36, 42, 48, 50]
    with pytest.raises(ValueError, match=r"every \(5\) must be a multiple of minibatch \(2\)"):
        ssse.fit_inverse_fisher(model, CE, (X, y), damping=0.1, minibatch=2,
                                checkpoint=tmp_path / "x.ck", every=5, progress=False)
    code, _, err = run(capsys, "fisher", "--model", str(trained / "model.safetensors"),
                       "--minibatch", "4", "--every", "30", "--checkpoint",
                       str(tmp_path / "y.ck"), "--out", str(tmp_path))
    assert code == 2 and one_line(err) and "multiple of --minibatch 4" in err


def test_a_resume_with_other_threads_or_every_is_refused(capsys, trained, tmp_path,
                                                         monkeypatch):
    import ssse.io

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    real = ssse.io.save_checkpoint
    saved = []

    def dies_after_the_first(path, tensors, meta):
        if saved:
            raise RuntimeError("killed")
        saved.append(real(path, tensors, meta))
    monkeypatch.setattr(ssse.io, "save_checkpoint", dies_after_the_first)
    ck = tmp_path / "fit.ck"
    argv = ["fisher", "--model", str(trained / "model.safetensors"), "--layout", "rows",
            "--checkpoint", str(ck), "--output", str(tmp_path / "f.safetensors"), "--quiet"]
    with pytest.raises(RuntimeError, match="killed"):
        main(argv + ["--every", "50", "--threads", "1"])
    monkeypatch.setattr(ssse.io, "save_checkpoint", real)
    assert load_checkpoint(ck)[1]["fit"]["threads"] == 1
    code, _, err = run(capsys, *argv, "--every", "50", "--threads", "2")
    assert code == 2 and one_line(err) and "made with 1 threads" in err and "--threads 1" in err
    code, _, err = run(capsys, *argv, "--every", "40", "--threads", "1")
    assert code == 2 and one_line(err) and "every=50 (--every), got 40" in err
    assert not (tmp_path / "f.safetensors").exists()
    code, out, err = run(capsys, *argv, "--every", "50", "--threads", "1")
    assert code == 0 and f"resumed from {ck} at sample 50" in out, err
    model = nn.Linear(4, 3).double().eval()
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    torch.set_num_threads(1)
    fit = dict(damping=0.1, checkpoint=tmp_path / "l.ck", every=10, chunk_size=5,
               progress=False)
    ssse.fit_inverse_fisher(model, CE, (X, y), **fit)  # leaves its complete checkpoint
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match=r"made with 1 threads, this process has 2"):
        ssse.fit_inverse_fisher(model, CE, (X, y), **fit)
