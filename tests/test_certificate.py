"""The per-request certificate: the gradient residual of the retained objective, checked
against a direct autograd computation, recorded in the ledger by ``verify``, with the
retraining advice above a threshold."""

import shutil

import pytest
import torch
from torch import nn

from ssse.certificate import certify, gradient_residual
from ssse.cli import main
from ssse.io import load_model
from ssse.ledger import Ledger
from ssse.service import serve_request

MODEL, FISHER, LEDGER = "model.safetensors", "inverse_fisher.safetensors", "ledger.jsonl"


def test_the_residual_is_the_norm_of_the_mean_regularised_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    w = 0.1
    loss = nn.CrossEntropyLoss(reduction="none")
    got, n = gradient_residual(model, loss, [(x[:13], y[:13]), (x[13:], y[13:])],
                               weight_decay=w)
    objective = nn.functional.cross_entropy(model(x), y) + 0.5 * w * sum(
        (p * p).sum() for p in model.parameters())
    grads = torch.autograd.grad(objective, list(model.parameters()))
    want = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    assert n == 30 and abs(got - want) <= 1e-13 * want
    # a selection: the norm over the selected parameters only
    head, _ = gradient_residual(model, loss, (x, y), weight_decay=w, params="2.*")
    want_head = float(torch.cat([g.reshape(-1) for g in grads[2:]]).norm())
    assert abs(head - want_head) <= 1e-13 * want_head
    cert = certify(model, loss, (x, y), weight_decay=w, retrain_above=want / 2)
    assert cert["retrain_recommended"] and cert["n_retained"] == 30
    assert not certify(model, loss, (x, y), weight_decay=w, retrain_above=want * 2)[
        "retrain_recommended"]
    assert not certify(model, loss, (x, y), weight_decay=w)["retrain_recommended"]
    with pytest.raises(ValueError, match="retrain_above"):
        certify(model, loss, (x, y), retrain_above=0.0)


@pytest.fixture
def svc(served_digits, tmp_path):
    d = tmp_path / "svc"
    d.mkdir()
    for name in (MODEL, FISHER):
        shutil.copy(served_digits(0) / name, d / name)
    return d


def test_the_ledger_records_the_certificate_of_each_request(svc, one_thread):
    first = serve_request(svc / MODEL, svc / FISHER, svc / LEDGER, [3, 4, 5], epsilon=0.5,
                          request_id="r1", verify=True)
    cert = first.entry["certificate"]
    # the same residual computed from the files: the erased model on the samples kept
    from ssse.data import load_recorded
    from ssse.models import loss_function

    model, meta = load_model(svc / MODEL)
    ds = load_recorded(meta["data"], dtype=next(model.parameters()).dtype)
    x, y = ds.train()
    keep = torch.ones(ds.n_train, dtype=torch.bool)
    keep[[3, 4, 5]] = False
    want, n = gradient_residual(model, loss_function(meta["loss"]), (x[keep], y[keep]),
                                weight_decay=meta["weight_decay"])
    assert cert["n_retained"] == n == ds.n_train - 3
    assert abs(cert["residual"] - want) <= 1e-12 * want
    assert cert["retrain_recommended"] is False and cert["retrain_above"] is None
    # a threshold below the residual: the next line advises retraining; the chain still holds
    second = serve_request(svc / MODEL, svc / FISHER, svc / LEDGER, [8], epsilon=0.5,
                           request_id="r2", verify=True, retrain_above=cert["residual"] / 10)
    assert second.entry["certificate"]["n_retained"] == ds.n_train - 4
    assert second.entry["certificate"]["retrain_recommended"] is True
    assert [e["request"] for e in Ledger(svc / LEDGER).entries()] == ["r1", "r2"]
    # without verify, no certificate
    third = serve_request(svc / MODEL, svc / FISHER, svc / LEDGER, [9], epsilon=0.5,
                          request_id="r3")
    assert "certificate" not in third.entry
    with pytest.raises(ValueError, match="verify"):
        serve_request(svc / MODEL, svc / FISHER, svc / LEDGER, [10], epsilon=0.5,
                      retrain_above=1.0)


