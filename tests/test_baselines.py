"""Baselines: influence update, Fisher forgetting, gradient ascent, retraining."""

import pytest
import torch
from torch import nn

import ssse
from ssse.baselines import _diagonal_fisher
from ssse._utils import FlatModel

from .testing import flat, flat_state, rel_err

CE = nn.CrossEntropyLoss(reduction="none")


def setup(n=30, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    X = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, X, y


def total_loss_fn(model, X, y, wd):
    def f(theta):
        params, pos = {}, 0
        for name, p in model.named_parameters():
            params[name] = theta[pos:pos + p.numel()].view(p.shape)
            pos += p.numel()
        out = torch.func.functional_call(model, params, (X,))
        return CE(out, y).sum() + 0.5 * wd * X.shape[0] * (theta * theta).sum()
    return f


@pytest.mark.parametrize("hessian", ["retained", "full"])
@pytest.mark.parametrize("block_size", [None, 7])
def test_influence_update_solves_the_block_hessian(hessian, block_size):
    model, X, y = setup()
    k, wd = 4, 0.1
    theta = flat(model)
    C = slice(k, None) if hessian == "retained" else slice(None)
    H = torch.autograd.functional.hessian(total_loss_fn(model, X[C], y[C], wd), theta,
                                         vectorize=True)
    g = torch.autograd.functional.jacobian(total_loss_fn(model, X[:k], y[:k], wd), theta)
    d, n = theta.numel(), X.shape[0]
    B = block_size or d
    # H sums the Hessians over C: eq. 4's (1/(n-k)) H_C^{-1} g, H_C the mean over C, is
    # (|C| / (n-k)) H^{-1} g (the paper keeps 1/(n-k) with the full Hessian too)
    scale = X[C].shape[0] / (n - k)
    expected = theta.clone()
    for s in range(0, d, B):
        sl = slice(s, min(s + B, d))
        expected[sl] += scale * torch.linalg.solve(H[sl, sl], g[sl])
    state = ssse.influence_update(model, CE, (X[:k], y[:k]), retained=(X[k:], y[k:]), weight_decay=wd,
                                  hessian=hessian, block_size=block_size)
    assert rel_err(flat_state(state, model), expected) < 1e-11
    assert torch.equal(flat(model), theta)


def test_influence_update_validates():
    model, X, y = setup()
    with pytest.raises(ValueError, match="hessian"):
        ssse.influence_update(model, CE, (X[:3], y[:3]), retained=(X[3:], y[3:]), hessian="diag")
    with pytest.raises(TypeError, match="retained"):
        ssse.influence_update(model, CE, (X[:3], y[:3]), retained=X[3:])


def golatkar_fisher(model, X):
    """Their loop: per sample and class y, p(y|x) * (grad of the cross-entropy at y)^2."""
    params = list(model.parameters())
    acc = [torch.zeros_like(p) for p in params]
    for x in X:
        out = model(x[None])
        prob = torch.softmax(out, -1).detach()
        for c in range(out.shape[1]):
            gs = torch.autograd.grad(nn.functional.cross_entropy(out, torch.tensor([c])), params,
                                     retain_graph=True)
            for a, g in zip(acc, gs):
                a += prob[0, c] * g * g
    return torch.cat([a.reshape(-1) for a in acc]) / X.shape[0]


def golatkar_std(p, f, num_classes, alpha, forget_class=None):
    var = (1.0 / (f + 1e-8)).clamp(max=1e3)
    if p.shape[0] == num_classes:
        var = var.clamp(max=1e2)
    var = alpha * var
    if p.ndim > 1:
        var = var.mean(dim=1, keepdim=True).expand_as(p).clone()
    if p.shape[0] == num_classes and forget_class is not None:
        var[forget_class] = 1e-4
    if p.shape[0] == num_classes or p.ndim == 1:
        var = var * 10
    return var.sqrt()


def test_true_diagonal_fisher_matches_their_loop():
    model, X, y = setup(n=6)
    got = _diagonal_fisher(FlatModel(model), CE, (X, y), "true", "categorical")
    assert rel_err(got, golatkar_fisher(model, X)) < 1e-12


@pytest.mark.parametrize("forget_class", [None, 1])
def test_fisher_forgetting_noise_has_their_variance(forget_class):
    model, X, y = setup(n=6)
    alpha, seed = 1e-3, 5
    state = ssse.fisher_forgetting(model, CE, None, retained=(X, y), alpha=alpha, seed=seed,
                                   forget_class=forget_class)
    fisher = golatkar_fisher(model, X)
    gen = torch.Generator().manual_seed(seed)
    pos = 0
    for name, p in model.named_parameters():
        f = fisher[pos:pos + p.numel()].view(p.shape)
        pos += p.numel()
        mu = p.detach().clone()
        if forget_class is not None and p.shape[0] == 3:
            mu[forget_class] = 0
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        expected = mu + golatkar_std(p.detach(), f, 3, alpha, forget_class) * noise
        assert rel_err(state[name], expected) < 1e-12, name
    again = ssse.fisher_forgetting(model, CE, None, retained=(X, y), alpha=alpha, seed=seed,
                                   forget_class=forget_class)
    other = ssse.fisher_forgetting(model, CE, None, retained=(X, y), alpha=alpha, seed=seed + 1,
                                   forget_class=forget_class)
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["0.weight"], other["0.weight"])


