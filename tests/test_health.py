"""Numerical health (issue 13): the condition warning of the stable build, the accuracy check of
the recurrences, overflow reported as overflow, and the probe that follows the inverse through
updates and downdates."""

import warnings

import pytest
import torch

import ssse_ext
from ssse_ext import ConditionWarning, HealthWarning, NotPositiveDefiniteError, reference
from ssse_ext.health import FisherProbe, tolerance

from .testing import rel_err

F64 = torch.float64


def woodbury_inverse(g: torch.Tensor, damping: float) -> torch.Tensor:
    """The low-rank (dual) form (1/λ)(I − Gᵀ(λN I + GGᵀ)⁻¹G) in float64: exact to rounding
    where the dense Fisher is rank-deficient (measured 7.7e-16 against a 60-digit mpmath
    inverse on the case below, benchmarks/bench_accuracy.py)."""
    g = g.to(F64)
    n, s = g.shape
    k = damping * n * torch.eye(n, dtype=F64) + g @ g.T
    return (torch.eye(s, dtype=F64) - g.T @ torch.cholesky_solve(g, torch.linalg.cholesky(k))) \
        / damping


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_ill_conditioned_block_is_named_with_its_expected_error(dtype):
    # the case: n = 30 rows < B = 60, scale 1e4, damping 1e-6 (condition number ~1e14)
    torch.manual_seed(0)
    g = (torch.randn(30, 60) * 1e4).to(dtype)
    with pytest.warns(ConditionWarning, match=r"block 0 \(parameters 0\.\.60\) is ill-cond"
                                              r"itioned.*condition number >= .*relative error "
                                              r"of about .*low-rank \(dual\) form") as rec:
        inv = ssse_ext.build_inverse_fisher(g, damping=1e-6, block_size=60,
                                            representation="dense")
    message = str(rec[0].message)
    expected = float(message.split("relative error of about ")[1].split()[0])
    actual = rel_err(inv.blocks[0], woodbury_inverse(g, 1e-6))
    # the warning is true: the error is far above the dtype's tolerance, and the estimate (a
    # lower bound from the Cholesky pivots) is within a factor 10 of what happens
    assert actual > 10 * tolerance(dtype)
    assert expected <= actual <= 10 * expected, (expected, actual)
    cond = torch.linalg.cond(1e-6 * torch.eye(60, dtype=F64) + g.double().T @ g.double() / 30)
    assert float(message.split("condition number >= ")[1].split(",")[0]) <= float(cond)


def test_a_well_conditioned_build_is_silent_and_accurate():
    torch.manual_seed(1)
    g = torch.randn(600, 200) * 1e4  # condition number ~13 whatever the scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv = ssse_ext.build_inverse_fisher(g, damping=1e-6, block_size=200)
    assert inv.health().ok
    ref = reference.block_closed_form(g.double(), inv.layout, 1e-6)[0]
    assert rel_err(inv.blocks[0], ref) < 1e-6  # one float32 rounding


def test_the_recurrences_say_they_are_unstable_and_name_the_default_build():
    torch.manual_seed(1)
    g = torch.randn(600, 200) * 1e4
    ref = reference.block_closed_form(g.double(), ssse_ext.BlockLayout.fixed(200, 200), 1e-6)[0]
    with pytest.raises(NotPositiveDefiniteError, match=r"unstable at this damping \(1e-06\) "
                                                       r"and gradient scale.*method=\"auto\""):
        ssse_ext.build_inverse_fisher(g, damping=1e-6, method="sherman_morrison")
    with pytest.warns(HealthWarning, match=r"method='woodbury'\): the accuracy check failed.*"
                                           r"method=\"auto\""):
        inv = ssse_ext.build_inverse_fisher(g, damping=1e-6, method="woodbury")
    assert rel_err(inv.blocks[0], ref) > 1e-4  # the warning is true
    with warnings.catch_warnings():  # and silent where the recurrence is accurate
        warnings.simplefilter("error")
        ssse_ext.build_inverse_fisher(torch.randn(100, 20, dtype=F64), damping=0.1,
                                      method="woodbury")


