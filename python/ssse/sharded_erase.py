r"""The erasures of :func:`ssse.ssse_update`, :func:`ssse.newton_erase` and
:class:`ssse.Eraser` over several processes (``comm.size > 1``), with a sharded inverse
(:mod:`ssse.sharding`).

The removed samples' gradients and curvature rows are computed where the samples are, their
column slices go to the owners (``all_to_all``), each owner computes its part of the step (SSSE,
paper eq. 8; the leave-k-out Newton step :math:`\frac1N (F' - \delta I)^{-1}\sum_S\nabla\ell_i`
per block by :meth:`~ssse_ext.BlockInverseFisher.solve_changed`) and checks its downdate, the
ranks agree, and the new parameters are all-gathered, so every rank ends with bit-identical
parameters. Every step that can fail locally is followed by an agreement among the ranks, so a
rank that raises makes every rank raise and nothing is half-changed.
"""

from __future__ import annotations

from typing import Callable

import torch

from ssse_ext.validation import (check_callable, check_choice, check_data, check_module,
                                 check_nonneg_float, check_positive_float, check_positive_int)

from .comm import Comm, digest, run_local
from .curvature import check_likelihood, get_curvature, options_with
from .erasure import FISHER_VARIANTS, check_ssse_settings, group_means
from .gradients import gradient_sum
from .model import FlatModel, finish_update, iter_batches
from .newton import check_newton_inverse, newton_shift, rows_of
from .sharded_fit import agreed_likelihood, refuse
from .sharding import ShardedInverseFisher, check_sharded

__all__ = ["erase_sharded", "newton_erase_sharded", "ssse_update_sharded"]

#: What the sharded erasures refuse (one line each).
NEWTON_REFUSED = {"refine_steps": ((0,), "the refinement's line search needs the whole "
                                          "inverse on one process")}
ERASER_REFUSED = {
    "ids": ((None,), "sample ids and the ledger are kept by a one-process Eraser"),
    "request_id": ((None,), "it goes with ids, which are not offered"),
    **NEWTON_REFUSED,
}


def local_rows(fm: FlatModel, loss_fn, batches, **options) -> torch.Tensor:
    """:func:`ssse.newton.rows_of` for this rank's share of the removed samples, possibly
    none: ``(rows, d)``."""
    if sum(x.shape[0] for x, _ in batches) == 0:
        return torch.zeros(0, fm.dim, dtype=options["dtype"], device=fm.device)
    return rows_of(fm, loss_fn, batches, **options)


def _removal_size(comm: Comm, k_local: int | None, error, what: str) -> int:
    """The removed samples of all ranks (agreed on)."""
    k = sum(r[0] for r in comm.status([k_local or 0], error, what))
    if k == 0:
        raise ValueError("removed is empty on every rank: nothing to erase")
    return k


def _check_remaining(n: int, k: int) -> None:
    if n <= k:
        raise ValueError(f"n_total must be larger than the number of removed samples k={k} "
                         f"(all ranks), got {n}")


def _owner_step(comm: Comm, inv: ShardedInverseFisher, step: Callable[[], torch.Tensor],
                what: str) -> torch.Tensor:
    """Runs the owners' part of an update (its new columns of the parameters), agrees, and
    all-gathers the whole vector: the same bits on every rank."""
    def run():
        part = step()
        if not bool(torch.isfinite(part).all()):
            raise FloatingPointError(f"{what} produced NaN or Inf; nothing was changed")
        return part

    part, error = run_local(run)
    comm.agree(error, f"{what} (the blocks of the owners)")
    return comm.gather_columns(part, inv.sharding, f"{what} (all-gather of the parameters)")


def _exchange_rows(comm: Comm, inv: ShardedInverseFisher, rows: torch.Tensor,
                   what: str) -> torch.Tensor:
    """Every rank's ``rows``, cut to this rank's columns, on the inverse's device."""
    counts = [r[0] for r in comm.ints([rows.shape[0]], f"{what} (rows)")]
    return comm.all_to_all_rows(rows, inv.sharding, counts,
                                f"{what} (exchange of row slices)").to(inv.device)


def _check_request(model, loss_fn, removed, inv_fisher, comm) -> FlatModel:
    """The checks every sharded erasure starts with; returns the flat model."""
    check_module(model)
    check_callable(loss_fn, "loss_fn")
    check_data(removed, "removed")
    fm = FlatModel(model)
    check_sharded(inv_fisher, comm)
    if inv_fisher.dim != fm.dim:
        raise ValueError(f"inv_fisher has dim={inv_fisher.dim}, the model has d={fm.dim} "
                         "trainable parameters")
    return fm


