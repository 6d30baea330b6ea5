"""Kronecker-factored blocks (K-FAC, EK-FAC): the store against explicit Kronecker products,
the curvature against per-sample gradients from torch.func, downdates against fresh fits,
files, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import ssse
import ssse_ext
from ssse.curvature import get_curvature, unregister_curvature
from ssse_ext.blocks import get_store
from ssse.curvature.kfac import ekfac, kfac, kronecker_weights
from ssse.model import FlatModel
from ssse_ext.blocks import Pinned
from ssse_ext.blocks.kronecker import KRONECKER_KEY, KroneckerFactors
from ssse_ext.blocks.kronecker_factors import kronecker_nbytes
from ssse_ext.side import Rows

from .test_comm import TwoRanks

F64 = torch.float64
LOSS = nn.CrossEntropyLoss(reduction="none")
DAMPING = 0.1


class Conv1D(nn.Module):
    """GPT-2's layer: ``y = x @ W + b`` with ``W`` stored ``(in, out)``."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def mlp(dtype=F64, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(),
                         nn.Linear(4, 3, bias=bias)).to(dtype).eval()


def data(n=30, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, dtype=dtype, generator=g), torch.randint(0, 3, (n,), generator=g)


def factors_and_grads(model, X, y):
    """Independent references for an MLP of Linear layers (one position per sample): per
    weight, the inputs ``a`` and output gradients ``g`` of every sample from a hand-written
    forward pass, and the per-sample weight gradients from ``vmap(grad)``."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    acts, pre, h = [], [], X
    for i, layer in enumerate(layers):
        acts.append(h)
        z = (h @ layer.weight.T + (0 if layer.bias is None else layer.bias)).detach()
        z.requires_grad_(True)
        pre.append(z)
        h = torch.tanh(z) if i < len(layers) - 1 else z
    # the output gradient of layer i is d(sum of losses)/dz_i: samples do not interact
    gs = torch.autograd.grad(LOSS(h, y).sum(), pre) if len(layers) == 1 else None
    if gs is None:
        out = pre[-1]
        g_last = torch.autograd.grad(LOSS(out, y).sum(), out)[0]
        g_first = (g_last @ layers[1].weight) * (1 - torch.tanh(pre[0].detach()) ** 2)
        gs = [g_first, g_last]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x, t):
        return LOSS(functional_call(model, p, (x[None],)), t[None]).sum()

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    names = [k for k in params if k.endswith("weight")]
    return [(a.detach(), g.detach(), per[k]) for a, g, k in zip(acts, gs, names)]


def kron_rows(model, X, y, curvature="kfac"):
    fm = FlatModel(model, loss_fn=LOSS)
    return get_curvature(curvature).rows(
        fm, fm.param_dict(), fm.frozen_dict(), X, y, loss_fn=LOSS, likelihood=None,
        generator=None, mc_samples=1, minibatch=1, state={})


def fresh(model, X, y, curvature, normalizer, layout):
    """A tensor-level fit of the curvature's rows of ``(X, y)`` with a given normaliser."""
    fm = FlatModel(model, loss_fn=LOSS)
    rep = get_curvature(curvature).representation_for(fm, layout, "dense")
    return ssse_ext.build_inverse_fisher(kron_rows(model, X, y, curvature), damping=DAMPING,
                                         layout=layout, representation=rep,
                                         normalizer=float(normalizer))


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- the store ------------------------------------------------------------------------------

