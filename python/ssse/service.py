r"""The ledger-served erase: a deletion request applied in place to a model file and its
inverse-Fisher file, and recorded in a ledger (:mod:`ssse.ledger`).

:func:`serve_request` is what ``ssse erase --ledger`` runs; :func:`check_ledger` and
:func:`recover_ledger` are ``ssse ledger check`` and ``ssse ledger recover``. Each holds the locks
of the ledger, of the model file and of the inverse file, in that order, for its whole duration
(one request at a time, and one ledger per model), and settles what a crash left
(:func:`ssse.ledger.recover`) before anything else.

A request is refused, with nothing changed, unless

- the files are the ones the ledger's last line left (their headers record its digest, their
  tensors are its fingerprints: :func:`ssse.ledger.check_served`);
- the inverse belongs to the model: it was fitted at the parameters :math:`\theta^*` the model
  descends from (:func:`check_origin`);
- the inverse passes its health probe, before the request's downdate and after it
  (:func:`check_health`);
- no sample is erased twice and no request id is served twice.

Refusals are ``ValueError``\ s: :class:`ServiceError` for this protocol's own,
:class:`ssse.ledger.LedgerError` for the ledger, :class:`ssse.io.FileFormatError` for a file;
a missing file is a ``FileNotFoundError`` and a file in use a
:class:`ssse.ledger.LedgerBusyError`. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

import ssse_ext
from ssse_ext.validation import check_device, check_positive_float

from .certificate import certify
from .curvature import CURVATURES
from .data import Dataset
from .erasure import Eraser
from .files import (InputNames, check_file, check_fitted_on, fitted_at, load_inverse_file,
                    load_model_file, load_training_set)
from .io import (fingerprint, load_inverse_fisher, load_model, save_inverse_fisher, save_model,
                 uninterrupted)
from . import ledger as ledger_module
from .ledger import (Ledger, LedgerError, LedgerState, check_ids, check_served, entry_digest,
                     lock_file, pending_path, recover)
from .models import LOSS_LIKELIHOODS, loss_function

__all__ = ["NOT_INHERITED", "LedgerReport", "ServedFile", "ServedRequest", "ServiceError",
           "check_health", "check_indices", "check_ledger", "check_origin", "erased_header",
           "newton_refusal", "recover_ledger", "serve_request"]

#: Model-file header fields that an erased model does not inherit from the model it came from.
NOT_INHERITED = ("spec", "dtype", "fingerprint", "ledger_request", "ledger_entry")


class ServiceError(ValueError):
    """A request, or a check of a ledger, refused: what it was given does not allow it (the
    message says why and what to do); nothing was changed."""


@dataclasses.dataclass(frozen=True)
class ServedRequest:
    """What :func:`serve_request` did.

    Attributes:
        request_id: the request's id in the ledger.
        ids: the training-set indices erased, sorted.
        entry: the ledger line that records the request.
        seconds: the time of the erasure itself (not of loading or writing the files).
        recovered: what the recovery before the request did, one line per action.
        model_path, fisher_path: the files replaced (symbolic links resolved).
    """

    request_id: str
    ids: list
    entry: dict
    seconds: float
    recovered: list
    model_path: Path
    fisher_path: Path

    @property
    def n_before(self) -> int:
        return self.entry["n_before"]

    @property
    def n_after(self) -> int:
        return self.entry["n_after"]

    @property
    def health(self) -> dict | None:
        """The inverse's health probe after the request (``None``: not probed)."""
        return self.entry.get("health")


@dataclasses.dataclass(frozen=True)
class ServedFile:
    """A file a ledger serves: its path (symbolic links resolved) and the fingerprint of its
    tensors."""

    path: Path
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class LedgerReport:
    """What :func:`check_ledger` or :func:`recover_ledger` found.

    Attributes:
        state: the verified ledger.
        files: ``"model"`` and ``"inverse"``, those that were given.
        health: the inverse's health probe (``None``: no inverse given).
        recovered: :func:`recover_ledger`'s actions, one line each (``None`` for a check).
    """

    state: LedgerState
    files: dict
    health: ssse_ext.Health | None = None
    recovered: list | None = None


