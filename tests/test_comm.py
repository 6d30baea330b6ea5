"""One API for one process and many: the default ``comm`` is one process, bit for bit, and what
the sharded path cannot do is refused in one line naming the option."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ssse
import ssse.comm
import ssse.distributed as D

N, FEATURES, CLASSES = 30, 4, 3
DAMPING, WD, EPS = 0.1, 1e-2, 0.5
LAYOUT = dict(layout="fixed", block_size=5)
LOSS = nn.CrossEntropyLoss(reduction="none")


def problem():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    torch.manual_seed(1)
    return X, y, nn.Linear(FEATURES, CLASSES).double().eval()


class TwoRanks(ssse.comm.Comm):
    """A comm that says it has two ranks and fails any collective: the refusals come before
    the first one."""

    def __init__(self):
        super().__init__()
        self.size = 2


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("comm", [ssse.comm.Comm, ssse.comm.TorchComm])
def test_the_default_comm_is_the_one_process_comm_bit_for_bit(comm):
    X, y, model = problem()
    data, removed = [(X, y)], [(X[:4], y[:4])]
    fit = dict(damping=WD, weight_decay=WD, progress=False, **LAYOUT)
    inv = ssse.fit_inverse_fisher(model, LOSS, data, **fit)
    inv_c = ssse.fit_inverse_fisher(model, LOSS, data, **fit, comm=comm())
    assert type(inv_c) is type(inv) and torch.equal(inv_c.dense(), inv.dense())
    upd = dict(inv_fisher=inv, epsilon=EPS, n_total=N, weight_decay=WD, fisher="leave_k_out")
    assert _equal(ssse.ssse_update(model, LOSS, removed, **upd),
                  ssse.ssse_update(model, LOSS, removed, **upd, comm=comm()))
    g = ssse.fit_inverse_fisher(model, LOSS, data, curvature="ggn", **fit)
    new = dict(inv_fisher=g, n_total=N, weight_decay=WD, refine_steps=1)
    assert _equal(ssse.newton_erase(model, LOSS, removed, **new),
                  ssse.newton_erase(model, LOSS, removed, **new, comm=comm()))
    a = ssse.Eraser(model, LOSS, damping=DAMPING, weight_decay=WD, **LAYOUT).fit(data)
    b = ssse.Eraser(model, LOSS, damping=DAMPING, weight_decay=WD, **LAYOUT,
                    comm=comm()).fit(data)
    assert _equal(a.erase(removed, epsilon=EPS, ids=[0, 1, 2, 3]),
                  b.erase(removed, epsilon=EPS, ids=[0, 1, 2, 3]))
    assert torch.equal(a.inv_fisher.dense(), b.inv_fisher.dense())


def _refused(call, option: str) -> str:
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and text.startswith(option), text
    assert "not offered" in text and "several processes" in text, text
    return text


@pytest.mark.parametrize("option, value", [
    ("representation", "dual"), ("checkpoint", "fit.ckpt"), ("every", 10)])
def test_a_sharded_fit_refuses_in_one_line(option, value):
    X, y, model = problem()
    _refused(lambda: ssse.fit_inverse_fisher(model, LOSS, [(X, y)], damping=DAMPING,
                                             **{option: value}, comm=TwoRanks()), option)


def test_the_sharded_erasures_refuse_in_one_line(tmp_path):
    X, y, model = problem()
    removed = [(X[:2], y[:2])]
    _refused(lambda: ssse.newton_erase(model, LOSS, removed, inv_fisher=None, n_total=N,
                                       weight_decay=WD, refine_steps=2, comm=TwoRanks()),
             "refine_steps")
    _refused(lambda: ssse.Eraser(model, LOSS, damping=DAMPING, ledger=tmp_path / "l.jsonl",
                                 comm=TwoRanks()), "ledger")
    eraser = ssse.Eraser(model, LOSS, damping=DAMPING, comm=TwoRanks())
    _refused(lambda: eraser.fit([(X, y)], ids=list(range(N))), "ids")
    for kw, option in ((dict(ids=[0, 1]), "ids"), (dict(request_id="r"), "request_id"),
                       (dict(refine_steps=1), "refine_steps")):
        _refused(lambda: eraser.erase(removed, **kw), option)
    assert not (tmp_path / "l.jsonl").exists()


def test_the_deprecated_module_warns_with_the_new_call():
    X, y, model = problem()
    with pytest.warns(DeprecationWarning, match=r"use ssse\.comm\.DistributedError"):
        assert D.DistributedError is ssse.comm.DistributedError
    with pytest.warns(DeprecationWarning, match=r"use ssse\.sharding\.Sharding"):
        D.Sharding
    with pytest.warns(DeprecationWarning, match=r"use ssse\.Eraser\(\.\.\., comm=comm\)"):
        er = D.Eraser(model, LOSS, damping=DAMPING, **LAYOUT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new API does not warn
        ref = ssse.Eraser(model, LOSS, damping=DAMPING, **LAYOUT).fit([(X, y)])
    assert torch.equal(er.fit([(X, y)]).inv_fisher.dense(), ref.inv_fisher.dense())
    with pytest.warns(DeprecationWarning, match=r"use ssse\.ssse_update\(\.\.\., comm=comm\)"):
        with pytest.raises(TypeError, match="inv_fisher must be a ShardedInverseFisher"):
            D.ssse_update(model, LOSS, [(X[:2], y[:2])], inv_fisher=ref.inv_fisher,
                          epsilon=EPS, n_total=N)


def test_the_command_and_the_files_use_the_new_api():
    import subprocess
    import sys

    code = ("import sys, warnings; warnings.simplefilter('error', DeprecationWarning); "
            "import ssse.cli, ssse.cli.commands.fisher, ssse.cli.commands.erase, ssse.files; "
            "print('ssse.distributed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