@pytest.mark.parametrize("storage", ["exact", "compact"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_kfac_apply_is_the_explicit_kronecker_inverse(dtype, tol, transposed, storage):
    torch.manual_seed(2)
    n, T, out, inn = 12, 3, 4, 6
    a, g = torch.randn(n, T, inn, dtype=F64), torch.randn(n, T, out, dtype=F64)
    G = torch.einsum("nto,nti->noi", g, a)
    G = G.transpose(1, 2) if transposed else G
    A, S = torch.einsum("nti,ntj->ij", a, a), torch.einsum("nti,ntj->ij", g, g)
    side = {KRONECKER_KEY: KroneckerFactors({0: (A, S, transposed)}, storage=storage)}
    layout = ssse_ext.BlockLayout.from_boundaries([out * inn], out * inn)
    inv = ssse_ext.build_inverse_fisher(Rows(G.reshape(n, -1).to(dtype), side),
                                        damping=DAMPING, layout=layout,
                                        representation=Pinned({0: "kfac"}))
    F = torch.kron(S / n, A / n) + DAMPING * torch.eye(out * inn, dtype=F64)
    if transposed:  # flat index i * out + o of the (in, out) weight
        perm = torch.arange(out * inn).reshape(out, inn).T.reshape(-1)
        F = F[perm][:, perm]
    v = torch.randn(out * inn, 3, dtype=F64)
    assert rel((inv @ v.to(dtype)).to(F64), torch.linalg.solve(F, v)) <= tol
    assert rel(inv.dense_block(0).to(F64), torch.linalg.inv(F)) <= tol
    assert inv.health(warn=False).ok
    store = inv.stores[0]
    assert store.storage == storage and inv.nbytes == store.nbytes == kronecker_nbytes(
        out, inn, dtype, storage=storage)
    assert store.blocks[0].qa.dtype == (F64 if storage == "exact" else dtype)
    # copies: exact ones are made from the float64 statistics, compact ones from the bases
    # of this dtype (a float32 basis stays float32-accurate in float64)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    moved = inv.to(dtype=other)
    exact_copy = other == torch.float64 and (storage == "exact" or dtype == torch.float64)
    assert moved.dtype == other and rel((moved @ v.to(other)).to(F64), torch.linalg.solve(
        F, v)) <= (1e-10 if exact_copy else 1e-5)
    assert moved.stores[0].blocks[0].qa.dtype == (F64 if storage == "exact" else other)
    assert torch.equal(inv.clone().dense(), inv.dense())


def test_an_empty_build_is_the_damping():
    layout = ssse_ext.BlockLayout.from_boundaries([6], 6)
    side = {KRONECKER_KEY: KroneckerFactors({0: (torch.zeros(3, 3, dtype=F64),
                                                 torch.zeros(2, 2, dtype=F64), False)})}
    for name in ("kfac", "ekfac"):
        inv = ssse_ext.build_inverse_fisher(Rows(torch.zeros(0, 6, dtype=F64), side),
                                            damping=0.5, layout=layout, normalizer=1.0,
                                            representation=Pinned({0: name}))
        assert torch.allclose(inv.dense(), 2 * torch.eye(6, dtype=F64))


# ---- the curvature against independent references -------------------------------------------

def test_the_kfac_blocks_of_an_mlp_are_s_kron_a():
    model, (X, y) = mlp(), data()
    inv = ssse.fit_inverse_fisher(model, LOSS, (X, y), damping=DAMPING, curvature="kfac",
                                  progress=False)
    assert inv.representation == ("kfac", "dense", "kfac", "dense")
    n = X.shape[0]
    for b, (a, g, _) in zip((0, 2), factors_and_grads(model, X, y)):
        F = torch.kron(g.T @ g / n, a.T @ a / n) + DAMPING * torch.eye(a.shape[1] * g.shape[1],
                                                                         dtype=F64)
        assert rel(inv.dense_block(b), torch.linalg.inv(F)) <= 1e-10
    # eq. 8 block by block: theta + eps / (n - k) F^-1 (sum of the removed gradients)
    params = {k: v.detach() for k, v in model.named_parameters()}
    per = vmap(grad(lambda p, x, t: LOSS(functional_call(model, p, (x[None],)), t[None]).sum()),
               in_dims=(None, 0, 0))(params, X[:3], y[:3])
    v = torch.cat([per[k].sum(0).reshape(-1) for k in params])
    theta = torch.cat([p.reshape(-1) for p in params.values()])
    new = ssse.ssse_update(model, LOSS, (X[:3], y[:3]), inv_fisher=inv, epsilon=0.5, n_total=n)
    got = torch.cat([new[k].reshape(-1) for k in params])
    assert rel(got - theta, 0.5 / (n - 3) * inv.dense() @ v) <= 1e-10


def test_the_ekfac_eigenvalues_are_the_per_sample_second_moments():
    model, (X, y) = mlp(), data()
    inv = ssse.fit_inverse_fisher(model, LOSS, (X, y), damping=DAMPING, curvature="ekfac",
                                  progress=False)
    store = inv.stores[[s.name for s in inv.stores].index("ekfac")]
    n = X.shape[0]
    for blk, (a, g, G) in zip(store.blocks, factors_and_grads(model, X, y)):
        _, qa = torch.linalg.eigh(a.T @ a / n)
        _, qg = torch.linalg.eigh(g.T @ g / n)
        lam = (qg.T @ G @ qa).square().mean(0)   # G: (n, out, in) from vmap(grad)
        # the bases agree up to the signs of their columns, which the squares remove
        assert torch.allclose(blk.lam / n, lam, rtol=1e-10, atol=1e-14)
        Q = torch.kron(qg, qa)
        F = Q @ torch.diag(lam.flatten() + DAMPING) @ Q.T
        assert rel(inv.dense_block(store.block_ids[store.blocks.index(blk)]),
                   torch.linalg.inv(F)) <= 1e-10


def test_the_rows_are_the_gradients_and_the_layout_keeps_weights_whole():
    model, (X, y) = mlp(), data(8)
    fm = FlatModel(model, loss_fn=LOSS)
    lay = get_curvature("kfac").layout_for(fm, ssse_ext.BlockLayout.fixed(fm.dim, 7))
    assert [lay.sizes[b] for b in range(lay.num_blocks) if lay.starts[b] in (0, 24)] == [20, 12]
    assert all(s <= 7 for st, s in zip(lay.starts, lay.sizes) if st not in (0, 24))
    rows = kron_rows(model, X, y)
    refs = factors_and_grads(model, X, y)
    assert torch.allclose(rows.rows[:, :20], refs[0][2].reshape(8, -1), atol=1e-12)
    assert list(kronecker_weights(fm)) == ["0.weight", "2.weight"]


def test_a_conv1d_weight_is_held_transposed():
    torch.manual_seed(3)
    model = nn.Sequential(Conv1D(3, 4), nn.Tanh(), nn.Linear(3, 2)).to(F64).eval()
    X, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 2, (10,))
    inv = ssse.fit_inverse_fisher(model, LOSS, (X, y), damping=DAMPING, curvature="kfac",
                                  progress=False)
    assert inv.representation[0] == "kfac" and inv.stores[-1].blocks[0].transposed
    z = (X @ model[0].weight + model[0].bias).detach().requires_grad_(True)
    g = torch.autograd.grad(LOSS(model[2](torch.tanh(z)), y).sum(), z)[0]
    S, A = g.T @ g / 10, X.T @ X / 10
    perm = torch.arange(12).reshape(3, 4).T.reshape(-1)
    F = (torch.kron(S, A) + DAMPING * torch.eye(12, dtype=F64))[perm][:, perm]
    assert rel(inv.dense_block(0), torch.linalg.inv(F)) <= 1e-10


@pytest.mark.parametrize("curvature", ["ekfac", "ekfac_exact"])
def test_a_one_shot_stream_gives_the_fit_of_two_passes(curvature, exact_ekfac, monkeypatch):
    model, (X, y) = mlp(), data()
    reads = []
    factors = ssse.curvature.kfac.layer_factors
    monkeypatch.setattr(ssse.curvature.kfac, "layer_factors",
                        lambda *a, **kw: reads.append(1) or factors(*a, **kw))
    batches = [(X[:11], y[:11]), (X[11:], y[11:])]
    twice = ssse.fit_inverse_fisher(model, LOSS, batches, damping=DAMPING, curvature=curvature,
                                    progress=False)
    read_twice, reads[:] = len(reads), []
    once = ssse.fit_inverse_fisher(model, LOSS, iter(batches), damping=DAMPING,
                                   curvature=curvature, progress=False)
    assert read_twice == 2 * len(reads)  # a list is read twice, an iterator once
    assert rel(once.dense(), twice.dense()) <= 1e-12
    assert (once.stores[-1].blocks[0].rows is None) == (curvature == "ekfac")


def test_a_one_shot_stream_that_does_not_fit_names_the_remedy():
    layout = ssse_ext.BlockLayout.from_boundaries([6], 6)
    cls = get_store("ekfac")
    room = cls.build_cost(layout, (0,), rows=0, dtype=F64, device=torch.device("cpu"),
                          method="cholesky").peak
    builder = cls.builder(layout, (0,), dtype=F64, device="cpu", method="cholesky",
                          damping=1.0, normalizer=None, rows=None, max_memory=room + 100)
    builder.add(torch.zeros(2, 6, dtype=F64))  # 96 bytes: held
    with pytest.raises(ssse_ext.InsufficientMemoryError, match="can be read twice"):
        builder.add(torch.zeros(2, 6, dtype=F64))


# ---- requests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("curvature", ["kfac", "ekfac_exact", "kfac_compact",
                                       "ekfac_exact_compact"])