@dataclasses.dataclass
class _Opened:
    """A request's inputs, loaded and checked against the ledger."""

    model: nn.Module
    meta: dict
    inv: ssse_ext.BlockInverseFisher
    fisher_meta: dict
    state: LedgerState
    ds: Dataset
    model_fp: str
    inverse_fp: str

    @property
    def erased(self) -> list[int]:
        return [int(i) for i in self.meta.get("erased", [])]


# ---- the protocol's checks ------------------------------------------------------------------

def check_origin(model: nn.Module, meta: dict, star: torch.Tensor | None,
                 first: dict | None = None, *, names: InputNames = InputNames()) -> str | None:
    """Refuses (:class:`ServiceError`) an inverse fitted at other parameters ``star`` than the
    ones ``model`` (with header ``meta``) descends from; returns their fingerprint, which the
    erased model records as its ``origin`` (``None``: the inverse does not record them, and
    nothing can be checked).

    The invariant: an inverse is the curvature at the parameters θ* it was fitted at (its
    ``theta_star``), and every request served with it takes its gradients there, so it belongs
    to the models that descend from θ*: θ* itself (no request served yet), or a model moved
    from θ* by requests, each of which records θ*'s fingerprint in the model's header. A model
    erased before that header field existed descends from θ* when ``first`` (its ledger's
    first line) started from θ*."""
    if star is None:
        return meta.get("origin")
    star = star.detach().to("cpu")
    origin = fingerprint({"theta_star": star})
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    ok = meta.get("origin") == origin
    if not ok and star.numel() == sum(p.numel() for _, p in params):
        flat = torch.cat([p.detach().reshape(-1) for _, p in params]).to("cpu", star.dtype)
        ok = torch.equal(flat, star)
        if not ok and first is not None and meta.get("origin") is None:
            state, at = dict(model.state_dict()), 0
            for name, p in params:
                state[name] = star[at:at + p.numel()].view_as(p).to(p.dtype)
                at += p.numel()
            ok = fingerprint(state) == first.get("model_before")
    if not ok:
        raise ServiceError(f"{names.fisher} was fitted at other parameters than the ones "
                           f"{names.model} descends from (its recorded theta_star): it is the "
                           "inverse of another model, or of this one before it was trained "
                           "again; fit one for this model with ssse fisher; nothing was changed")
    return origin


def check_health(health, when: str = "", *, outcome: str = "; nothing was changed",
                 names: InputNames = InputNames()) -> None:
    """Refuses (:class:`ServiceError`) an inverse whose health probe ``health`` (a
    :class:`ssse_ext.Health` or its ``as_dict()``; ``None``: not probed) fails: a request
    computed with it would be recorded as done while the model barely moves, or moves the wrong
    way. ``when`` and ``outcome`` complete the message."""
    if health is None:
        return
    if not isinstance(health, dict):
        health = health.as_dict()
    residual, tolerance = health["residual"], health["tolerance"]
    if residual <= tolerance:
        return
    raise ServiceError(f"{names.fisher}: the inverse fails its health probe{when}: residual "
                       f"{residual:.1e} > threshold {tolerance:.1e} (block "
                       f"{health.get('block')}), so it is not the inverse of its Fisher (damaged, "
                       f"or too ill-conditioned); refit it with ssse fisher{outcome}")


def erased_header(meta: dict, erased: Sequence[int], *, epsilon: float | None, variant: str,
                  origin: str | None, **extra) -> dict:
    """The header of a model erased from one with header ``meta``: what it inherits, the
    indices erased so far, how, the fingerprint of the parameters it descends from, and
    ``extra``."""
    return {**{k: v for k, v in meta.items() if k not in NOT_INHERITED},
            "erased": sorted(erased), "epsilon": epsilon, "variant": variant,
            **({"origin": origin} if origin else {}), **extra}


# ---- locks and the ledger's verdict ---------------------------------------------------------

