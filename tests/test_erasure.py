"""ssse_update (paper eq. 8) and Eraser against dense float64 formulas."""

import copy

import pytest
import torch
from torch import nn

import ssse
import ssse_ext
from ssse_ext import reference

from .testing import CHAIN, SOLVE, STABLE, flat, flat_state, rel_err

F64 = torch.float64

CE = nn.CrossEntropyLoss(reduction="none")
WD = 0.05


def setup(n=40, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                          nn.Linear(6, 3)).double().eval()
    model[1].running_mean.normal_()
    X = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, X, y


def grads(model, X, y):
    return torch.cat(list(ssse.per_sample_grads(model, CE, (X, y), weight_decay=WD)))


def dense_inverse(G, layout, damping, normalizer):
    return torch.block_diag(*reference.block_closed_form(G, layout, damping, normalizer))


def fit(model, X, y, damping=0.1):
    return ssse.fit_inverse_fisher(model, CE, (X, y), damping=damping, block_size=10,
                                   weight_decay=WD, progress=False)


def test_ssse_update_is_eq8():
    model, X, y = setup()
    inv = fit(model, X, y)
    k, n, eps = 4, 40, 0.7
    state = ssse.ssse_update(model, CE, (X[:k], y[:k]), inv_fisher=inv, epsilon=eps, n_total=n,
                             weight_decay=WD)
    G = grads(model, X, y)
    Finv = dense_inverse(G, inv.layout, 0.1, n)
    expected = flat(model) + eps / (n - k) * Finv @ G[:k].sum(0)
    assert rel_err(flat_state(state, model), expected) < SOLVE[F64]
    # buffers are copied, the model is untouched
    assert set(state) == set(model.state_dict())
    assert torch.equal(state["1.running_mean"], model[1].running_mean)
    assert state["1.running_mean"].data_ptr() != model[1].running_mean.data_ptr()
    assert not torch.equal(state["0.weight"], model[0].weight.detach())


def test_leave_k_out_and_retained_variants():
    model, X, y = setup()
    inv = fit(model, X, y)
    before = inv.dense()
    k, n, eps = 5, 40, 2.0
    G = grads(model, X, y)
    state = ssse.ssse_update(model, CE, (X[:k], y[:k]), inv_fisher=inv, epsilon=eps, n_total=n,
                             weight_decay=WD, fisher="leave_k_out")
    # the downdate keeps N = n: the Fisher of D \ S with the original normaliser
    Finv = dense_inverse(G[k:], inv.layout, 0.1, n)
    expected = flat(model) + eps / (n - k) * Finv @ G[:k].sum(0)
    assert rel_err(flat_state(state, model), expected) < CHAIN[F64]
    assert torch.equal(inv.dense(), before)  # the caller's inverse is not downdated

    state = ssse.ssse_update(model, CE, [(X[:2], y[:2]), (X[2:k], y[2:k])], inv_fisher=inv,
                             epsilon=eps, n_total=n, weight_decay=WD, gradient="retained",
                             retained=(X[k:], y[k:]))
    Finv = dense_inverse(G, inv.layout, 0.1, n)
    expected = flat(model) - eps / (n - k) * Finv @ G[k:].sum(0)
    assert rel_err(flat_state(state, model), expected) < SOLVE[F64]