def test_a_request_equals_a_fresh_fit_on_the_remaining_samples(curvature, exact_ekfac,
                                                                 compact_curvatures):
    model, (X, y) = mlp(), data()
    eraser = ssse.Eraser(model, LOSS, damping=DAMPING, curvature=curvature).fit((X, y),
                                                                                progress=False)
    before = eraser.inv_fisher.dense()
    v = kron_rows(model, X[:4], y[:4]).rows.sum(0)
    state = eraser.erase((X[:4], y[:4]), ids=[0, 1, 2, 3], epsilon=2.0)
    # the step used the Fisher of D (eq. 8), the weights were written from it
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    step = torch.cat([state[k].reshape(-1) for k, _ in model.named_parameters()]) - theta
    assert rel(step, 2.0 / 26 * before @ v) <= 1e-10
    ref = fresh(model, X[4:], y[4:], curvature, 30, eraser.inv_fisher.layout)
    assert rel(eraser.inv_fisher.dense(), ref.dense()) <= 1e-10
    # a sampled probe of Kronecker blocks is a full one (no dense copies)
    health = eraser.inv_fisher.health(warn=False, blocks=1)
    assert health.ok and health.blocks is None
    # the leave-k-out step: the Fisher without the request's samples, applied on the fly
    v = kron_rows(model, X[4:6], y[4:6]).rows.sum(0)
    theta = torch.cat([state[k].reshape(-1) for k, _ in model.named_parameters()])
    state = eraser.erase((X[4:6], y[4:6]), ids=[4, 5], epsilon=2.0, fisher="leave_k_out")
    step = torch.cat([state[k].reshape(-1) for k, _ in model.named_parameters()]) - theta
    ref = fresh(model, X[6:], y[6:], curvature, 30, eraser.inv_fisher.layout)
    assert rel(step, 2.0 / 24 * ref.dense() @ v) <= 1e-10


