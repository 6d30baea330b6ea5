"""The paper's metrics (§4) on small hand-computed cases."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import ssse
from ssse import metrics

from .testing import SAME, SOLVE

F64 = torch.float64
LABELS = np.array([[0, 0], [0, 0], [1, 0], [1, 0]])  # attribute 1 is absent
PERFECT = np.array([[0.1, 0.5], [0.2, 0.1], [0.3, 0.9], [0.4, 0.3]])  # AUC 1
INVERTED = np.array([[0.4, 0.2], [0.3, 0.8], [0.2, 0.3], [0.1, 0.1]])  # AUC 0
THREE_QUARTERS = np.array([[0.1, 0.0], [0.3, 0.0], [0.2, 0.0], [0.4, 0.0]])  # AUC 3/4


def test_attribute_aucs_and_absent_attribute():
    np.testing.assert_allclose(metrics.attribute_aucs(THREE_QUARTERS, LABELS), [0.75, 0.0])
    np.testing.assert_allclose(metrics.attribute_aucs(PERFECT, LABELS), [1.0, 0.0])


def test_performance_similarity_hand_computed():
    assert metrics.performance_similarity(PERFECT, INVERTED, LABELS) == pytest.approx(1.0)
    assert metrics.performance_similarity(PERFECT, THREE_QUARTERS, LABELS) == pytest.approx(0.25)
    # tensors and a single attribute as (n,)
    assert metrics.performance_similarity(torch.tensor(PERFECT[:, 0]),
                                          torch.tensor(INVERTED[:, 0]),
                                          torch.tensor(LABELS[:, 0])) == pytest.approx(1.0)


def test_similarity_ratio_cases():
    # behaves as the retrained model: gamma = 1; as the original: gamma = 0
    assert metrics.similarity_ratio(PERFECT, INVERTED, PERFECT, LABELS) == 1.0
    assert metrics.similarity_ratio(PERFECT, PERFECT, INVERTED, LABELS) == 0.0
    # D(hat, orig) = 0.25, D(hat, retrained) = 0.75: gamma = 0.25
    assert metrics.similarity_ratio(THREE_QUARTERS, PERFECT, INVERTED, LABELS) == \
        pytest.approx(0.25)
    # edge cases gamma = 0.5: equidistant, and indistinguishable from both (0 / 0)
    half = np.array([[0.1, 0], [0.4, 0], [0.2, 0], [0.3, 0]])  # AUC 0.5
    assert metrics.similarity_ratio(half, PERFECT, INVERTED, LABELS) == 0.5
    assert metrics.similarity_ratio(PERFECT, PERFECT, PERFECT, LABELS) == 0.5


def test_confusion_distance_hand_computed():
    labels = np.array([0, 1, 2, 2])
    a = np.array([0, 1, 2, 2])
    b = np.array([0, 2, 2, 1])
    # m_a = diag(1, 1, 2); m_b has (0,0)=1, (1,2)=1, (2,2)=1, (2,1)=1
    assert metrics.confusion_distance(a, b, labels, 3) == 4.0
    scores_b = torch.nn.functional.one_hot(torch.tensor(b), 3).double()  # argmax of scores
    assert metrics.confusion_distance(torch.tensor(a), scores_b, torch.tensor(labels), 3) == 4.0
    assert metrics.confusion_distance(a, b, labels, 3, normalize="all") == pytest.approx(1.0)


def test_normalized_confusion_distance_cases():
    labels = np.array([0, 1, 2, 2])
    orig = np.array([0, 1, 2, 2])
    retr = np.array([1, 1, 0, 2])
    assert metrics.normalized_confusion_distance(retr, orig, retr, labels, 3) == 0.0
    assert metrics.normalized_confusion_distance(orig, orig, retr, labels, 3) == 1.0
    # hat differs from each in one sample (distance 2 each): delta = 0.5
    hat = np.array([1, 1, 2, 2])
    assert metrics.normalized_confusion_distance(hat, orig, retr, labels, 3) == 0.5
    assert metrics.normalized_confusion_distance(orig, orig, orig, labels, 3) == 0.5
    # m_hat has (0,2)=1, (1,1)=1, (2,2)=2: distance 2 to the original, 4 to the retrained
    hat = np.array([2, 1, 2, 2])
    assert metrics.normalized_confusion_distance(hat, orig, retr, labels, 3) == \
        pytest.approx(2 / 3)


def test_metric_inputs_are_validated():
    with pytest.raises(ValueError, match="same shape"):
        metrics.performance_similarity(PERFECT, INVERTED, LABELS[:3])
    with pytest.raises(ValueError, match="pred_a"):
        metrics.confusion_distance(np.zeros(3), np.zeros(4), np.zeros(4), 2)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.confusion_distance(np.zeros(4), np.zeros(4), np.zeros(4), 0)


def test_normalized_parameter_distance():
    orig, retr = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])
    assert metrics.normalized_parameter_distance(torch.tensor([3.0, 0.0]), orig, retr) == \
        pytest.approx(0.8)
    lin = [nn.Linear(2, 1) for _ in range(3)]
    value = metrics.normalized_parameter_distance(lin[0], lin[1].state_dict(), lin[2])
    a, o, r = (torch.cat([m.weight.detach().reshape(-1), m.bias.detach()]) for m in lin)
    assert value == pytest.approx(float((a - r).norm() / (o - r).norm()))
    with pytest.raises(ValueError, match="sizes"):
        metrics.normalized_parameter_distance(orig, retr, torch.zeros(3))


def test_split_report_against_manual_values():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    rep = metrics.split_report(model, {"D\\S": (X, y), "T_a": None}, weight_decay=0.1)
    model.zero_grad()
    reg = 0.05 * sum((p * p).sum() for p in model.parameters())
    loss = nn.functional.cross_entropy(model(X), y) + reg
    loss.backward()
    gnorm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    acc = (model(X).argmax(1) == y).double().mean()
    got = rep["D\\S"]
    assert got["n"] == 10 and got["loss"] == pytest.approx(loss.item(), rel=SAME[F64])
    assert got["grad_norm"] == pytest.approx(float(gnorm), rel=SAME[F64])
    assert got["accuracy"] == pytest.approx(float(acc))
    assert rep["T_a"]["n"] == 0 and math.isnan(rep["T_a"]["accuracy"])

    # multi-attribute outputs: binary cross-entropy, accuracy per entry
    Y = (torch.randn(10, 4) > 0).double()
    rep = metrics.split_report(model, {"S": [(X[:4], Y[:4]), (X[4:], Y[4:])]})["S"]
    out = model(X).detach()
    assert rep["accuracy"] == pytest.approx(float(((out > 0).double() == Y).double().mean()))
    bce = nn.functional.binary_cross_entropy_with_logits(out, Y, reduction="sum") / 10
    assert rep["loss"] == pytest.approx(float(bce), rel=SAME[F64])


def test_membership_inference_separates_memorised_samples():
    model = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0], [1.0]]))
    # members have label 1 and large x (low loss); non-members have label 0 and large x
    members = (torch.tensor([[3.0], [4.0], [5.0]], dtype=torch.float64), torch.ones(3).long())
    others = (torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.zeros(2).long())
    res = metrics.membership_inference(model, members, others)
    assert res["auc"] == 1.0 and res["member_loss"] < res["nonmember_loss"]
    res = metrics.membership_inference(model, members, members)
    assert res["auc"] == 0.5


def test_select_epsilon():
    curve_values = {0.1: 0.2, 1.0: 0.8, 10.0: 0.8, 100.0: float("nan")}
    best, curve = metrics.select_epsilon(curve_values, curve_values.get)
    assert best == 1.0 and curve[1] == (1.0, 0.8) and len(curve) == 4
    best, _ = metrics.select_epsilon([0.1, 1.0, 10.0],
                                     lambda e: {"normalized_confusion_distance": abs(e - 10)},
                                     criterion="confusion")
    assert best == 10.0
    with pytest.raises(ValueError, match="criterion"):
        metrics.select_epsilon([1.0], lambda e: 0.0, criterion="auc")
    with pytest.raises(ValueError, match="candidates"):
        metrics.select_epsilon([], lambda e: 0.0)
    with pytest.raises(ValueError, match="NaN"):
        metrics.select_epsilon([1.0], lambda e: float("nan"))


def exact_scale_problem(r, weight_decay=0.5, n=30, p=5):
    """Least squares at theta = 0 with labels +-r: every residual has size r, so the gradients
    g_i = -y_i x_i give sum g g^T = r^2 X^T X, while the Hessian of the loss with weight decay w
    is X^T X / n + w I. With damping lambda = w r^2 the stored Fisher is exactly r^2 H:
    H F^{-1} = I / r^2, and eq. 8 reproduces the Newton step at epsilon = r^2."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = r * (2.0 * (torch.rand(n, generator=g) < 0.5).double() - 1.0)
    model = nn.Linear(p, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    return model, (X, y), weight_decay * r * r


def squared_error(out, y):
    return 0.5 * (out.squeeze(-1) - y) ** 2


@pytest.mark.parametrize("r", [0.5, 3.0])
@pytest.mark.parametrize("probe", ["gradients", "gaussian"])
def test_estimate_epsilon_is_exact_when_the_hessian_is_a_multiple_of_the_fisher(r, probe):
    model, (X, y), damping = exact_scale_problem(r)
    inv = ssse.fit_inverse_fisher(model, squared_error, (X, y), damping=damping, block_size=5,
                                  weight_decay=0.5, progress=False)
    assert inv.layout.num_blocks == 1  # a block-diagonal F^{-1} is not (r^2 H)^{-1}
    eps, residual = metrics.estimate_epsilon(model, squared_error, (X, y), inv_fisher=inv,
                                             weight_decay=0.5, probes=4, probe=probe,
                                             details=True)
    assert eps == pytest.approx(r * r, rel=SOLVE[torch.float64])
    assert residual < SOLVE[torch.float64]
    # the first probes of an iterable, and the same answer whatever they are
    batches = [(X[i:i + 7], y[i:i + 7]) for i in range(0, 30, 7)]
    eps = metrics.estimate_epsilon(model, squared_error, batches, inv_fisher=inv,
                                   weight_decay=0.5, probes=9, probe=probe, seed=3)
    assert eps == pytest.approx(r * r, rel=SOLVE[torch.float64])


def test_estimate_epsilon_refuses_a_generator_and_a_bad_seed():
    model, (X, y), damping = exact_scale_problem(1.0)
    inv = ssse.fit_inverse_fisher(model, squared_error, (X, y), damping=damping, progress=False)
    batches = [(X[i:i + 10], y[i:i + 10]) for i in range(0, 30, 10)]
    with pytest.raises(TypeError, match="data is read more than once"):
        metrics.estimate_epsilon(model, squared_error, iter(batches), inv_fisher=inv, probes=4)
    with pytest.raises(TypeError, match="seed"):
        metrics.estimate_epsilon(model, squared_error, batches, inv_fisher=inv, seed=None)


def test_confusion_distance_refuses_classes_out_of_range():
    labels = np.array([0, 1, 2])
    # class 5 does not exist for num_classes=3: it must not be dropped silently (distance 0)
    with pytest.raises(ValueError, match="pred_a must hold class indices in 0..2"):
        metrics.confusion_distance(np.array([0, 1, 5]), np.array([0, 1, 2]), labels, 3)
    with pytest.raises(ValueError, match="labels must hold class indices"):
        metrics.confusion_distance(labels, labels, np.array([0, 1, 3]), 3)
    with pytest.raises(ValueError, match="pred_b has scores for 4 classes"):
        metrics.confusion_distance(labels, np.eye(4)[:3], labels, 3)
    empty = np.array([], dtype=np.int64)
    assert metrics.confusion_distance(empty, empty, empty, 3) == 0.0
    assert metrics.normalized_confusion_distance(empty, empty, empty, empty, 3) == 0.5


def test_select_epsilon_validates_candidates():
    with pytest.raises(ValueError, match="candidates must be finite numbers > 0"):
        metrics.select_epsilon([1.0, -2.0], lambda e: 0.5)
    with pytest.raises(TypeError, match="candidates must be an iterable of numbers"):
        metrics.select_epsilon(["a"], lambda e: 0.5)


def test_similarity_ratio_against_sklearn_on_random_scores():
    # gamma computed here from sklearn's ROC-AUC and Def. 4.2 directly, on random scores where
    # the erased model is a mix of the original and the retrained one: gamma grows with the
    # share of the retrained model (a swapped orientation would make it fall)
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(7)
    n, a = 200, 5
    labels = rng.integers(0, 2, size=(n, a))
    orig = rng.normal(size=(n, a)) + 1.5 * labels
    retr = rng.normal(size=(n, a)) - 0.5 * labels

    def d(s1, s2):
        return sum(abs(roc_auc_score(labels[:, j], s1[:, j]) - roc_auc_score(labels[:, j], s2[:, j]))
                   for j in range(a))

    gammas = []
    for share in (0.1, 0.5, 0.9):
        hat = (1 - share) * orig + share * retr
        expected = d(hat, orig) / (d(hat, orig) + d(hat, retr))
        got = metrics.similarity_ratio(hat, orig, retr, labels)
        assert got == pytest.approx(expected, abs=1e-12)
        gammas.append(got)
    assert gammas[0] < 0.5 < gammas[2] and gammas == sorted(gammas)