@contextlib.contextmanager
def _locked(ledger: Ledger, model_path, fisher_path, names: InputNames
            ) -> Iterator[dict[str, Path]]:
    """Holds the locks of the ledger, the model and the inverse, in that order; yields the files
    given (``"model"``, ``"inverse"``) with symbolic links resolved, so that every path to a
    file takes the same lock."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(ledger.lock())
        files = {}
        for what, path, name in (("model", model_path, names.model),
                                 ("inverse", fisher_path, names.fisher)):
            if path is not None:
                files[what] = stack.enter_context(lock_file(check_file(path, name),
                                                            f"the {what}"))
        yield files


def _recover(ledger: Ledger, files: dict, on_recover) -> list[str]:
    done = recover(ledger, files)
    if on_recover is not None:
        for line in done:
            on_recover(line)
    return done


def _verified(ledger: Ledger, files: dict, *, outcome: str = "; nothing was changed"
              ) -> LedgerState:
    """The ledger's verified state, after checking that every ``files[what] = (path, header,
    fingerprint)`` is what its last request left."""
    try:
        state = ledger.verify()
        for what, (path, meta, fp) in files.items():
            check_served(state, what, path, meta, fp)
    except LedgerError as exc:
        raise LedgerError(f"{exc}{outcome}") from None
    return state


# ---- serving a request ----------------------------------------------------------------------

def serve_request(model_path: str | os.PathLike, fisher_path: str | os.PathLike,
                  ledger_path: str | os.PathLike,
                  indices: Sequence[int] | Callable[[Dataset], Sequence[int]], *,
                  epsilon: float | None = None, request_id: str | None = None,
                  variant: str = "full", refine_steps: int = 0, data: dict | None = None,
                  device=None, dtype: torch.dtype | None = None,
                  on_recover: Callable[[str], None] | None = None,
                  names: InputNames = InputNames(), verify: bool = False,
                  retrain_above: float | None = None) -> ServedRequest:
    r"""Erases training samples from a served model in place: ``model_path`` and
    ``fisher_path`` are replaced by the erased model and the downdated inverse, and the request
    is appended to the ledger ``ledger_path`` (created by the first request), by the crash rule
    of :mod:`ssse.ledger`.

    Args:
        model_path: an ssse model file (``ssse train``, or a previous request's result).
        fisher_path: its inverse Fisher (``ssse fisher``).
        ledger_path: the JSON-lines ledger.
        indices: training-set indices to erase, or a function of the training set (a
            :class:`ssse.data.Dataset`) that chooses them, called once it is loaded.
        epsilon: :math:`\varepsilon > 0` of SSSE (paper eq. 8); ``None`` with a Gauss–Newton
            inverse: the leave-k-out Newton step.
        request_id: the request's id in the ledger (default: a random one); an id the ledger
            holds is refused.
        variant, refine_steps: as for :meth:`ssse.Eraser.erase` (``fisher=variant``).
        data: overrides of the data set the model file records (``name``, ``data_dir``,
            ``train_limit``).
        device, dtype: where and in which dtype to compute (default: CPU, the file's dtype).
        on_recover: called with each line of what the recovery before the request did, as it
            is done (the request may still be refused after it).
        names: how messages name the inputs.
        verify: record the request's certificate in its ledger line (``"certificate"``,
            :func:`ssse.certificate.certify`): the gradient residual of the retained objective
            at the erased model, one pass over the samples kept.
        retrain_above: with ``verify``, the residual above which the line says
            ``"retrain_recommended": true``.

    Returns:
        A :class:`ServedRequest`.

    Raises:
        ServiceError: the request is refused (ids erased before or out of range, a request id
            the ledger holds, an inverse that does not belong to the model or fails its health
            probe, ...); nothing was changed.
        ssse.ledger.LedgerError: the ledger is broken, or the files are not the ones its last
            line left.
        ssse.ledger.LedgerBusyError: another process serves the ledger or the files.
    """
    if request_id is not None and not isinstance(request_id, str):
        raise TypeError(f"request_id must be a string, got {type(request_id).__name__}")
    if request_id is not None and not request_id.strip():
        raise ValueError(f"request_id must not be blank, got {request_id!r}")
    device = check_device(device, "device") or torch.device("cpu")
    if retrain_above is not None and not verify:
        raise ValueError("retrain_above needs verify=True: the residual it bounds is computed "
                         "only then")
    if retrain_above is not None:
        check_positive_float(retrain_above, "retrain_above")
    ledger = Ledger(ledger_path)
    with _locked(ledger, model_path, fisher_path, names) as files:
        recovered = _recover(ledger, files, on_recover)
        opened = _open(model_path, fisher_path, ledger, files, data=data, device=device,
                       dtype=dtype, names=names)
        request_id = request_id or uuid.uuid4().hex
        ids = _admit(opened, ledger, request_id, indices, epsilon, names)
        star = _fitted_at(opened, files["inverse"], names)
        origin = check_origin(opened.model, opened.meta, star,
                              opened.state.entries[0] if opened.state.entries else None,
                              names=names)
        check_health(opened.inv.health(warn=False), names=names)
        eraser = _restore(opened, star)
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # a failed probe is refused below, with its reason
            warnings.simplefilter("ignore", ssse_ext.HealthWarning)
            new_state = eraser.erase(_samples(opened, ids, device), ids=ids,
                                     request_id=request_id, epsilon=epsilon, fisher=variant,
                                     refine_steps=refine_steps)
        seconds = time.perf_counter() - t0
        check_health(eraser.last_request["health"], " after this request's downdate",
                     names=names)
        certificate = {"retrain_above": retrain_above} if verify else None
        entry = _commit(ledger, opened, eraser, new_state, files, ids, star=star, origin=origin,
                        epsilon=epsilon, variant=variant, certificate=certificate)
    return ServedRequest(request_id, ids, entry, seconds, recovered, files["model"],
                         files["inverse"])


def _open(model_path, fisher_path, ledger: Ledger, files: dict, *, data, device, dtype,
          names: InputNames) -> _Opened:
    """Loads the model, the inverse and the training set, and checks the files against the
    ledger's last line."""
    model, meta = load_model_file(model_path, device=device, dtype=dtype, names=names)
    inv, fisher_meta = load_inverse_file(fisher_path, model, device=device, names=names)
    model_fp, inverse_fp = fingerprint(model.state_dict()), fingerprint(inv.to_state()[0])
    state = _verified(ledger, {"model": (files["model"], meta, model_fp),
                               "inverse": (files["inverse"], fisher_meta, inverse_fp)})
    ds = load_training_set(model, meta, data, device=device, names=names)
    check_fitted_on(fisher_meta, ds.n_train, names)
    opened = _Opened(model, meta, inv, fisher_meta, state, ds, model_fp, inverse_fp)
    if opened.erased and "n_remaining" not in fisher_meta:
        raise ServiceError(f"{names.model} already had samples erased without a ledger, and "
                           f"{names.fisher} is the inverse of the whole training set: start a "
                           "ledger from the trained model and its inverse")
    return opened


def _admit(opened: _Opened, ledger: Ledger, request_id: str, indices, epsilon,
           names: InputNames) -> list[int]:
    """The request's indices, sorted, once the ledger and the model's header allow them."""
    try:  # a retried request is told so first, before its samples are found erased
        ledger.check(request_id, [])
        ids = _indices(indices, opened.ds, opened.erased)
        ledger.check(request_id, ids)
    except ServiceError:
        raise
    except ValueError as exc:
        raise ServiceError(str(exc)) from None
    refusal = None if epsilon is not None else newton_refusal(opened.inv.curvature, names)
    if refusal:
        raise ServiceError(refusal)
    return ids


def newton_refusal(curvature: str, names: InputNames = InputNames()) -> str | None:
    """Why an erasure without ε cannot take the Newton step on an inverse of ``curvature``
    (one line), or ``None`` when the curvature serves it."""
    newton = CURVATURES.where("supports_newton")
    if curvature in newton:
        return None
    return (f"{names.epsilon} is needed unless {names.fisher} holds a Gauss-Newton matrix "
            f"(ssse fisher --curvature {' or '.join(newton) or '(none registered)'}); it "
            f"holds {curvature}")


def _indices(indices, ds: Dataset, erased: list[int]) -> list[int]:
    return check_indices(indices(ds) if callable(indices) else indices, ds.n_train, erased)


def check_indices(indices: Sequence[int], n: int, erased: Sequence[int] = ()) -> list[int]:
    """``indices`` of a training set of ``n`` samples, sorted; refused (:class:`ServiceError`)
    when one is out of ``[0, n)`` or among ``erased``, or when they would leave no sample."""
    ids = check_ids(indices, "indices")
    if not all(isinstance(i, int) for i in ids):
        raise TypeError("indices must be training-set indices (integers)")
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise ServiceError(f"indices out of range [0, {n}): {bad[:5]}")
    again = sorted(set(ids) & set(erased))
    if again:
        raise ServiceError(f"{len(again)} of these samples were already erased from this model "
                           f"(e.g. {again[:5]}); choose others")
    if len(ids) + len(erased) >= n:
        raise ServiceError("cannot erase the whole training set")
    return sorted(ids)


def _fitted_at(opened: _Opened, fisher_path: Path, names: InputNames) -> torch.Tensor:
    star = fitted_at(fisher_path)
    if star is not None:
        return star
    if opened.erased:
        raise ServiceError(f"{names.fisher} does not record the parameters it was fitted at "
                           "(fit it again with ssse fisher)")
    return torch.cat([p.detach().reshape(-1) for p in opened.model.parameters()
                      if p.requires_grad])


def _restore(opened: _Opened, star: torch.Tensor) -> Eraser:
    """The Eraser that carries on from the served files."""
    meta, fmeta, n = opened.meta, opened.fisher_meta, opened.ds.n_train
    loss = meta.get("loss", "cross_entropy")
    return Eraser.restore(
        opened.model, loss_function(loss), opened.inv,
        n=int(fmeta.get("n_remaining", n - len(opened.erased))), theta_star=star,
        train_ids=range(n), erased=opened.erased,
        weight_decay=float(meta.get("weight_decay", 0.0)),
        minibatch=int(fmeta.get("minibatch", 1)), likelihood=LOSS_LIKELIHOODS[loss],
        mc_samples=int(fmeta.get("mc_samples", 1)))


def _samples(opened: _Opened, ids: list[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = opened.ds.train()
    idx = torch.tensor(ids, dtype=torch.int64)
    dtype = next(opened.model.parameters()).dtype
    # one batch in a list: the library then never re-slices it
    return [(x[idx].to(device, dtype), y[idx].to(device))]


def _commit(ledger: Ledger, opened: _Opened, eraser: Eraser, new_state: dict, files: dict,
            ids: list[int], *, star: torch.Tensor, origin: str | None, epsilon,
            variant: str, certificate: dict | None = None) -> dict:
    """Writes the erased model and the downdated inverse and appends the request's line, by the
    crash rule; returns the line. With ``certificate`` (``{"retrain_above": ...}``), the line
    holds the erased model's certificate on the samples it keeps."""
    model = opened.model
    model.load_state_dict(new_state)
    extra = {}
    if certificate is not None:
        gone = torch.zeros(opened.ds.n_train, dtype=torch.bool)
        gone[torch.tensor(sorted(set(opened.erased) | set(ids)), dtype=torch.int64)] = True
        x, y = opened.ds.train()
        kept = [(x[~gone].to(eraser.device), y[~gone].to(eraser.device))]
        extra["certificate"] = certify(model, eraser.loss_fn, kept,
                                       weight_decay=eraser.weight_decay,
                                       retrain_above=certificate["retrain_above"])
    entry = ledger.seal({**eraser.last_request, **extra, "model_before": opened.model_fp,
                         "model_after": fingerprint(model.state_dict()),
                         "inverse_before": opened.inverse_fp,
                         "inverse_after": fingerprint(eraser.inv_fisher.to_state()[0])})
    served = {"ledger_request": entry["request"], "ledger_entry": entry_digest(entry)}
    model_meta = erased_header(opened.meta, set(opened.erased) | set(ids),
                               epsilon=epsilon, variant=variant, origin=origin, **served,
                               fingerprint=entry["model_after"])
    fisher_meta = {**{k: v for k, v in opened.fisher_meta.items()
                      if k not in ("state", "fingerprint", "ledger_request", "ledger_entry")},
                   "n_remaining": eraser.n, **served, "fingerprint": entry["inverse_after"]}
    with uninterrupted():
        ledger_module.commit(ledger, entry, {
            "inverse": (files["inverse"], lambda p: save_inverse_fisher(
                p, eraser.inv_fisher, extra={"theta_star": star}, **fisher_meta)),
            "model": (files["model"], lambda p: save_model(
                p, model, spec=opened.meta["spec"], **model_meta))})
    return entry


# ---- checking and recovering a ledger -------------------------------------------------------

def check_ledger(ledger_path: str | os.PathLike, model_path: str | os.PathLike | None = None,
                 fisher_path: str | os.PathLike | None = None, *,
                 names: InputNames = InputNames()) -> LedgerReport:
    """Verifies a ledger's chain and, when given, that the model and the inverse it serves are
    the ones its last request left and that the inverse passes its health probe.

    Raises:
        FileNotFoundError: no ledger at ``ledger_path``, or a file given that does not exist.
        ServiceError: a request interrupted by a crash awaits recovery
            (:func:`recover_ledger`), or the inverse fails its health probe.
        ssse.ledger.LedgerError: the chain is broken, or a file is not what the ledger left.
    """
    ledger = Ledger(ledger_path)
    check_file(ledger.path, names.ledger)
    with _locked(ledger, model_path, fisher_path, names) as files:
        torn = ledger.verify().torn
        waiting = [str(pending_path(p)) for p in files.values() if pending_path(p).exists()]
        if torn or waiting:
            what = f"pending file {waiting[0]}" if waiting else "a torn last line"
            raise ServiceError(f"a request interrupted by a crash awaits recovery ({what}): "
                               f"run ssse ledger recover --ledger {ledger_path} --model M "
                               "--fisher F")
        return _report(ledger, files, names)


def recover_ledger(ledger_path: str | os.PathLike, model_path: str | os.PathLike,
                   fisher_path: str | os.PathLike, *,
                   on_recover: Callable[[str], None] | None = None,
                   names: InputNames = InputNames()) -> LedgerReport:
    """Settles a request interrupted by a crash (completes it when the ledger records it, rolls
    it back otherwise), then checks as :func:`check_ledger`. The report's ``recovered`` says
    what was done (empty: nothing to recover); ``on_recover`` is called with each of its lines
    as it is done (the check after it may still fail)."""
    ledger = Ledger(ledger_path)
    with _locked(ledger, model_path, fisher_path, names) as files:
        done = _recover(ledger, files, on_recover)
        return dataclasses.replace(_report(ledger, files, names), recovered=done)


def _report(ledger: Ledger, files: dict, names: InputNames) -> LedgerReport:
    loaded, inv = {}, None
    if "model" in files:
        model, meta = load_model(files["model"])
        loaded["model"] = (files["model"], meta, fingerprint(model.state_dict()))
    if "inverse" in files:
        inv, fisher_meta = load_inverse_fisher(files["inverse"])
        loaded["inverse"] = (files["inverse"], fisher_meta, fingerprint(inv.to_state()[0]))
    state = _verified(ledger, loaded, outcome="")
    health = None
    if inv is not None:
        health = inv.health(warn=False)
        check_health(health, outcome="", names=names)
    return LedgerReport(state, {what: ServedFile(path, fp) for what, (path, _, fp)
                                in loaded.items()}, health)