def test_basis_kept_downdates_the_eigenvalues_in_the_kept_basis(exact_ekfac):
    model, (X, y) = mlp(), data()
    lay = get_curvature("ekfac").layout_for(FlatModel(model), ssse_ext.BlockLayout.per_parameter(
        [p.shape for p in model.parameters()], 1024))
    kept = ekfac("ekfac_kept", tolerance=1e9)  # never moves the basis
    try:
        inv = fresh(model, X, y, "ekfac_kept", 30, lay)
        store = inv.stores[-1]
        old = [(blk.qa, blk.qg) for blk in store.blocks]
        inv.downdate(kron_rows(model, X[:3], y[:3], "ekfac_kept"))
        rest = factors_and_grads(model, X[3:], y[3:])
        for blk, (qa, qg), (_, _, G) in zip(store.blocks, old, rest):
            assert torch.equal(blk.qa, qa) and torch.equal(blk.qg, qg)
            assert torch.allclose(blk.lam, (qg.T @ G @ qa).square().sum(0), rtol=1e-10,
                                  atol=1e-13)
        assert store.rebased == 0 and store.last_moved > 0
        exact = fresh(model, X[3:], y[3:], "ekfac_exact", 30, lay)
        # the kept basis is an approximation: close to the exact refit, not equal
        assert 0 < rel(inv.dense(), exact.dense()) < 0.5
    finally:
        unregister_curvature(kept.name)


