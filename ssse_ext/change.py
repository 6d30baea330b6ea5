r"""A change of a :class:`~ssse_ext.BlockInverseFisher` by rows, in two steps: every block is
checked (nothing is written), then written (which cannot fail).

:meth:`BlockInverseFisher.checked_change` returns a :class:`PendingChange`, and
:meth:`PendingChange.commit` writes it. Between the two the caller may use what the check
computed and abandon the change by dropping it: the inverse is as it was until the commit.
With vectors :math:`v`, the check also gives :math:`F^{-1} v` with the blocks before the change
or after it, read in the same pass over the blocks where a store can
(:meth:`~ssse_ext.blocks.BlockStore.check_and_apply`): an erasure's step and its downdate then
read each dense block twice (check, write) instead of three times. :meth:`~BlockInverseFisher.
update` and :meth:`~BlockInverseFisher.downdate` are a check and its commit.
"""

from __future__ import annotations

import torch

from .budget import check_memory
from .health import device_clock
from .lowrank import check_change_memory
from .side import follow_probe, side_kwargs
from .validation import check_choice, check_positive_int

__all__ = ["PendingChange", "UPDATE_METHODS", "check_change"]

#: Methods of :meth:`BlockInverseFisher.update` and :meth:`BlockInverseFisher.downdate`.
UPDATE_METHODS = ("woodbury", "sherman_morrison")
# Rows per CUDA kernel call of the Woodbury form (the kernel fuses consecutive rank-64 steps into
# one pass over F^{-1}, its workspace growing with the call); on the CPU a call takes all rows.
_DEFAULT_WOODBURY_CHUNK = 1024


class PendingChange:
    """A change checked on every block of ``inv`` and not written yet (see the module).

    Attributes:
        applied: with vectors given to the check, the float64 products, shaped like them
            (``None`` otherwise).
        check_seconds: the seconds the check took.
    """

    def __init__(self, inv, stores, rows, sign: int, plans, applied, check_seconds: float):
        self._inv, self._stores, self._rows, self._sign = inv, stores, rows, sign
        self._plans, self._at, self._done = plans, inv.changes, False
        self._version = rows._version  # plans may read the rows again when written
        self.applied, self.check_seconds = applied, check_seconds

    def commit(self, *, timings: dict | None = None):
        """Writes the change (it cannot fail) and returns the inverse. ``timings`` receives
        the seconds of the writes (``"write"``) and of the probe's update (``"probe"``).

        Raises:
            RuntimeError: committed already, or the inverse or the rows changed after the
                check (nothing is written: check the change again). Changes made to the stores
                directly, not through the inverse, are not detected.
        """
        inv = self._inv
        if self._done:
            raise RuntimeError("this change was committed already")
        if inv.changes != self._at:
            raise RuntimeError("the inverse changed after this change was checked: nothing "
                               "was written; check the change again")
        if self._rows._version != self._version:
            raise RuntimeError("the rows were modified after this change was checked: nothing "
                               "was written; check the change again")
        self._done = True
        if self._plans is None:  # no rows: nothing to write
            return inv
        clock = (lambda: device_clock(inv.device)) if timings is not None else float
        t0 = clock()
        for store, plan in zip(self._stores, self._plans):
            store.write(plan)
        t1 = clock()
        inv.num_samples += self._sign * self._rows.shape[0]
        inv.changes += 1
        if inv.probe is not None:
            follow_probe(inv.probe, self._stores, self._rows, self._sign)
        if timings is not None:
            timings.update(write=t1 - t0, probe=clock() - t1)
        return inv


def check_change(inv, stores, grads, sign: int, *, method: str, chunk_size: int | None,
                 apply=None, changed: bool = False, timed: bool = True) -> PendingChange:
    """:meth:`BlockInverseFisher.checked_change` on ``inv``'s ``stores``; ``timed``: read the
    device's clock for ``check_seconds`` (on a GPU, a synchronisation)."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    check_choice(method, "method", UPDATE_METHODS)
    chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if not isinstance(changed, bool):
        raise TypeError(f"changed must be a bool, got {type(changed).__name__}")
    if method == "woodbury" and chunk_size is None and inv.device.type == "cuda":
        chunk_size = _DEFAULT_WOODBURY_CHUNK  # the CPU kernel's memory does not grow with it
    what = "update" if sign > 0 else "downdate"
    rows, side = inv._rows(grads)
    vv = out = vec = None
    if apply is not None:
        vv, vec = inv._vector(apply, "apply")
    clock = (lambda: device_clock(inv.device)) if timed else float
    t0 = clock()
    if rows.shape[0] == 0:  # nothing to check or write: the products of the blocks as they are
        if vv is not None:
            out = inv.matvec(vv).to(torch.float64)
        return PendingChange(inv, stores, rows, sign, None, _shaped(out, vec), 0.0)
    check_change_memory(stores, rows.shape[0], inv.dim, inv.device, what, method=method)
    if vv is not None:
        # the products in float64, a kernel's part of them and the vectors converted
        check_memory(what, 24 * vv.numel(), inv.device,
                     detail=f"float64 products of {vv.shape[1]} vector(s)")
        out = torch.zeros(vv.shape, dtype=torch.float64, device=inv.device)
    # Every store checks all of its blocks before any store writes: a refusal leaves the
    # inverse as it was, without a copy of it.
    plans = []
    for store in stores:
        kw = dict(method=method, chunk_size=chunk_size, what=what, **side_kwargs(store, side))
        plans.append(store.check_change(rows, sign, **kw) if vv is None else
                     store.check_and_apply(rows, sign, vv, out, changed=changed, **kw))
    return PendingChange(inv, stores, rows, sign, plans, _shaped(out, vec), clock() - t0)


def _shaped(out, vec):
    return out if out is None or not vec else out.view(-1)