def ssse_update_sharded(comm: Comm, a: dict) -> dict[str, torch.Tensor]:
    """:func:`ssse.ssse_update` with its arguments ``a`` (by name) over the ranks of ``comm``:
    ``removed`` and ``retained`` are this rank's shares (possibly empty), ``k`` counts all
    ranks' samples, ``minibatch`` groups within each share."""
    inv = a["inv_fisher"]

    def prepare():
        fm = _check_request(a["model"], a["loss_fn"], a["removed"], inv, comm)
        eps, n, w, b = check_ssse_settings(a["epsilon"], a["n_total"], a["weight_decay"],
                                           a["fisher"], a["gradient"], a["minibatch"],
                                           a["retained"], "this rank's share of D \\ S")
        batches = list(iter_batches(a["removed"], "removed", device=fm.device))
        rows = None
        if a["fisher"] == "leave_k_out":
            grads = local_rows(fm, a["loss_fn"], batches, dtype=inv.dtype,
                               curvature="empirical", weight_decay=w)
            v = grads.sum(0)
            rows = group_means(grads, b) if grads.shape[0] else grads
        else:
            v, _ = gradient_sum(a["model"], a["loss_fn"], batches, weight_decay=w,
                                dtype=inv.dtype, name="removed")
        if a["gradient"] == "retained":
            v = -gradient_sum(a["model"], a["loss_fn"], a["retained"], weight_decay=w,
                              dtype=inv.dtype, name="retained")[0]
        k = sum(x.shape[0] for x, _ in batches)
        fp = digest(fm.flat(), inv.fingerprint(), eps, n, w, a["fisher"], a["gradient"], b)
        return fm, eps, n, v.to(inv.device), rows, k, fp

    prepared, error = run_local(prepare)
    k = _removal_size(comm, None if prepared is None else prepared[5], error, "ssse_update")
    fm, eps, n, v, rows, _, fp = prepared
    comm.same(fp, "ssse_update: the model's parameters, the inverse or the arguments")
    _check_remaining(n, k)
    cols = inv.columns
    v = comm.all_reduce_sum(v, "ssse_update (sum of the gradients)")
    if rows is not None:
        rows = _exchange_rows(comm, inv, rows, "ssse_update")

    def step():
        theta = fm.flat(dtype=inv.dtype, device=inv.device)[cols]
        if theta.numel() == 0:
            return theta
        return inv.local.apply_update(theta, v[cols], eps / (n - k), without=rows)

    theta_hat = _owner_step(comm, inv, step, "the SSSE update")
    return finish_update(fm, theta_hat, inplace=a["inplace"], what="the SSSE update")


def newton_erase_sharded(comm: Comm, a: dict) -> dict[str, torch.Tensor]:
    """:func:`ssse.newton_erase` with its arguments ``a`` (by name) over the ranks of ``comm``:
    ``removed`` is this rank's share; the first step only (``refine_steps`` is refused)."""
    refuse(a, NEWTON_REFUSED, "newton_erase")
    inv = a["inv_fisher"]

    def prepare():
        fm = _check_request(a["model"], a["loss_fn"], a["removed"], inv, comm)
        n = check_positive_int(a["n_total"], "n_total")
        w = check_nonneg_float(a["weight_decay"], "weight_decay")
        check_likelihood(a["likelihood"])
        check_positive_float(a["tol"], "tol")
        check_newton_inverse(inv)
        batches = list(iter_batches(a["removed"], "removed", device=fm.device))
        return fm, n, w, batches

    prepared, error = run_local(prepare)
    comm.agree(error, "newton_erase (arguments)")
    fm, n, w, batches = prepared
    curv = get_curvature(inv.curvature)
    lik, _ = agreed_likelihood(comm, fm, a["loss_fn"], batches, curv, a["likelihood"],
                               "newton_erase")

    def rows_and_gradient():
        rows = local_rows(fm, a["loss_fn"], batches, curvature=curv, dtype=inv.dtype,
                          likelihood=lik)
        g, _ = gradient_sum(a["model"], a["loss_fn"], batches, weight_decay=w,
                            dtype=inv.dtype, name="removed")
        return rows, g, sum(x.shape[0] for x, _ in batches)

    made, error = run_local(rows_and_gradient)
    k = _removal_size(comm, None if made is None else made[2], error, "newton_erase")
    rows, g, _ = made
    comm.same(digest(fm.flat(), inv.fingerprint(), n, w, "" if lik is None else lik.spec),
              "newton_erase: the model's parameters, the inverse or the arguments")
    _check_remaining(n, k)
    delta = newton_shift(inv, n, k, w)
    theta_hat = _newton_step(comm, inv, fm.flat(dtype=torch.float64), rows, g, n, delta,
                             fm.dtype, "the Newton erasure")
    return finish_update(fm, theta_hat.to(fm.device), inplace=a["inplace"],
                         what="the Newton erasure")


