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

The operations of the sharded inverse that combine the ranks' blocks are here too, as functions
of the inverse that are the methods of :class:`~ssse.sharding.ShardedInverseFisher`
(:func:`matvec`, :func:`apply_update`, :func:`without`, :func:`solve_changed`, :func:`update`,
:func:`downdate`, :func:`clone`, :func:`to`): the same results as
:class:`ssse_ext.BlockInverseFisher`'s, on every rank, with the same agreements.
"""

from __future__ import annotations

from typing import Callable

import torch

import ssse_ext
from ssse_ext.side import gathered_rows
from ssse_ext.validation import (check_choice, check_finite_float, check_nonneg_float,
                                 check_positive_float, check_positive_int, check_update_operands,
                                 check_vector)

from .batches import batch_len, check_data, check_loss, check_module, task_of
from .comm import Comm, digest, one_process, run_local
from .curvature import check_likelihood, get_curvature, options_with
from .erasure import FISHER_VARIANTS, check_ssse_settings, group_means, refuse_side_rows
from .gradients import gradient_sum
from .model import FlatModel, check_inverse, finish_update, iter_batches
from .newton import check_newton_inverse, newton_shift, rows_of
from .sharded_fit import agreed_likelihood, refuse
from .sharded_side import owned_side, split_rows, with_side
from .sharding import ShardedInverseFisher, check_sharded

__all__ = ["ShardedChange", "apply_update", "check_erase_request", "check_newton_settings",
           "check_restored", "check_sharded_inverse", "clone", "downdate", "erase_sharded",
           "gathered", "matvec", "newton_erase_sharded", "owned_rows", "solve_changed",
           "ssse_update_sharded", "to", "update", "without", "write_rows"]

#: What the sharded erasures refuse (one line each).
NEWTON_REFUSED = {"refine_steps": ((0,), "the refinement's line search needs the whole "
                                          "inverse on one process")}
ERASER_REFUSED = {
    "ids": ((None,), "sample ids and the ledger are kept by a one-process Eraser"),
    "request_id": ((None,), "it goes with ids, which are not offered"),
    "verify": ((None,), "the retained data are spread over the ranks; certify the erased "
                        "model with ssse.certificate.certify"),
    "retrain_above": ((None,), "it goes with verify, which is not offered"),
    **NEWTON_REFUSED,
}


def local_rows(fm: FlatModel, loss_fn, batches, **options) -> torch.Tensor:
    """:func:`ssse.newton.rows_of` for this rank's share of the removed samples, possibly
    none: ``(rows, d)``."""
    if sum(batch_len(y) for _, y in batches) == 0:
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

    return comm.gather_step(run, inv.sharding, what)


def _exchange_rows(comm: Comm, inv: ShardedInverseFisher, rows, what: str):
    """Every rank's ``rows``, cut to this rank's columns, on the inverse's device; rows with a
    side payload (:class:`ssse_ext.Rows`) come with the sum of all ranks' payloads over this
    rank's blocks (:func:`ssse.sharded_side.owned_side`)."""
    rows, side = split_rows(rows)
    mine = comm.exchange_rows(rows, inv.sharding, what).to(inv.device)
    return with_side(mine, owned_side(comm, inv.sharding, side, what, device=inv.device))


def _check_request(model, loss_fn, removed, inv_fisher, comm, params=None) -> FlatModel:
    """The checks every sharded erasure starts with; returns the flat model (of the ``params``
    selection)."""
    check_module(model)
    check_data(removed, "removed", task_of(check_loss(loss_fn)))
    fm = FlatModel(model, params=params, loss_fn=loss_fn)
    check_sharded_inverse(inv_fisher, fm, comm)
    return fm


def check_sharded_inverse(inv_fisher, fm: FlatModel, comm: Comm) -> ShardedInverseFisher:
    """This rank's share of an inverse sharded over the ranks of ``comm``, over the model's
    ``d`` trainable parameters (:func:`ssse.model.check_inverse` of a sharded inverse)."""
    check_sharded(inv_fisher, comm)
    if inv_fisher.dim != fm.dim:
        raise ValueError(f"inv_fisher has dim={inv_fisher.dim}, the model has d={fm.dim} "
                         "trainable parameters")
    return inv_fisher