def test_the_command_prints_the_certificate_and_refuses_it_without_a_ledger(svc, one_thread,
                                                                            capsys):
    code = main(["erase", "--model", str(svc / MODEL), "--fisher", str(svc / FISHER),
                 "--indices", "3,4", "--epsilon", "0.5", "--ledger", str(svc / LEDGER),
                 "--verify", "--retrain-above", "1e-12"])
    assert code == 0
    out = capsys.readouterr().out
    assert "certificate: gradient residual" in out and "retrain recommended" in out
    for extra, message in ((["--verify"], "--verify needs --ledger"),
                           (["--retrain-above", "1"], "--retrain-above needs --verify")):
        code = main(["erase", "--model", str(svc / MODEL), "--fisher", str(svc / FISHER),
                     "--indices", "5", "--epsilon", "0.5", "--out", str(svc / "o.safetensors"),
                     *extra])
        assert code == 2 and message in capsys.readouterr().err
        assert not (svc / "o.safetensors").exists()


def test_an_eraser_request_records_the_certificate_at_the_new_parameters(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    loss = nn.CrossEntropyLoss(reduction="none")
    from ssse import Eraser

    eraser = Eraser(model, loss, damping=1e-3, weight_decay=0.01,
                    ledger=tmp_path / "ledger.jsonl")
    eraser.fit((x, y))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = (x[5:], y[5:])
    state = eraser.erase((x[:5], y[:5]), ids=list(range(5)), epsilon=0.5, verify=kept,
                         retrain_above=1e9)
    # the residual of the returned parameters on the kept data, computed independently
    erased = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    erased.load_state_dict(state)
    want, n = gradient_residual(erased, loss, kept, weight_decay=0.01)
    cert = eraser.last_certificate
    assert n == 35 and cert["n_retained"] == 35
    assert abs(cert["residual"] - want) <= 1e-12 * want
    assert cert["retrain_recommended"] is False
    assert eraser.last_request["certificate"] == cert
    assert Ledger(tmp_path / "ledger.jsonl").entries()[-1]["certificate"] == cert
    # the model was not written (inplace=False), and the residual is not the old model's
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    old, _ = gradient_residual(model, loss, kept, weight_decay=0.01)
    assert abs(old - want) > 1e-6 * want
    # a second request with a threshold below the residual recommends retraining
    eraser.erase((x[5:8], y[5:8]), ids=[5, 6, 7], epsilon=0.5, verify=(x[8:], y[8:]),
                 retrain_above=1e-12)
    assert eraser.last_certificate["retrain_recommended"] is True
    eraser.erase((x[8:9], y[8:9]), ids=[8], epsilon=0.5)
    assert eraser.last_certificate is None and "certificate" not in eraser.last_request


def test_an_eraser_refuses_a_bad_verify_and_changes_nothing():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    from ssse import Eraser

    eraser = Eraser(model, nn.CrossEntropyLoss(reduction="none"), damping=1e-3)
    eraser.fit((x, y))
    theta, inv = eraser.theta.clone(), eraser.inv_fisher.packed.clone()
    for kwargs, exc, match in (({"verify": True}, TypeError, "verify must be the data"),
                               ({"retrain_above": 1.0}, ValueError, "retrain_above needs"),
                               ({"verify": (x[2:], y[2:]), "retrain_above": -1.0}, ValueError,
                                "retrain_above"),
                               ({"verify": (x[2:0], y[2:0])}, ValueError, "retained is empty")):
        with pytest.raises(exc, match=match):
            eraser.erase((x[:2], y[:2]), epsilon=0.5, **kwargs)
        assert torch.equal(eraser.theta, theta) and eraser.n == 20
        assert torch.equal(eraser.inv_fisher.packed, inv)
