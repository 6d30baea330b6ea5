"""L2-regularised logistic regression: the optimum is unique, so erasure methods can be compared
with the retrained optimum itself."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssse
import ssse_ext

from .testing import SAME, SOLVE, rel_err

WD = 1e-2
K = 8


def bce(out, y):
    return F.binary_cross_entropy_with_logits(out.squeeze(-1), y, reduction="none")


def flat(model):
    return torch.cat([q.detach().reshape(-1) for q in model.parameters()])


def flat_state(state):
    return torch.cat([state["weight"].reshape(-1), state["bias"].reshape(-1)])


@functools.lru_cache(maxsize=None)
def make_problem(seed):
    """Data, the trained model and the model retrained without the first K samples."""
    g = torch.Generator().manual_seed(seed)
    n, p = 400, 8
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    w = torch.randn(p, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(2 * X @ w)).double()
    recipe = ssse.training.lbfgs_recipe(lambda: nn.Linear(p, 1), bce, weight_decay=WD,
                                        tolerance=1e-10)
    model = ssse.retrain(recipe, (X, y), seed=0)
    retrained = ssse.retrain(recipe, (X[K:], y[K:]), seed=0)
    return X, y, model, retrained


@pytest.fixture(scope="module")
def problem():
    return make_problem(0)


def test_optima_are_tight(problem):
    # After the Newton polish the gradient is its own rounding: each of the n terms
    # (sigmoid(x.w) - y) x / n is computed to a few u (|x_j| <= 5 here), so the mean carries
    # about n * u * max|x| / n = 6e-16 per entry, times sqrt(d) = 3 in norm. 1e-13 leaves a
    # factor 50; L-BFGS alone stalls at 1e-10 to 3e-9 (where its line search stops resolving
    # the objective), which this bound rejects.
    X, y, model, retrained = problem
    bound = 1e-13
    report = ssse.metrics.split_report(model, {"D": (X, y)}, loss_fn=bce, weight_decay=WD)
    assert report["D"]["grad_norm"] < bound
    report = ssse.metrics.split_report(retrained, {"D\\S": (X[K:], y[K:])}, loss_fn=bce,
                                       weight_decay=WD)
    assert report["D\\S"]["grad_norm"] < bound


def test_lbfgs_alone_warns_when_it_stops_above_its_tolerance():
    X, y, _, _ = make_problem(0)
    recipe = ssse.training.lbfgs_recipe(lambda: nn.Linear(X.shape[1], 1), bce, weight_decay=WD,
                                        tolerance=1e-15, newton_steps=0)
    with pytest.warns(ssse.training.ConvergenceWarning, match="tolerance=1e-15"):
        ssse.retrain(recipe, (X, y), seed=0)


def test_influence_update_lands_near_the_retrained_optimum(problem):
    X, y, model, retrained = problem
    star, target = flat(model), flat(retrained)
    base = (star - target).norm()
    state = ssse.influence_update(model, bce, (X[:K], y[:K]), retained=(X[K:], y[K:]),
                                  weight_decay=WD)
    ratio = (flat_state(state) - target).norm() / base
    assert ratio < 0.05  # measured 0.0198: one Newton step on the retained objective
    state = ssse.influence_update(model, bce, (X[:K], y[:K]), retained=(X[K:], y[K:]),
                                  weight_decay=WD, hessian="full")
    assert (flat_state(state) - target).norm() / base < 0.25  # measured 0.117 with H_D


def closed_form_hessian(model, X):
    """Mean Hessian of the regularised logistic loss: X~^T diag(s(1-s)) X~ / n + w I."""
    Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
    s = torch.sigmoid(model(X).detach().squeeze(-1))
    return Xa.T @ (Xa * (s * (1 - s))[:, None]) / X.shape[0] + WD * torch.eye(Xa.shape[1],
                                                                              dtype=X.dtype)


def test_ssse_with_the_inverse_hessian_is_the_influence_update(problem):
    X, y, model, _ = problem
    n, d = X.shape[0], X.shape[1] + 1
    H = closed_form_hessian(model, X[K:])
    layout = ssse_ext.BlockLayout.fixed(d, d)
    packed = torch.linalg.inv(H).reshape(-1).contiguous()
    inv = ssse_ext.BlockInverseFisher(packed, ssse_ext.FisherConfig(1.0, float(n), layout), n)
    state = ssse.ssse_update(model, bce, (X[:K], y[:K]), inv_fisher=inv, epsilon=1.0, n_total=n,
                             weight_decay=WD)
    expected = ssse.influence_update(model, bce, (X[:K], y[:K]), retained=(X[K:], y[K:]),
                                     weight_decay=WD)
    assert rel_err(flat_state(state), flat_state(expected)) < SOLVE[torch.float64]


def test_influence_block_hessian_is_exact(problem):
    X, y, model, _ = problem
    layout = ssse_ext.BlockLayout.fixed(9, 4)
    blocks = ssse.baselines.block_hessians(model, bce, [("data", (X, y))], layout,
                                           weight_decay=WD)
    H = closed_form_hessian(model, X) * X.shape[0]
    for b, blk in enumerate(blocks):
        sl = layout.slice(b)
        assert rel_err(blk, H[sl, sl]) < SAME[torch.float64]


def _estimate_and_oracle(seed):
    """The estimated epsilon, the oracle (the epsilon whose SSSE step lands closest to the
    retrained optimum) and how far SSSE with the estimate lands, relative to the original."""
    X, y, model, retrained = make_problem(seed)
    n = X.shape[0]
    star, target = flat(model), flat(retrained)
    inv = ssse.fit_inverse_fisher(model, bce, (X, y), damping=1e-4, layout="fixed",
                                  weight_decay=WD, progress=False)
    v, _ = ssse.gradient_sum(model, bce, (X[:K], y[:K]), weight_decay=WD)
    step = inv.matvec(v) / (n - K)
    best = float(step @ (target - star) / (step @ step))
    eps = ssse.metrics.estimate_epsilon(model, bce, (X, y), inv_fisher=inv, weight_decay=WD,
                                        probes=32)
    state = ssse.ssse_update(model, bce, (X[:K], y[:K]), inv_fisher=inv, epsilon=eps, n_total=n,
                             weight_decay=WD)
    moved = float((flat_state(state) - target).norm() / (star - target).norm())
    return eps, best, moved, inv


@pytest.mark.parametrize("seed", range(10))
def test_estimated_epsilon_is_its_closed_form(seed):
    # On every data set: the least-squares fit of eps H F^-1 u_j = u_j over the 32 probes (the
    # per-sample gradients, weight decay included, of the samples a permutation seeded 0
    # puts first), with the closed-form Hessian and the stored inverse as a matrix
    X, y, model, _ = make_problem(seed)
    eps, _, _, inv = _estimate_and_oracle(seed)
    Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
    theta = flat(model)
    idx = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:32]
    s = torch.sigmoid(Xa[idx] @ theta)
    U = (Xa[idx] * (s - y[idx])[:, None] + WD * theta).T  # (d, probes)
    F_inv = inv.matvec(torch.eye(theta.numel(), dtype=torch.float64))
    HW = closed_form_hessian(model, X) @ (F_inv @ U)
    assert eps == pytest.approx(float((HW * U).sum() / (HW * HW).sum()), rel=1e-10)


def test_estimated_epsilon_tracks_the_best_one_over_data_sets():
    # The oracle depends on the K removed samples as much as on the model, so their ratio is
    # not bounded on every data set (0.79 to 4.1 over data seeds 20-79). The windows below are
    # set from those 60 seeds and checked on seeds 0-19, which they were not fitted to: median
    # ratio 1.37 over the 60 (its spread over 20 seeds: about 0.17), SSSE with the estimate
    # closer to the retrained optimum on 49 of 60 (82 %: 16.4 of 20, sd 1.7), median distance
    # 0.53 of the original's. An estimate off by a factor 2 either way leaves the ratio window.
    runs = [_estimate_and_oracle(seed)[:3] for seed in range(20)]
    ratios = [eps / best for eps, best, _ in runs]
    moved = [m for _, _, m in runs]
    assert 0.8 < float(torch.tensor(ratios).median()) < 2.0  # measured 1.12 on seeds 0-19
    assert sum(m < 1 for m in moved) >= 11  # measured 17
    assert float(torch.tensor(moved).median()) < 0.8  # measured 0.38


def test_influence_update_refuses_blocks_that_do_not_fit(problem):
    X, y, model, _ = problem
    with pytest.raises(MemoryError, match="block_size"):
        ssse.influence_update(model, bce, (X[:K], y[:K]), retained=(X[K:], y[K:]),
                              max_memory=1000)