def test_basis_kept_projects_when_the_basis_moved_beyond_the_tolerance():
    model, (X, y) = mlp(), data()
    moving = ekfac("ekfac_moving", tolerance=0.0)
    try:
        eraser = ssse.Eraser(model, LOSS, damping=DAMPING, curvature="ekfac_moving").fit(
            (X, y), progress=False)
        eraser.erase((X[:3], y[:3]), ids=[0, 1, 2], epsilon=1.0)
        store = eraser.inv_fisher.stores[-1]
        assert store.rebased == 2  # both weights
        assert eraser.inv_fisher.health(warn=False).ok
    finally:
        unregister_curvature(moving.name)


def test_removing_samples_that_were_never_added_changes_nothing():
    model, (X, y) = mlp(bias=False), data()
    inv = ssse.fit_inverse_fisher(model, LOSS, (X[:10], y[:10]), damping=DAMPING,
                                  curvature="kfac", progress=False)
    before = inv.dense()
    with pytest.raises(ssse_ext.NotPositiveDefiniteError, match="not part of it"):
        inv.downdate(kron_rows(model, 10 * X[10:20], y[10:20]))
    with pytest.raises(ValueError, match="need the Kronecker factors"):
        inv.downdate(kron_rows(model, X[:2], y[:2]).rows)
    assert torch.equal(inv.dense(), before) and inv.num_samples == 10


def test_a_leave_k_out_apply_equals_the_downdated_inverse():
    model, (X, y) = mlp(), data()
    inv = ssse.fit_inverse_fisher(model, LOSS, (X, y), damping=DAMPING, curvature="kfac",
                                  progress=False)
    rows = kron_rows(model, X[:5], y[:5])
    v = torch.randn(inv.dim, dtype=F64)
    on_the_fly = inv.without(rows) @ v
    inv.downdate(rows)
    assert rel(on_the_fly, inv @ v) <= 1e-12
    assert rel(inv.solve_changed(rows, v, sign=1), inv.without(rows, sign=1) @ v) <= 1e-12


# ---- refusals ---------------------------------------------------------------------------------

