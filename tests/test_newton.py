"""The stored Gauss–Newton / true-Fisher curvature and the tuning-free Newton erasure."""

import pytest
import torch
from torch import nn

import ssse
import ssse_ext

from .testing import rel_err

CE = nn.CrossEntropyLoss(reduction="none")


def bce(out, y):
    return nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none").sum(1)


def flat_state(state):
    return torch.cat([state["weight"].reshape(-1)] + ([state["bias"]] if "bias" in state
                                                      else []))


def trained(n=120, p=5, c=4, w=1e-2, seed=0, kind="categorical"):
    torch.manual_seed(seed)
    X = torch.randn(n, p, dtype=torch.float64)
    if kind == "categorical":
        y = torch.randint(0, c, (n,))
        loss, model_fn = CE, lambda: nn.Linear(p, c)
    else:
        y = (torch.rand(n, c) < 0.3).double()
        loss, model_fn = bce, lambda: nn.Linear(p, c, bias=False)
    recipe = ssse.training.lbfgs_recipe(model_fn, loss, weight_decay=w, tolerance=1e-12)
    return ssse.retrain(recipe, (X, y), seed=0), loss, X, y, recipe


def mean_hessian(model, loss, X, y):
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[k].shape for k in names]
    theta = torch.cat([params[k].detach().reshape(-1) for k in names])

    def f(t):
        parts, pos = {}, 0
        for k, s in zip(names, shapes):
            parts[k] = t[pos:pos + s.numel()].reshape(s)
            pos += s.numel()
        return loss(torch.func.functional_call(model, parts, (X,)), y).mean()

    return torch.autograd.functional.hessian(f, theta)


@pytest.mark.parametrize("kind", ["categorical", "bernoulli"])
def test_ggn_rows_give_the_hessian_of_a_linear_model(kind):
    # For a linear model with softmax or sigmoid outputs the Gauss-Newton matrix is the Hessian.
    model, loss, X, y, _ = trained(kind=kind)
    d = sum(p.numel() for p in model.parameters())
    inv = ssse.fit_inverse_fisher(model, loss, (X, y), damping=0.3, curvature="ggn",
                                  likelihood=kind, layout="fixed", block_size=d, progress=False)
    assert inv.curvature == "ggn" and inv.normalizer == X.shape[0]
    H = mean_hessian(model, loss, X, y)
    expected = torch.linalg.inv(0.3 * torch.eye(d, dtype=torch.float64) + H)
    assert rel_err(inv.dense(), expected) < 1e-11
    # the rows need the inputs only: other labels give the same matrix
    other = torch.randint(0, 4, y.shape) if kind == "categorical" else 1 - y
    again = ssse.fit_inverse_fisher(model, loss, (X, other), damping=0.3, curvature="ggn",
                                    likelihood=kind, layout="fixed", block_size=d,
                                    progress=False)
    assert torch.equal(again.dense(), inv.dense())


def test_monte_carlo_fisher_converges_to_the_ggn():
    model, loss, X, y, _ = trained()
    exact = ssse.fit_inverse_fisher(model, loss, (X, y), damping=0.3, curvature="ggn",
                                    layout="fixed", block_size=24, progress=False)
    errors = []
    for draws in (4, 400):
        mc = ssse.fit_inverse_fisher(model, loss, (X, y), damping=0.3, curvature="mc",
                                     mc_samples=draws, seed=1, layout="fixed", block_size=24,
                                     progress=False)
        assert mc.normalizer == 120 * draws
        errors.append(rel_err(torch.linalg.inv(mc.dense()), torch.linalg.inv(exact.dense())))
    # a Monte-Carlo error shrinks like 1/sqrt(draws): 10x fewer with 100x the draws; measured
    # 0.086 and 0.0087
    assert errors[1] < 0.02 and errors[1] < errors[0] / 5


@pytest.mark.parametrize("kind", ["categorical", "bernoulli"])
@pytest.mark.parametrize("damping", [1e-2, 3e-3])  # = w, and another: the shift is exact
def test_newton_erase_equals_the_retained_influence_update_on_the_row_blocks(kind, damping):
    model, loss, X, y, _ = trained(kind=kind)
    w, k, p = 1e-2, 12, X.shape[1]
    inv = ssse.fit_inverse_fisher(model, loss, (X, y), damping=damping, curvature="ggn",
                                  likelihood=kind, layout="rows", progress=False)
    got = ssse.newton_erase(model, loss, (X[:k], y[:k]), inv_fisher=inv, n_total=120,
                            weight_decay=w, likelihood=kind)
    # influence_update's fixed blocks of p parameters are the output rows (then the bias)
    ref = ssse.influence_update(model, loss, (X[:k], y[:k]), retained=(X[k:], y[k:]),
                                weight_decay=w, block_size=p)
    star = flat_state(model.state_dict())
    step = flat_state(ref) - star
    assert (flat_state(got) - flat_state(ref)).norm() / step.norm() < 1e-8
    assert step.norm() > 1e-3  # a real step, not two zeros


