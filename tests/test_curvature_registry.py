"""Curvatures and likelihoods as registered objects: the likelihood inferred from the loss
(never guessed) or checked against it, the Gauss-Newton matrix of every likelihood against the
Hessian of a linear model, and a curvature added from outside the library."""

import pytest
import torch
from torch import nn

import ssse
from ssse.curvature import (CURVATURES, LIKELIHOODS, Bernoulli, Categorical, Curvature,
                            Gaussian, get_curvature, get_likelihood, likelihood_of_loss,
                            register_curvature, resolve_likelihood, unregister_curvature)

from .testing import SAME, SOLVE, rel_err

F64 = torch.float64
CE = nn.CrossEntropyLoss(reduction="none")
BCE = nn.BCEWithLogitsLoss(reduction="none")
MSE = nn.MSELoss(reduction="none")


def bce_summed(out, y):
    return nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none").sum(1)


def ce_function(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def half_squares_plus_constant(out, y):
    # 0.5 ||z - y||^2 + 3: the Gaussian NLL of sigma = 1 with a constant in place of log(2 pi)
    return 0.5 * ((out - y) ** 2).sum(1) + 3.0


def problem(kind, n=40, p=5, c=3, seed=0, bias=True):
    """A random linear model and data whose labels suit ``kind``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Linear(p, c, bias=bias).double()
    X = torch.randn(n, p, generator=g, dtype=F64)
    if kind == "categorical":
        y = torch.randint(0, c, (n,), generator=g)
    elif kind == "bernoulli":
        y = (torch.rand(n, c, generator=g, dtype=F64) < 0.3).double()
    else:
        y = torch.randn(n, c, generator=g, dtype=F64)
    return model, X, y


def mean_hessian(model, loss, X, y):
    """The Hessian of the mean loss in the flat parameters, by autograd."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t):
        parts, pos = {}, 0
        for k, s in zip(names, shapes):
            parts[k] = t[pos:pos + s.numel()].reshape(s)
            pos += s.numel()
        out = torch.func.functional_call(model, parts, (X,))
        return ssse.model.per_sample_losses(loss, out, y).mean()

    return torch.autograd.functional.hessian(f, theta)


def one_block_ggn(model, loss, X, y, damping, **kw):
    d = sum(p.numel() for p in model.parameters())
    return ssse.fit_inverse_fisher(model, loss, (X, y), damping=damping, curvature="ggn",
                                   layout="fixed", block_size=d, progress=False, **kw)


# ---- the registries -------------------------------------------------------------------------

def test_the_registries_read_as_tuples_of_names():
    names = ("empirical", "ggn", "mc", "kfac", "ekfac", "kfac_compact", "ekfac_compact",
             "kfac_ggn", "ekfac_ggn")
    assert CURVATURES == names and list(CURVATURES) == [*CURVATURES]
    assert LIKELIHOODS == ("categorical", "bernoulli", "gaussian")
    assert "ggn" in CURVATURES and "toy" not in CURVATURES and None not in CURVATURES
    assert repr(CURVATURES) == repr(names)  # what choice errors print
    assert get_curvature("ggn").supports_newton and not get_curvature("mc").supports_newton
    assert [get_curvature(n).needs_likelihood for n in CURVATURES] == \
        [False, True, True, False, False, False, False, True, True]
    with pytest.raises(ValueError, match=r"curvature must be one of \('empirical'"):
        get_curvature("shampoo")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        get_likelihood("poisson")
    with pytest.raises(TypeError, match="instance"):
        register_curvature(Curvature)


# ---- the likelihood, from the loss --------------------------------------------------------

@pytest.mark.parametrize("loss, expected", [(CE, Categorical()), (BCE, Bernoulli()),
                                            (MSE, Gaussian(1.0))])
def test_the_likelihood_is_inferred_from_each_torch_loss(loss, expected):
    assert likelihood_of_loss(loss) == expected
    kind = expected.name
    model, X, y = problem(kind)
    assert resolve_likelihood(None, loss, model(X).detach(), y) == expected
    # a torch loss that is not the NLL as it stands is not taken by its type
    assert likelihood_of_loss(type(loss)()) is None  # reduction="mean"
    assert likelihood_of_loss(nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)) is None
    assert likelihood_of_loss(nn.BCEWithLogitsLoss(reduction="none",
                                                   pos_weight=torch.ones(3))) is None


@pytest.mark.parametrize("loss, kind, expected", [
    (ce_function, "categorical", Categorical()),
    (bce_summed, "bernoulli", Bernoulli()),
    (half_squares_plus_constant, "gaussian", Gaussian(0.5)),
])
def test_a_custom_loss_that_matches_exactly_one_likelihood_is_accepted(loss, kind, expected):
    model, X, y = problem(kind)
    got = resolve_likelihood(None, loss, model(X).detach(), y)
    assert type(got) is type(expected)
    if isinstance(got, Gaussian):  # the scale is fitted with the constant, to rounding
        assert abs(got.scale - 0.5) < 1e-12
    # and the fit uses it: the same inverse as with the likelihood given
    ggn = one_block_ggn(model, loss, X, y, 0.1)
    given = one_block_ggn(model, loss, X, y, 0.1, likelihood=kind)
    assert rel_err(ggn.dense(), given.dense()) < SAME[F64]