def test_the_refusals_name_the_argument(tmp_path):
    model, (X, y) = mlp(), data(8)
    local_only = kfac("kfac_local_only")  # a curvature may keep its fit to one process
    try:
        local_only.shardable = False
        with pytest.raises(ValueError, match="^comm: curvature='kfac_local_only' is not"):
            ssse.fit_inverse_fisher(model, LOSS, (X, y), damping=DAMPING, curvature=local_only,
                                    comm=TwoRanks())
    finally:
        unregister_curvature("kfac_local_only")
    with pytest.raises(ValueError, match="^checkpoint: "):
        ssse.fit_inverse_fisher(model, LOSS, (X, y), damping=DAMPING, curvature="kfac",
                                checkpoint=tmp_path / "fit.ckpt", progress=False)
    eraser = ssse.Eraser(model, LOSS, damping=DAMPING, curvature="ekfac").fit((X, y),
                                                                              progress=False)
    with pytest.raises(ValueError, match="^epsilon must be given"):
        eraser.erase((X[:1], y[:1]), ids=[0])
    with pytest.raises(ValueError, match='^fisher="leave_k_out" needs'):
        ssse.ssse_update(model, LOSS, (X[:1], y[:1]), inv_fisher=eraser.inv_fisher,
                         epsilon=1.0, n_total=8, fisher="leave_k_out")
    with pytest.raises(ValueError, match="refresh"):
        KroneckerFactors({}, refresh="sometimes")
    with pytest.raises(ValueError, match="refresh"):
        ekfac("ekfac_bad", refresh="never")
    with pytest.raises(ValueError, match="tolerance"):
        KroneckerFactors({}, tolerance=-1.0)
    for bad in (lambda: KroneckerFactors({}, storage="small"),
                lambda: ekfac("ekfac_bad", storage="float32"),
                lambda: kfac("kfac_bad", storage=None),
                lambda: kronecker_nbytes(2, 3, torch.float32, storage="half")):
        with pytest.raises(ValueError, match=r"^storage must be one of \('exact', 'compact'\)"):
            bad()
    with pytest.raises(ValueError, match="storage"):
        KroneckerFactors({}) + KroneckerFactors({}, storage="compact")
    with pytest.raises(ValueError, match="no block store is registered as 'kfc'"):
        Pinned({0: "kfc"})
    with pytest.raises(TypeError, match="rows must be a torch.Tensor"):
        Rows([[1.0]], {})
    with pytest.raises(TypeError, match=r"side\['k'\] must be a SidePayload"):
        Rows(torch.zeros(1, 1), {"k": 1})
    layout = ssse_ext.BlockLayout.from_boundaries([6], 6)
    with pytest.raises(ValueError, match="^representation=.* the rows carry none"):
        ssse_ext.build_inverse_fisher(torch.zeros(2, 6), damping=1.0, layout=layout,
                                      representation=Pinned({0: "kfac"}))
    with pytest.raises(ValueError, match="^representation='ekfac' puts blocks in the ekfac"):
        ssse.fit_inverse_fisher(model, LOSS, (X, y), damping=DAMPING, representation="ekfac",
                                progress=False)
    other = {KRONECKER_KEY: KroneckerFactors({6: (torch.eye(3, dtype=F64),
                                                  torch.eye(2, dtype=F64), False)})}
    with pytest.raises(ValueError, match="block 0 has no Kronecker factors"):
        ssse_ext.build_inverse_fisher(Rows(torch.zeros(2, 6), other), damping=1.0,
                                      layout=layout, representation=Pinned({0: "kfac"}))
    side = {KRONECKER_KEY: KroneckerFactors({0: (torch.eye(4, dtype=F64),
                                                 torch.eye(2, dtype=F64), False)})}
    with pytest.raises(ValueError, match="block 0 has 6 parameters"):
        ssse_ext.build_inverse_fisher(Rows(torch.zeros(2, 6), side), damping=1.0,
                                      layout=layout, representation=Pinned({0: "kfac"}))


def test_odd_sizes_and_a_model_without_linear_weights():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0)).to(
        F64).eval()
    X, y = torch.randn(9, 1, dtype=F64), torch.randn(9, dtype=F64)
    mse = nn.MSELoss(reduction="none")
    eraser = ssse.Eraser(model, mse, damping=DAMPING, curvature="ekfac").fit((X, y),
                                                                            progress=False)
    assert eraser.inv_fisher.representation == ("ekfac", "dense", "ekfac", "dense")
    eraser.erase((X[:1], y[:1]), ids=[0], epsilon=1.0)
    assert eraser.inv_fisher.health(warn=False).ok
    # no supported weight: the empirical Fisher of the gradients, dense, without decay
    bias_only = ssse.fit_inverse_fisher(model, mse, (X, y), damping=DAMPING, curvature="kfac",
                                        params=["0.bias"], progress=False)
    emp = ssse.fit_inverse_fisher(model, mse, (X, y), damping=DAMPING, params=["0.bias"],
                                  progress=False)
    assert bias_only.representation == ("dense",)
    assert torch.allclose(bias_only.dense(), emp.dense(), rtol=1e-12)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of CPU attention