def test_newton_erase_needs_a_ggn_inverse_and_weight_decay():
    model, loss, X, y, _ = trained()
    emp = ssse.fit_inverse_fisher(model, loss, (X, y), damping=1e-2, weight_decay=1e-2,
                                  progress=False)
    with pytest.raises(ValueError, match='curvature="ggn"'):
        ssse.newton_erase(model, loss, (X[:3], y[:3]), inv_fisher=emp, n_total=120,
                          weight_decay=1e-2)
    ggn = ssse.fit_inverse_fisher(model, loss, (X, y), damping=1e-3, curvature="ggn",
                                  progress=False)
    # without weight decay the retained curvature need not be positive definite
    with pytest.raises(ValueError, match="weight_decay > 0"):
        ssse.newton_erase(model, loss, (X[:3], y[:3]), inv_fisher=ggn, n_total=120,
                          weight_decay=0.0)
    with pytest.raises(ValueError, match="n_total must be larger"):
        ssse.newton_erase(model, loss, (X, y), inv_fisher=ggn, n_total=120, weight_decay=1e-3)


def test_refinement_minimises_the_removed_samples_model_objective():
    # M(theta) = 1/2 (theta - theta*)^T H_D (theta - theta*) - (1/n) sum_S l_i(theta), with
    # H_D the exact Hessian (one block): the refined erasure must reach M's minimiser, found
    # here independently by dense Newton iterations with autograd Hessians.
    model, loss, X, y, _ = trained(n=80, seed=3)
    w, n, d = 1e-2, 80, 24
    S = y == 2
    XS, yS = X[S], y[S]
    inv = ssse.fit_inverse_fisher(model, loss, (X, y), damping=w, curvature="ggn",
                                  layout="fixed", block_size=d, progress=False)
    star = flat_state(model.state_dict()).detach()
    HD = mean_hessian(model, loss, X, y) + w * torch.eye(d, dtype=torch.float64)

    def M(t):
        W, b = t[:20].reshape(4, 5), t[20:]
        reg = 0.5 * w * (t * t).sum() * XS.shape[0]
        return 0.5 * (t - star) @ HD @ (t - star) - (loss(XS @ W.T + b, yS).sum() + reg) / n

    t = star.clone()
    for _ in range(12):  # Newton converges quadratically
        g = torch.autograd.functional.jacobian(M, t)
        t = t - torch.linalg.solve(torch.autograd.functional.hessian(M, t), g)
    plain = flat_state(ssse.newton_erase(model, loss, (XS, yS), inv_fisher=inv, n_total=n,
                                         weight_decay=w))
    refined = flat_state(ssse.newton_erase(model, loss, (XS, yS), inv_fisher=inv, n_total=n,
                                           weight_decay=w, refine_steps=10))
    assert rel_err(refined - star, t - star) < 1e-6
    assert M(refined) < M(plain) - 1e-6  # the refinement did something here
    assert rel_err(plain - star, t - star) > 1e-3