def check_restored(inv_fisher, fm: FlatModel, comm, train_ids, erased) -> None:
    """The inverse of :meth:`ssse.Eraser.restore`: a :class:`ssse_ext.BlockInverseFisher` for
    one process (``comm`` ``None`` or of one process), this rank's share of one sharded over
    the ranks of ``comm`` otherwise, which refuses sample ids (as :meth:`ssse.Eraser.fit`)."""
    if one_process(comm):
        check_inverse(inv_fisher, fm)
        return
    check_sharded_inverse(inv_fisher, fm, comm)
    if train_ids is not None or len(erased):
        raise ValueError("train_ids and erased are not offered by an Eraser over several "
                         "processes: sample ids and the ledger are kept by a one-process Eraser")


def ssse_update_sharded(comm: Comm, a: dict) -> dict[str, torch.Tensor]:
    """:func:`ssse.ssse_update` with its arguments ``a`` (by name) over the ranks of ``comm``:
    ``removed`` and ``retained`` are this rank's shares (possibly empty), ``k`` counts all
    ranks' samples, ``minibatch`` groups within each share."""
    inv = a["inv_fisher"]

    def prepare():
        fm = _check_request(a["model"], a["loss_fn"], a["removed"], inv, comm,
                            a.get("params"))
        eps, n, w, b = check_ssse_settings(a["epsilon"], a["n_total"], a["weight_decay"],
                                           a["fisher"], a["gradient"], a["minibatch"],
                                           a["retained"], "this rank's share of D \\ S")
        refuse_side_rows(inv.local, a["fisher"], inv.curvature)
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
        k = sum(batch_len(y) for _, y in batches)
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


def check_newton_settings(n_total, weight_decay, likelihood, tol,
                          inv) -> tuple[int, float, float]:
    """The checks of a Newton erasure's settings (local or sharded) but ``refine_steps``;
    returns ``(n_total, weight_decay, tol)``."""
    n = check_positive_int(n_total, "n_total")
    w = check_nonneg_float(weight_decay, "weight_decay")
    check_likelihood(likelihood)
    tol = check_positive_float(tol, "tol")
    check_newton_inverse(inv)
    return n, w, tol


def newton_erase_sharded(comm: Comm, a: dict) -> dict[str, torch.Tensor]:
    """:func:`ssse.newton_erase` with its arguments ``a`` (by name) over the ranks of ``comm``:
    ``removed`` is this rank's share; the first step only (``refine_steps`` is refused)."""
    refuse(a, NEWTON_REFUSED, "newton_erase")
    inv = a["inv_fisher"]

    def prepare():
        fm = _check_request(a["model"], a["loss_fn"], a["removed"], inv, comm,
                            a.get("params"))
        n, w, _ = check_newton_settings(a["n_total"], a["weight_decay"], a["likelihood"],
                                        a["tol"], inv)
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
        return rows, g, sum(batch_len(y) for _, y in batches)

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


def check_erase_request(eraser, epsilon, fisher: str) -> float | None:
    """The checks of a request's settings to an :class:`ssse.Eraser` (local or sharded): all
    but ``removed``, ``refine_steps``, ``ids`` and ``request_id``; returns ``epsilon``."""
    if eraser.inv_fisher is None:
        raise RuntimeError("call fit(train_data) before erase()")
    check_choice(fisher, "fisher", FISHER_VARIANTS)
    if epsilon is None and not get_curvature(eraser.curvature).supports_newton:
        raise ValueError(f"epsilon must be given unless the Eraser was made with "
                         f"{options_with('supports_newton')} (the Newton step needs the "
                         f"Gauss-Newton inverse), got curvature={eraser.curvature!r}")
    return None if epsilon is None else check_positive_float(epsilon, "epsilon")


def _prepare_request(eraser, a: dict):
    """This rank's part of a request: its epsilon, samples, rows, gradient and digest."""
    inv = eraser.inv_fisher
    eps = check_erase_request(eraser, a["epsilon"], a["fisher"])
    check_data(a["removed"], "removed", eraser._fm.task)
    batches = list(iter_batches(a["removed"], "removed", device=eraser._fm.device,
                                task=eraser._fm.task))
    k = sum(batch_len(y) for _, y in batches)
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
    write_rows(inv, mine, -1)  # every owner checked its downdate above: it cannot fail
    return eraser.finish_request(theta, k, eps, a["inplace"])


# ---- the operations of a sharded inverse: the methods of ShardedInverseFisher ------------------
#
# Collective over the inverse's comm: vectors are the same on every rank, rows are each rank's
# share of them, and every rank gets the whole result (the same bits); a failure on any rank
# raises on every rank.

