r"""Tuning-free erasure: the leave-k-out Newton step with a stored Gauss–Newton inverse, and its
refinement for large removals from the removed samples alone (docs/maths.md).

The retained objective after removing :math:`S` (:math:`k` samples) from :math:`D` is

.. math:: L_{D\setminus S}(\theta) = \frac{1}{n-k}\sum_{i\in D\setminus S} \mathrm{loss}_i(\theta)
          + \frac{w}{2}\lVert\theta\rVert^2 ,

with curvature :math:`H_R = wI + \frac{1}{n-k}\sum_{D\setminus S} G_i` (:math:`G_i` the
Gauss–Newton matrix of sample :math:`i`). At the trained :math:`\theta^*` (a stationary point of
:math:`L_D`) its gradient is :math:`-\frac{1}{n-k}\sum_S \nabla\ell_i(\theta^*)`, with
:math:`\ell_i = \mathrm{loss}_i + \frac w2\lVert\theta\rVert^2`, so one Newton step is

.. math:: \hat\theta = \theta^* + \frac{1}{n-k} H_R^{-1} \sum_{i\in S}\nabla\ell_i(\theta^*)
          = \theta^* + \frac1n \big(F' - \delta I\big)^{-1} \sum_{i\in S}\nabla\ell_i(\theta^*),

where :math:`F' = \lambda I + \frac1n\sum_{D\setminus S} G_i` is the stored inverse's matrix
(``curvature="ggn"``, normaliser :math:`N = n`; any registered curvature with
``supports_newton``) downdated by the Gauss–Newton rows of :math:`S`
at :math:`\theta^*`, and :math:`\delta = \lambda - \frac{n-k}{n} w`: the :math:`n` versus
:math:`n-k` normaliser and the damping meet in that one shift, applied without approximation:
per block, with :math:`F_b^{-1} = LL^\top` from the stored inverse,
:math:`(F'_b - \delta I)^{-1} = L A^{-1} L^\top` with :math:`A = I - (R_bL)^\top(R_bL)/N - \delta
L^\top L` (:meth:`ssse_ext.BlockInverseFisher.solve_changed`). It is positive definite whenever
:math:`\delta < \lambda`, i.e. whenever the model was trained with weight decay; with
:math:`\lambda = w` (the damping that makes the stored matrix the training objective's
curvature) :math:`\delta = wk/n`. For an L2 logistic regression whose blocks are its output rows
the Gauss–Newton matrix is the Hessian, and the step equals the influence update with the
retained Hessian (paper eq. 4) restricted to those blocks.

Large removals: the data of :math:`D` is gone but its quadratic model around :math:`\theta^*`
is not, :math:`Q_D(\theta) = \frac12 (\theta-\theta^*)^\top H_D (\theta-\theta^*)` with
:math:`H_D = F + (w - \lambda)I` (:math:`F` the stored matrix). Refinement minimises
:math:`M(\theta) = Q_D(\theta) - \frac1n\sum_{i\in S}\ell_i(\theta)` (proportional to the
retained objective, up to :math:`Q_D`'s second-order model of :math:`L_D`) by Newton steps that
need :math:`S` only: its gradients and Gauss–Newton rows at the current :math:`\theta_t`, a
Woodbury downdate of the stored inverse on the fly (not modified), and a backtracking line search
on :math:`M`. The first step from :math:`\theta^*` is the Newton step above. :math:`M` need not
be convex (the removed samples' curvature at :math:`\theta_t` can exceed their share of
:math:`H_D`); where the downdate at :math:`\theta_t` is not positive definite, the step keeps
the curvature of :math:`\theta^*`.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

import ssse_ext
from ssse_ext.validation import (check_nonneg_float, check_nonneg_int, check_positive_float,
                                 check_positive_int)

from .batches import batch_len
from .model import (FlatModel, check_request, finish_update, iter_batches, per_sample_losses,
                     warn_if_training)
from .curvature import check_likelihood, get_curvature, options_with
from .budget import request_budget
from .comm import one_process
from .gradients import gradient_sum
from .rows import likelihood_on, row_stream, stacked_rows

__all__ = ["check_newton_inverse", "newton_erase", "newton_refined", "newton_shift", "rows_of"]

# Halvings of the step in the refinement's line search.
_MAX_HALVINGS = 12
# Armijo constant of the line search.
_ARMIJO = 1e-4



def rows_of(fm: FlatModel, loss_fn, data, *, curvature, dtype, likelihood=None,
            weight_decay: float = 0.0, params: dict | None = None,
            max_memory: int | None = None, autocast=None) -> torch.Tensor:
    """All rows of ``curvature`` (a name or a registered :class:`~ssse.curvature.Curvature`)
    for the samples of ``data`` (a list of batches) at ``params``, as one ``(rows, d)`` tensor,
    computed in chunks of at most ``max_memory`` bytes."""
    k = sum(batch_len(y) for _, y in data)
    if k == 0:
        raise ValueError("removed is empty: nothing to erase")
    info: dict = {}
    stream = row_stream(fm, loss_fn, data, "removed", weight_decay=weight_decay,
                          chunk_size=None, minibatch=1, dtype=dtype, params=params,
                          curvature=curvature, likelihood=likelihood, max_memory=max_memory,
                          info=info, autocast=autocast)
    first = next(stream)
    return stacked_rows(itertools.chain([first], stream), k * info["rows_per_sample"])


def check_newton_inverse(inv: ssse_ext.BlockInverseFisher, name: str = "inv_fisher") -> None:
    """Refuses an inverse whose curvature the Newton step cannot downdate exactly."""
    if not get_curvature(inv.curvature).supports_newton:
        raise ValueError(f"{name} must hold the Gauss-Newton matrix (fit with "
                         f"{options_with('supports_newton')}), got curvature={inv.curvature!r}")


def newton_shift(inv: ssse_ext.BlockInverseFisher, n: int, k: int, w: float) -> float:
    """:math:`\\delta = \\lambda - (n - k) w / N`; :math:`F' - \\delta I \\succeq (\\lambda -
    \\delta) I` is positive definite for any removal only when :math:`\\delta < \\lambda`."""
    delta = inv.damping - (n - k) * w / inv.normalizer
    if not delta < inv.damping:
        raise ValueError(f"the leave-k-out Newton step needs damping - (n-k)/N * weight_decay "
                         f"< damping, i.e. weight_decay > 0, got damping={inv.damping:g}, "
                         f"weight_decay={w:g}, n={n}, k={k}, N={inv.normalizer:g}: fit the "
                         "Gauss-Newton inverse with damping=weight_decay")
    return delta


def newton_erase(model: nn.Module, loss_fn, removed, *, inv_fisher: ssse_ext.BlockInverseFisher,
                 n_total: int, weight_decay: float = 0.0, likelihood=None,
                 refine_steps: int = 0, tol: float = 1e-10,
                 inplace: bool = False, comm=None, params=None) -> dict[str, torch.Tensor]:
    r"""Erases ``removed`` with no :math:`\varepsilon` to choose: the leave-k-out Newton step on
    the retained objective, then ``refine_steps`` Newton steps on :math:`M(\theta)` that use the
    removed samples only (see the module docstring).

    Args:
        model: the trained model (:math:`\theta^*`).
        loss_fn: per-sample loss, as in :func:`ssse.per_sample_grads`.
        removed: :math:`S`, an ``(X, y)`` pair or an iterable of batches.
        inv_fisher: the inverse of the Gauss–Newton matrix at :math:`\theta^*`
            (``ssse.fit_inverse_fisher(..., curvature="ggn", damping=weight_decay)``), not
            modified.
        n_total: :math:`n = |D|`, the samples the model was trained on.
        weight_decay: :math:`w`, the L2 coefficient of training.
        likelihood: the model's output distribution, as for the fit
            (:func:`ssse.fit_inverse_fisher`): ``None`` infers it from ``loss_fn``; a given one
            is checked against it.
        refine_steps: Newton steps on :math:`M` after the first (0: the plain Newton step).
        tol: the refinement stops once a step is smaller than this, relative to the total.
        inplace: also write the result into the model.
        comm: a :class:`ssse.comm.Comm` of several processes shards the step: ``removed`` is
            then this rank's share and ``inv_fisher`` its sharded inverse
            (:mod:`ssse.sharded_erase`; ``refine_steps`` is refused). Default: one process.
        params: the parameter selection the inverse was fitted on (see
            :func:`ssse.fit_inverse_fisher`); the others are left bit-identical.

    Returns:
        A new ``state_dict`` (the same bits on every rank). On any error nothing is changed.
    """
    if not one_process(comm):
        from .sharded_erase import newton_erase_sharded  # it builds on this module

        return newton_erase_sharded(comm, dict(locals()))
    fm, inv = check_request(model, loss_fn, removed, inv_fisher, params=params)
    n = check_positive_int(n_total, "n_total")
    w = check_nonneg_float(weight_decay, "weight_decay")
    check_likelihood(likelihood)
    refine_steps = check_nonneg_int(refine_steps, "refine_steps")
    tol = check_positive_float(tol, "tol")
    check_newton_inverse(inv)
    warn_if_training(model, "newton_erase")
    batches = list(iter_batches(removed, "removed", task=fm.task))
    k = sum(batch_len(y) for _, y in batches)
    if k == 0:
        raise ValueError("removed is empty: nothing to erase")
    if n <= k:
        raise ValueError(f"n_total must be larger than the number of removed samples k={k}, "
                         f"got {n}")
    if get_curvature(inv.curvature).needs_likelihood:  # resolved once for every step
        first = next(b for b in batches if batch_len(b[1]))
        likelihood = likelihood_on(fm, loss_fn, first, likelihood, dtype=inv.dtype)
    star = fm.flat(dtype=torch.float64, device=inv.device)
    step = newton_refined(fm, loss_fn, batches, inv, n=n, weight_decay=w,
                          likelihood=likelihood, steps=refine_steps, tol=tol,
                          max_memory=request_budget(inv.nbytes, fm.device))
    return finish_update(fm, (star + step).to(fm.device, fm.dtype), inplace=inplace,
                         what="the Newton erasure")


def _objective(fm: FlatModel, loss_fn, batches, theta: torch.Tensor, x,
               hx: torch.Tensor, n: int, w: float) -> float:
    """:math:`M(\\theta)` up to a constant, with ``x = theta - theta*`` and ``hx = H x``."""
    params = fm.unflatten(theta.to(fm.device, fm.dtype))
    frozen = fm.frozen_dict()
    total, k = 0.0, 0
    with torch.no_grad():
        for xb, yb in iter_batches(batches, "removed", device=fm.device, dtype=fm.dtype,
                                   task=fm.task):
            out = fm(params, xb, frozen)
            total += float(per_sample_losses(loss_fn, out, yb).double().sum())
            k += batch_len(yb)
    reg = 0.5 * w * float((theta * theta).sum()) * k
    return 0.5 * float(x @ hx) - (total + reg) / n


def newton_refined(fm: FlatModel, loss_fn, batches, inv: ssse_ext.BlockInverseFisher, *, n: int,
                   weight_decay: float, likelihood, steps: int, tol: float,
                   star: dict | None = None, first: tuple | None = None,
                   max_memory: int | None = None) -> torch.Tensor:
    r"""The leave-k-out Newton step from :math:`\theta^*` (``star``, default the model's
    parameters), then
    ``steps`` Newton steps with a line search on :math:`M(\theta) = Q(\theta) -
    \frac1n\sum_S \ell_i(\theta)`; returns :math:`\hat\theta - \theta^*` (float64).

    The inverse holds :math:`F = \lambda I + \frac1N\sum_r u_r u_r^\top` for the ``n``
    samples left (``N`` its fixed normaliser), so :math:`Q`'s Hessian is
    :math:`H = \frac Nn (F - \lambda I) + wI` and :math:`\nabla^2 M = \frac Nn (F' - \delta I)`
    with :math:`F' = F - R^\top R / N` (:math:`R` the Gauss–Newton rows of :math:`S` at the
    current point) and :math:`\delta = \lambda - (n-k) w / N`. :math:`H x` is tracked exactly
    from the solves, since :math:`F` itself is known only through its inverse. ``first``: the
    rows and the summed gradient (weight decay included) of :math:`S` at :math:`\theta^*`,
    when the caller has them; ``max_memory``: the bytes the rows may take while computed.
    """
    w, dtype, device, N = weight_decay, inv.dtype, inv.device, inv.normalizer
    if steps and any(store.takes_side for store in inv.stores):
        raise ValueError(f"refine_steps must be 0 with {inv.curvature!r} blocks, got {steps}: "
                         "the refinement tracks F x through the rows' rank-k change, and "
                         "Kronecker-factored blocks change by more than their rows")
    k = sum(batch_len(y) for _, y in batches)
    ratio = n / N
    delta = newton_shift(inv, n, k, w)
    base = fm.param_dict(dtype) if star is None else star
    star = torch.cat([base[name].reshape(-1) for name in fm.names]).to(device, torch.float64)
    x = torch.zeros_like(star)   # theta - theta*
    fx = torch.zeros_like(star)  # F x
    rows_star = None             # the Gauss-Newton rows of S at theta*
    for step in range(steps + 1):
        theta = star + x
        params = base if step == 0 else {name: t.to(dtype) for name, t in
                                         fm.unflatten(theta.to(fm.device)).items()}
        if step == 0 and first is not None:
            rows, g_s = first
        else:
            rows = rows_of(fm, loss_fn, batches, curvature=inv.curvature, dtype=dtype,
                           likelihood=likelihood, params=params,
                           max_memory=max_memory).to(device)
            g_s, _ = gradient_sum(fm.model, loss_fn, batches, weight_decay=w, dtype=dtype,
                                  params=params, name="removed")
        hx = (fx - inv.damping * x) / ratio + w * x
        rhs = (g_s.to(device, torch.float64) / n - hx) * ratio  # -grad M, times n / N
        try:
            d = inv.solve_changed(rows, rhs, sign=-1, shift=delta)
        except ssse_ext.NotPositiveDefiniteError:
            # M is not convex: where S's curvature at theta_t exceeds its share of the stored
            # curvature, keep the curvature of theta* (a chord step: still a descent direction)
            if step == 0:
                raise
            rows = rows_star
            d = inv.solve_changed(rows, rhs, sign=-1, shift=delta)
        if steps == 0:  # the plain Newton step: no line search needs F d
            x = x + d
            break
        if step == 0:
            rows_star = rows
        r64 = rows.to(torch.float64)
        fd = rhs + delta * d + r64.T @ (r64 @ d) / N                # F d
        if step == 0:
            x, fx = x + d, fx + fd
            continue
        hd = (fd - inv.damping * d) / ratio + w * d
        m0 = _objective(fm, loss_fn, batches, theta, x, hx, n, w)
        slope = -float(rhs @ d) / ratio  # M's derivative along d (negative: d descends)
        alpha = 1.0
        for _ in range(_MAX_HALVINGS):
            m1 = _objective(fm, loss_fn, batches, theta + alpha * d, x + alpha * d,
                            hx + alpha * hd, n, w)
            if m1 <= m0 + _ARMIJO * alpha * slope:
                break
            alpha *= 0.5
        else:
            break  # no decrease along the Newton direction: stop at the current point
        x, fx = x + alpha * d, fx + alpha * fd
        if alpha * float(d.norm()) <= tol * float(x.norm()):
            break
    return x