def huber(out, y):
    return nn.functional.huber_loss(out, y, reduction="none").sum(1)


def test_a_loss_that_matches_no_likelihood_or_several_is_refused_naming_likelihood():
    model, X, y = problem("categorical")
    out = model(X).detach()
    with pytest.raises(ValueError, match=r"match none of categorical .*; pass likelihood="):
        resolve_likelihood(None, lambda z, t: 2 * ce_function(z, t), out, y)
    with pytest.raises(ValueError, match="likelihood="):  # the fit refuses it the same way
        one_block_ggn(model, lambda z, t: 2 * ce_function(z, t), X, y, 0.1)
    model, X, y = problem("gaussian")
    with pytest.raises(ValueError, match="likelihood="):  # not a squared error
        one_block_ggn(model, huber, X, y, 0.1)
    # two samples cannot rule out a squared error with a scale and a constant: a sigmoid loss
    # agrees with the Bernoulli NLL, but choosing it would be a guess
    model, X, y = problem("bernoulli")
    with pytest.raises(ValueError, match=r"agree with bernoulli and cannot rule out gaussian"):
        resolve_likelihood(None, bce_summed, model(X[:2]).detach(), y[:2])
    assert resolve_likelihood(None, bce_summed, model(X[:3]).detach(), y[:3]) == Bernoulli()
    assert resolve_likelihood("bernoulli", bce_summed, model(X[:2]).detach(), y[:2]) == \
        Bernoulli()


def test_a_given_likelihood_that_does_not_match_the_loss_is_refused():
    model, X, y = problem("categorical")
    with pytest.raises(ValueError, match=r"likelihood='bernoulli' does not match"):
        one_block_ggn(model, CE, X, y, 0.1, likelihood="bernoulli")
    with pytest.raises(ValueError, match=r"likelihood='gaussian' does not match"):
        ssse.fit_inverse_fisher(model, CE, (X, y), damping=0.1, curvature="mc",
                                likelihood="gaussian", progress=False)
    model, X, y = problem("bernoulli")
    with pytest.raises(ValueError, match=r"likelihood='categorical' does not match"):
        one_block_ggn(model, BCE, X, y, 0.1, likelihood="categorical")
    model, X, y = problem("gaussian")
    with pytest.raises(ValueError, match=r"likelihood='gaussian\(scale=2.0\)' does not match"):
        one_block_ggn(model, MSE, X, y, 0.1, likelihood=Gaussian(scale=2.0))
    # the Newton step checks it as well
    inv = one_block_ggn(model, MSE, X, y, 0.1)
    with pytest.raises(ValueError, match=r"likelihood='bernoulli' does not match"):
        ssse.newton_erase(model, MSE, (X[:3], y[:3]), inv_fisher=inv, n_total=40,
                          weight_decay=0.1, likelihood="bernoulli")


# ---- the Gauss-Newton matrix of each likelihood -----------------------------------------------

@pytest.mark.parametrize("loss", [BCE, bce_summed], ids=["BCEWithLogitsLoss", "summed"])
def test_a_sigmoid_loss_without_likelihood_gets_the_bernoulli_gauss_newton(loss):
    # 14 independent sigmoid outputs (as Yeast's labels): the inferred likelihood must be the
    # Bernoulli, bit for bit the fit with it given, and for a linear model the Hessian
    model, X, y = problem("bernoulli", n=60, p=6, c=14, bias=False)
    damping = 0.05
    inferred = one_block_ggn(model, loss, X, y, damping)
    given = one_block_ggn(model, loss, X, y, damping, likelihood="bernoulli")
    assert torch.equal(inferred.dense(), given.dense())
    H = mean_hessian(model, loss, X, y)
    expected = torch.linalg.inv(damping * torch.eye(H.shape[0], dtype=F64) + H)
    assert rel_err(inferred.dense(), expected) < SOLVE[F64]


def test_the_gaussian_gauss_newton_of_a_linear_model_is_the_hessian():
    # z = W x + b with the loss ||z - y||^2: H = (2/n) sum_i J_i^T J_i, for one output
    # (2/n) [X 1]^T [X 1]; checked against autograd for three outputs
    damping = 0.2
    model, X, y = problem("gaussian", c=1)
    inv = one_block_ggn(model, MSE, X, y, damping)
    Xb = torch.cat([X, torch.ones(X.shape[0], 1, dtype=F64)], dim=1)
    H = 2 / X.shape[0] * Xb.T @ Xb
    eye = torch.eye(H.shape[0], dtype=F64)
    assert rel_err(inv.dense(), torch.linalg.inv(damping * eye + H)) < SOLVE[F64]
    assert rel_err(mean_hessian(model, MSE, X, y), H) < SAME[F64]
    model, X, y = problem("gaussian", c=3)
    for loss in (MSE, half_squares_plus_constant):
        inv = one_block_ggn(model, loss, X, y, damping)
        H = mean_hessian(model, loss, X, y)
        eye = torch.eye(H.shape[0], dtype=F64)
        assert rel_err(inv.dense(), torch.linalg.inv(damping * eye + H)) < SOLVE[F64]


