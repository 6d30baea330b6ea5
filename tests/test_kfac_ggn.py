"""Kronecker-factored Gauss–Newton curvatures (``"kfac_ggn"``, ``"ekfac_ggn"``): the factors
against a hand-written forward pass, the EK-FAC eigenvalues against the Gauss–Newton rows from
torch.func, and the leave-k-out Newton step (``newton_erase`` and ``Eraser``) against the same
step computed densely from a fresh fit on the remaining samples."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import ssse
import ssse_ext
from ssse.curvature import get_curvature, get_likelihood, unregister_curvature
from ssse.curvature.kfac import ekfac, kfac
from ssse.model import FlatModel

F64 = torch.float64
LOSS = nn.CrossEntropyLoss(reduction="none")
WD = 0.05  # the weight decay of training, and the damping of the stored matrix


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64).eval()


def data(n=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, dtype=F64, generator=g), torch.randint(0, 3, (n,), generator=g)


def softmax_factor(z):
    """:math:`B` with :math:`BB^\\top = \\mathrm{diag}(p) - pp^\\top`, written out here:
    :math:`B = (\\mathrm{diag}(p) - p p^\\top)\\,\\mathrm{diag}(p)^{-1/2}`."""
    p = torch.softmax(z, dim=1)
    return (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / p.sqrt()[:, None, :]


def ggn_references(model, X):
    """Per weight, from a hand-written forward pass: the inputs ``a`` ``(n, in)`` and the
    Gauss–Newton output gradients ``g`` ``(n, c, out)`` (one per output row of :math:`B`)."""
    l1, l2 = model[0], model[2]
    z1 = X @ l1.weight.T + l1.bias
    h = torch.tanh(z1)
    z2 = h @ l2.weight.T + l2.bias
    B = softmax_factor(z2).detach()                                 # (n, c, r)
    g2 = B.transpose(1, 2)                                          # (n, r, out)
    g1 = (g2 @ l2.weight) * (1 - h ** 2)[:, None, :]                # (n, r, hidden)
    return [(X.detach(), g1.detach()), (h.detach(), g2.detach())]


def jacobian_rows(model, X):
    """The Gauss–Newton rows :math:`J_i^\\top B_i e_r` from ``vmap(jacrev)``: ``(n, c, d)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out(p, x):
        return functional_call(model, p, (x[None],))[0]

    jac = vmap(jacrev(out), in_dims=(None, 0))(params, X)
    J = torch.cat([jac[k].reshape(X.shape[0], 3, -1) for k in params], dim=2)
    B = softmax_factor(model(X)).detach()
    return torch.einsum("ncr,ncd->nrd", B, J)


def fresh(model, X, curvature, normalizer, layout):
    """A tensor-level fit of the curvature's rows of ``X`` at a given normaliser."""
    fm = FlatModel(model, loss_fn=LOSS)
    curv = get_curvature(curvature)
    rows = curv.rows(fm, fm.param_dict(), fm.frozen_dict(), X, None, loss_fn=LOSS,
                     likelihood=get_likelihood("categorical"), generator=None, mc_samples=1,
                     minibatch=1, state={})
    return ssse_ext.build_inverse_fisher(rows, damping=WD, layout=layout,
                                         representation=curv.representation_for(fm, layout,
                                                                                "dense"),
                                         normalizer=float(normalizer))


def fit(model, X, y, curvature, **kw):
    return ssse.fit_inverse_fisher(model, LOSS, (X, y), damping=WD, curvature=curvature,
                                   progress=False, **kw)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def ggn_exact():
    curv = ekfac("ekfac_ggn_exact", refresh="exact", fisher="ggn")
    yield curv
    unregister_curvature(curv.name)


def test_the_kfac_ggn_blocks_are_the_gauss_newton_factors():
    model, (X, y) = mlp(), data()
    inv = fit(model, X, y, "kfac_ggn")
    assert inv.representation == ("kfac", "dense", "kfac", "dense")
    n = X.shape[0]
    for b, (a, g) in zip((0, 2), ggn_references(model, X)):
        S = torch.einsum("nro,nrp->op", g, g) / n
        F = torch.kron(S, a.T @ a / n) + WD * torch.eye(S.shape[0] * a.shape[1], dtype=F64)
        assert rel(inv.dense_block(b), torch.linalg.inv(F)) <= 1e-10
    # the other parameters keep the Gauss-Newton matrix itself
    ggn = fit(model, X, y, "ggn", layout=inv.layout)
    for b in (1, 3):
        assert rel(inv.dense_block(b), ggn.dense_block(b)) <= 1e-12
    # the Gauss-Newton factors do not read the labels; the empirical ones do
    other = (y + 1) % 3
    assert torch.equal(fit(model, X, other, "kfac_ggn").dense(), inv.dense())
    empirical = fit(model, X, y, "kfac")
    assert rel(empirical.dense_block(0), inv.dense_block(0)) > 1e-3


def test_the_ekfac_ggn_eigenvalues_are_the_second_moments_of_the_gauss_newton_rows():
    model, (X, y) = mlp(), data()
    inv = fit(model, X, y, "ekfac_ggn")
    store = inv.stores[[s.name for s in inv.stores].index("ekfac")]
    rows = jacobian_rows(model, X)                                  # (n, c, d)
    n = X.shape[0]
    for blk, b, (a, g) in zip(store.blocks, store.block_ids, ggn_references(model, X)):
        _, qa = torch.linalg.eigh(a.T @ a / n)
        _, qg = torch.linalg.eigh(torch.einsum("nro,nrp->op", g, g) / n)
        sl = inv.layout.slice(b)
        G = rows[:, :, sl].reshape(-1, qg.shape[0], qa.shape[0])     # (n c, out, in)
        lam = (qg.T @ G @ qa).square().sum(0) / n
        assert torch.allclose(blk.lam / n, lam, rtol=1e-9, atol=1e-14)


