"""The forgetting test (U-LiRA's per-example likelihood-ratio attack, the NeurIPS 2023 unlearning
challenge's epsilon): exact on a case computed by hand, at chance when the two families of models
agree (within the sampling noise of the number of decisions), near-perfect when they are far
apart, and equal to a direct implementation written along another path."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ssse import metrics
from ssse.forgetting import challenge_epsilon, forget_score, logit_confidence


def test_a_case_computed_by_hand():
    # Three models per family, one sample: retrained 0, 1, 2 and erased 1, 2, 3. Pair r is left
    # out of both fits. Pair 0: retrained fit {1, 2} (mean 1.5, variance 0.5), erased fit
    # {2, 3} (2.5, 0.5): equal variances, so the score is ((x-1.5)^2 - (x-2.5)^2) / (2 * 0.5)
    # = 2x - 4: erased 1 -> -2, retrained 0 -> -4. Pair 1: fits {0, 2} and {1, 3} (means 1, 2,
    # variances 2): (2x - 3) / 4: erased 2 -> 1/4, retrained 1 -> -1/4. Pair 2: fits {0, 1},
    # {1, 2}: 2x - 2: erased 3 -> 4, retrained 2 -> 2.
    # Positives {-2, 1/4, 4}, negatives {-4, -1/4, 2}: above 4 nothing; at >= 4 TPR 1/3 with
    # FPR 0 (one zero rate: discarded); >= 2: TPR 1/3, FPR 1/3 (FNR 2/3): log((.99-1/3)/(2/3))
    # < 0; >= 1/4: TPR 2/3, FPR 1/3, FNR 1/3: log((1 - .01 - 1/3) / (1/3)) = log 1.97 both ways;
    # >= -1/4: FPR 2/3, FNR 1/3: < 0; below that FNR 0 (discarded). AUC: 6 of 9 pairs ordered.
    out = metrics.forgetting_quality([[0.0], [1.0], [2.0]], [[1.0], [2.0], [3.0]],
                                     fprs=(0.01, 0.1, 0.34))
    assert out["tpr_at_fpr"] == {0.01: 1 / 3, 0.1: 1 / 3, 0.34: 2 / 3}
    assert out["auc"] == pytest.approx(2 / 3, abs=1e-15)
    assert out["epsilon"] == pytest.approx(math.log(1.97), abs=1e-14)
    # the challenge's own test on the raw values: "erased if x > 1" has FPR 1/3 (retrained 2)
    # and FNR 1/3 (erased 1): log 1.97 again; every other threshold has a zero rate or less
    assert out["per_sample_epsilon"].tolist() == [pytest.approx(math.log(1.97), abs=1e-14)]
    assert out["forget_score"] == 0.5  # 0.5 <= eps < 1: bin 2, scores 2 / 2^2
    assert (out["models"], out["samples"], out["decisions"]) == (3, 1, 3)
    # delta = 0: log(2/3 / (1/3)) = log 2
    assert metrics.forgetting_quality([[0.0], [1.0], [2.0]], [[1.0], [2.0], [3.0]],
                                      delta=0.0)["epsilon"] == pytest.approx(math.log(2))


def test_the_challenge_conventions():
    assert challenge_epsilon([0.0, 0.3], [0.0, 0.3]) == math.inf  # a perfect attack
    assert challenge_epsilon([0.0, 1.0], [0.5, 0.0]) == 0.0  # one zero rate each: discarded
    # wrong almost always (both numerators negative): its negation is near-perfect
    assert challenge_epsilon([0.995], [0.995]) == math.inf
    assert challenge_epsilon([0.1], [0.2], delta=0.0) == pytest.approx(math.log(0.8 / 0.1))
    assert challenge_epsilon([0.2, 0.1], [0.3, 0.2], delta=0.05) == \
        pytest.approx(math.log(0.75 / 0.1))
    assert forget_score([0.0, 0.49, 0.5, 0.99, 6.0, math.inf]) == \
        pytest.approx((1 + 1 + 0.5 + 0.5 + 2 / 2 ** 13 + 2 / 2 ** 13) / 6)


def test_logit_confidence_is_the_log_odds_of_the_true_class():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 7, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (7,), generator=g)
    p = torch.softmax(z, dim=-1)[..., torch.arange(7), y]
    assert np.allclose(logit_confidence(z, y), torch.log(p / (1 - p)).numpy(), atol=1e-12)
    # where p_y rounds to 1: 40 - log(e^0 + e^0)
    assert logit_confidence([[40.0, 0.0, 0.0]], [0])[0] == pytest.approx(40 - math.log(2))
    # logits and labels in, the same as the statistic in
    a = metrics.forgetting_quality(z, z.flip(0), y)
    b = metrics.forgetting_quality(logit_confidence(z, y), logit_confidence(z.flip(0), y))
    assert a["epsilon"] == b["epsilon"] and a["tpr_at_fpr"] == b["tpr_at_fpr"]


def _families(seed, models, k, shift=0.0):
    """A statistic per (model, sample): per-sample means and spreads, the erased family moved
    by ``shift`` spreads."""
    rng = np.random.default_rng(seed)
    mean, spread = 2 * rng.normal(size=k), np.exp(0.3 * rng.normal(size=k))
    retrained = mean + spread * rng.normal(size=(models, k))
    erased = mean + spread * (shift + rng.normal(size=(models, k)))
    return retrained, erased


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("variance", ["global", "per_sample"])
def test_identical_distributions_leave_the_attack_at_chance(seed, variance):
    models, k, delta = 8, 500, 0.01
    n = models * k  # decisions per family
    out = metrics.forgetting_quality(*_families(seed, models, k), delta=delta, variance=variance)
    # TPR - FPR at a threshold is a difference of two rates of n decisions: binomial sd
    # sqrt(2 a (1 - a) / n) at rate a. 5 sd: the decisions share their fits, which widens the
    # spread by 1.2 to 1.3 (measured over 150 draws: largest TPR at 0.01 was 0.018 here)
    for a, tpr in out["tpr_at_fpr"].items():
        assert abs(tpr - a) <= 5 * math.sqrt(2 * a * (1 - a) / n), (a, tpr)
    auc_sd = math.sqrt((2 * n + 1) / (12 * n * n))
    assert abs(out["auc"] - 0.5) <= 5 * auc_sd
    # eps: at a threshold with FPR f the larger term is log((TPR - delta) / f) with
    # TPR <= f + z sqrt(2 f / n); its largest value over f is log(1 + z^2 / (2 n delta))
    assert out["epsilon"] <= math.log(1 + 5 ** 2 / (2 * n * delta))  # 0.27; measured <= 0.17


@pytest.mark.parametrize("shift", [10.0, -10.0])
def test_separated_distributions_are_told_apart(shift):
    out = metrics.forgetting_quality(*_families(0, 8, 200, shift=shift))
    assert out["tpr_at_fpr"][0.01] == 1.0 and out["auc"] == 1.0
    assert out["epsilon"] == math.inf  # FPR = FNR = 0 at some threshold
    assert np.all(out["per_sample_epsilon"] == math.inf)
    assert out["forget_score"] == 2 / 2 ** 13


def test_partly_separated_distributions_give_a_large_finite_epsilon():
    # a shift of 4 spreads: TPR at FPR 0.01 is about Phi(4 - 2.33) = 0.95, and that threshold
    # alone gives eps = log((0.95 - 0.01) / 0.01) = 4.5
    out = metrics.forgetting_quality(*_families(1, 8, 500, shift=4.0))
    assert out["tpr_at_fpr"][0.01] > 0.9
    assert 3.5 < out["epsilon"] < math.inf


def _direct(retrained, erased, delta, variance, fprs):
    """The same quantities, by loops over pairs, samples and thresholds."""
    models, k = retrained.shape
    pos, neg = [], []
    for r in range(models):
        rest = [i for i in range(models) if i != r]
        fit = {}
        for name, fam in (("e", erased), ("r", retrained)):
            mu = [sum(fam[i, j] for i in rest) / len(rest) for j in range(k)]
            var = [sum((fam[i, j] - mu[j]) ** 2 for i in rest) / (len(rest) - 1)
                   for j in range(k)]
            if variance == "global":
                var = [sum(var) / k] * k
            fit[name] = (mu, var)
        for j in range(k):
            def score(x):
                return norm.logpdf(x, fit["e"][0][j], math.sqrt(fit["e"][1][j])) - \
                    norm.logpdf(x, fit["r"][0][j], math.sqrt(fit["r"][1][j]))
            pos.append(score(erased[r, j]))
            neg.append(score(retrained[r, j]))
    points = [(sum(s >= t for s in neg) / len(neg), sum(s >= t for s in pos) / len(pos))
              for t in sorted(set(pos + neg)) + [math.inf]]
    tpr_at = {a: max(tp for fp, tp in points if fp <= a) for a in fprs}
    auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))

    def eps(rates):
        best = []
        for fp, fn in rates:
            if fp == 0 and fn == 0:
                return math.inf
            if fp == 0 or fn == 0:
                continue
            terms = [math.log((1 - delta - a) / b) for a, b in ((fp, fn), (fn, fp))
                     if 1 - delta - a > 0]
            best.append(max(terms) if terms else math.inf)
        return max([0.0] + best)

    per_sample = []
    for j in range(k):
        e, r = list(erased[:, j]), list(retrained[:, j])
        rates = []
        for t in set(e + r):
            fp, fn = sum(x > t for x in r) / models, sum(x <= t for x in e) / models
            rates += [(fp, fn), (1 - fp, 1 - fn)]
        per_sample.append(eps(rates))
    return tpr_at, auc, eps([(fp, 1 - tp) for fp, tp in points]), per_sample


@pytest.mark.parametrize("variance", ["global", "per_sample"])
@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_it_agrees_with_a_direct_implementation(variance, shift):
    retrained, erased = _families(3, 5, 12, shift=shift)
    # ties between and within families
    retrained, erased = np.round(retrained, 1), np.round(erased, 1)
    fprs = (0.01, 0.1, 0.3)
    out = metrics.forgetting_quality(retrained, erased, fprs=fprs, variance=variance,
                                     delta=0.02)
    tpr_at, auc, eps, per_sample = _direct(retrained, erased, 0.02, variance, fprs)
    assert out["tpr_at_fpr"] == pytest.approx(tpr_at, abs=1e-12)
    assert out["auc"] == pytest.approx(auc, abs=1e-12)
    assert out["epsilon"] == pytest.approx(eps, abs=1e-9)
    assert out["per_sample_epsilon"] == pytest.approx(per_sample, abs=1e-12)


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.forgetting_quality(np.zeros((3, 4)), np.zeros((4, 4))),
     "erased must have the shape of retrained"),
    (lambda: metrics.forgetting_quality(np.zeros((2, 4)), np.zeros((2, 4))),
     "retrained must hold at least 3 models"),
    (lambda: metrics.forgetting_quality(np.zeros((3, 4, 2)), np.zeros((3, 4, 2))),
     "retrained: labels are needed"),
    (lambda: metrics.forgetting_quality(np.zeros((3, 4, 2)), np.zeros((3, 4, 2)), [0, 1]),
     "labels must be 4 integers"),
    (lambda: metrics.forgetting_quality(np.zeros((3, 4, 2)), np.zeros((3, 4, 2)),
                                        [0, 1, 2, 1]), "labels must lie in [0, 2)"),
    (lambda: metrics.forgetting_quality(np.zeros((3, 4)), np.zeros((3, 4)), [0, 1, 1, 0]),
     "labels apply to logits only"),
    (lambda: metrics.forgetting_quality(np.zeros(4), np.zeros(4)),
     "retrained must have shape (models, k)"),
    (lambda: metrics.forgetting_quality(np.zeros((3, 4)), np.full((3, 4), np.nan)),
     "erased must hold finite numbers"),
    (lambda: metrics.forgetting_quality(np.zeros((3, 4)), np.zeros((3, 4)), fprs=(0.0,)),
     "fprs must lie in (0, 1)"),
    (lambda: metrics.forgetting_quality(np.zeros((3, 4)), np.zeros((3, 4)), fprs=()),
     "fprs must be a non-empty sequence"),
    (lambda: metrics.forgetting_quality(np.zeros((3, 4)), np.zeros((3, 4)), delta=1.0),
     "delta must be a number in [0, 1)"),
    (lambda: metrics.forgetting_quality(np.zeros((3, 4)), np.zeros((3, 4)), variance="x"),
     "variance must be one of"),
])
def test_bad_inputs_are_refused_naming_the_argument(call, message):
    with pytest.raises((ValueError, TypeError)) as exc:
        call()
    assert message in str(exc.value)


@pytest.fixture
def one_thread():
    """The experiment's models are tiny: more intra-op threads only contend (on a busy 2-core
    machine they multiply its wall time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_experiment_on_quick_settings(tmp_path, one_thread):
    import json

    from ssse.experiments import forgetting

    forgetting.run(quick=True, seed=0, out=tmp_path, progress=False)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["source"]["version"] and "commit" in res["source"]
    assert (tmp_path / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out, grids = res["results"], res["config"]["grids"]
    # each tuned value is the proxy's first argmin of delta among the values within 5 points
    # of the original's accuracy on the retained samples
    floor = out["proxy"]["accuracy_floor"]
    for name, m in out["proxy"]["methods"].items():
        allowed = [i for i, a in enumerate(m["accuracy_D-S"]) if a >= floor]
        best = min(allowed, key=lambda i: (m["curve"][i], i))
        assert out["chosen"][name] == m["value"] == grids[name][best]
    sections = (tmp_path / "results.md").read_text().split("\n## ")[1:]
    assert len(sections) == len(out["settings"])
    for section, (setting, s) in zip(sections, out["settings"].items()):
        assert section.startswith(f"{setting} (k={s['k']})")
        assert list(s["rows"]) == [n for n in forgetting.ROWS if n not in forgetting.EKFAC_ROWS]
        lines = [line for line in section.splitlines() if line.startswith("| ")][1:]
        for line, (name, q) in zip(lines, s["rows"].items()):
            assert q["decisions"] == res["config"]["models"] * s["k"]
            # the table prints the json's numbers, in the columns of its header
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[0].startswith(name)
            t = q["tpr_at_fpr"]
            for cell, value in zip(cells[1:6], (t["0.01"], t["0.05"], t["0.1"], q["auc"],
                                                q["epsilon"])):
                assert float(cell) == pytest.approx(value, abs=5e-5, rel=1e-3)
        # the attack tells the original model from the retrained ones better than it tells
        # two retrained families apart (measured AUC 0.94 and 0.67 against 0.56 and 0.56)
        assert s["rows"]["original (no erasure)"]["auc"] > s["rows"]["retrained (control)"]["auc"]


def test_the_experiment_on_the_cnn_quick_settings(tmp_path, one_thread):
    import json

    from ssse.experiments import forgetting

    assert forgetting.default_out("fashion-mnist").as_posix() == "results/forgetting_fashion-mnist"
    assert forgetting.default_out(None).as_posix() == "results/forgetting"
    forgetting.run(quick=True, seed=0, data="fashion-mnist", out=tmp_path, progress=False)
    res = json.loads((tmp_path / "results.json").read_text())
    c, out = res["config"], res["results"]
    assert (tmp_path / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the results record the CNN and the non-convex experiment's curvatures
    assert (c["model"], c["spec"]["arch"], c["recipe"]["optimizer"]) == \
        ("resnet", "small_resnet", "sgd")
    assert c["inverse"] == {"layout": "per_parameter", "block_size": 256}
    assert c["newton_block"] == c["d"]  # one Gauss-Newton block: the largest that fits
    assert forgetting.INFLUENCE in c["omitted"]
    assert f"Not run: {forgetting.INFLUENCE}" in (tmp_path / "results.md").read_text()
    for s in out["settings"].values():
        assert list(s["rows"]) == [n for n in forgetting.ROWS if n != forgetting.INFLUENCE
                                   and n not in forgetting.EKFAC_ROWS]
        for q in s["rows"].values():
            assert q["decisions"] == c["models"] * s["k"]


def test_the_cnn_quick_settings_with_the_ekfac_rows(tmp_path, one_thread):
    """methods=["SSSE EK-FAC"] adds SSSE with the EK-FAC inverse (its ε chosen on the proxy as
    SSSE's) and the Newton step on the Gauss-Newton EK-FAC, next to every other row."""
    import json

    from ssse.experiments import forgetting

    forgetting.run(quick=True, seed=0, data="fashion-mnist", out=tmp_path, progress=False,
                   methods=["SSSE EK-FAC"], repeats=3)
    res = json.loads((tmp_path / "results.json").read_text())
    out = res["results"]
    assert forgetting.SSSE_EKFAC in out["chosen"] and forgetting.SSSE_EKFAC in \
        res["config"]["grids"]
    for s in out["settings"].values():
        assert list(s["rows"]) == [n for n in forgetting.ROWS if n != forgetting.INFLUENCE]
    assert "SSSE EK-FAC (ε=" in (tmp_path / "results.md").read_text()
    # a draw's EK-FAC rows are erasures with their own inverses: other models than the
    # exact blocks' at the same ε (the quick settings' attack saturates, so compare logits)
    task, _ = forgetting.make("fashion-mnist", quick=True, seed=0, device="cpu", dtype=None,
                              data_dir=None)
    settings = forgetting._settings(task, 0)
    chosen = {"SSSE": 0.1, forgetting.SSSE_EKFAC: 0.1, "gradient ascent": 0.01,
              "Fisher forgetting": 1e-6}
    draw = forgetting._one_draw(task, settings, chosen, 0, seed=0, damping=1e-3, ekfac=True)
    for s in draw["settings"].values():
        logits = s["logits"]
        for exact, kron in (("SSSE", forgetting.SSSE_EKFAC),
                            (forgetting.NEWTON, forgetting.NEWTON_EKFAC)):
            assert np.abs(logits[kron] - logits[exact]).max() > 1e-3
            assert np.abs(logits[kron] - logits["original (no erasure)"]).max() > 1e-3


@pytest.mark.parametrize("data, methods, text", [
    ("fashion-mnist", ["SSSE", "SSSE EK-FAC"], "methods: 'SSSE' is not a row to add"),
    ("digits", ["SSSE EK-FAC"], "methods: the EK-FAC rows need the CNN"),
])
def test_methods_are_checked_with_named_messages(data, methods, text):
    from ssse.experiments import forgetting

    with pytest.raises(ValueError, match=text):
        forgetting.compute(quick=True, data=data, methods=methods, progress=False)


def test_each_cnn_draw_trains_its_own_models(one_thread):
    """A draw's models are what its training data and seeds make them: the CNN's seeds differ
    per model and per draw (logistic regression keeps one seed: its optimum is unique), the
    retrained and control models are trained without S (rebuilt here along another path), and
    every erasure moves the original's logits on S."""
    from ssse.experiments import forgetting

    task, _ = forgetting.make("fashion-mnist", quick=True, seed=0, device="cpu", dtype=None,
                              data_dir=None)
    digits, _ = forgetting.make("digits", quick=True, seed=0, device="cpu", dtype=None,
                                data_dir=None)
    assert set(forgetting.train_seeds(digits, 7, 0).values()) == \
        set(forgetting.train_seeds(digits, 7, 5).values()) == {7}
    seeds = [forgetting.train_seeds(task, 0, r) for r in range(3)]
    assert len({v for s in seeds for v in s.values()}) == 9
    settings = forgetting._settings(task, 0)
    chosen = {"SSSE": 0.1, "gradient ascent": 0.01, "Fisher forgetting": 1e-6}
    draw = forgetting._one_draw(task, settings, chosen, 1, seed=0, damping=1e-3)
    must = torch.unique(torch.cat(list(settings.values())))
    for setting, removed in settings.items():
        logits = draw["settings"][setting]["logits"]
        x, y = task.ds.x_train[removed], task.ds.y_train[removed]
        for name, idx_seed, role in ((("retrained", 1, "retrained"),
                                      (forgetting.CONTROL, 5_001, "control"))):
            sub, idx = forgetting._draw(task, must, idx_seed)
            keep = torch.ones(sub.n, dtype=torch.bool)
            keep[torch.searchsorted(idx, removed)] = False
            model = sub.train(sub.data(torch.nonzero(keep).flatten()), seed=seeds[1][role])
            with torch.no_grad():
                again = model(x).double().numpy()
            np.testing.assert_allclose(logits[name], again, rtol=1e-5, atol=1e-5)
        for name in ("SSSE", forgetting.NEWTON, "gradient ascent", "Fisher forgetting",
                     "retrained", forgetting.CONTROL):
            assert np.abs(logits[name] - logits[forgetting.ORIGINAL]).max() > 1e-6, name
        assert set(logits) == set(forgetting.ROWS) - {forgetting.INFLUENCE} - \
            set(forgetting.EKFAC_ROWS) | {"retrained"}
        assert y.numel() == logits[forgetting.ORIGINAL].shape[0]
