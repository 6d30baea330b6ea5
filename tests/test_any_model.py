"""Bring your own model: mapping batches, tasks, parameter selection, the linear-layer
per-sample gradients, autocast rows; each checked against a float64 reference computed one
sample at a time with plain autograd (no code of the library)."""

import warnings

import pytest
import torch
from torch import nn

import ssse
from ssse.batches import Split, batch_len, iter_batches
from ssse.curvature.layer_grads import layer_gradients, linear_owners
from ssse.model import FlatModel, per_sample_losses

DAMPING = 1e-2
EPS = 0.7


@pytest.fixture(autouse=True)
def float64_by_default():
    """Models and data of this file in float64 (restored afterwards for the other files)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


class KwargsNet(nn.Module):
    """A model called as ``model(features=..., mask=...)`` returning a mapping with logits."""

    def __init__(self, d_in=5, hidden=7, c=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, c)

    def forward(self, features, mask):
        return {"logits": self.head(self.body(features * mask))}


def kwargs_data(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    mask = (torch.rand(n, 5, generator=g) > 0.2).double()
    y = torch.randint(0, 3, (n,), generator=g)
    return {"features": x, "mask": mask, "labels": y}


def reference_grads(model, names, sample_loss, n):
    """``(n, d)`` per-sample gradients, one sample at a time, by torch.autograd."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(n):
        gs = torch.autograd.grad(sample_loss(i), [params[k] for k in names])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows).detach()


def reference_update(theta, G, removed, layout, n, eps=EPS, damping=DAMPING):
    """theta + eps/(n-k) F^-1 v with the block Fisher built from the float64 rows G."""
    v = G[removed].sum(0)
    out = theta.clone()
    for start, size in zip(layout.starts, layout.sizes):
        g = G[:, start:start + size]
        F = damping * torch.eye(size) + g.T @ g / n
        out[start:start + size] += eps / (n - len(removed)) * torch.linalg.solve(
            F, v[start:start + size])
    return out


def flat(model, names):
    params = dict(model.named_parameters())
    return torch.cat([params[k].detach().reshape(-1) for k in names])


def test_mapping_batches_match_the_reference():
    torch.manual_seed(0)
    model = KwargsNet().eval()
    data = kwargs_data()
    loss = nn.CrossEntropyLoss(reduction="none")
    inv = ssse.fit_inverse_fisher(model, loss, data, damping=DAMPING, progress=False)
    names = [k for k, _ in model.named_parameters()]
    assert inv.params == tuple(names)

    def sample_loss(i):
        out = model(features=data["features"][i:i + 1], mask=data["mask"][i:i + 1])
        return loss(out["logits"], data["labels"][i:i + 1]).sum()

    G = reference_grads(model, names, sample_loss, 30)
    removed = list(range(4))
    sub = {k: v[:4] for k, v in data.items()}
    new = ssse.ssse_update(model, loss, sub, inv_fisher=inv, epsilon=EPS, n_total=30)
    got = torch.cat([new[k].reshape(-1) for k in names])
    want = reference_update(flat(model, names), G, removed, inv.layout, 30)
    assert torch.allclose(got, want, rtol=0, atol=1e-12 * want.abs().max())
    # a list of mapping batches (a DataLoader's) gives the same inverse
    batches = [{k: v[i:i + 7] for k, v in data.items()} for i in range(0, 30, 7)]
    inv2 = ssse.fit_inverse_fisher(model, loss, batches, damping=DAMPING, progress=False)
    v = torch.randn(inv.dim)
    assert torch.allclose(inv @ v, inv2 @ v, rtol=1e-12, atol=0)


def test_a_mapping_without_labels_is_refused():
    model = KwargsNet().eval()
    data = kwargs_data()
    del data["labels"]
    with pytest.raises(ValueError, match="'labels'"):
        ssse.fit_inverse_fisher(model, nn.CrossEntropyLoss(reduction="none"), data,
                                damping=DAMPING, progress=False)


class WeightedTask(ssse.Task):
    """A batch ``(x, y, w)``: the per-sample loss is ``w * cross-entropy``."""

    def forward(self, model, batch):
        return model(batch[0])

    def per_sample_loss(self, outputs, batch):
        return batch[2] * nn.functional.cross_entropy(outputs, batch[1], reduction="none")