class ShardedChange:
    """A sharded inverse with all ranks' rows removed from its Fisher (or added), applied on
    the fly (:meth:`ShardedInverseFisher.without`): every owner holds the
    :class:`ssse_ext.LowRankChange` of its blocks, computed and checked once; its products are
    collective, as the inverse's."""

    def __init__(self, inverse: ShardedInverseFisher, change):
        self.inverse, self.change = inverse, change

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """The product with ``v`` (``(d,)`` or ``(d, r)``), in float64."""
        return gathered(self.inverse, "solve", lambda vp, _: self.change.solve(vp), v,
                        float64=True)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The product with ``v``, in the inverse's dtype."""
        return gathered(self.inverse, "matvec", lambda vp, _: self.change.matvec(vp), v)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def apply_update(self, theta: torch.Tensor, v: torch.Tensor, scale: float = 1.0
                     ) -> torch.Tensor:
        """``theta + scale * (this inverse) v``, in the inverse's dtype."""
        return gathered(self.inverse, "apply_update", lambda vp, tp: self.change.apply_update(
            tp, vp, scale), v, theta, scale=scale)


def gathered(inv: ShardedInverseFisher, what: str, step, v, theta=None, *, name: str = "v",
             scale: float = 1.0, float64: bool = False) -> torch.Tensor:
    """The whole result, on every rank, of which ``step(v's rows, theta's rows)`` computes this
    rank's rows (``inv.columns``); ``v`` and ``theta`` are the same ``(d,)`` or ``(d, r)``
    tensors on every rank, checked there (``float64``: ``v`` is given to ``step`` in float64,
    and the result is float64)."""
    cols, like = inv.columns, dict(dim=inv.dim, dtype=inv.dtype, device=inv.device)

    def local():
        check_sharded(inv, inv.comm)
        check_finite_float(scale, "scale")
        if theta is None:
            base, (vv, _) = None, check_vector(v.to(inv.dtype) if float64 and isinstance(
                v, torch.Tensor) else v, name, **like)
        else:
            base, vv, _ = check_update_operands(theta, v, **like)
        if float64:
            vv = v.to(torch.float64).reshape(vv.shape)
        if cols.start == cols.stop:  # no blocks here
            return vv[cols].clone()
        return step(vv[cols], None if base is None else base[cols])

    return inv.comm.gather_step(local, inv.sharding, what).view(v.shape)


def owned_rows(inv: ShardedInverseFisher, rows, what: str, name: str = "rows",
               check: Callable[[], None] | None = None) -> torch.Tensor:
    """All ranks' rows cut to this rank's columns, on its device: ``rows`` is this rank's
    ``(k_r, d)`` share (or an iterable of such chunks; either may be :class:`ssse_ext.Rows`),
    checked on every rank with ``check`` first."""
    def local():
        check_sharded(inv, inv.comm)
        if check is not None:
            check()
        return gathered_rows(rows, name, dim=inv.dim, dtype=inv.dtype, device=inv.device)

    made, error = run_local(local)
    inv.comm.agree(error, f"{what} (the rows)")
    return _exchange_rows(inv.comm, inv, with_side(*made), what)


def _check_sign(sign) -> None:
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")


def matvec(inv: ShardedInverseFisher, v: torch.Tensor) -> torch.Tensor:
    """``F^{-1} v`` for ``v`` of shape ``(d,)`` or ``(d, r)``."""
    return ShardedChange(inv, inv.local).matvec(v)


def apply_update(inv: ShardedInverseFisher, theta: torch.Tensor, v: torch.Tensor,
                 scale: float = 1.0, *, without=None) -> torch.Tensor:
    """``theta + scale * F^{-1} v`` (paper eq. 8), the Fisher changed by the rows ``without``
    (this rank's share, see :meth:`~ShardedInverseFisher.without`) when given; nothing is
    modified."""
    change = ShardedChange(inv, inv.local) if without is None else inv.without(without)
    return change.apply_update(theta, v, scale)


def without(inv: ShardedInverseFisher, rows, *, sign: int = -1) -> ShardedChange:
    r"""The inverse of :math:`F + \mathrm{sign}\,R^\top R / N` applied on the fly
    (:class:`ShardedChange`), :math:`R` all ranks' rows (``rows``: this rank's ``(k_r, d)``
    share or chunks of it); the inverse is not modified.

    Raises:
        NotPositiveDefiniteError: on every rank, when a block would not stay positive definite.
    """
    mine = owned_rows(inv, rows, "without", check=lambda: _check_sign(sign))
    change, error = run_local(lambda: inv.local.without(mine, sign=sign)
                              if inv.local.layout.num_blocks else None)
    inv.comm.agree(error, "without (the blocks of the owners)")
    return ShardedChange(inv, change)