def test_eraser_newton_requests_match_newton_erase_and_are_atomic():
    model, loss, X, y, _ = trained()
    w = 1e-2
    eraser = ssse.Eraser(model, loss, damping=w, weight_decay=w, curvature="ggn",
                         layout="rows").fit((X, y))
    assert eraser.n == 120 and eraser.inv_fisher.num_samples == 480
    inv = ssse.fit_inverse_fisher(model, loss, (X, y), damping=w, curvature="ggn",
                                  layout="rows", progress=False)
    expected = ssse.newton_erase(model, loss, (X[:6], y[:6]), inv_fisher=inv, n_total=120,
                                 weight_decay=w)
    before = eraser.inv_fisher.packed.clone()
    with pytest.raises(ssse_ext.NotPositiveDefiniteError):
        eraser.erase((50 * X[:6], y[:6]))
    assert torch.equal(eraser.inv_fisher.packed, before) and eraser.n == 120
    got = eraser.erase((X[:6], y[:6]))
    assert rel_err(flat_state(got), flat_state(expected)) < 1e-12
    assert eraser.n == 114 and eraser.history == [(6, None)]
    # the stored inverse now holds the retained samples' curvature, with N = 120 kept:
    # (w I + (1/120) sum_rest G)^-1, from a fit on the rest, whose N is 114
    rest = ssse.fit_inverse_fisher(model, loss, (X[6:], y[6:]), damping=w, curvature="ggn",
                                   layout="rows", progress=False)
    eye = torch.eye(24, dtype=torch.float64)
    expect = torch.linalg.inv(w * eye + (torch.linalg.inv(rest.dense()) - w * eye) * 114 / 120)
    assert rel_err(eraser.inv_fisher.dense(), expect) < 1e-10
    with pytest.raises(ValueError, match="epsilon must be given"):
        ssse.Eraser(model, loss, damping=w).fit((X, y)).erase((X[:2], y[:2]))


@pytest.mark.parametrize("damping", [1e-2, 2e-3])
def test_newton_erase_is_one_newton_step_of_the_retained_objective(damping):
    # One block over all parameters of a linear softmax model: the stored Gauss-Newton matrix is
    # the Hessian, so the leave-k-out step must be exactly theta* - H_R^-1 grad L_R(theta*), with
    # L_R = (1/(n-k)) sum_{D\S} l_i + w/2 |theta|^2, both computed here by autograd. With
    # damping != w only the shift turns the stored lambda I into the retained w I.
    model, loss, X, y, _ = trained(n=90, seed=5)
    w, k, n = 1e-2, 9, 90
    d = sum(p.numel() for p in model.parameters())
    inv = ssse.fit_inverse_fisher(model, loss, (X, y), damping=damping, curvature="ggn",
                                  layout="fixed", block_size=d, progress=False)
    got = flat_state(ssse.newton_erase(model, loss, (X[:k], y[:k]), inv_fisher=inv, n_total=n,
                                       weight_decay=w))
    star = flat_state(model.state_dict()).detach()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def retained(t):
        parts, pos = {}, 0
        for name, s in zip(names, shapes):
            parts[name] = t[pos:pos + s.numel()].reshape(s)
            pos += s.numel()
        out = torch.func.functional_call(model, parts, (X[k:],))
        return loss(out, y[k:]).mean() + 0.5 * w * (t * t).sum()

    g = torch.autograd.functional.jacobian(retained, star)
    H = torch.autograd.functional.hessian(retained, star)
    expected = star - torch.linalg.solve(H, g)
    assert rel_err(got - star, expected - star) < 1e-10


@pytest.mark.parametrize("kind", ["categorical", "bernoulli"])
def test_largest_blocks_give_the_influence_update_with_the_full_hessian(kind):
    """The experiments' default Newton blocks: one block of all d parameters when it fits, and
    then the step is the influence update with the full retained Hessian; a budget too small
    for one block halves the block until its dense build fits."""
    from ssse.experiments.methods import largest_block_size
    from ssse_ext.build import build_peak_bytes

    model, loss, X, y, _ = trained(kind=kind)
    w, k = 1e-2, 12
    d = sum(p.numel() for p in model.parameters())
    b = largest_block_size(model)
    assert b == d
    inv = ssse.fit_inverse_fisher(model, loss, (X, y), damping=w, curvature="ggn",
                                  likelihood=kind, layout="fixed", block_size=b, progress=False)
    got = ssse.newton_erase(model, loss, (X[:k], y[:k]), inv_fisher=inv, n_total=120,
                            weight_decay=w, likelihood=kind)
    ref = ssse.influence_update(model, loss, (X[:k], y[:k]), retained=(X[k:], y[k:]),
                                weight_decay=w)
    star = flat_state(model.state_dict())
    step = flat_state(ref) - star
    assert (flat_state(got) - flat_state(ref)).norm() / step.norm() < 1e-8
    assert step.norm() > 1e-3

    def peak(block):
        return build_peak_bytes(ssse_ext.BlockLayout.fixed(d, block), torch.float64,
                                representation="dense")
    budget = (peak(d) + peak(1)) // 2  # room for less than one block of d
    small = largest_block_size(model, max_memory=budget)
    assert 1 <= small < d and peak(small) <= budget < peak(2 * small)
    with pytest.raises(ValueError, match="max_memory"):
        largest_block_size(model, max_memory=0)