def test_a_task_runs_any_batch():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(25, 4), torch.randint(0, 3, (25,))
    w = torch.rand(25) + 0.5
    task = WeightedTask()
    inv = ssse.fit_inverse_fisher(model, task, (x, y, w), damping=DAMPING, progress=False)
    names = [k for k, _ in model.named_parameters()]

    def sample_loss(i):
        return w[i] * nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])

    G = reference_grads(model, names, sample_loss, 25)
    new = ssse.ssse_update(model, task, (x[:3], y[:3], w[:3]), inv_fisher=inv, epsilon=EPS,
                           n_total=25)
    got = torch.cat([new[k].reshape(-1) for k in names])
    want = reference_update(flat(model, names), G, [0, 1, 2], inv.layout, 25)
    assert torch.allclose(got, want, rtol=0, atol=1e-12 * want.abs().max())
    # an Eraser serves the task's batches too, and its request equals the one-shot update
    eraser = ssse.Eraser(model, task, damping=DAMPING).fit([(x, y, w)])
    served = eraser.erase((x[:3], y[:3], w[:3]), epsilon=EPS, fisher="full")
    assert torch.allclose(torch.cat([served[k].reshape(-1) for k in names]), got,
                          rtol=0, atol=1e-12 * got.abs().max())


def test_a_selection_leaves_the_rest_bit_identical_and_is_recorded():
    torch.manual_seed(2)
    model = KwargsNet().eval()
    data = kwargs_data(seed=2)
    loss = nn.CrossEntropyLoss(reduction="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inv = ssse.fit_inverse_fisher(model, loss, data, damping=DAMPING, params="head.*",
                                  progress=False)
    assert inv.params == ("head.weight", "head.bias")
    sub = {k: v[:5] for k, v in data.items()}
    ssse.ssse_update(model, loss, sub, inv_fisher=inv, epsilon=EPS, n_total=30,
                     params=[model.head], inplace=True)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in before.items():
        same = torch.equal(v, after[k])
        assert same == (not k.startswith("head.")), k
    # the reference on the head alone
    names = ["head.weight", "head.bias"]
    for k, v in before.items():
        model.state_dict()[k].copy_(v)

    def sample_loss(i):
        out = model(features=data["features"][i:i + 1], mask=data["mask"][i:i + 1])
        return loss(out["logits"], data["labels"][i:i + 1]).sum()

    G = reference_grads(model, names, sample_loss, 30)
    want = reference_update(flat(model, names), G, list(range(5)), inv.layout, 30)
    got = torch.cat([after[k].reshape(-1) for k in names])
    assert torch.allclose(got, want, rtol=0, atol=1e-12 * want.abs().max())
    # another selection is refused, naming params=, and nothing changes
    with pytest.raises(ValueError, match="params="):
        ssse.ssse_update(model, loss, sub, inv_fisher=inv, epsilon=EPS, n_total=30)
    with pytest.raises(ValueError, match="selects no parameter"):
        ssse.fit_inverse_fisher(model, loss, data, damping=DAMPING, params="nope*")
    with pytest.raises(TypeError, match="params"):
        ssse.select_parameters(model, 3)
    pred = ssse.select_parameters(model, lambda name, p: p.dim() == 1)
    assert pred == ["body.0.bias", "head.bias"]


def test_linear_layer_gradients_equal_vmap():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(),
                          nn.Linear(5, 2)).eval()
    x, y = torch.randn(9, 3, 4), torch.randn(9, 3, 2)  # three positions per sample
    loss = nn.MSELoss(reduction="none")
    fm = FlatModel(model)
    owners = linear_owners(model, fm.names)
    assert owners is not None
    params, frozen = fm.param_dict(), fm.frozen_dict()
    rows = layer_gradients(fm, owners, lambda p, a, b: per_sample_losses(loss, fm(p, a, frozen),
                                                                          b), params, x, y)
    want = torch.cat(list(ssse.per_sample_grads(model, loss, (x, y))))
    assert torch.allclose(rows, want, rtol=0, atol=1e-13 * want.abs().max())
    # a parameter outside a linear layer: not served by this engine
    assert linear_owners(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)),
                         ["1.weight"]) is None


