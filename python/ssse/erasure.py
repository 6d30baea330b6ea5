r"""The SSSE update (paper eq. 8) and :class:`Eraser`, which serves a sequence of requests.

.. math:: \hat\theta_\varepsilon = \theta^* + \frac{\varepsilon}{n-k}\,
          F_D^{-1} \sum_{i \in S} \nabla \ell_i(\theta^*)

with :math:`F_D` the block-diagonal damped empirical Fisher of the training set :math:`D`
(:func:`ssse.fit_inverse_fisher`), :math:`S \subset D` the :math:`k` samples to erase and
:math:`n = |D|`. It is the influence-function update (paper eq. 4) with the Hessian replaced by
:math:`F_D / \varepsilon`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

import ssse_ext
from ssse_ext.validation import (check_choice, check_device, check_dtype, check_nonneg_float,
                                 check_nonneg_int, check_positive_float, check_positive_int)

from .batches import batch_len, check_data, check_loss, check_module, is_batch
from .model import FlatModel, check_request, finish_update, iter_batches, warn_if_training
from .curvature import check_likelihood, get_curvature, options_with
from .budget import request_budget
from .comm import one_process
from .fit import fit_inverse_fisher
from .gradients import gradient_sum
from .layouts import resolve_layout
from .settings import check_minibatch
from .rows import check_autocast, likelihood_of_data
from .sharded_fit import agreed_likelihood, fit_samples
from .io import fingerprint
from .ledger import Ledger, check_ids
from .newton import newton_refined, rows_of
from .certificate import certify_flat
from .requests import (DEFAULT_PROBE_BLOCKS, StageTimer, check_probe_blocks, check_verify,
                       group_means, record_request, request_ids, request_rows)

__all__ = ["ssse_update", "Eraser", "FISHER_VARIANTS", "GRADIENT_VARIANTS", "check_ssse_settings",
           "group_means", "refuse_side_rows"]

#: ``"full"``: the Fisher of D (the paper); ``"leave_k_out"``: downdated by S first.
FISHER_VARIANTS = ("full", "leave_k_out")
#: ``"removed"``: the summed gradient of S (the paper); ``"retained"``: minus that of D \ S.
GRADIENT_VARIANTS = ("removed", "retained")


def check_ssse_settings(epsilon, n_total, weight_decay, fisher, gradient, minibatch, retained,
                        retained_name: str, task=None) -> tuple[float, int, float, int]:
    """The checks of an SSSE request's settings (local or sharded); returns ``(epsilon,
    n_total, weight_decay, minibatch)``. ``retained_name`` says what ``retained`` must hold."""
    epsilon = check_positive_float(epsilon, "epsilon")
    n_total = check_positive_int(n_total, "n_total")
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    check_choice(fisher, "fisher", FISHER_VARIANTS)
    check_choice(gradient, "gradient", GRADIENT_VARIANTS)
    minibatch = check_positive_int(minibatch, "minibatch")
    if gradient == "retained":
        if retained is None:
            raise ValueError(f'retained must be given ({retained_name}) when '
                             'gradient="retained"')
        check_data(retained, "retained", task)
    return epsilon, n_total, weight_decay, minibatch


def refuse_side_rows(inv: ssse_ext.BlockInverseFisher, fisher: str, curvature: str) -> None:
    """:func:`ssse_update`'s refusal of ``fisher="leave_k_out"`` on an inverse with blocks whose
    downdate reads a side payload of the rows (it computes plain gradient rows)."""
    if fisher == "leave_k_out" and any(getattr(s, "takes_side", False)
                                       for s in getattr(inv, "stores", ())):
        raise ValueError(f'fisher="leave_k_out" needs the removed samples\' rows of '
                         f'curvature={curvature!r} with their side payload, which '
                         f'ssse_update does not compute: serve the request with ssse.Eraser('
                         f'..., curvature={curvature!r}).erase(..., fisher="leave_k_out")')


def ssse_update(model: nn.Module, loss_fn, removed, *,
                inv_fisher: ssse_ext.BlockInverseFisher, epsilon: float, n_total: int,
                weight_decay: float = 0.0, fisher: str = "full", gradient: str = "removed",
                retained=None, minibatch: int = 1, inplace: bool = False, comm=None,
                params=None) -> dict[str, torch.Tensor]:
    r"""Single-step sample erasure, paper eq. 8, applied block by block:

    .. math:: \hat\theta_\varepsilon = \theta^* + \frac{\varepsilon}{n-k}\,F^{-1} v,\qquad
              v = \sum_{i \in S} \nabla\ell_i(\theta^*)

    Args:
        model: the trained model (:math:`\theta^*`).
        loss_fn: per-sample loss, as in :func:`ssse.per_sample_grads`.
        removed: :math:`S`, an ``(X, y)`` pair or an iterable of batches.
        inv_fisher: :math:`F_D^{-1}` from :func:`ssse.fit_inverse_fisher` at :math:`\theta^*`
            (not modified).
        epsilon: :math:`\varepsilon > 0`.
        n_total: :math:`n = |D|`, the number of training *samples* (``n_total > k``).
        weight_decay: the L2 coefficient folded into every :math:`\ell_i`.
        fisher: ``"full"`` uses :math:`F_D^{-1}`; ``"leave_k_out"`` removes the gradients of :math:`S` first (:math:`F_{D \setminus S}^{-1}`, see docs/maths.md).
        gradient: ``"removed"`` (paper): :math:`v = \sum_{S} \nabla\ell_i`; ``"retained"``
            (paper §5.3): :math:`v = -\sum_{D \setminus S} \nabla\ell_i`, the same direction at an
            optimum since :math:`\sum_D \nabla\ell_i = 0` there. Needs ``retained``.
        retained: :math:`D \setminus S` for ``gradient="retained"``.
        minibatch: ``b`` of a mini-batch Fisher; the leave-k-out downdate then removes the mean
            gradients of consecutive groups of ``b`` samples of :math:`S` (an approximation:
            the groups of the fit mixed :math:`S` with other samples).
        inplace: also write :math:`\hat\theta` into ``model``.
        comm: a :class:`ssse.comm.Comm` of several processes shards the update: ``removed`` and
            ``retained`` are then this rank's shares (:math:`k` counts all ranks') and
            ``inv_fisher`` its sharded inverse (:mod:`ssse.sharded_erase`). Default: one process.
        params: the parameter selection the inverse was fitted on (see
            :func:`ssse.fit_inverse_fisher`); the others are left bit-identical.

    Returns:
        A new ``state_dict`` with :math:`\hat\theta_\varepsilon` (the same bits on every rank).
        On any error nothing is changed.
    """
    if not one_process(comm):
        from .sharded_erase import ssse_update_sharded  # it builds on this module

        return ssse_update_sharded(comm, dict(locals()))
    fm, inv = check_request(model, loss_fn, removed, inv_fisher, params=params)
    epsilon, n_total, weight_decay, minibatch = check_ssse_settings(
        epsilon, n_total, weight_decay, fisher, gradient, minibatch, retained, "D \\ S",
        fm.task)
    warn_if_training(model, "ssse_update")
    refuse_side_rows(inv, fisher, inv.curvature)

    dtype, device = inv.dtype, inv.device
    rows = None
    if fisher == "leave_k_out":
        rows = rows_of(fm, loss_fn, list(iter_batches(removed, "removed", task=fm.task)),
                       curvature="empirical", dtype=dtype, weight_decay=weight_decay,
                       max_memory=request_budget(inv.nbytes, fm.device))
        k = rows.shape[0]
        v = rows.sum(0)
    else:
        v, k = gradient_sum(fm, loss_fn, removed, weight_decay=weight_decay, dtype=dtype,
                            name="removed")
        if k == 0:
            raise ValueError("removed is empty: nothing to erase")
    if n_total <= k:
        raise ValueError(f"n_total must be larger than the number of removed samples k={k}, "
                         f"got {n_total}")
    if gradient == "retained":
        v_ret, _ = gradient_sum(fm, loss_fn, retained, weight_decay=weight_decay,
                                dtype=dtype, name="retained")
        v = -v_ret
    # the leave-k-out Fisher is applied on the fly (Woodbury): the stored inverse is not copied
    without = None if rows is None else group_means(rows, minibatch).to(device)
    theta = fm.flat(dtype=dtype, device=device)
    theta_hat = inv.apply_update(theta, v.to(device), epsilon / (n_total - k), without=without)
    return finish_update(fm, theta_hat, inplace=inplace, what="the SSSE update")


def _configure(obj, model: nn.Module, loss_fn, *, damping: float, block_size: int | None,
               layout, weight_decay: float, minibatch: int, dtype: torch.dtype | None, device,
               chunk_size: int | None, max_memory: int | None, curvature,
               likelihood, mc_samples: int, params=None, autocast=None) -> None:
    """Checks the settings an :class:`Eraser` (or its distributed counterpart) shares and stores
    them on ``obj`` (``curvature`` as its name, the :class:`~ssse.curvature.Curvature` as
    ``_curvature``); raises before storing anything a later check would refuse."""
    check_module(model)
    fm = FlatModel(model, params=params, loss_fn=check_loss(loss_fn))
    curv = get_curvature(curvature)
    dtype = check_dtype(dtype) or fm.dtype
    settings = dict(
        model=model, loss_fn=loss_fn, _fm=fm,
        damping=check_positive_float(damping, "damping"),
        weight_decay=check_nonneg_float(weight_decay, "weight_decay"),
        minibatch=check_positive_int(minibatch, "minibatch"),
        layout=resolve_layout(layout, block_size, fm),
        dtype=dtype, autocast=check_autocast(autocast, dtype),
        device=check_device(device) or fm.device,
        chunk_size=check_positive_int(chunk_size, "chunk_size", allow_none=True),
        max_memory=check_positive_int(max_memory, "max_memory", allow_none=True),
        curvature=curv.name, _curvature=curv,
        likelihood=check_likelihood(likelihood),
        mc_samples=check_positive_int(mc_samples, "mc_samples"))
    check_minibatch(settings["minibatch"], curv)
    for name, value in settings.items():
        setattr(obj, name, value)


class Eraser:
    r"""Serves a sequence of deletion requests.

    :meth:`fit` computes the inverse curvature :math:`F_D^{-1}` at the trained parameters
    :math:`\theta^*`. With the paper's empirical Fisher (``curvature="empirical"``), request
    :math:`t` (samples :math:`S_t`, :math:`k_t` of them) moves the current parameters by SSSE
    (paper eq. 8),

    .. math:: \theta_t = \theta_{t-1} + \frac{\varepsilon}{n_{t-1}-k_t}\,F_{D_{t-1}}^{-1}
              \sum_{i\in S_t}\nabla\ell_i(\theta^*),\qquad D_t = D_{t-1}\setminus S_t,\;
              n_t = n_{t-1} - k_t

    and downdates the inverse by the rows of :math:`S_t`, so later requests see the curvature
    of the remaining data. With ``curvature="ggn"`` (and ``damping`` = ``weight_decay``) a
    request without ``epsilon`` takes the leave-k-out Newton step instead, optionally refined
    (:func:`ssse.newton_erase`): nothing to tune. Gradients and curvature rows are always
    taken at :math:`\theta^*`, where the inverse was fitted, so a downdate removes exactly the
    rows that were added (with ``minibatch=1``; with ``curvature="mc"`` the draws of the fit
    cannot be replayed, and a downdate removes the removed samples' expected rows, their
    Gauss–Newton rows).

    Two requests :math:`S_1, S_2` versus one for :math:`S_1 \cup S_2`: the only differences are
    the normalisation of the first step (:math:`n-k_1` instead of :math:`n-k_1-k_2`) and the
    Fisher of the second (:math:`F_{D\setminus S_1}` instead of :math:`F_D`), both relative
    changes of order :math:`k/(n-k)` of the step.

    A request copies nothing of the inverse's size: the step is computed first (a leave-k-out
    Fisher applied on the fly), then the inverse is downdated in place after every block has
    been checked, so any error leaves everything unchanged. Extra memory: :math:`O(k\,d)`.

    **Sample ids.** Gradients cannot tell whether a sample was trained on, or already erased:
    requests name their samples with ``ids`` (:meth:`erase`), checked against the training
    set's ids (:meth:`fit`; by default the positions ``0 .. n-1`` in ``train_data``) and the
    ids erased before, and refused before anything changes. With a ``ledger``
    (:class:`ssse.ledger.Ledger` or a path), ids are required and every request is appended
    to it (:func:`ssse.ledger.record`: ids hash, method, fingerprints of the model and the
    inverse before and after, health probe); request ids and sample ids already in the
    ledger are refused.

    **Health probe.** After every downdate the inverse's health probe
    (:meth:`ssse_ext.BlockInverseFisher.health`) is computed, recorded and warned about when
    above the dtype's tolerance. A full probe costs three products with the whole inverse, as
    much again as the rest of a request on a dense inverse, so a request probes
    ``probe_blocks`` blocks: the worst at the inverse's last full probe (up to half), then
    blocks drawn by a generator seeded with the probe's seed and the inverse's count of
    changes (the same on every run): 32 of a ResNet's 2,700 blocks of 256 cost about 1 % of a
    full probe. Probed in full always: every request with a ledger, before and after (its line
    says the request was served by a sound inverse), and the inverse before it is written
    (:meth:`ssse_ext.BlockInverseFisher.to_state`, hence :func:`ssse.io.save_inverse_fisher`
    and the files of :mod:`ssse.service`): one that changed since its last full probe is
    probed then, and refused (:class:`ssse_ext.HealthError`) when it fails.

    Args:
        model: the trained model (:math:`\theta^*`); written only by ``erase(..., inplace=True)``.
        loss_fn, damping, block_size, layout, weight_decay, minibatch, chunk_size, max_memory,
            curvature, likelihood, mc_samples, representation: as in
            :func:`ssse.fit_inverse_fisher` (``representation`` defaults to ``"requests"``:
            per block the store whose downdates stay within 1e-5 (float32) or 1e-10
            (float64) of a fresh fit, :data:`ssse_ext.blocks.REQUESTS`; ``"dense"`` with
            ``minibatch > 1``, where a dual block cannot remove the group means it does not
            store, and ``"auto"`` over several processes, which build dense blocks: dense
            blocks drift like any Woodbury downdate).
            A curvature that needs a likelihood has it resolved once, by :meth:`fit` on the
            training data (``likelihood`` then holds it); requests check it against their
            samples.
        dtype, device: of the inverse (default: the model's).
        ledger: an append-only record of the requests (a :class:`ssse.ledger.Ledger` or a
            file path), or ``None``.
        probe_blocks: blocks probed after a request without a ledger (default
            :data:`ssse.requests.DEFAULT_PROBE_BLOCKS`); ``None``: every block.
        comm: a :class:`ssse.comm.Comm` of several processes serves the requests together
            (every method collective): :meth:`fit` and :meth:`erase` take this rank's share of
            the samples, the inverse is sharded (:mod:`ssse.sharded_erase`); refused there:
            ``ledger``, ``ids``, ``request_id``, ``refine_steps``, checkpoints. Default: one
            process.

    Attributes:
        inv_fisher: the current inverse (of the curvature of the remaining data).
        n: the number of remaining training samples.
        theta: the current flat parameters.
        history: one ``(k, epsilon)`` per request served (``epsilon`` is ``None`` for a Newton
            step).
        erased_ids: the ids erased so far (by requests that gave ids).
        last_request: the record of the last request that gave ids
            (:func:`ssse.ledger.record`; the fingerprints only with a ledger).
        last_certificate: the certificate of the last request (:meth:`erase`'s ``verify``),
            or ``None``.
        last_timings: seconds of the stages of the last request (:data:`ssse.requests.STAGES`
            and ``"total"``; on CUDA after the kernels each stage queued).
    """

    def __init__(self, model: nn.Module, loss_fn, *, damping: float,
                 block_size: int | None = None, layout="per_parameter",
                 weight_decay: float = 0.0, minibatch: int = 1,
                 dtype: torch.dtype | None = None, device=None, chunk_size: int | None = None,
                 max_memory: int | None = None, curvature="empirical",
                 likelihood=None, mc_samples: int = 1,
                 representation: str | None = None, ledger=None, comm=None, params=None,
                 autocast=None, probe_blocks: int | None = DEFAULT_PROBE_BLOCKS):
        self.probe_blocks = check_probe_blocks(probe_blocks)
        _configure(self, model, loss_fn, damping=damping, block_size=block_size,
                   layout=layout, weight_decay=weight_decay, minibatch=minibatch, dtype=dtype,
                   device=device, chunk_size=chunk_size, max_memory=max_memory,
                   curvature=curvature, likelihood=likelihood, mc_samples=mc_samples,
                   params=params, autocast=autocast)
        self.comm = None if one_process(comm) else comm
        if self.comm is not None and ledger is not None:
            raise ValueError("ledger is not offered by an Eraser over several processes: each "
                             "rank would append the requests; keep it on a one-process Eraser")
        if ledger is not None and not isinstance(ledger, Ledger):
            if not isinstance(ledger, (str, os.PathLike)):
                raise TypeError(f"ledger must be a ssse.ledger.Ledger or a file path, got "
                                f"{type(ledger).__name__}")
            ledger = Ledger(ledger)
        self.ledger: Ledger | None = ledger
        # dual blocks remove only rows they store; a mini-batch Fisher's downdate removes the
        # removed samples' group means, which it does not store: dense blocks then
        self.representation = check_choice(
            representation or ("dense" if self.minibatch > 1 else
                              "requests" if self.comm is None else "auto"), "representation",
            ssse_ext.fisher.REPRESENTATIONS)
        self.inv_fisher: ssse_ext.BlockInverseFisher | None = None
        self.n: int | None = None
        self.theta: torch.Tensor | None = None
        self._star: dict | None = None
        self.history: list[tuple[int, float | None]] = []
        self.erased_ids: set = set()
        self.last_request: dict | None = None
        self.last_certificate: dict | None = None
        self.last_timings: dict[str, float] = {}
        self._train_ids = None
        self._inverse_fp: str | None = None

    def fit(self, train_data, *, n_total: int | None = None, ids=None, progress: bool = False,
            checkpoint=None, every: int | None = None) -> "Eraser":
        """Fits :math:`F_D^{-1}` at the model's current parameters (:math:`\\theta^*`).

        Args:
            train_data: :math:`D`, an ``(X, y)`` pair or an iterable of batches.
            n_total: :math:`n`; default the number of samples seen (needed only with
                ``minibatch > 1`` and an iterable, where the fit counts mini-batches).
            ids: the ids of the training samples, one per sample (ints or strings); default
                their positions ``0 .. n-1`` in ``train_data``.
            progress: show a progress bar.
            checkpoint, every: a resumable fit (see :func:`ssse.fit_inverse_fisher`).
        """
        check_data(train_data, "train_data", self._fm.task)
        if ids is not None:
            ids = check_ids(ids)
        likelihood = self.likelihood
        if self.comm is not None:
            if ids is not None:
                raise ValueError("ids is not offered by an Eraser over several processes: "
                                 "sample ids and the ledger are kept by a one-process Eraser")
            resolved, train_data = agreed_likelihood(self.comm, self._fm, self.loss_fn,
                                                     train_data, self._curvature, likelihood,
                                                     "Eraser.fit")
            likelihood = resolved or likelihood
        elif self._curvature.needs_likelihood:
            # resolved once, on the training data: every request then uses (and checks) it
            likelihood, train_data = likelihood_of_data(self._fm, self.loss_fn, train_data,
                                                        likelihood, name="train_data",
                                                        dtype=self.dtype)
        inv = fit_inverse_fisher(self.model, self.loss_fn, train_data, damping=self.damping,
                                 layout=self.layout, weight_decay=self.weight_decay,
                                 minibatch=self.minibatch, dtype=self.dtype, device=self.device,
                                 chunk_size=self.chunk_size, max_memory=self.max_memory,
                                 curvature=self._curvature, likelihood=likelihood,
                                 mc_samples=self.mc_samples,
                                 representation=self.representation, progress=progress,
                                 checkpoint=checkpoint, every=every, comm=self.comm,
                                 params=self._fm.names, autocast=self.autocast)
        if n_total is not None:
            n = check_positive_int(n_total, "n_total")
        elif self.comm is not None:
            n = fit_samples(self.comm, self, inv, train_data)
        elif self.minibatch == 1:
            n = round(inv.normalizer / self._curvature.normalizer_weight(
                mc_samples=self.mc_samples))
        elif is_batch(train_data, self._fm.task):
            n = batch_len(train_data)
        else:
            raise ValueError("n_total must be given with minibatch > 1 and an iterable "
                             "train_data (the fit counts mini-batches, not samples)")
        if ids is not None and len(ids) != n:
            raise ValueError(f"ids must hold one id per training sample ({n}), got {len(ids)}")
        self._train_ids = range(n) if ids is None else set(ids)
        self.erased_ids, self.last_request, self._inverse_fp = set(), None, None
        self.inv_fisher, self.n, self.likelihood = inv, n, likelihood
        self.theta = self._fm.flat(dtype=self.dtype, device=self.device)
        # a copy: param_dict() shares storage with the model, which erase(inplace=True) writes
        self._star = {k: v.clone() for k, v in self._fm.param_dict(self.dtype).items()}
        self.history = []
        return self

    def rows_and_gradient(self, removed) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows whose downdate takes ``removed`` (a list of batches) back out of the
        inverse, and the summed gradient, both at theta* (:func:`ssse.requests.request_rows`:
        one batched pass when it fits the request's memory budget)."""
        return request_rows(self, removed)

    @classmethod
    def restore(cls, model: nn.Module, loss_fn, inv_fisher: ssse_ext.BlockInverseFisher, *,
                n: int, theta_star: torch.Tensor | None = None, train_ids=None, erased=(),
                weight_decay: float = 0.0, minibatch: int = 1, likelihood=None,
                mc_samples: int = 1, ledger=None, comm=None,
                probe_blocks: int | None = None) -> "Eraser":
        r"""An Eraser that carries on from a saved state instead of fitting.

        Args:
            model: holds the current parameters :math:`\theta_t`.
            loss_fn, weight_decay, minibatch, likelihood, mc_samples, ledger, comm: as for the
                constructor; with several processes ``inv_fisher`` is this rank's
                :class:`~ssse.sharding.ShardedInverseFisher` (e.g. from
                :func:`ssse.sharding.load_sharded`) and ``n`` counts all ranks' samples.
            probe_blocks: as for the constructor, but every block by default: an inverse
                carried on from a file is usually written back after each request, which
                probes it in full anyway (:meth:`ssse_ext.BlockInverseFisher.to_state`).
            inv_fisher: the current inverse; its damping, layout, curvature, dtype and device
                are the Eraser's.
            n: the number of training samples left.
            theta_star: the ``(d,)`` flat parameters the inverse was fitted at (default: the
                model's, i.e. no request was served yet).
            train_ids: the training set's ids (anything supporting ``in``; default
                ``range(n + len(erased))``).
            erased: the ids erased before.
        """
        check_module(model)
        selection = getattr(inv_fisher, "params", None)  # the names the inverse records
        fm = FlatModel(model, params=None if selection is None else list(selection))
        from .sharded_erase import check_restored  # it builds on this module

        check_restored(inv_fisher, fm, comm, train_ids, erased)
        n = check_positive_int(n, "n")
        erased = set(check_ids(list(erased), "erased")) if len(erased) else set()
        self = cls(model, loss_fn, damping=inv_fisher.damping, layout=inv_fisher.layout,
                   weight_decay=weight_decay, minibatch=minibatch, dtype=inv_fisher.dtype,
                   device=inv_fisher.device, curvature=inv_fisher.curvature,
                   likelihood=likelihood, mc_samples=mc_samples, ledger=ledger, comm=comm,
                   params=None if selection is None else fm.names, probe_blocks=probe_blocks)
        if theta_star is None:
            star = fm.flat(dtype=self.dtype)
        elif not isinstance(theta_star, torch.Tensor) or tuple(theta_star.shape) != (fm.dim,) \
                or not theta_star.is_floating_point() or not bool(torch.isfinite(theta_star).all()):
            raise ValueError(f"theta_star must be a finite ({fm.dim},) float tensor")
        else:
            star = theta_star.to(dtype=self.dtype, device=fm.device)
        self._star = {k: v.clone() for k, v in fm.unflatten(star).items()}
        self.inv_fisher, self.n = inv_fisher, n
        self.theta = fm.flat(dtype=self.dtype, device=self.device)
        self._train_ids = range(n + len(erased)) if train_ids is None else train_ids
        self.erased_ids = erased
        return self

    def erase(self, removed, *, ids=None, request_id: str | None = None,
              epsilon: float | None = None, fisher: str = "full", refine_steps: int = 0,
              inplace: bool = False, verify=None,
              retrain_above: float | None = None) -> dict[str, torch.Tensor]:
        r"""Serves one deletion request (see the class docstring).

        Args:
            removed: :math:`S_t`, samples of the remaining training set.
            ids: the ids of the samples of ``removed``, in order (ints or strings): refused
                (``ValueError``, nothing changed) when one was never trained on or was erased
                before. Required with a ledger.
            request_id: the request's id (default: a random one); refused when the ledger
                already holds it.
            epsilon: :math:`\varepsilon > 0` of SSSE; ``None`` (only with
                ``curvature="ggn"``): the leave-k-out Newton step, nothing to tune.
            fisher: for SSSE, ``"full"`` (the Fisher of the data before this request, as in
                eq. 8) or ``"leave_k_out"`` (without :math:`S_t`); the Newton step always
                uses the leave-k-out curvature.
            refine_steps: Newton refinement steps after the first (Newton step only).
            inplace: also write the new parameters into the model.
            verify: the data the model keeps (the training set without every erased sample,
                this request's included): the request's certificate, the gradient residual
                of the retained objective at the new parameters (one pass over ``verify``,
                :func:`ssse.certificate.certify`), goes into :attr:`last_certificate` and the
                request's ledger line (``"certificate"``).
            retrain_above: with ``verify``, the residual above which the certificate
                recommends retraining.

        Returns:
            A new ``state_dict``. On any error (e.g. :class:`ssse_ext.NotPositiveDefiniteError`
            when ``removed`` was never part of the training set) nothing is changed.
        """
        if self.comm is not None:
            from .sharded_erase import erase_sharded  # it builds on this module

            return erase_sharded(self, self.comm, dict(locals()))
        if self.inv_fisher is None:
            raise RuntimeError("call fit(train_data) before erase()")
        check_data(removed, "removed", self._fm.task)
        check_choice(fisher, "fisher", FISHER_VARIANTS)
        refine_steps = check_nonneg_int(refine_steps, "refine_steps")
        if epsilon is None and not self._curvature.supports_newton:
            raise ValueError(f"epsilon must be given unless the Eraser was made with "
                             f"{options_with('supports_newton')} (the Newton step needs the "
                             f"Gauss-Newton inverse), got curvature={self.curvature!r}")
        if epsilon is not None:
            epsilon = check_positive_float(epsilon, "epsilon")
        verify = check_verify(verify, retrain_above, self._fm.task)
        batches = list(iter_batches(removed, "removed", device=self._fm.device,
                                    task=self._fm.task))
        k = sum(batch_len(y) for _, y in batches)
        if k == 0:
            raise ValueError("removed is empty: nothing to erase")
        if k >= self.n:
            raise ValueError(f"removed has {k} samples, but only {self.n} remain")
        if self.ledger is None:
            return self._erase(batches, k, ids, request_id, epsilon, fisher, refine_steps,
                               inplace, verify)
        # check and append under one lock: another process may serve the same ledger
        with self.ledger.lock():
            return self._erase(batches, k, ids, request_id, epsilon, fisher, refine_steps,
                               inplace, verify)

    def _erase(self, batches, k, ids, request_id, epsilon, fisher, refine_steps, inplace,
               verify):
        ids, request_id = request_ids(ids, k, request_id, train_ids=self._train_ids,
                                      erased=self.erased_ids, ledger=self.ledger)
        keep, timer = self.ledger is not None, StageTimer(self.device)
        if keep:
            before = self.inv_fisher.health(warn=False)
            if before is not None and not before.ok:
                raise ssse_ext.HealthError(
                    f"inv_fisher fails its health probe before request {request_id!r} "
                    f"({before}): nothing was changed; refit the inverse")
            timer.lap("ledger")
        rows, v = self.rows_and_gradient(batches)
        timer.lap("rows")
        # No copy of the inverse: the step and the downdate's check of every block come first
        # (one pass over the blocks for eq. 8), the writes last, so an error at either point
        # leaves everything unchanged. Extra memory: O(k d).
        change = None
        if epsilon is None:
            step = newton_refined(self._fm, self.loss_fn, batches, self.inv_fisher, n=self.n,
                                  weight_decay=self.weight_decay, likelihood=self.likelihood,
                                  steps=refine_steps, tol=1e-10, star=self._star,
                                  first=(rows, v), max_memory=request_budget(
                                      self.inv_fisher.nbytes, self._fm.device,
                                      self.max_memory))
        else:
            change = self.inv_fisher.checked_change(rows, apply=v,
                                                    changed=fisher == "leave_k_out")
            step = epsilon / (self.n - k) * change.applied
        theta = (self.theta.to(torch.float64) + step).to(self.dtype)
        if not bool(torch.isfinite(theta).all()):
            raise FloatingPointError("the erasure produced NaN or Inf; nothing was changed")
        timer.add({} if change is None else {"check": change.check_seconds}, rest="apply")
        # the certificate depends on the new parameters only: taken before anything changes
        certificate = None if verify is None else certify_flat(
            self._fm, self.loss_fn, verify[0], theta, weight_decay=self.weight_decay,
            retrain_above=verify[1])
        timer.lap("verify")
        model_before = None
        if keep:
            model_before = fingerprint(self._fm.state_dict_with(self.theta))
            if self._inverse_fp is None:
                self._inverse_fp = fingerprint(self.inv_fisher.to_state()[0])
            timer.lap("ledger")
        if change is None:
            change = self.inv_fisher.checked_change(rows)
            timer.lap("check")
        seconds: dict = {}
        change.commit(timings=seconds)
        timer.add(seconds, rest="apply")
        old_theta, old_n = self.theta, self.n
        state = finish_update(self._fm, theta, inplace=inplace, what="the erasure")
        self.theta, self.n = theta, self.n - k
        timer.lap("apply")
        # a ledger line says the request was served by a sound inverse: probed in full there
        health = self.inv_fisher.health(what=f"request {request_id or len(self.history) + 1}",
                                        warn=not keep, blocks=None if keep else self.probe_blocks)
        timer.lap("probe")
        if keep and health is not None and not health.ok:
            # never record a request served by an inverse that fails its probe
            self._undo(rows, old_theta, old_n, inplace)
            raise ssse_ext.HealthError(
                f"inv_fisher fails its health probe after request {request_id!r} ({health}): "
                "the request was undone and not recorded; refit the inverse")
        self.last_certificate = certificate
        if ids is not None:
            record_request(self, ids, request_id, epsilon, fisher, refine_steps, old_n, health,
                           rows, (old_theta, state, model_before), inplace, certificate)
        self.history.append((k, epsilon))
        timer.lap("ledger" if keep else "apply")
        self.last_timings = timer.result()
        return state

    def finish_request(self, theta: torch.Tensor, k: int, epsilon: float | None,
                       inplace: bool) -> dict[str, torch.Tensor]:
        """Takes the new parameters of a request of ``k`` samples that changed the inverse."""
        state = finish_update(self._fm, theta, inplace=inplace, what="the erasure")
        self.theta, self.n = theta, self.n - k
        self.history.append((k, epsilon))
        return state

    def _undo(self, rows: torch.Tensor, theta: torch.Tensor, n: int, inplace: bool) -> None:
        """Reverts a request whose record could not be written."""
        self.inv_fisher.update(rows)
        self.theta, self.n = theta, n
        if inplace:
            self._fm.write(theta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` with the current parameters."""
        if self.theta is None:
            raise RuntimeError("call fit(train_data) first")
        return self._fm.state_dict_with(self.theta)

    def __repr__(self) -> str:
        return (f"Eraser(n={self.n}, requests={len(self.history)}, layout={self.layout}, "
                f"damping={self.damping:g}, curvature={self.curvature!r}, "
                f"minibatch={self.minibatch})")
