"""Per-sample gradients and fit_inverse_fisher against loops of single backward passes."""

import pytest
import torch
from torch import nn

import ssse
import ssse_ext
from ssse_ext import reference

from .testing import DEVICES, SAME, SOLVE, STABLE, rel_err

CE = nn.CrossEntropyLoss(reduction="none")


def mlp(seed=0, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7)] + ([nn.BatchNorm1d(7)] if bn else []) + [nn.Tanh(), nn.Linear(7, 3)]
    model = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics, used in eval mode
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                              generator=g)


def loop_grads(model, loss_fn, X, y, weight_decay=0.0, b=1):
    """One backward pass per group of b consecutive samples (the reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(0, X.shape[0], b):
        model.zero_grad()
        loss = loss_fn(model(X[i:i + b]), y[i:i + b]).mean()
        loss = loss + 0.5 * weight_decay * sum((p * p).sum() for p in params)
        loss.backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    return torch.stack(rows).detach()


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_per_sample_grads_match_loop(weight_decay):
    model = mlp()
    X, y = data(23)
    got = torch.cat(list(ssse.per_sample_grads(model, CE, (X, y), weight_decay=weight_decay,
                                               chunk_size=5)))
    assert got.shape == (23, sum(p.numel() for p in model.parameters()))
    assert rel_err(got, loop_grads(model, CE, X, y, weight_decay)) < SAME[torch.float64]


def test_chunks_have_requested_size():
    model = mlp(bn=False)
    X, y = data(23)
    sizes = [c.shape[0] for c in ssse.per_sample_grads(model, CE, (X, y), chunk_size=10)]
    assert sizes == [10, 10, 3]


@pytest.mark.parametrize("b", [2, 4, 10])
def test_minibatch_mode_groups_across_batches(b):
    model = mlp()
    X, y = data(23)
    batches = [(X[:6], y[:6]), (X[6:7], y[6:7]), (X[7:], y[7:])]  # groups straddle batches
    got = torch.cat(list(ssse.per_sample_grads(model, CE, batches, minibatch=b,
                                               weight_decay=0.1, chunk_size=3)))
    ref = loop_grads(model, CE, X, y, 0.1, b)
    assert got.shape[0] == -(-23 // b)
    assert rel_err(got, ref) < SAME[torch.float64]


def test_frozen_parameters_are_excluded():
    model = mlp(bn=False)
    model[0].weight.requires_grad_(False)
    X, y = data(9)
    got = torch.cat(list(ssse.per_sample_grads(model, CE, (X, y))))
    assert got.shape == (9, 7 + 7 * 3 + 3)
    assert rel_err(got, loop_grads(model, CE, X, y)) < SAME[torch.float64]


def test_multi_output_losses_are_summed_per_sample():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    X = torch.randn(8, 4, dtype=torch.float64)
    Y = torch.randint(0, 2, (8, 3)).double()
    bce = nn.BCEWithLogitsLoss(reduction="none")
    got = torch.cat(list(ssse.per_sample_grads(model, bce, (X, Y))))
    ref = loop_grads(model, lambda o, t: bce(o, t).sum(1), X, Y)
    assert rel_err(got, ref) < SAME[torch.float64]


class NotVmappable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        scale = 1.0 if float(x.abs().sum()) >= 0 else 0.0  # .item() is not batchable by vmap
        return self.lin(x) * scale


def test_fallback_loop_warns_and_matches():
    torch.manual_seed(0)
    model = NotVmappable().double()
    X, y = data(7)
    with pytest.warns(RuntimeWarning, match="per-sample loop"):
        got = torch.cat(list(ssse.per_sample_grads(model, CE, (X, y), minibatch=2,
                                                   weight_decay=0.2)))
    assert rel_err(got, loop_grads(model, CE, X, y, 0.2, 2)) < SAME[torch.float64]


def test_scalar_loss_is_refused():
    with pytest.raises(ValueError, match="reduction='none'"):
        list(ssse.per_sample_grads(mlp(), nn.CrossEntropyLoss(), data(4)))


@pytest.mark.parametrize("kwargs, match", [
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"minibatch": 0}, "minibatch"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_per_sample_grads_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ssse.per_sample_grads(mlp(), CE, data(4), **kwargs)


def test_bad_data_is_named():
    with pytest.raises(TypeError, match="data"):
        ssse.per_sample_grads(mlp(), CE, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="same number of rows"):
        ssse.per_sample_grads(mlp(), CE, (torch.zeros(3, 5), torch.zeros(4)))


def test_training_mode_batchnorm_warns():
    model = mlp().train()
    with pytest.warns(RuntimeWarning, match="model.eval"):
        ssse.per_sample_grads(model, CE, data(4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["per_parameter", "fixed"])
def test_fit_inverse_fisher_matches_closed_form(layout, device):
    model = mlp().to(device)
    X, y = data(31)
    inv = ssse.fit_inverse_fisher(model, CE, (X.to(device), y.to(device)), damping=0.05,
                                  block_size=8, layout=layout, weight_decay=0.01,
                                  progress=False)
    shapes = [p.shape for p in model.parameters()]
    lay = (ssse_ext.BlockLayout.per_parameter(shapes, 8) if layout == "per_parameter"
           else ssse_ext.BlockLayout.fixed(sum(p.numel() for p in model.parameters()), 8))
    assert inv.layout == lay and inv.num_samples == 31 and inv.normalizer == 31
    G = loop_grads(model.cpu(), CE, X, y, 0.01)
    ref = torch.block_diag(*reference.block_closed_form(G, lay, 0.05))
    assert rel_err(inv.dense(), ref) < STABLE[torch.float64]


def test_fit_inverse_fisher_minibatch_normalizer_dtype_and_layout_object():
    model = mlp()
    X, y = data(25)
    d = sum(p.numel() for p in model.parameters())
    lay = ssse_ext.BlockLayout.from_boundaries([20, 40], dim=d)
    inv = ssse.fit_inverse_fisher(model, CE, [(X[:12], y[:12]), (X[12:], y[12:])], damping=0.1,
                                  layout=lay, minibatch=5, dtype=torch.float32, progress=False)
    assert inv.dtype == torch.float32 and inv.normalizer == 5 and inv.layout is lay
    ref = torch.block_diag(*reference.block_closed_form(loop_grads(model, CE, X, y, b=5), lay,
                                                        0.1))
    # float32 gradients: their rounding goes through the inverse
    assert rel_err(inv.dense(), ref) < SOLVE[torch.float32]


def test_fit_inverse_fisher_validates():
    model = mlp()
    with pytest.raises(ValueError, match="damping"):
        ssse.fit_inverse_fisher(model, CE, data(4), damping=0.0)
    with pytest.raises(ValueError, match="layout"):
        ssse.fit_inverse_fisher(model, CE, data(4), damping=1.0, layout="diagonal")
    with pytest.raises(ValueError, match="dim"):
        ssse.fit_inverse_fisher(model, CE, data(4), damping=1.0,
                                layout=ssse_ext.BlockLayout.fixed(10, 5))
    with pytest.raises(TypeError, match="dtype"):
        ssse.fit_inverse_fisher(model, CE, data(4), damping=1.0, dtype=torch.int32)


def test_gradient_sum_and_hessian_vector_products():
    model = mlp()
    X, y = data(17)
    g, n = ssse.gradient_sum(model, CE, [(X[:9], y[:9]), (X[9:], y[9:])], weight_decay=0.2)
    assert n == 17
    assert rel_err(g, loop_grads(model, CE, X, y, 0.2).sum(0)) < SAME[torch.float64]

    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def total(theta):
        out, pos = {}, 0
        for (name, p) in model.named_parameters():
            out[name] = theta[pos:pos + p.numel()].view(p.shape)
            pos += p.numel()
        pred = torch.func.functional_call(model, (out, dict(model.named_buffers())), (X,))
        return CE(pred, y).sum() + 0.5 * 0.2 * 17 * (theta * theta).sum()

    H = torch.autograd.functional.hessian(total, flat, vectorize=True)
    V = torch.randn(flat.numel(), 3, dtype=torch.float64)
    HV, n = ssse.hessian_vector_products(model, CE, (X, y), V, weight_decay=0.2, chunk=2)
    assert n == 17 and rel_err(HV, H @ V) < SAME[torch.float64]


def test_pairs_longer_than_a_batch_are_cut_whole():
    # Regression: every batch of a large (X, y) pair must be seen, not only the first.
    from ssse.model import iter_batches

    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    batches = list(iter_batches((x, y), "data", batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


def test_fit_inverse_fisher_names_empty_data():
    X, y = data(4)
    with pytest.raises(ValueError, match="data is empty"):
        ssse.fit_inverse_fisher(mlp(), CE, (X[:0], y[:0]), damping=1.0, progress=False)
    with pytest.raises(ValueError, match="data is empty"):
        ssse.fit_inverse_fisher(mlp(), CE, [], damping=1.0, progress=False)


def test_device_argument_is_named():
    X, y = data(4)
    with pytest.raises(ValueError, match="device must name a torch device"):
        ssse.fit_inverse_fisher(mlp(), CE, (X, y), damping=1.0, device="gpu0", progress=False)
    with pytest.raises(TypeError, match="device must be a torch.device"):
        ssse.Eraser(mlp(), CE, damping=1.0, device=3.5)
