"""What one deletion request served by :class:`ssse.Eraser` is made of: its rows and summed
gradient at :math:`\\theta^*`, the health probe after it (how many blocks), and the seconds of
each of its stages.

A request on a dense inverse costs one batched pass over its samples for the rows (more when
they do not fit the request's memory budget, :func:`ssse.budget.request_budget`), one pass
over the inverse for the step, and two for the downdate (the check of every block, then the
write); a full health probe would add three more, so a request probes only a few blocks
(:data:`DEFAULT_PROBE_BLOCKS`) and the inverse is probed in full before it is written
(:meth:`ssse_ext.BlockInverseFisher.to_state`).
"""

from __future__ import annotations

import uuid

import torch

from ssse_ext.health import device_clock
from ssse_ext.validation import check_positive_float, check_positive_int

from .batches import check_data
from .budget import request_budget
from .gradients import gradient_sum
from .io import fingerprint
from .ledger import check_ids, record
from .newton import rows_of

__all__ = ["DEFAULT_PROBE_BLOCKS", "STAGES", "StageTimer", "check_probe_blocks", "check_verify",
           "group_means", "record_request", "request_ids", "request_rows"]

#: Blocks the health probe checks after a request that is not recorded in a ledger: about 1 %
#: of a ResNet's blocks of 256, a cost of about 1 % of a full probe there.
DEFAULT_PROBE_BLOCKS = 32
#: The stages of a request, in :attr:`ssse.Eraser.last_timings`: the rows and summed gradient,
#: the step (the Newton step; for eq. 8 the update of the parameters only, its product with the
#: inverse being read in the check's pass), the check of every block, the write, the probe; with a
#: ledger, ``"ledger"`` (the probe before the request, the fingerprints and the record); with
#: ``verify=``, ``"verify"`` (the certificate's pass over the retained data).
STAGES = ("rows", "apply", "check", "write", "probe", "ledger", "verify")


def check_probe_blocks(value) -> int | None:
    """``probe_blocks`` of an :class:`~ssse.Eraser`: a positive int, or ``None`` (every
    block)."""
    return check_positive_int(value, "probe_blocks", allow_none=True)


def check_verify(verify, retrain_above, task) -> tuple | None:
    """``(retained data, retrain_above)`` of a request's ``verify=`` and ``retrain_above=``
    (:meth:`ssse.Eraser.erase`), or ``None`` without ``verify``."""
    if verify is None:
        if retrain_above is not None:
            raise ValueError("retrain_above needs verify=<the retained data>: the residual it "
                             "bounds is computed on them")
        return None
    if isinstance(verify, bool):
        raise TypeError("verify must be the data the model keeps (the training set without "
                        "every erased sample, this request's included), got a bool")
    check_data(verify, "verify", task)
    if retrain_above is not None:
        retrain_above = check_positive_float(retrain_above, "retrain_above")
    return verify, retrain_above


def record_request(eraser, ids, request_id, epsilon, fisher, refine_steps, old_n, health, rows,
                   models, inplace, certificate) -> None:
    """Records a served request of ``eraser`` that gave ids in :attr:`~ssse.Eraser.last_request`
    (and appends it to the ledger, or undoes the request when the ledger cannot be written)."""
    old_theta, state, model_before = models
    entry = record(request_id, ids, method="newton" if epsilon is None else "ssse",
                   epsilon=epsilon, fisher=None if epsilon is None else fisher,
                   curvature=eraser.curvature, refine_steps=refine_steps,
                   n_before=old_n, n_after=eraser.n,
                   health=None if health is None else health.as_dict())
    if certificate is not None:
        entry["certificate"] = certificate
    if eraser.ledger is not None:
        inverse_after = fingerprint(eraser.inv_fisher.to_state()[0])
        entry.update(model_before=model_before, model_after=fingerprint(state),
                     inverse_before=eraser._inverse_fp, inverse_after=inverse_after)
        try:
            eraser.ledger.append(entry)
        except OSError as exc:
            eraser._undo(rows, old_theta, old_n, inplace)
            raise OSError(f"the ledger {eraser.ledger.path} could not be written ({exc}); "
                          "the request was undone (the inverse updated back with its "
                          "rows, equal up to rounding)") from exc
        eraser._inverse_fp = inverse_after
    eraser.erased_ids.update(ids)
    eraser.last_request = entry