def test_overflow_is_reported_as_overflow_and_changes_nothing():
    g = torch.randn(20, 6, dtype=F64) * 1e160
    for method in ("auto", "sherman_morrison", "woodbury"):
        with pytest.raises(FloatingPointError, match="overflow"):
            ssse_ext.build_inverse_fisher(g, damping=1e-3, method=method)
    inv = ssse_ext.build_inverse_fisher(torch.randn(20, 6, dtype=F64), damping=1e-3)
    before = inv.packed.clone()
    for change in (inv.update, inv.downdate):
        with pytest.raises(FloatingPointError, match="overflow"):
            change(g[:2])
    assert torch.equal(inv.packed, before)


def test_the_probe_follows_downdates_and_catches_a_corrupted_block():
    torch.manual_seed(2)
    g = torch.randn(80, 23, dtype=F64)
    inv = ssse_ext.build_inverse_fisher(g, damping=0.1, block_size=8)  # blocks 8, 8, 7
    inv.downdate(g[:10])
    # the sketch is F X of the remaining rows exactly, the stored inverse matches it
    probe = inv.probe
    dense = torch.block_diag(*[0.1 * torch.eye(s, dtype=F64) + g[10:, inv.layout.slice(b)].T
                               @ g[10:, inv.layout.slice(b)] / 80
                               for b, s in enumerate(inv.layout.sizes)])
    assert rel_err(probe.fisher_x(0.1, 80), dense @ probe.x) < 1e-13
    health = inv.health()
    assert health.ok and health.residual < 1e-12
    # the probe travels with the inverse
    tensors, meta = inv.to_state()
    back = ssse_ext.BlockInverseFisher.from_state(tensors, meta)
    assert torch.equal(back.probe.sketch, probe.sketch) and back.health().residual == \
        health.residual
    inv.blocks[1][2, 2] *= 1.001
    with pytest.warns(HealthWarning, match="off by .* in block 1 .* rebuild it"):
        bad = inv.health()
    assert not bad.ok and bad.block == 1


def test_a_fresh_float32_inverse_is_healthy():
    # the probe charges a float32 inverse for its own rounding only (FX is passed in two
    # float32 parts): ~kappa * 6e-8, far below the tolerance 3.5e-4
    torch.manual_seed(3)
    inv = ssse_ext.build_inverse_fisher(torch.randn(2000, 512) * 3, damping=1e-3,
                                        block_size=256)
    health = inv.health()
    assert health.residual < 1e-6 and health.tolerance == pytest.approx(3.45e-4, rel=1e-2)


def test_probe_arguments_are_checked():
    layout = ssse_ext.BlockLayout.fixed(10, 4)
    with pytest.raises(TypeError, match="layout must be a BlockLayout"):
        FisherProbe("x")
    with pytest.raises(ValueError, match="columns must be a positive integer"):
        FisherProbe(layout, columns=0)
    with pytest.raises(ValueError, match="sketch must be a float64 tensor of shape"):
        FisherProbe(layout, sketch=torch.zeros(10, 2))
    with pytest.raises(ValueError, match="probe_vectors must be an integer >= 0"):
        ssse_ext.build_inverse_fisher(torch.randn(5, 10), damping=1.0, probe_vectors=-1)
    assert ssse_ext.build_inverse_fisher(torch.randn(5, 10), damping=1.0,
                                         probe_vectors=0).health() is None


@pytest.mark.parametrize("representation", ["dual", "auto"])
def test_the_probe_covers_dual_blocks(representation):
    torch.manual_seed(4)
    g = torch.randn(20, 70, dtype=F64)
    layout = ssse_ext.BlockLayout.from_boundaries([10, 70])  # 10 (dense for auto), 60 (dual)
    inv = ssse_ext.build_inverse_fisher(g, damping=0.1, layout=layout,
                                        representation=representation)
    assert "dual" in inv.representation
    inv.downdate(g[:5])
    dense = torch.block_diag(*[0.1 * torch.eye(s, dtype=F64) + g[5:, layout.slice(b)].T
                               @ g[5:, layout.slice(b)] / 20
                               for b, s in enumerate(layout.sizes)])
    assert rel_err(inv.probe.fisher_x(0.1, 20), dense @ inv.probe.x) < 1e-13
    assert inv.health().residual < 1e-12
    tensors, meta = inv.to_state()
    assert ssse_ext.BlockInverseFisher.from_state(tensors, meta).health().residual < 1e-12