def test_the_monte_carlo_fisher_of_a_squared_error_converges_to_its_gauss_newton():
    model, X, y = problem("gaussian", n=30, c=2)
    exact = one_block_ggn(model, MSE, X, y, 0.3)
    errors = []
    for draws in (4, 400):
        mc = ssse.fit_inverse_fisher(model, MSE, (X, y), damping=0.3, curvature="mc",
                                     mc_samples=draws, seed=1, layout="fixed", block_size=12,
                                     progress=False)
        assert mc.normalizer == 30 * draws
        errors.append(rel_err(torch.linalg.inv(mc.dense()), torch.linalg.inv(exact.dense())))
    # a Monte-Carlo error shrinks like 1/sqrt(draws): 10x less with 100x the draws; measured
    # 0.43 and 0.034 (the seed is fixed: the test is deterministic)
    assert errors[1] < 0.05 and errors[1] < errors[0] / 5


def test_likelihood_objects_and_names_are_both_accepted():
    model, X, y = problem("bernoulli")
    by_name = one_block_ggn(model, BCE, X, y, 0.1, likelihood="bernoulli")
    by_object = one_block_ggn(model, BCE, X, y, 0.1, likelihood=Bernoulli())
    assert torch.equal(by_name.dense(), by_object.dense())
    eraser = ssse.Eraser(model, BCE, damping=0.1, weight_decay=0.1, curvature="ggn",
                         layout="fixed", block_size=18).fit((X, y))
    assert eraser.likelihood == Bernoulli()  # resolved once, at the fit


# ---- a curvature from outside the library ---------------------------------------------------

class DoubledGradients(Curvature):
    """The empirical rows scaled by 2: F = lambda I + (4/n) sum_i g_i g_i^T."""

    name = "toy"

    def rows(self, fm, params, frozen, x, y, **kwargs):
        return 2 * get_curvature("empirical").rows(fm, params, frozen, x, y, **kwargs)


@pytest.fixture
def toy():
    obj = register_curvature(DoubledGradients())
    yield obj
    unregister_curvature("toy")


def test_a_registered_curvature_is_fitted_and_erased_with(toy):
    assert "toy" in CURVATURES
    model, X, y = problem("categorical", n=50)
    n, k, lam, eps = 50, 6, 0.05, 0.7
    d = sum(p.numel() for p in model.parameters())
    G = torch.cat(list(ssse.per_sample_grads(model, CE, (X, y))))
    eye = torch.eye(d, dtype=F64)
    inv = ssse.fit_inverse_fisher(model, CE, (X, y), damping=lam, curvature="toy",
                                  layout="fixed", block_size=d, progress=False)
    assert inv.curvature == "toy" and inv.normalizer == n
    F = lam * eye + 4 / n * G.T @ G
    assert rel_err(inv.dense(), torch.linalg.inv(F)) < SOLVE[F64]

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    state = ssse.ssse_update(model, CE, (X[:k], y[:k]), inv_fisher=inv, epsilon=eps,
                             n_total=n)
    got = torch.cat([state["weight"].reshape(-1), state["bias"]])
    expected = theta + eps / (n - k) * torch.linalg.solve(F, G[:k].sum(0))
    assert rel_err(got - theta, expected - theta) < SOLVE[F64]

    # an Eraser downdates the toy rows of the removed samples: the inverse is then the toy
    # curvature of the rest (normaliser n kept)
    eraser = ssse.Eraser(model, CE, damping=lam, curvature="toy", layout="fixed",
                         block_size=d).fit((X, y))
    state = eraser.erase((X[:k], y[:k]), epsilon=eps, fisher="leave_k_out")
    rest = lam * eye + 4 / n * G[k:].T @ G[k:]
    assert rel_err(eraser.inv_fisher.dense(), torch.linalg.inv(rest)) < SOLVE[F64]
    got = torch.cat([state["weight"].reshape(-1), state["bias"]])
    expected = theta + eps / (n - k) * torch.linalg.solve(rest, G[:k].sum(0))
    assert rel_err(got - theta, expected - theta) < SOLVE[F64]
    assert eraser.last_request is None and eraser.history == [(k, eps)]

    # what it did not declare is refused: the Newton step, mini-batches
    with pytest.raises(ValueError, match="epsilon must be given"):
        eraser.erase((X[k:k + 2], y[k:k + 2]))
    with pytest.raises(ValueError, match='minibatch > 1 needs curvature="empirical"'):
        ssse.fit_inverse_fisher(model, CE, (X, y), damping=lam, curvature="toy", minibatch=2,
                                progress=False)