def _newton_step(comm: Comm, inv: ShardedInverseFisher, theta64: torch.Tensor,
                 rows: torch.Tensor, g: torch.Tensor, n: int, delta: float, out_dtype,
                 what: str, check_downdate: bool = False):
    """``theta + (F' - delta I)^{-1} g / N`` in float64, rounded to ``out_dtype``, gathered
    (as :func:`ssse.newton.newton_refined`'s first step); optionally checks that the owners'
    blocks can be downdated by ``rows`` (for an Eraser). Returns (theta, owner rows)."""
    cols = inv.columns
    g = comm.all_reduce_sum(g, f"{what} (sum of the gradients)")
    mine = _exchange_rows(comm, inv, rows, what)
    ratio = n / inv.normalizer

    def step():
        theta = theta64.to(inv.device)[cols]
        if theta.numel() == 0:
            return theta.to(out_dtype)
        rhs = g.to(inv.device, torch.float64)[cols] / n * ratio
        d = inv.local.solve_changed(mine, rhs, sign=-1, shift=delta)
        if check_downdate:
            inv.local.without(mine)  # the downdate that follows checks the same, then writes
        return (theta + d).to(out_dtype)

    theta = _owner_step(comm, inv, step, what)
    return (theta, mine) if check_downdate else theta


def _prepare_request(eraser, a: dict):
    """This rank's part of a request: its epsilon, samples, rows, gradient and digest."""
    inv = eraser.inv_fisher
    if inv is None:
        raise RuntimeError("call fit(train_data) before erase()")
    check_data(a["removed"], "removed")
    check_choice(a["fisher"], "fisher", FISHER_VARIANTS)
    eps = a["epsilon"]
    if eps is None and not get_curvature(eraser.curvature).supports_newton:
        raise ValueError(f"epsilon must be given unless the Eraser was made with "
                         f"{options_with('supports_newton')} (the Newton step needs the "
                         f"Gauss-Newton inverse), got curvature={eraser.curvature!r}")
    if eps is not None:
        eps = check_positive_float(eps, "epsilon")
    batches = list(iter_batches(a["removed"], "removed",
                                device=FlatModel(eraser.model).device))
    k = sum(x.shape[0] for x, _ in batches)
    if k:
        rows, v = eraser.rows_and_gradient(batches)
    else:
        rows = torch.zeros(0, inv.dim, dtype=eraser.dtype, device=eraser.device)
        v = torch.zeros(inv.dim, dtype=eraser.dtype, device=eraser.device)
    fp = digest(eraser.theta, inv.fingerprint(), eraser.n, eps, a["fisher"])
    return eps, k, rows, v, fp


def erase_sharded(eraser, comm: Comm, a: dict) -> dict[str, torch.Tensor]:
    """:meth:`ssse.Eraser.erase` with its arguments ``a`` (by name) over the ranks of
    ``comm``: ``removed`` is this rank's share of the request (possibly empty); without
    ``epsilon`` the leave-k-out Newton step (no refinement)."""
    refuse(a, ERASER_REFUSED, "Eraser.erase")
    inv = eraser.inv_fisher
    prepared, error = run_local(lambda: _prepare_request(eraser, a))
    k = _removal_size(comm, None if prepared is None else prepared[1], error, "Eraser.erase")
    eps, _, rows, v, fp = prepared
    comm.same(fp, "Eraser.erase: the parameters, the inverse or the arguments")
    if k >= eraser.n:
        raise ValueError(f"removed has {k} samples (all ranks), but only {eraser.n} remain")
    cols, what = inv.columns, "the erasure"
    if eps is None:
        delta = newton_shift(inv, eraser.n, k, eraser.weight_decay)
        theta, mine = _newton_step(comm, inv, eraser.theta.to(torch.float64), rows, v,
                                   eraser.n, delta, eraser.dtype, what, check_downdate=True)
    else:
        v = comm.all_reduce_sum(v, f"{what} (sum of the gradients)")
        mine = _exchange_rows(comm, inv, rows, what)
        leave = a["fisher"] == "leave_k_out"

        def step():
            theta = eraser.theta[cols]
            if theta.numel() == 0:
                return theta
            out = inv.local.apply_update(theta, v[cols], eps / (eraser.n - k),
                                         without=mine if leave else None)
            if not leave:
                inv.local.without(mine)  # the downdate below checks the same, then writes
            return out

        theta = _owner_step(comm, inv, step, what)
    # every owner checked its downdate above: these writes cannot fail
    if inv.local.layout.num_blocks:
        inv.local.downdate(mine)
    else:  # a rank without blocks keeps the same count of rows as the owners
        inv.local.num_samples -= mine.shape[0]
    return eraser.finish_request(theta, k, eps, a["inplace"])