def test_the_training_flag_is_read_from_the_layers():
    inner = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).eval()
    wrapper = nn.Module()
    wrapper.inner = inner
    wrapper.forward = lambda x: inner(x)
    wrapper.train()  # the wrapper says training; the dropout layer inside does not
    inner.eval()
    x, y = torch.randn(6, 3), torch.randn(6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        list(ssse.per_sample_grads(wrapper, nn.MSELoss(reduction="none"), (x, y)))
    inner[1].train()
    with pytest.warns(RuntimeWarning, match="training mode"):
        list(ssse.per_sample_grads(wrapper, nn.MSELoss(reduction="none"), (x, y)))


def test_split_batches_are_read_again_as_they_are():
    data = kwargs_data(n=10)
    batches = list(iter_batches(data, "data", batch_size=4))
    assert all(isinstance(b, Split) for b in batches)
    again = list(iter_batches(batches, "data"))
    assert [batch_len(b[1]) for b in again] == [4, 4, 2]
    assert torch.equal(again[0][0]["features"], data["features"][:4])


def test_autocast_rows_accumulate_in_float32():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).float().eval()
    x, y = torch.randn(40, 6, dtype=torch.float32), torch.randint(0, 3, (40,))
    loss = nn.CrossEntropyLoss(reduction="none")
    full = ssse.fit_inverse_fisher(model, loss, (x, y), damping=DAMPING, progress=False)
    low = ssse.fit_inverse_fisher(model, loss, (x, y), damping=DAMPING, progress=False,
                                  autocast=torch.bfloat16)
    assert low.dtype == torch.float32
    v = torch.randn(full.dim, dtype=torch.float32)
    a, b = full @ v, low @ v
    rel = float((a - b).norm() / a.norm())
    # bfloat16 keeps 8 bits of mantissa: the rows differ by about 2^-8 relative, and so does
    # the inverse they make; float32 rows would agree to about 1e-6
    assert 1e-5 < rel < 0.1
    with pytest.raises(ValueError, match="autocast"):
        ssse.fit_inverse_fisher(model, loss, (x, y), damping=DAMPING, autocast=torch.int8)
    with pytest.raises(ValueError, match="autocast"):
        ssse.fit_inverse_fisher(model.double(), loss, (x.double(), y), damping=DAMPING,
                                autocast=torch.bfloat16)


def test_causal_lm_loss_sums_the_shifted_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = ssse.losses.IGNORE_INDEX
    got = ssse.causal_lm_loss(logits, labels)
    for i in range(2):
        want = sum(float(-torch.log_softmax(logits[i, t], -1)[labels[i, t + 1]])
                   for t in range(4) if labels[i, t + 1] != -100)
        assert abs(float(got[i]) - want) < 1e-12
    with pytest.raises(ValueError, match="logits"):
        ssse.causal_lm_loss(logits[0], labels)


class PairNet(nn.Module):
    """KwargsNet called with one tensor: the two inputs side by side."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(features=x[:, :5], mask=x[:, 5:])["logits"]


def test_baselines_and_metrics_read_mapping_batches_as_pairs():
    torch.manual_seed(5)
    inner = KwargsNet().eval()
    pair_model = PairNet(inner).eval()
    data = kwargs_data(n=24, seed=5)
    x = torch.cat([data["features"], data["mask"]], dim=1)
    pair = (x, data["labels"])
    loss = nn.CrossEntropyLoss(reduction="none")
    sub = {k: v[:4] for k, v in data.items()}
    rest = {k: v[4:] for k, v in data.items()}
    pair_sub, pair_rest = (x[:4], pair[1][:4]), (x[4:], pair[1][4:])
    calls = [
        (lambda m, s, r: ssse.influence_update(m, loss, s, retained=r, weight_decay=0.1)),
        (lambda m, s, r: ssse.gradient_ascent(m, loss, s, lr=0.3)),
        (lambda m, s, r: ssse.fisher_forgetting(m, loss, s, retained=r, alpha=1e-3, seed=1)),
    ]
    for call in calls:
        a = call(inner, sub, rest)
        b = call(pair_model, pair_sub, pair_rest)
        for k, v in a.items():
            assert torch.allclose(v, b["inner." + k], rtol=1e-12, atol=1e-14), k
    ra = ssse.metrics.split_report(inner, {"S": sub}, loss_fn=loss)["S"]
    rb = ssse.metrics.split_report(pair_model, {"S": pair_sub}, loss_fn=loss)["S"]
    for key in ("n", "loss", "grad_norm", "accuracy"):
        assert ra[key] == pytest.approx(rb[key], rel=1e-12), key
    ma = ssse.metrics.membership_inference(inner, sub, rest, loss_fn=loss)
    mb = ssse.metrics.membership_inference(pair_model, pair_sub, pair_rest, loss_fn=loss)
    assert ma == pytest.approx(mb, rel=1e-12)
    assert torch.allclose(ssse.metrics.predict(inner, data), ssse.metrics.predict(pair_model,
                                                                                  pair))