def newton_reference(model, X, y, k, curvature):
    r"""The Newton step of ``newton_erase``'s docstring computed densely:
    :math:`\frac1n (F' - \delta I)^{-1} \sum_{i \in S} \nabla\ell_i`, with :math:`F'` the
    dense matrix of a fresh fit on the remaining samples at the normaliser :math:`n`."""
    n = X.shape[0]
    layout = fit(model, X[:1], y[:1], curvature).layout
    Fp = torch.linalg.inv(fresh(model, X[k:], curvature, n, layout).dense())
    delta = WD - (n - k) * WD / n
    params = dict(model.named_parameters())
    losses = LOSS(model(X[:k]), y[:k]).sum()
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(losses, list(params.values()))])
    g = g + k * WD * theta
    return theta, torch.linalg.solve(Fp - delta * torch.eye(len(theta), dtype=F64), g) / n, g


@pytest.mark.parametrize("curvature", ["kfac_ggn", "ekfac_ggn_exact"])
def test_the_newton_step_with_kronecker_gauss_newton_blocks(curvature, ggn_exact):
    model, (X, y) = mlp(), data()
    n, k = X.shape[0], 4
    inv = fit(model, X, y, curvature)
    before = inv.dense()
    state = ssse.newton_erase(model, LOSS, (X[:k], y[:k]), inv_fisher=inv, n_total=n,
                              weight_decay=WD)
    theta, step, _ = newton_reference(model, X, y, k, curvature)
    got = torch.cat([state[name].reshape(-1) for name, _ in model.named_parameters()])
    assert rel(got - theta, step) <= 1e-9
    assert torch.equal(inv.dense(), before)  # not modified
    # the service: the same step, and the inverse then equals the fresh fit
    eraser = ssse.Eraser(model, LOSS, damping=WD, weight_decay=WD,
                         curvature=curvature).fit((X, y), progress=False)
    state = eraser.erase((X[:k], y[:k]), ids=list(range(k)))
    got = torch.cat([state[name].reshape(-1) for name, _ in model.named_parameters()])
    assert rel(got - theta, step) <= 1e-9
    ref = fresh(model, X[k:], curvature, n, eraser.inv_fisher.layout)
    assert rel(eraser.inv_fisher.dense(), ref.dense()) <= 1e-10


def test_basis_kept_newton_steps_stay_near_the_exact_ones(ggn_exact):
    """The default EK-FAC (basis kept) takes its step in the basis of the full data: not the
    exact refresh's step, but closer to it than a step that ignores the removal's curvature
    (the stored matrix of all n samples, shifted alike)."""
    model, (X, y) = mlp(), data()
    inv = fit(model, X, y, "ekfac_ggn")
    state = ssse.newton_erase(model, LOSS, (X[:4], y[:4]), inv_fisher=inv, n_total=30,
                              weight_decay=WD)
    theta, step, g = newton_reference(model, X, y, 4, ggn_exact.name)
    got = torch.cat([state[name].reshape(-1) for name, _ in model.named_parameters()])
    shifted = torch.linalg.inv(inv.dense()) - (WD - 26 * WD / 30) * torch.eye(len(theta),
                                                                            dtype=F64)
    ignored = torch.linalg.solve(shifted, g) / 30
    assert 0 < rel(got - theta, step) < rel(ignored, step)


def test_the_flavour_is_an_option_of_the_curvature():
    assert get_curvature("kfac_ggn").supports_newton and \
        not get_curvature("kfac_ggn").needs_labels
    assert not get_curvature("kfac").supports_newton and get_curvature("kfac").needs_labels
    assert get_curvature("ekfac_ggn").rows_per_sample(7) == 7
    assert get_curvature("ekfac").rows_per_sample(7) == 1
    with pytest.raises(ValueError, match="^fisher must be one of"):
        kfac("kfac_bad", fisher="hessian")
    assert "kfac_bad" not in ssse.curvature.CURVATURES
    model, (X, y) = mlp(), data(8)
    inv = fit(model, X, y, "ekfac")
    with pytest.raises(ValueError, match="^inv_fisher must hold the Gauss-Newton matrix"):
        ssse.newton_erase(model, LOSS, (X[:1], y[:1]), inv_fisher=inv, n_total=8,
                          weight_decay=WD)
    # the refinement tracks F x through the rows' rank-k change: refused, nothing changed
    eraser = ssse.Eraser(model, LOSS, damping=WD, weight_decay=WD,
                         curvature="kfac_ggn").fit((X, y), progress=False)
    before, theta = eraser.inv_fisher.dense(), eraser.theta.clone()
    with pytest.raises(ValueError, match="^refine_steps must be 0 with 'kfac_ggn' blocks"):
        eraser.erase((X[:2], y[:2]), ids=[0, 1], refine_steps=1)
    assert torch.equal(eraser.inv_fisher.dense(), before) and torch.equal(eraser.theta, theta)
    assert eraser.n == 8 and not eraser.history


def test_a_model_without_softmax_outputs_names_the_likelihood():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 2)).to(F64).eval()
    X = torch.randn(6, 5, dtype=F64)
    with pytest.raises(ValueError, match="likelihood"):
        ssse.fit_inverse_fisher(model, lambda out, t: (out - t).abs().sum(1), (X, X[:, :2]),
                                damping=WD, curvature="kfac_ggn", progress=False)