def solve_changed(inv: ShardedInverseFisher, rows, rhs: torch.Tensor, *, sign: int = -1,
                  shift: float = 0.0) -> torch.Tensor:
    r""":math:`(F + \mathrm{sign}\,R^\top R / N - \mathrm{shift}\cdot I)^{-1}\,\mathrm{rhs}`
    in float64 (:meth:`ssse_ext.BlockInverseFisher.solve_changed` of every owner's blocks),
    :math:`R` all ranks' rows (``rows``: this rank's share); nothing is modified."""
    mine = owned_rows(inv, rows, "solve_changed",
                      check=lambda: (_check_sign(sign), check_finite_float(shift, "shift")))
    return gathered(inv, "solve_changed", lambda vp, _: inv.local.solve_changed(
        mine, vp, sign=sign, shift=shift), rhs, name="rhs", float64=True)


def _change(inv: ShardedInverseFisher, grads, sign: int, method: str,
            chunk_size: int | None) -> ShardedInverseFisher:
    what = "update" if sign > 0 else "downdate"

    def check():
        check_choice(method, "method", ssse_ext.UPDATE_METHODS)
        check_positive_int(chunk_size, "chunk_size", allow_none=True)

    mine = owned_rows(inv, grads, what, "grads", check)
    if inv.comm.size > 1 and inv.local.layout.num_blocks and mine.shape[0]:
        # what the write checks, on every owner first (one rank: the write checks first)
        _, error = run_local(lambda: inv.local.without(mine, sign=sign))
    else:
        error = None
    inv.comm.agree(error, f"{what} (the blocks of the owners)")
    _, error = run_local(lambda: write_rows(inv, mine, sign, method, chunk_size))
    inv.comm.agree(error, f"{what} (the writes)")
    return inv


def write_rows(inv: ShardedInverseFisher, mine: torch.Tensor, sign: int,
               method: str = "woodbury", chunk_size: int | None = None) -> None:
    """Adds (``sign=+1``) or removes this rank's columns ``mine`` of all ranks' rows; a rank
    without blocks keeps the owners' count of rows."""
    if inv.local.layout.num_blocks:
        change = inv.local.update if sign > 0 else inv.local.downdate
        change(mine, method=method, chunk_size=chunk_size)
    else:
        inv.local.num_samples += sign * mine.shape[0]


def update(inv: ShardedInverseFisher, grads, *, method: str = "woodbury",
           chunk_size: int | None = None) -> ShardedInverseFisher:
    """Adds all ranks' rows (``grads``: this rank's ``(k_r, d)`` share or chunks of it) to
    every block (:meth:`ssse_ext.BlockInverseFisher.update`); returns the inverse."""
    return _change(inv, grads, +1, method, chunk_size)


def downdate(inv: ShardedInverseFisher, grads, *, method: str = "woodbury",
             chunk_size: int | None = None) -> ShardedInverseFisher:
    """Removes all ranks' rows (``grads``: this rank's share) from every block
    (:meth:`ssse_ext.BlockInverseFisher.downdate`); returns the inverse.

    Raises:
        NotPositiveDefiniteError, RowNotFoundError: on every rank, with nothing changed, when
            an owner refuses.
    """
    return _change(inv, grads, -1, method, chunk_size)


def clone(inv: ShardedInverseFisher, *, max_memory: int | None = None) -> ShardedInverseFisher:
    """A copy on the same device (:meth:`ssse_ext.BlockInverseFisher.clone` of every rank's
    blocks), refused on every rank when refused on one."""
    return _copy(inv, lambda: inv.local.clone(max_memory=max_memory))


def to(inv: ShardedInverseFisher, device=None, dtype: torch.dtype | None = None, *,
       max_memory: int | None = None) -> ShardedInverseFisher:
    """A copy on ``device`` and/or in ``dtype`` (:meth:`ssse_ext.BlockInverseFisher.to` of every
    rank's blocks), refused on every rank when refused on one."""
    return _copy(inv, lambda: inv.local.to(device, dtype, max_memory=max_memory))


def _copy(inv: ShardedInverseFisher, copy) -> ShardedInverseFisher:
    def local():
        check_sharded(inv, inv.comm)
        return ShardedInverseFisher(copy(), inv.sharding, inv.rank, inv.comm)

    made, error = run_local(local)
    inv.comm.agree(error, "a copy of the inverse")
    return made