def test_inplace_writes_and_float32_inverse():
    model, X, y = setup()
    inv = fit(model, X, y).to(dtype=torch.float32)
    state = ssse.ssse_update(model, CE, (X[:3], y[:3]), inv_fisher=inv, epsilon=1.0, n_total=40,
                             weight_decay=WD, inplace=True)
    assert state["0.weight"].dtype == torch.float64
    assert torch.equal(state["0.weight"], model[0].weight.detach())


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"epsilon": 0.0}, ValueError, "epsilon"),
    ({"epsilon": float("nan")}, ValueError, "epsilon"),
    ({"n_total": 3}, ValueError, "n_total"),
    ({"fisher": "diag"}, ValueError, "fisher"),
    ({"gradient": "retained"}, ValueError, "retained"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay"),
])
def test_ssse_update_validates_and_changes_nothing(kwargs, exc, match):
    model, X, y = setup()
    inv = fit(model, X, y)
    args = {"epsilon": 1.0, "n_total": 40, "inplace": True, **kwargs}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        ssse.ssse_update(model, CE, (X[:3], y[:3]), inv_fisher=inv, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ssse_update_rejects_a_foreign_inverse():
    model, X, y = setup()
    other = ssse_ext.build_inverse_fisher(torch.randn(5, 7, dtype=torch.float64), damping=1.0)
    with pytest.raises(ValueError, match="inv_fisher"):
        ssse.ssse_update(model, CE, (X[:3], y[:3]), inv_fisher=other, epsilon=1.0, n_total=40)
    with pytest.raises(TypeError, match="inv_fisher"):
        ssse.ssse_update(model, CE, (X[:3], y[:3]), inv_fisher=torch.eye(3), epsilon=1.0,
                         n_total=40)


def test_eraser_sequence_follows_its_recurrence():
    model, X, y = setup()
    before = flat(model)
    eraser = ssse.Eraser(model, CE, damping=0.1, block_size=10, weight_decay=WD).fit((X, y))
    G = grads(model, X, y)
    lay = eraser.layout
    s1 = eraser.erase((X[:3], y[:3]), epsilon=1.5)
    s2 = eraser.erase((X[3:7], y[3:7]), epsilon=1.5)
    assert eraser.n == 33 and eraser.history == [(3, 1.5), (4, 1.5)]
    theta1 = before + 1.5 / 37 * dense_inverse(G, lay, 0.1, 40) @ G[:3].sum(0)
    theta2 = theta1 + 1.5 / 33 * dense_inverse(G[3:], lay, 0.1, 40) @ G[3:7].sum(0)
    assert rel_err(flat_state(s1, model), theta1) < SOLVE[F64]
    assert rel_err(flat_state(s2, model), theta2) < CHAIN[F64]
    assert rel_err(eraser.inv_fisher.dense(), dense_inverse(G[7:], lay, 0.1, 40)) < CHAIN[F64]
    assert torch.equal(flat(model), before)  # inplace=False leaves the model alone


def test_eraser_two_requests_approximate_their_union():
    model, X, y = setup(n=200)
    union_model = ssse.Eraser(model, CE, damping=0.1, weight_decay=WD).fit((X, y))
    seq = ssse.Eraser(model, CE, damping=0.1, weight_decay=WD).fit((X, y))
    s_union = union_model.erase((X[:6], y[:6]), epsilon=1.0)
    seq.erase((X[:3], y[:3]), epsilon=1.0)
    s_seq = seq.erase((X[3:6], y[3:6]), epsilon=1.0)
    step = flat_state(s_union, model) - flat(model)
    diff = (flat_state(s_seq, model) - flat_state(s_union, model)).norm() / step.norm()
    # documented: relative difference of order k/(n-k) = 6/194 (measured 0.013)
    assert diff < 6 / 194
    assert diff > 0  # the two are not identical: the Fisher and normalisation differ


def test_eraser_error_leaves_state_unchanged():
    model, X, y = setup()
    eraser = ssse.Eraser(model, CE, damping=1e-3, weight_decay=WD).fit((X, y))
    inv, n, theta = eraser.inv_fisher.dense(), eraser.n, eraser.theta.clone()
    # a sample that was never in D, with a huge gradient: its downdate is not positive definite
    with pytest.raises(ssse_ext.NotPositiveDefiniteError):
        eraser.erase((100 * X[:1], y[:1]), epsilon=1.0, inplace=True)
    assert eraser.n == n and torch.equal(eraser.theta, theta)
    assert torch.equal(eraser.inv_fisher.dense(), inv) and torch.equal(flat(model), theta)
    with pytest.raises(ValueError, match="remain"):
        eraser.erase((X, y), epsilon=1.0)


def fisher_less(rows, removed_rows, layout, damping, normalizer):
    """Dense float64 block inverse of damping I + (sum of r r^T over rows, minus that over
    removed_rows) / normalizer: a Fisher downdated by rows that were never added."""
    blocks = []
    for b in range(layout.num_blocks):
        sl = layout.slice(b)
        a, r = rows[:, sl], removed_rows[:, sl]
        fisher = damping * torch.eye(a.shape[1], dtype=F64) + (a.T @ a - r.T @ r) / normalizer
        blocks.append(torch.linalg.inv(fisher))
    return torch.block_diag(*blocks)


def test_eraser_minibatch_downdates_the_group_means():
    # minibatch=4: the Fisher holds the means of the 10 groups of 4 consecutive samples, N = 10;
    # a request downdates the means of its own consecutive groups of 4 (a last, smaller group
    # gives its own mean), which are groups of the fit only when they line up with them.
    model, X, y = setup()
    before = flat(model)
    G = grads(model, X, y)  # per-sample gradients at theta*, before any in-place write
    means = G.view(10, 4, -1).mean(1)
    none = G[:0]
    eraser = ssse.Eraser(model, CE, damping=0.1, block_size=10, weight_decay=WD,
                         minibatch=4).fit((X, y))
    lay = eraser.layout
    assert eraser.n == 40 and eraser.inv_fisher.num_samples == 10
    inv0 = fisher_less(means, none, lay, 0.1, 10)
    assert rel_err(eraser.inv_fisher.dense(), inv0) < STABLE[F64]

    # S_1 = the fit's first group: the downdate removes exactly its row
    s1 = eraser.erase((X[:4], y[:4]), epsilon=1.5, inplace=True)
    theta1 = before + 1.5 / 36 * inv0 @ G[:4].sum(0)
    inv1 = fisher_less(means[1:], none, lay, 0.1, 10)
    assert eraser.n == 36 and torch.equal(s1["3.weight"], model[3].weight.detach())
    assert rel_err(flat_state(s1, model), theta1) < SOLVE[F64]
    assert rel_err(eraser.inv_fisher.dense(), inv1) < CHAIN[F64]

    # S_2 = samples 4..9: the fit's group 1, then the mean of samples 8, 9 (half of group 2)
    s2 = eraser.erase((X[4:10], y[4:10]), epsilon=1.5)
    theta2 = theta1 + 1.5 / 30 * inv1 @ G[4:10].sum(0)
    inv2 = fisher_less(means[1:], torch.stack([G[4:8].mean(0), G[8:10].mean(0)]), lay, 0.1, 10)
    assert eraser.n == 30 and eraser.history == [(4, 1.5), (6, 1.5)]
    assert rel_err(flat_state(s2, model), theta2) < CHAIN[F64]
    assert rel_err(eraser.inv_fisher.dense(), inv2) < CHAIN[F64]

    # ssse_update's leave-k-out Fisher downdates the same group means of S
    model, X, y = setup()
    inv = ssse.fit_inverse_fisher(model, CE, (X, y), damping=0.1, block_size=10,
                                  weight_decay=WD, minibatch=4, progress=False)
    state = ssse.ssse_update(model, CE, (X[4:10], y[4:10]), inv_fisher=inv, epsilon=1.5,
                             n_total=40, weight_decay=WD, fisher="leave_k_out", minibatch=4)
    lko = fisher_less(means, torch.stack([G[4:8].mean(0), G[8:10].mean(0)]), lay, 0.1, 10)
    expected = before + 1.5 / 34 * lko @ G[4:10].sum(0)
    assert rel_err(flat_state(state, model), expected) < CHAIN[F64]


def test_eraser_minibatch_needs_n_total():
    model, X, y = setup()
    with pytest.raises(ValueError, match="n_total"):
        ssse.Eraser(model, CE, damping=0.1, minibatch=4).fit([(X, y)])
    with pytest.raises(RuntimeError, match="fit"):
        ssse.Eraser(model, CE, damping=0.1).erase((X, y), epsilon=1.0)


def test_eraser_inplace_keeps_gradients_at_theta_star():
    model, X, y = setup()
    twin = copy.deepcopy(model)
    quiet = ssse.Eraser(model, CE, damping=0.1, weight_decay=WD).fit((X, y))
    loud = ssse.Eraser(twin, CE, damping=0.1, weight_decay=WD).fit((X, y))
    for sl in (slice(0, 3), slice(3, 7)):
        a = quiet.erase((X[sl], y[sl]), epsilon=1.0)
        b = loud.erase((X[sl], y[sl]), epsilon=1.0, inplace=True)
    # writing the model must not move the point where later gradients are taken: the same
    # computation, bit for bit
    assert torch.equal(flat_state(b, model), flat_state(a, model))
    assert torch.equal(flat(twin), flat_state(b, model))


def test_nothing_the_caller_owns_moves_with_a_train_mode_batchnorm():
    # issue 13: forward passes of a BatchNorm in training mode update its running statistics
    # in place; every method and fit must leave the model's state_dict bit-identical, whether
    # it succeeds or raises (per-sample passes of a train-mode BatchNorm cannot work)
    import hashlib
    import warnings

    model, X, y = setup()
    inv = fit(model, X, y)
    ggn = ssse.fit_inverse_fisher(model, CE, (X, y), damping=WD, weight_decay=WD,
                                  curvature="ggn", block_size=10, progress=False)
    model.train()
    S, R = (X[:4], y[:4]), (X[4:], y[4:])
    calls = {
        "ssse_update": lambda: ssse.ssse_update(model, CE, S, inv_fisher=inv, epsilon=1.0,
                                                n_total=40, weight_decay=WD),
        "ssse_update leave-k-out": lambda: ssse.ssse_update(
            model, CE, S, inv_fisher=inv, epsilon=1.0, n_total=40, fisher="leave_k_out"),
        "ssse_update retained": lambda: ssse.ssse_update(
            model, CE, S, inv_fisher=inv, epsilon=1.0, n_total=40, gradient="retained",
            retained=R),
        "newton_erase": lambda: ssse.newton_erase(model, CE, S, inv_fisher=ggn, n_total=40,
                                                  weight_decay=WD),
        "influence_update": lambda: ssse.influence_update(model, CE, S, retained=R,
                                                          weight_decay=WD),
        "fisher_forgetting": lambda: ssse.fisher_forgetting(model, CE, S, retained=R,
                                                            alpha=1e-3, seed=0),
        "gradient_ascent": lambda: ssse.gradient_ascent(model, CE, S, lr=0.1),
        "fit_inverse_fisher": lambda: fit(model, X, y),
        "per_sample_grads": lambda: grads(model, X, y),
        "Eraser": lambda: ssse.Eraser(model, CE, damping=0.1).fit((X, y)).erase(S, epsilon=1.0),
        "estimate_epsilon": lambda: ssse.metrics.estimate_epsilon(model, CE, (X, y),
                                                                   inv_fisher=inv),
    }

    def digest():
        return {k: hashlib.sha256(v.detach().cpu().numpy().tobytes()).hexdigest()
                for k, v in model.state_dict().items()}

    before = digest()
    outcome = {}
    for name, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                call()
                outcome[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - the point is what they leave behind
                outcome[name] = type(exc).__name__
        assert digest() == before, f"{name} ({outcome[name]}) changed the model's state_dict"
    assert outcome["ssse_update"] == "ok" and outcome["gradient_ascent"] == "ok"


@pytest.mark.parametrize("curvature", ["ggn", "kfac"])
def test_a_request_with_params_takes_the_gradient_over_the_selection(curvature):
    # rows that are not the gradients: the request sums the gradient in a pass of its own,
    # which must cover the selected parameters only; the others stay as they are
    model, X, y = setup(seed=5)
    eraser = ssse.Eraser(model, CE, damping=1e-3, curvature=curvature,
                         params="0.weight").fit((X, y))
    before = copy.deepcopy(model.state_dict())
    state = eraser.erase((X[:3], y[:3]), epsilon=1.0)
    assert not torch.equal(state["0.weight"], before["0.weight"])
    assert all(torch.equal(state[k], v) for k, v in before.items() if k != "0.weight")
