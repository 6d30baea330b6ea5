"""A model of no built-in architecture through the command: ``--model-factory`` builds it,
``--data-factory`` gives its training set (mapping batches with "labels", the model called with
keyword inputs), ``--params`` selects its parameters; fisher then erase give what the library
gives on the same inputs, nothing is unpickled, and every bad factory is refused in one line."""

import pickle
import sys
import textwrap
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

import ssse
from ssse.cli import main
from ssse.io import load_inverse_fisher, read_metadata, save_model
from ssse.models import loss_function

SPEC = {"features": 4, "hidden": 5, "classes": 3}
DATA = {"seed": 3, "n": 40}
WEIGHT_DECAY = 1e-3

FACTORIES = '''
import torch
from torch import nn

CALLS = []
NOT_CALLABLE = 3


class KeywordNet(nn.Module):
    """Called with keyword inputs, as a Hugging Face model is."""

    def __init__(self, features=4, hidden=5, classes=3):
        super().__init__()
        self.embed = nn.Linear(features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, features, mask):
        return self.head(torch.tanh(self.embed(features * mask)))


def build(spec):
    CALLS.append(("model", spec))
    return KeywordNet(**(spec or {"features": 4, "hidden": 5, "classes": 3}))


def data(config):
    CALLS.append(("data", config))
    config = config or {"seed": 3, "n": 40}
    g = torch.Generator().manual_seed(config["seed"])
    n = config["n"]
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, 4, generator=g) > 0.2).double()
    y = torch.randint(0, 3, (n,), generator=g)
    return [{"features": x[i:i + 16], "mask": mask[i:i + 16], "labels": y[i:i + 16]}
            for i in range(0, n, 16)]


def fewer(config):
    return data({**config, "n": 30})


def generator(config):
    return (b for b in data(config))


def returns_dict(spec):
    return {"not": "a module"}


def returns_text(config):
    return "not data"


def renamed(spec):
    return nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))


def wider(spec):
    return KeywordNet(**{**spec, "hidden": 6})


def raises(spec):
    raise RuntimeError("no such checkpoint")


def takes_tensors(spec):
    return nn.Linear(4, 3)
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """The name of a fresh module holding the factories (on ``sys.path``)."""
    name = f"factories_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / f"{name}.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(folder))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def module(name):
    return sys.modules[name]


def module_of(name):
    """The factories' module, imported."""
    import importlib

    return importlib.import_module(name)


def model_file(factories, path, kind="ssse"):
    """A model of the factory's architecture, float64, as an ssse model file recording its
    spec, loss, weight decay and data, or as a plain safetensors state dict."""
    torch.manual_seed(0)
    model = module_of(factories).KeywordNet(**SPEC).double()
    if kind == "plain":
        save_file(model.state_dict(), str(path))
    else:
        save_model(path, model, spec=SPEC, loss="cross_entropy", weight_decay=WEIGHT_DECAY,
                   data=DATA, n_train=DATA["n"])
    return path


def no_pickle(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class Refused(pickle.Unpickler):  # still a class: torch subclasses it on some imports
        __init__ = refused

    for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(owner, name, refused)
    monkeypatch.setattr(pickle, "Unpickler", Refused)


def fit_and_erase(capsys, factories, tmp_path, model_path, *extra, erase_extra=()):
    spec = ["--model-factory", f"{factories}:build", "--data-factory", f"{factories}:data"]
    code, out, err = run(capsys, "fisher", "--model", model_path, *spec, *extra, "--out",
                         tmp_path, "--quiet")
    assert code == 0, err
    erased = tmp_path / "erased.safetensors"
    code, out, err = run(capsys, "erase", "--model", model_path, "--fisher",
                         tmp_path / "inverse_fisher.safetensors", *spec, *erase_extra,
                         "--indices", "0-4,17,33", "--epsilon", "0.5", "--output", erased)
    assert code == 0, err
    assert out.startswith("erased 7 of 40 samples")
    return erased


def library_erasure(factories, model_path, *, weight_decay, params=None):
    """What the library gives on the same inputs: the model loaded into the factory's module,
    the inverse fitted on the factory's data, the SSSE update of the same samples."""
    mod = module(factories)
    model = mod.KeywordNet(**SPEC).double()
    model.load_state_dict(load_file(str(model_path)))
    model.eval()
    data = mod.data(DATA)
    ce = loss_function("cross_entropy")
    inv = ssse.fit_inverse_fisher(model, ce, data, damping=1e-3, weight_decay=weight_decay,
                                  progress=False, params=params)
    rows = torch.tensor([0, 1, 2, 3, 4, 17, 33])
    full = {k: torch.cat([b[k] for b in data]) for k in data[0]}
    removed = {k: v[rows] for k, v in full.items()}
    state = ssse.ssse_update(model, ce, removed, inv_fisher=inv, epsilon=0.5, n_total=40,
                             weight_decay=weight_decay, params=params)
    return inv, state


@pytest.mark.parametrize("kind", ["ssse", "plain"])
def test_fisher_then_erase_a_factory_model_as_the_library_does(capsys, factories, tmp_path,
                                                               monkeypatch, kind):
    model_path = model_file(factories, tmp_path / "model.safetensors", kind)
    with monkeypatch.context() as patched:
        no_pickle(patched)
        erased = fit_and_erase(capsys, factories, tmp_path, model_path)
    # the factories receive the recorded spec and data object (None: a plain file records none)
    recorded = (SPEC, DATA) if kind == "ssse" else (None, None)
    assert module(factories).CALLS[:2] == [("model", recorded[0]), ("data", recorded[1])]
    weight_decay = WEIGHT_DECAY if kind == "ssse" else 0.0
    inv, state = library_erasure(factories, model_path, weight_decay=weight_decay)
    saved, _ = load_inverse_fisher(tmp_path / "inverse_fisher.safetensors")
    assert saved.params == inv.params == ("embed.weight", "embed.bias", "head.weight",
                                          "head.bias")
    got = load_file(str(erased))
    assert set(got) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12)
    assert not torch.equal(got["head.weight"], load_file(str(model_path))["head.weight"])
    _, meta = read_metadata(erased)
    assert meta.get("spec") == (SPEC if kind == "ssse" else None)
    assert meta["erased"] == [0, 1, 2, 3, 4, 17, 33] and meta["n_train"] == 40


def test_params_select_the_parameters_fitted_and_erased(capsys, factories, tmp_path):
    model_path = model_file(factories, tmp_path / "model.safetensors")
    erased = fit_and_erase(capsys, factories, tmp_path, model_path, "--params", "head.*")
    inv, state = library_erasure(factories, model_path, weight_decay=WEIGHT_DECAY,
                                 params="head.*")
    saved, _ = load_inverse_fisher(tmp_path / "inverse_fisher.safetensors")
    assert saved.params == inv.params == ("head.weight", "head.bias") and saved.dim == 18
    got, before = load_file(str(erased)), load_file(str(model_path))
    for key in ("embed.weight", "embed.bias"):  # not selected: bit-identical
        assert torch.equal(got[key], before[key])
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(got[key], state[key], rtol=1e-10, atol=1e-12)
        assert not torch.equal(got[key], before[key])
    # the same selection given again is accepted; another one is refused, naming --params
    base = ["erase", "--model", model_path, "--fisher", tmp_path / "inverse_fisher.safetensors",
            "--model-factory", f"{factories}:build", "--data-factory", f"{factories}:data",
            "--indices", "1", "--epsilon", "0.5", "--output", tmp_path / "again.safetensors"]
    assert run(capsys, *base, "--params", "head.weight", "--params", "head.bias")[0] == 0
    code, _, err = run(capsys, *base, "--params", "embed.*")
    assert code == 2 and one_line(err) and "--params selects 2 parameters" in err
    assert "--fisher was fitted on 2" in err


def test_params_that_select_nothing_are_refused(capsys, factories, tmp_path):
    model_path = model_file(factories, tmp_path / "model.safetensors")
    code, _, err = run(capsys, "fisher", "--model", model_path, "--model-factory",
                       f"{factories}:build", "--data-factory", f"{factories}:data",
                       "--params", "lora_*", "--out", tmp_path, "--quiet")
    assert code == 2 and one_line(err)
    assert "--params: 'lora_*' selects no parameter of the model" in err
    assert not (tmp_path / "inverse_fisher.safetensors").exists()


def test_an_inverse_of_other_parameters_is_refused_naming_params(capsys, factories, tmp_path):
    model_path = model_file(factories, tmp_path / "model.safetensors")
    fit_and_erase(capsys, factories, tmp_path, model_path)
    other = tmp_path / "other.safetensors"  # as many parameters, under other names
    save_file(module(factories).renamed(None).double().state_dict(), str(other))
    code, _, err = run(capsys, "erase", "--model", other, "--fisher",
                       tmp_path / "inverse_fisher.safetensors", "--model-factory",
                       f"{factories}:renamed", "--data-factory", f"{factories}:data",
                       "--indices", "1", "--epsilon", "1", "--output", tmp_path / "e2.safetensors")
    assert code == 2 and one_line(err)
    assert "--fisher was fitted on parameters the model does not have (4 of 4, e.g. " \
        "['embed.weight', 'embed.bias', 'head.weight'])" in err and "--params" in err
    assert not (tmp_path / "e2.safetensors").exists()


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "argument --model-factory: expected package.module:function, got 'nocolon'"),
    ("mod:", "expected package.module:function"),
    (":build", "expected package.module:function"),
    ("1mod:build", "expected package.module:function"),
    ("mod:build extra", "expected package.module:function"),
    ("mod.:build", "expected package.module:function"),
])
def test_a_malformed_factory_is_refused_by_the_parser(capsys, tmp_path, spec, message):
    code, _, err = run(capsys, "fisher", "--model", tmp_path / "m.safetensors",
                       "--model-factory", spec)
    assert code == 2 and one_line(err) and message in err


def refusal(capsys, tmp_path, factories, model_factory, data_factory="data"):
    model_path = model_file(factories, tmp_path / "model.safetensors")
    code, out, err = run(capsys, "fisher", "--model", model_path, "--model-factory",
                         model_factory.format(m=factories), "--data-factory",
                         f"{factories}:{data_factory}", "--out", tmp_path / "out", "--quiet")
    assert code == 2 and one_line(err), err
    assert not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize("model_factory, message", [
    ("no_such_module_for_ssse:build", "--model-factory no_such_module_for_ssse:build: cannot "
     "import module 'no_such_module_for_ssse' (ModuleNotFoundError"),
    ("{m}:missing", "has no attribute 'missing'"),
    ("{m}:KeywordNet.missing", "'KeywordNet' has no attribute 'missing'"),
    ("{m}:NOT_CALLABLE", ": NOT_CALLABLE is not callable (it is a int)"),
    ("{m}:returns_dict", "--model-factory must return a torch.nn.Module, got dict"),
    ("{m}:raises", "--model-factory: raises() raised RuntimeError: no such checkpoint"),
    ("{m}:renamed", "does not match --model"),
    ("{m}:wider", "3 tensors of other shapes, e.g. embed.weight (5, 4) (the model's (6, 4))"),
])
def test_a_bad_model_factory_is_refused_in_one_line(capsys, factories, tmp_path, model_factory,
                                                    message):
    err = refusal(capsys, tmp_path, factories, model_factory)
    assert err.startswith("ssse fisher: error: ") and message in err
    if model_factory.endswith("renamed"):
        assert "4 tensors missing in the file, e.g. 0.weight, 0.bias, 1.weight; 4 tensors " \
            "not in the model, e.g. embed.bias, embed.weight, head.bias" in err


@pytest.mark.parametrize("data_factory, message", [
    ("missing", "has no attribute 'missing'"),
    ("returns_text", "what --data-factory returns must be an (inputs, targets) pair"),
    ("generator", "what --data-factory returns is read more than once"),
    ("fewer", "the model was trained on 40 samples, but --data-factory gives 30"),
])
def test_a_bad_data_factory_is_refused_in_one_line(capsys, factories, tmp_path, data_factory,
                                                   message):
    err = refusal(capsys, tmp_path, factories, "{m}:build", data_factory)
    assert message in err and "--data-factory" in err


def test_inputs_the_model_does_not_take_are_refused(capsys, factories, tmp_path):
    model_path = tmp_path / "model.safetensors"
    save_file(module_of(factories).takes_tensors(None).double().state_dict(), str(model_path))
    code, _, err = run(capsys, "fisher", "--model", model_path, "--model-factory",
                       f"{factories}:takes_tensors", "--data-factory", f"{factories}:data",
                       "--out", tmp_path / "out", "--quiet")
    assert code == 2 and one_line(err)
    assert "the model does not take the inputs --data-factory gives (TypeError" in err
    assert not (tmp_path / "out").exists()
    # a built-in data set for a model of keyword inputs
    code, _, err = run(capsys, "fisher", "--model", model_file(factories, model_path),
                       "--model-factory", f"{factories}:build", "--data", "digits",
                       "--train-limit", "40", "--out", tmp_path / "out", "--quiet")
    assert code == 2 and one_line(err)
    assert f"the model ({SPEC}) does not take the inputs of data set 'digits'" in err


def test_classes_are_those_of_the_factory_data(capsys, factories, tmp_path):
    model_path = model_file(factories, tmp_path / "model.safetensors")
    spec = ["--model-factory", f"{factories}:build", "--data-factory", f"{factories}:data"]
    assert run(capsys, "fisher", "--model", model_path, *spec, "--out", tmp_path,
               "--quiet")[0] == 0
    base = ["erase", "--model", model_path, "--fisher", tmp_path / "inverse_fisher.safetensors",
            *spec, "--epsilon", "0.5", "--output", tmp_path / "e.safetensors"]
    code, out, err = run(capsys, *base, "--remove-class", "1", "--fraction", "0.5")
    assert code == 0, err
    labels = torch.cat([b["labels"] for b in module(factories).data(DATA)])
    k = round(0.5 * int((labels == 1).sum()))
    assert out.startswith(f"erased {k} of 40 samples")
    code, _, err = run(capsys, *base, "--remove-class", "3")
    assert code == 2 and one_line(err) and "--remove-class 3: classes are 0..2" in err
    code, _, err = run(capsys, *base, "--remove-attribute", "0")
    assert code == 2 and one_line(err) and "the data set has no such attribute" in err


def test_data_dir_reaches_the_data_factory(capsys, factories, tmp_path):
    model_path = model_file(factories, tmp_path / "model.safetensors")
    code, _, err = run(capsys, "fisher", "--model", model_path, "--model-factory",
                       f"{factories}:build", "--data-factory", f"{factories}:data",
                       "--data-dir", tmp_path / "files", "--out", tmp_path, "--quiet")
    assert code == 0, err
    assert ("data", {**DATA, "data_dir": str(tmp_path / "files")}) in module(factories).CALLS


def test_options_that_do_not_combine_with_the_factories(capsys, factories, tmp_path):
    model_path = model_file(factories, tmp_path / "model.safetensors")
    spec = ["--model-factory", f"{factories}:build", "--data-factory", f"{factories}:data"]
    code, _, err = run(capsys, "fisher", "--model", model_path, *spec, "--data", "digits",
                       "--out", tmp_path, "--quiet")
    assert code == 2 and one_line(err) and "--data chooses a built-in data set" in err
    fisher = tmp_path / "inverse.safetensors"
    fisher.write_bytes(model_path.read_bytes())  # not read: the combination is refused first
    code, _, err = run(capsys, "erase", "--model", model_path, "--fisher", fisher, *spec,
                       "--indices", "1", "--epsilon", "1", "--ledger", tmp_path / "l.jsonl")
    assert code == 2 and one_line(err)
    assert "--model-factory: requests served with --ledger" in err
    # a factory model whose file records no built-in data set needs --data-factory
    code, _, err = run(capsys, "fisher", "--model", model_path, *spec[:2], "--out", tmp_path,
                       "--quiet")
    assert code == 2 and one_line(err) and "give --data-factory" in err


def test_a_model_of_no_built_in_architecture_asks_for_a_factory(capsys, factories, tmp_path):
    model_path = model_file(factories, tmp_path / "model.safetensors")
    code, _, err = run(capsys, "fisher", "--model", model_path, "--out", tmp_path, "--quiet")
    assert code == 2 and one_line(err)
    assert "none of the built-in architectures (linear, small_resnet, resnet): give " \
        "--model-factory" in err
    plain = model_file(factories, tmp_path / "plain.safetensors", "plain")
    code, _, err = run(capsys, "fisher", "--model", plain, "--out", tmp_path, "--quiet")
    assert code == 2 and one_line(err) and "is a plain safetensors file" in err
    # sweep takes no factory: it does not suggest one
    code, _, err = run(capsys, "sweep", "--model", model_path, "--fisher", model_path,
                       "--indices", "1", "--out", tmp_path / "s")
    assert code == 2 and one_line(err) and "give --model-factory" not in err


def test_a_built_in_model_through_a_factory(capsys, factories, tmp_path):
    """A factory may build any module, a built-in architecture's too, with a built-in data
    set: the result is the built-in path's."""
    built_in = tmp_path / "builtin"
    assert main(["train", "--data", "digits", "--train-limit", "120", "--out", str(built_in),
                 "--quiet"]) == 0
    module_path = tmp_path / "code" / f"{factories}.py"
    module_path.write_text(module_path.read_text() + textwrap.dedent('''
        def linear(spec):
            CALLS.append(("linear", spec))
            return nn.Linear(spec["in_features"], spec["out_features"])
        '''))
    model_path = built_in / "model.safetensors"
    for sub, extra in (("a", []), ("b", ["--model-factory", f"{factories}:linear"])):
        out = tmp_path / sub
        assert run(capsys, "fisher", "--model", model_path, *extra, "--layout", "rows",
                   "--out", out, "--quiet")[0] == 0
        code, _, err = run(capsys, "erase", "--model", model_path, "--fisher",
                           out / "inverse_fisher.safetensors", *extra, "--remove-class", "3",
                           "--epsilon", "0.5", "--output", out / "erased.safetensors")
        assert code == 0, err
    a, b = (load_file(str(tmp_path / s / "erased.safetensors")) for s in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert module(factories).CALLS[0][0] == "linear"
    assert module(factories).CALLS[0][1]["arch"] == "linear"