def test_gpt2_conv1d_weights_against_per_position_and_per_sample_references():
    transformers = pytest.importorskip("transformers", reason="needs the hf extra")
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    n, T = 6, 5
    ids = torch.randint(0, 30, (n, T), generator=torch.Generator().manual_seed(6))
    data = {"input_ids": ids, "labels": ids}
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"]
    inv = ssse.fit_inverse_fisher(model, ssse.causal_lm_loss, data, damping=DAMPING,
                                  curvature="ekfac", params=names, progress=False)
    assert inv.representation == ("ekfac", "ekfac")
    modules = dict(model.named_modules())
    for blk, name in zip(inv.stores[0].blocks, names):
        layer = modules[name.rpartition(".")[0]]
        seen = []

        def keep(_module, inputs, output):
            output.retain_grad()
            seen.append((inputs[0], output))
        hook = layer.register_forward_hook(keep)
        ssse.causal_lm_loss(model(input_ids=ids).logits, ids).sum().backward()
        hook.remove()
        a, z = seen[0]
        a, g = a.detach().reshape(-1, a.shape[-1]), z.grad.reshape(-1, z.shape[-1])
        _, qa = torch.linalg.eigh(a.T @ a / n)
        _, qg = torch.linalg.eigh(g.T @ g / n)
        per_sample = []  # one sample at a time: the weight's gradient, stored (in, out)
        for i in range(n):
            loss = ssse.causal_lm_loss(model(input_ids=ids[i:i + 1]).logits, ids[i:i + 1]).sum()
            per_sample.append(torch.autograd.grad(loss, layer.weight)[0].T)
        G = torch.stack(per_sample)
        assert blk.transposed and (blk.out, blk.inn) == tuple(G.shape[1:])
        assert torch.allclose(blk.lam / n, (qg.T @ G @ qa).square().mean(0), rtol=1e-9,
                              atol=1e-14)


def test_conv2d_weights_are_kronecker_factored_over_patches():
    torch.manual_seed(7)
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)).to(F64).eval()
    n = 12
    X, y = torch.randn(n, 2, 5, 5, dtype=F64), torch.randint(0, 3, (n,))
    kfac = ssse.fit_inverse_fisher(model, LOSS, (X, y), damping=DAMPING, curvature="kfac",
                                   progress=False)
    eig = ssse.fit_inverse_fisher(model, LOSS, (X, y), damping=DAMPING, curvature="ekfac",
                                  progress=False)
    assert kfac.representation == ("kfac", "dense", "kfac", "dense")
    # references: patches cut by hand from the padded input, output gradients by autograd
    z = conv(X).detach().requires_grad_(True)
    g = torch.autograd.grad(LOSS(model[3](torch.tanh(z).flatten(1)), y).sum(), z)[0]
    pad = nn.functional.pad(X, (1, 1, 1, 1))
    a = torch.stack([pad[:, :, 2 * p:2 * p + 3, 2 * q:2 * q + 3].reshape(n, -1)
                     for p in range(3) for q in range(3)], 1).reshape(-1, 18)
    gp = g.permute(0, 2, 3, 1).reshape(-1, 3)
    A, S = a.T @ a / n, gp.T @ gp / n
    F = torch.kron(S, A) + DAMPING * torch.eye(54, dtype=F64)
    assert rel(kfac.dense_block(0), torch.linalg.inv(F)) <= 1e-10
    params = {k: v.detach() for k, v in model.named_parameters()}
    G = vmap(grad(lambda p, x, t: LOSS(functional_call(model, p, (x[None],)), t[None]).sum()),
             in_dims=(None, 0, 0))(params, X, y)["0.weight"].reshape(n, 3, 18)
    _, qa = torch.linalg.eigh(A)
    _, qg = torch.linalg.eigh(S)
    lam = eig.stores[-1].blocks[0].lam / n
    assert torch.allclose(lam, (qg.T @ G @ qa).square().mean(0), rtol=1e-9, atol=1e-14)