def group_means(rows: torch.Tensor, b: int) -> torch.Tensor:
    """Mean of consecutive groups of ``b`` rows (a last, smaller group gives its own mean)."""
    if b == 1:
        return rows
    return torch.stack([rows[i:i + b].mean(0) for i in range(0, rows.shape[0], b)])


def request_ids(ids, k: int, request_id, *, train_ids, erased, ledger
                ) -> tuple[list | None, str | None]:
    """A request's sample ids and request id (a random one when not given), checked before
    anything changes against the training set's ids ``train_ids``, the ids ``erased`` before
    and the ``ledger`` (or ``None``: then ids are optional)."""
    if ids is None:
        if ledger is not None:
            raise ValueError("ids must be given: the Eraser records its requests in a "
                             "ledger, by sample id")
        if request_id is not None:
            raise ValueError("request_id needs ids")
        return None, None
    ids = check_ids(ids)
    if len(ids) != k:
        raise ValueError(f"ids must hold one id per removed sample ({k}), got {len(ids)}")
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not isinstance(request_id, str) or not request_id.strip():
        raise TypeError(f"request_id must be a non-empty string, got {request_id!r}")
    strangers = [i for i in ids if i not in train_ids]
    if strangers:
        raise ValueError(f"{len(strangers)} of the ids were never part of the training set "
                         f"(e.g. {strangers[:5]}): refused, nothing was changed")
    again = sorted(set(ids) & erased)
    if again:
        raise ValueError(f"{len(again)} of the ids were already erased (e.g. {again[:5]}): "
                         "refused, nothing was changed")
    if ledger is not None:
        ledger.check(request_id, ids)
    return ids, request_id


def request_rows(eraser, removed) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows whose downdate takes ``removed`` (a list of batches) back out of the inverse
    of ``eraser`` (an :class:`~ssse.Eraser`), and the summed gradient, both at
    :math:`\\theta^*`, on the inverse's device. The rows come from one batched pass over the
    samples when it fits the request's memory budget (``max_memory`` of the Eraser, else
    :func:`~ssse.budget.request_budget`), else from chunks of that size; the gradient is their
    sum when the rows are the gradients, else one more pass."""
    fm = eraser._fm
    budget = request_budget(eraser.inv_fisher.nbytes, fm.device, eraser.max_memory)
    source, scale = eraser._curvature.for_removal(mc_samples=eraser.mc_samples)
    rows = rows_of(fm, eraser.loss_fn, removed, curvature=source, dtype=eraser.dtype,
                   likelihood=eraser.likelihood, weight_decay=eraser.weight_decay,
                   params=eraser._star, max_memory=budget,
                   autocast=eraser.autocast).to(eraser.device)
    if source.rows_are_gradients and scale == 1:
        v = rows.sum(0)
    else:
        v = gradient_sum(fm, eraser.loss_fn, removed,
                         weight_decay=eraser.weight_decay, dtype=eraser.dtype,
                         params=eraser._star, name="removed")[0]
    if scale != 1:
        # a random curvature's expected rows, weighed as its draws were in the fit
        rows = rows * scale
    return group_means(rows, eraser.minibatch), v.to(eraser.device)


class StageTimer:
    """The seconds of the stages of one request (:data:`STAGES`), read from a monotonic
    clock; on a CUDA device after the work queued so far, so that each stage is charged its
    own kernels."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self._start = self._last = self._now()

    def _now(self) -> float:
        return device_clock(self.device)

    def lap(self, stage: str) -> None:
        """Charges the time since the last lap (or the start) to ``stage``."""
        now = self._now()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

    def add(self, seconds: dict[str, float], rest: str) -> None:
        """Charges stages timed elsewhere since the last lap (e.g. the downdate's check and
        write), the rest of that time to ``rest``, and starts the next lap."""
        now = self._now()
        for stage, s in seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + s
        left = max(now - self._last - sum(seconds.values()), 0.0)
        self.seconds[rest] = self.seconds.get(rest, 0.0) + left
        self._last = now

    def result(self) -> dict[str, float]:
        """The seconds per stage, and ``"total"`` since the timer was made."""
        return {**self.seconds, "total": self._now() - self._start}