def test_fisher_forgetting_empirical_and_bernoulli():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    Y = (torch.randn(5, 2) > 0).double()
    bce = nn.BCEWithLogitsLoss(reduction="none")
    fm = FlatModel(model)
    emp = _diagonal_fisher(fm, bce, (X, Y), "empirical", "bernoulli")
    rows = torch.cat(list(ssse.per_sample_grads(model, bce, (X, Y))))
    assert rel_err(emp, (rows * rows).mean(0)) < 1e-13
    true = _diagonal_fisher(fm, bce, (X, Y), "true", "bernoulli")
    # E_y[(grad log p(y|x))^2] of independent Bernoulli outputs: sum over outputs of
    # s(1-s) (d z / d theta)^2 for a linear model
    s = torch.sigmoid(model(X)).detach()
    w = s * (1 - s)  # (n, 2)
    expected_w = (w[:, :, None] * X[:, None, :] ** 2).mean(0)
    expected = torch.cat([expected_w.reshape(-1), w.mean(0)])
    assert rel_err(true, expected) < 1e-12
    with pytest.raises(ValueError, match="alpha"):
        ssse.fisher_forgetting(model, bce, None, retained=(X, Y), alpha=0.0, seed=0)
    with pytest.raises(TypeError, match="seed"):
        ssse.fisher_forgetting(model, bce, None, retained=(X, Y), alpha=1.0, seed=None)


def test_gradient_ascent_is_one_step_on_the_mean_gradient():
    model, X, y = setup()
    model.zero_grad()
    CE(model(X[:5]), y[:5]).mean().backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    state = ssse.gradient_ascent(model, CE, [(X[:2], y[:2]), (X[2:5], y[2:5])], lr=0.3)
    assert rel_err(flat_state(state, model), flat(model) + 0.3 * g) < 1e-13
    ssse.gradient_ascent(model, CE, (X[:5], y[:5]), lr=0.3, inplace=True)
    assert rel_err(flat(model), flat_state(state, model)) < 1e-15


def test_retrain_is_seeded_and_restores_the_global_rng():
    _, X, y = setup(n=40)
    recipe = ssse.training.sgd_recipe(lambda: nn.Linear(3, 3), CE, epochs=3, lr=0.1,
                                      batch_size=8, weight_decay=1e-3, dtype=torch.float64)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ssse.retrain(recipe, (X, y), seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = ssse.retrain(recipe, (X, y), seed=7)
    c = ssse.retrain(recipe, (X, y), seed=8)
    assert torch.equal(flat(a), flat(b)) and not torch.equal(flat(a), flat(c))
    init = nn.Linear(3, 3).double()
    assert ssse.metrics.split_report(a, {"D": (X, y)}, loss_fn=CE)["D"]["loss"] < \
        ssse.metrics.split_report(init, {"D": (X, y)}, loss_fn=CE)["D"]["loss"]
    with pytest.raises(TypeError, match="recipe"):
        ssse.retrain(lambda data, seed: None, (X, y), seed=0)
    with pytest.raises(TypeError, match="seed"):
        ssse.retrain(recipe, (X, y), seed="0")


def test_two_pass_baselines_refuse_one_shot_iterators():
    model, X, y = setup()
    # influence_update(hessian="full") reads S twice (gradient, then Hessian): a generator's
    # second pass would silently drop S from H_D
    with pytest.raises(TypeError, match="removed is read more than once"):
        ssse.influence_update(model, CE, ((X[i:i + 2], y[i:i + 2]) for i in (0, 2)),
                              retained=(X[4:], y[4:]), hessian="full", weight_decay=0.1)
    listed = ssse.influence_update(model, CE, [(X[:2], y[:2]), (X[2:4], y[2:4])],
                                   retained=(X[4:], y[4:]), hessian="full", weight_decay=0.1)
    paired = ssse.influence_update(model, CE, (X[:4], y[:4]), retained=(X[4:], y[4:]),
                                   hessian="full", weight_decay=0.1)
    assert rel_err(flat_state(listed, model), flat_state(paired, model)) < 1e-12
    with pytest.raises(TypeError, match="retained is read more than once"):
        ssse.fisher_forgetting(model, CE, None, retained=iter([(X, y)]), alpha=1e-6, seed=0)
    with pytest.raises(ValueError, match="retained is empty"):
        ssse.fisher_forgetting(model, CE, None, retained=(X[:0], y[:0]), alpha=1e-6, seed=0)
