r"""Scale out over ``torch.distributed``: a block-sharded inverse Fisher, fitted and used for
erasure by several processes (GPUs, nodes), each holding only its own blocks (docs/maths.md).

Rank :math:`r` of :math:`P` owns the consecutive blocks ``sharding.blocks(r)`` of the layout,
chosen so that the ranks' costs :math:`\sum_b s_b^2` (the Gram's flops per row, and the memory)
are balanced (:class:`Sharding`). Every rank passes *its share* of the data (training samples to
:func:`fit_inverse_fisher`, removed samples to the erasures): rows are computed where their data
is, and only the column slices of a block's owner travel.

The fit has two exchanges (``exchange=``), with the same result to rounding:

- ``"reduce_scatter"`` (a): every rank accumulates the float64 Gram matrices of *all* blocks for
  its own rows, then each owner receives the sum of its blocks (one in-place reduce per group
  of accumulators, i.e. a reduce-scatter without a second copy of them). Memory
  :math:`8\,\mathrm{numel}` bytes per rank (:math:`d\,B` entries); bytes sent per rank
  :math:`8\,\mathrm{numel}\,(P-1)/P`, independent of the number of rows.
- ``"all_to_all"`` (b): every chunk of gradient rows is cut into the owners' column slices and
  exchanged (``all_to_all``), so each owner accumulates its blocks over all rows. Memory
  :math:`8\,\mathrm{numel}/P` per rank; bytes sent per rank :math:`n\,d\,e\,(P-1)/P^2` for
  :math:`n` rows in all, of :math:`e`-byte elements.
- ``"auto"`` (default): (a) when every rank can hold the accumulators of all blocks and (a)
  sends fewer bytes (:math:`8\,\mathrm{numel}\,P < n\,d\,e`: for blocks of :math:`B`, more
  than :math:`8BP/e` rows), else (b). When the accumulators do not fit, (b) is the only choice
  and its memory falls as :math:`1/P`; when they fit, (a) sends less for any real training set
  (CIFAR-10 on a ResNet-18 with :math:`B = 256` and 8 GPUs: 150 GB against 2 TB in all).

Erasure (:func:`ssse_update`, :func:`newton_erase`, :class:`Eraser`): the removed samples'
gradients and curvature rows are computed where the samples are, their column slices go to
the owners (``all_to_all``), each owner computes its part of the step (SSSE, paper eq. 8; the
leave-k-out Newton step :math:`\frac1N (F' - \delta I)^{-1}\sum_S\nabla\ell_i` per block by
:meth:`~ssse_ext.BlockInverseFisher.solve_changed`) and checks its downdate, the ranks agree,
and the new parameters are all-gathered, so every rank ends with bit-identical parameters.

Failures: every step that can fail locally (an argument, the model, the loss, a block that is
not positive definite) is followed by an agreement among the ranks, so a rank that raises makes
every rank raise (its own exception there, :class:`DistributedError` naming it elsewhere) and
nothing is half-changed. Collectives wait at most ``timeout`` seconds (default: the process
group's timeout); a rank that died or hung gives :class:`DistributedError` on the others, and a
watchdog ends the process if a collective outlives its timeout anyway
(:data:`WATCHDOG_EXIT_CODE`).

Transport: ``torch.distributed`` only (NCCL between GPUs, gloo on CPUs); the process group is
the caller's (``group=``, default the world), e.g. from :func:`init` under ``torchrun``.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import json
import math
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import ssse_ext
from ssse_ext.validation import (check_callable, check_choice, check_data, check_device,
                                 check_dtype, check_int, check_module, check_nonneg_float,
                                 check_positive_float, check_positive_int, is_pair)

from ._utils import FlatModel, available_memory, data_size, finish_update, iter_batches
from .curvature import CURVATURES, LIKELIHOODS
from .erasure import Eraser as _LocalEraser
from .erasure import (FISHER_VARIANTS, _configure, _group_means,
                      check_ssse_settings)
from .gradients import _grad_stream, gradient_sum, resolve_layout
from .io import atomic_path, write_json
from .newton import _shift

__all__ = [
    "DEFAULT_TIMEOUT",
    "EXCHANGES",
    "WATCHDOG_EXIT_CODE",
    "DistributedError",
    "Eraser",
    "ShardedInverseFisher",
    "Sharding",
    "fit_inverse_fisher",
    "init",
    "is_index",
    "launched",
    "load_inverse_fisher",
    "newton_erase",
    "save_inverse_fisher",
    "share",
    "ssse_update",
]

#: The fit's exchanges (module docstring).
EXCHANGES = ("auto", "reduce_scatter", "all_to_all")
#: Seconds a collective may wait for the other ranks (torch's own default for gloo and NCCL).
DEFAULT_TIMEOUT = 1800.0
#: Exit status of a process ended by the watchdog.
WATCHDOG_EXIT_CODE = 70
INDEX_FORMAT = "ssse-inverse-fisher-index"
SHARD_FORMAT = "ssse-inverse-fisher-shard"
FORMAT_VERSION = 1

# As in ssse.gradients: the share of available memory a fit plans to use, and the default
# size of its gradient chunks relative to the rank's part of the inverse.
_MEMORY_SHARE = 0.8
_CHUNK_SHARE_OF_INVERSE = 0.35
_MIN_CHUNK_BYTES = 64 << 20
# Characters of a failed rank's message sent to the others.
_MAX_MESSAGE = 2000
# The watchdog fires this long after a collective's own timeout: the backend should have raised
# by then, so the process is stuck for good.
_WATCHDOG_GRACE = 10.0
# Seconds a collective waits beyond the process group's timeout when that is the timeout used.
_BACKEND_FIRST = 2.0


class DistributedError(RuntimeError):
    """Another rank failed (its message is included), exited, or did not reach a collective
    within the timeout."""


# ---- the partition of the blocks ---------------------------------------------------------------

@dataclass(frozen=True)
class Sharding:
    r"""Which rank owns which blocks: rank ``r`` owns blocks ``bounds[r] .. bounds[r+1] - 1``
    of ``layout``, i.e. the parameters ``columns(r)``.

    Use :meth:`balanced` (the partition that minimises the largest
    :math:`\sum_{b \in r} s_b^2`).
    """

    layout: ssse_ext.BlockLayout
    bounds: tuple[int, ...]

    def __post_init__(self):
        if not isinstance(self.layout, ssse_ext.BlockLayout):
            raise TypeError(f"layout must be a ssse_ext.BlockLayout, got "
                            f"{type(self.layout).__name__}")
        bounds = tuple(int(b) for b in self.bounds)
        nb = self.layout.num_blocks
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != nb or \
                any(b > c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"bounds must rise from 0 to the layout's {nb} blocks with at least "
                             f"one rank, got {list(self.bounds)}")
        object.__setattr__(self, "bounds", bounds)
        # the first parameter of every range (asked for per chunk of rows, so kept)
        starts = [self.layout.starts[b] if b < nb else self.layout.dim for b in bounds]
        object.__setattr__(self, "_starts", tuple(starts))

    @classmethod
    def balanced(cls, layout: ssse_ext.BlockLayout, world_size: int) -> "Sharding":
        r"""Consecutive ranges of blocks for ``world_size`` ranks with the smallest possible
        largest cost :math:`\sum s_b^2`; every rank gets at least one block when there are
        enough blocks."""
        if not isinstance(layout, ssse_ext.BlockLayout):
            raise TypeError(f"layout must be a ssse_ext.BlockLayout, got {type(layout).__name__}")
        world_size = check_positive_int(world_size, "world_size")
        costs = [s * s for s in layout.sizes]
        prefix = [0]
        for c in costs:
            prefix.append(prefix[-1] + c)
        nb = len(costs)
        if nb == 0:
            return cls(layout, (0,) * (world_size + 1))

        def cuts(cap: int) -> list[int] | None:
            """Greedy ranges of cost <= cap (None: more than world_size needed)."""
            out, pos = [0], 0
            while pos < nb:
                pos = bisect.bisect_right(prefix, prefix[pos] + cap) - 1
                out.append(pos)
                if len(out) - 1 > world_size:
                    return None
            return out

        lo, hi = max(costs), prefix[-1]
        while lo < hi:
            mid = (lo + hi) // 2
            if cuts(mid) is None:
                lo = mid + 1
            else:
                hi = mid
        bounds = cuts(lo)
        # fewer ranges than ranks: split the costliest range that has two blocks or more
        while len(bounds) - 1 < world_size:
            spans = [(prefix[b] - prefix[a], j) for j, (a, b) in
                     enumerate(zip(bounds, bounds[1:])) if b - a >= 2]
            if not spans:
                break
            _, j = max(spans)
            a, b = bounds[j], bounds[j + 1]
            half = (prefix[a] + prefix[b]) / 2
            c = min(max(bisect.bisect_left(prefix, half, a, b), a + 1), b - 1)
            if c + 1 < b and abs(prefix[c + 1] - half) < abs(prefix[c] - half):
                c += 1
            bounds.insert(j + 1, c)
        bounds += [nb] * (world_size + 1 - len(bounds))
        return cls(layout, tuple(bounds))

    @property
    def world_size(self) -> int:
        return len(self.bounds) - 1

    def _rank(self, rank: int) -> int:
        rank = check_int(rank, "rank")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return rank

    def blocks(self, rank: int) -> tuple[int, int]:
        """``(first, last)``: rank ``rank`` owns blocks ``first .. last - 1``."""
        rank = self._rank(rank)
        return self.bounds[rank], self.bounds[rank + 1]

    def columns(self, rank: int) -> slice:
        """The parameters covered by the blocks of rank ``rank``."""
        rank = self._rank(rank)
        return slice(self._starts[rank], self._starts[rank + 1])

    def width(self, rank: int) -> int:
        c = self.columns(rank)
        return c.stop - c.start

    def numel(self, rank: int) -> int:
        """Elements of rank ``rank``'s part of the packed inverse (its cost)."""
        return self.layout.numel_of(*self.blocks(rank))

    def sub_layout(self, rank: int) -> ssse_ext.BlockLayout:
        """Rank ``rank``'s blocks as a layout of their own (over its columns)."""
        first, last = self.blocks(rank)
        sizes = list(self.layout.sizes[first:last])
        return ssse_ext.BlockLayout.from_dict({"dim": sum(sizes), "sizes": sizes})

    def owner(self, block: int) -> int:
        """The rank that owns block ``block``."""
        block = check_int(block, "block")
        if not 0 <= block < self.layout.num_blocks:
            raise ValueError(f"block must be in [0, {self.layout.num_blocks}), got {block}")
        return bisect.bisect_right(self.bounds, block) - 1

    def __repr__(self) -> str:
        costs = [self.numel(r) for r in range(self.world_size)]
        return (f"Sharding({self.layout!r}, world_size={self.world_size}, "
                f"bounds={list(self.bounds)}, costs={costs})")


def share(n: int, *, group=None) -> range:
    """This rank's contiguous share of ``n`` items (samples, removal indices): ranks get
    ``n // P`` or ``n // P + 1`` items, in rank order."""
    n = check_int(n, "n")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rank, size = _rank_and_size(group)
    lo = rank * (n // size) + min(rank, n % size)
    return range(lo, lo + n // size + (rank < n % size))


# ---- collectives: timeouts, agreement, watchdog -------------------------------------------------

class _Watchdog:
    """Ends the process when a collective outlives its timeout by ``grace`` seconds. The
    backend raises at the timeout (gloo, and NCCL with its async error handling); a process
    that is still inside the collective after that is stuck for good, and every other rank's
    job would wait on it."""

    def __init__(self, grace: float = _WATCHDOG_GRACE, exit_fn: Callable[[int], Any] = os._exit,
                 poll: float = 1.0):
        self.grace, self.exit_fn, self.poll = grace, exit_fn, poll
        self._pending: dict[int, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._next = 0

    def enter(self, what: str, timeout: float) -> int:
        with self._lock:
            token = self._next
            self._next += 1
            self._pending[token] = (time.monotonic() + timeout + self.grace, what)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ssse-watchdog",
                                                daemon=True)
                self._thread.start()
        return token

    def leave(self, token: int) -> None:
        with self._lock:
            self._pending.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.poll)
            now = time.monotonic()
            with self._lock:
                late = [what for deadline, what in self._pending.values() if now > deadline]
                if late:
                    self._pending.clear()
            if late:
                sys.stderr.write(f"ssse.distributed: watchdog: {late[0]} is still waiting "
                                 f"{self.grace:g} s after its timeout; another rank is gone "
                                 f"or stuck. Exiting with status {WATCHDOG_EXIT_CODE}.\n")
                sys.stderr.flush()
                self.exit_fn(WATCHDOG_EXIT_CODE)


_WATCHDOG = _Watchdog()
# torch >= 2.12 renamed all_gather_into_tensor (same semantics)
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _rank_and_size(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    if group is not None:
        raise ValueError("group was given but torch.distributed is not initialised")
    return 0, 1


def _group_timeout(group) -> float:
    """The process group's own timeout (what its backend waits), or :data:`DEFAULT_TIMEOUT`
    where torch does not tell it."""
    try:
        pg = group or dist.group.WORLD
        device = torch.device("cuda") if dist.get_backend(group) == "nccl" else \
            torch.device("cpu")
        return float(pg._get_backend(device).options._timeout.total_seconds())
    except Exception:  # a private torch API: any change falls back to the default
        return DEFAULT_TIMEOUT


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


class _Comm:
    """The collectives of one operation over ``group``: each with a timeout and wrapped so that
    a lost rank becomes :class:`DistributedError`; counts the bytes this rank sends. Without an
    initialised process group it is a group of one, and every collective is trivial."""

    def __init__(self, group=None, timeout: float | None = None):
        if timeout is not None:
            timeout = check_positive_float(timeout, "timeout")
        self.group = group
        self.rank, self.size = _rank_and_size(group)
        self.timeout = timeout or (_group_timeout(group) if self.size > 1 else DEFAULT_TIMEOUT)
        # With the group's own timeout, wait a little longer than the backend: it gives up its
        # operation first, so none is left pending when DistributedError is raised (a pending
        # gloo operation makes the process wait, or abort, at exit).
        self._wait = self.timeout + (_BACKEND_FIRST if timeout is None else 0.0)
        self.device = torch.device("cpu")
        if self.size > 1 and dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.sent: dict[str, int] = {}

    def _count(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)

    def _run(self, what: str, fn, *args, **kwargs) -> None:
        token = _WATCHDOG.enter(f"rank {self.rank}: {what}", self._wait)
        try:
            work = fn(*args, group=self.group, async_op=True, **kwargs)
            if work is not None:
                work.wait(timeout=datetime.timedelta(seconds=self._wait))
        except Exception as exc:
            raise DistributedError(
                f"rank {self.rank} of {self.size}: {what} failed: another rank exited, failed "
                f"outside ssse, or did not reach this step within the timeout of "
                f"{self.timeout:g} s ({_first_line(exc)})") from exc
        finally:
            _WATCHDOG.leave(token)

    # ---- typed collectives ----
    def all_gather(self, t: torch.Tensor, what: str, kind: str = "control") -> torch.Tensor:
        """``(P, *t.shape)``: every rank's ``t``."""
        t = t.to(self.device).contiguous()
        if self.size == 1:
            return t.unsqueeze(0).clone()
        out = torch.empty(self.size * t.numel(), dtype=t.dtype, device=self.device)
        self._run(what, _ALL_GATHER, out, t.reshape(-1))
        self._count(kind, t.numel() * t.element_size() * (self.size - 1))
        return out.view((self.size,) + tuple(t.shape))

    def all_reduce_sum(self, t: torch.Tensor, what: str, kind: str = "vectors") -> torch.Tensor:
        """The sum over ranks of ``t`` (a new tensor on ``t``'s device)."""
        if self.size == 1:
            return t.clone()
        buf = t.to(self.device, copy=True).contiguous()
        self._run(what, dist.all_reduce, buf)
        # a ring all-reduce sends 2 (P - 1) / P of the tensor from every rank
        self._count(kind, 2 * buf.numel() * buf.element_size() * (self.size - 1) // self.size)
        return buf.to(t.device)

    def reduce_(self, t: torch.Tensor, dst: int, what: str, kind: str) -> None:
        """Sums ``t`` over ranks into rank ``dst``'s ``t`` (in place)."""
        if self.size == 1:
            return
        buf = t if t.device == self.device else t.to(self.device)
        self._run(what, dist.reduce, buf, dst)
        if dst != self.rank:
            self._count(kind, buf.numel() * buf.element_size())
        elif buf is not t:
            t.copy_(buf)

    def broadcast(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        if self.size == 1:
            return t
        buf = t.to(self.device).contiguous()
        self._run(what, dist.broadcast, buf, src)
        if self.rank == src:
            self._count("control", buf.numel() * buf.element_size() * (self.size - 1))
        return buf.to(t.device)

    def ints(self, values: list[int], what: str) -> list[list[int]]:
        """Every rank's list of ``len(values)`` integers."""
        t = torch.tensor(values, dtype=torch.int64)
        return self.all_gather(t, what).cpu().tolist()

    def texts(self, text: str, what: str) -> list[str]:
        """Every rank's short text (UTF-8 bytes in tensors: nothing is pickled)."""
        data = text.encode("utf-8")[:_MAX_MESSAGE]
        lengths = [row[0] for row in self.ints([len(data)], what)]
        buf = torch.zeros(max(max(lengths), 1), dtype=torch.uint8)
        buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        rows = self.all_gather(buf, what).cpu()
        return [bytes(rows[r, :lengths[r]].tolist()).decode("utf-8", "replace")
                for r in range(self.size)]

    def status(self, values: list[int], error: BaseException | None, what: str) -> list[list[int]]:
        """All ranks' ``values`` after a local step; if any rank's step raised, raises on every
        rank: the failed rank's own exception there, :class:`DistributedError` naming it and
        quoting its message elsewhere."""
        if self.size == 1:
            if error is not None:
                raise error
            return [list(values)]
        rows = self.ints([int(error is not None)] + [int(v) for v in values], what)
        failed = [r for r, row in enumerate(rows) if row[0]]
        if failed:
            messages = self.texts("" if error is None else _first_line(error), what)
            if error is not None:
                raise error
            more = f" (and rank(s) {', '.join(map(str, failed[1:]))})" if failed[1:] else ""
            raise DistributedError(f"rank {self.rank} of {self.size}: rank {failed[0]} failed "
                                   f"in {what}{more}: {messages[failed[0]]}")
        return [row[1:] for row in rows]

    def agree(self, error: BaseException | None, what: str) -> None:
        self.status([], error, what)

    def same(self, digest: bytes, what: str) -> None:
        """Raises on every rank unless every rank's ``digest`` equals rank 0's."""
        value = int.from_bytes(digest[:8], "little", signed=True)
        rows = self.ints([value], what)
        bad = [r for r, row in enumerate(rows) if row[0] != rows[0][0]]
        if bad:
            raise DistributedError(f"rank {self.rank} of {self.size}: {what} differ between "
                                   f"ranks: rank {bad[0]}'s differ from rank 0's")

    def all_to_all_rows(self, rows: torch.Tensor, sharding: Sharding, counts: list[int],
                        what: str, kind: str = "rows") -> torch.Tensor:
        """The owners' column slices of every rank's ``(m_q, d)`` rows (``counts[q] = m_q``,
        this rank's ``rows`` of ``counts[rank]`` rows): ``(sum_q m_q, width)`` on this rank, in
        rank order, on the communication device (one rank: on ``rows``' device)."""
        width = sharding.width(self.rank)
        if self.size == 1:
            return rows[:, sharding.columns(0)].contiguous()
        m = counts[self.rank]
        rows = rows.to(self.device)
        send = torch.cat([rows[:, sharding.columns(r)].reshape(-1) for r in range(self.size)]) \
            if m else torch.zeros(0, dtype=rows.dtype, device=self.device)
        in_splits = [m * sharding.width(r) for r in range(self.size)]
        out_splits = [counts[q] * width for q in range(self.size)]
        recv = torch.empty(sum(out_splits), dtype=rows.dtype, device=self.device)
        self._run(what, dist.all_to_all_single, recv, send, output_split_sizes=out_splits,
                  input_split_sizes=in_splits)
        self._count(kind, (sum(in_splits) - in_splits[self.rank]) * send.element_size())
        return recv.view(sum(counts), width)

    def gather_columns(self, part: torch.Tensor, sharding: Sharding, what: str) -> torch.Tensor:
        """The ``(d,)`` vector whose columns ``sharding.columns(r)`` are rank ``r``'s ``part``:
        the same bits on every rank."""
        if self.size == 1:
            return part.clone()
        widths = [sharding.width(r) for r in range(self.size)]
        buf = torch.zeros(max(widths), dtype=part.dtype, device=self.device)
        buf[:part.numel()] = part.to(self.device)
        rows = self.all_gather(buf, what, kind="parameters")
        return torch.cat([rows[r, :widths[r]] for r in range(self.size)]).to(part.device)


def _local(step: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Runs a rank-local step, returning its result or the exception it raised (for
    :meth:`_Comm.status`)."""
    try:
        return step(), None
    except Exception as exc:  # every failure is agreed on by all ranks before raising
        return None, exc


def _digest(*parts) -> bytes:
    """A fingerprint of tensors (their bytes) and plain values (their JSON)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().contiguous().cpu()
            h.update(str(t.dtype).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.digest()


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init(*, backend: str | None = None, device=None,
         timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """Initialises the default process group from the launcher's environment (``torchrun``),
    unless one exists, and returns ``(rank, world_size)``.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL for a CUDA ``device``, gloo otherwise.
        device: the device the process computes on; a CUDA device becomes
            ``cuda:LOCAL_RANK`` (one GPU per process) and is made current.
        timeout: seconds a collective may wait for the other ranks.
    """
    timeout = check_positive_float(timeout, "timeout")
    device = check_device(device)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launched():
        raise RuntimeError("init() needs the environment of a launcher such as torchrun (RANK, "
                           "WORLD_SIZE, MASTER_ADDR, MASTER_PORT); start with torchrun "
                           "--nproc-per-node=K ... or call "
                           "torch.distributed.init_process_group yourself")
    cuda = device is not None and device.type == "cuda"
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    check_choice(backend, "backend", ("nccl", "gloo"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


# ---- the sharded inverse ------------------------------------------------------------------------

def _local_attribute(name: str, doc: str) -> property:
    """A read-only property that reads ``name`` from the local shard."""
    return property(lambda self: getattr(self.local, name), doc=doc)


class ShardedInverseFisher:
    r"""This rank's share of a block-sharded inverse Fisher: the blocks ``sharding.blocks(rank)``
    as :attr:`local`, a :class:`ssse_ext.BlockInverseFisher` over their columns
    (``sharding.columns(rank)``; its segments are those blocks' packed storage), plus the whole
    layout and the partition.

    Made by :func:`fit_inverse_fisher`, :func:`load_inverse_fisher` or :meth:`from_full`;
    :meth:`gather` assembles the whole inverse (tests, small models).
    """

    def __init__(self, local: ssse_ext.BlockInverseFisher, sharding: Sharding, rank: int):
        if not isinstance(local, ssse_ext.BlockInverseFisher):
            raise TypeError(f"local must be a ssse_ext.BlockInverseFisher, got "
                            f"{type(local).__name__}")
        if not isinstance(sharding, Sharding):
            raise TypeError(f"sharding must be a Sharding, got {type(sharding).__name__}")
        rank = sharding._rank(rank)
        expected = sharding.sub_layout(rank)
        if local.layout.sizes != expected.sizes:
            raise ValueError(f"local holds blocks of sizes {list(local.layout.sizes)[:8]}..., "
                             f"rank {rank} owns blocks {sharding.blocks(rank)} of sizes "
                             f"{list(expected.sizes)[:8]}...")
        self.local, self.sharding, self.rank = local, sharding, rank
        self.fit_stats: dict = {}

    @property
    def layout(self) -> ssse_ext.BlockLayout:
        return self.sharding.layout

    @property
    def config(self) -> ssse_ext.FisherConfig:
        return ssse_ext.FisherConfig(self.damping, self.normalizer, self.layout, self.curvature)

    # the local shard's (the same on every rank)
    damping = _local_attribute("damping", "the damping λ")
    normalizer = _local_attribute("normalizer", "the normaliser N")
    curvature = _local_attribute("curvature", "the curvature stored")
    num_samples = _local_attribute("num_samples", "the samples the inverse holds")
    dtype = _local_attribute("dtype", "the blocks' dtype")
    device = _local_attribute("device", "the blocks' device")

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def world_size(self) -> int:
        return self.sharding.world_size

    @property
    def block_range(self) -> tuple[int, int]:
        """``(first, last)``: the blocks ``first .. last - 1`` of the layout held here."""
        return self.sharding.blocks(self.rank)

    @property
    def columns(self) -> slice:
        return self.sharding.columns(self.rank)

    @property
    def nbytes(self) -> int:
        return self.local.nbytes

    def _fingerprint(self) -> bytes:
        return _digest(self.damping, self.normalizer, self.curvature, self.num_samples,
                       str(self.dtype), list(self.sharding.bounds), list(self.layout.sizes))

    @classmethod
    def from_full(cls, inv: ssse_ext.BlockInverseFisher, *, group=None,
                  sharding: Sharding | None = None) -> "ShardedInverseFisher":
        """This rank's blocks of a whole inverse (a copy); ``sharding`` default balanced over
        the group's ranks."""
        if not isinstance(inv, ssse_ext.BlockInverseFisher):
            raise TypeError(f"inv must be a ssse_ext.BlockInverseFisher, got {type(inv).__name__}")
        rank, size = _rank_and_size(group)
        sharding = Sharding.balanced(inv.layout, size) if sharding is None else sharding
        if not isinstance(sharding, Sharding):
            raise TypeError(f"sharding must be a Sharding, got {type(sharding).__name__}")
        if sharding.layout != inv.layout or sharding.world_size != size:
            raise ValueError(f"sharding must partition the inverse's layout ({inv.layout!r}) "
                             f"over the group's {size} ranks, got {sharding!r}")
        first, last = sharding.blocks(rank)
        offsets = inv.layout.offsets
        lo = offsets[first] if first < last else 0
        packed = inv.packed[lo:lo + inv.layout.numel_of(first, last)].clone()
        return cls(_local_inverse(packed, sharding, rank, inv.damping, inv.normalizer,
                                  inv.curvature, inv.num_samples), sharding, rank)

    def gather(self, *, group=None, timeout: float | None = None) -> ssse_ext.BlockInverseFisher:
        """The whole inverse, on every rank (collective): memory of the whole inverse."""
        comm = _Comm(group, timeout)
        _check_group(self, comm)
        numels = [self.sharding.numel(r) for r in range(comm.size)]
        buf = torch.zeros(max(max(numels), 1), dtype=self.dtype, device=comm.device)
        packed = self.local.packed
        buf[:packed.numel()] = packed.to(comm.device)
        rows = comm.all_gather(buf, "gather of the inverse", kind="inverse").to(self.device)
        segments = [rows[r, :numels[r]].clone() for r in range(comm.size) if numels[r]]
        if not segments:
            segments = [torch.zeros(0, dtype=self.dtype, device=self.device)]
        return ssse_ext.BlockInverseFisher(segments, self.config, self.num_samples)

    def __repr__(self) -> str:
        first, last = self.block_range
        return (f"ShardedInverseFisher(rank={self.rank} of {self.world_size}, blocks {first}.."
                f"{last - 1} of {self.layout.num_blocks}, dim={self.dim}, "
                f"damping={self.damping:g}, normalizer={self.normalizer:g}, "
                f"dtype={self.dtype}, device={self.device})")


def _local_inverse(segments, sharding: Sharding, rank: int, damping: float, normalizer: float,
                   curvature: str, num_samples: int) -> ssse_ext.BlockInverseFisher:
    config = ssse_ext.FisherConfig(damping, normalizer, sharding.sub_layout(rank), curvature)
    return ssse_ext.BlockInverseFisher(segments, config, num_samples)


def _check_group(inv, comm: _Comm) -> None:
    if not isinstance(inv, ShardedInverseFisher):
        raise TypeError(f"inv_fisher must be a ShardedInverseFisher, got {type(inv).__name__}")
    if inv.world_size != comm.size or inv.rank != comm.rank:
        raise ValueError(f"inv_fisher is rank {inv.rank}'s share of {inv.world_size}, this is "
                         f"rank {comm.rank} of {comm.size}: load it again on this group "
                         "(load_inverse_fisher re-shards)")


# ---- the fit -------------------------------------------------------------------------------------

def _chunks_with_status(stream):
    """``next(stream)`` as ``(chunk or None, error or None)``."""
    try:
        return next(stream, None), None
    except Exception as exc:  # agreed on with the other ranks before it is raised
        return None, exc


def fit_inverse_fisher(model: nn.Module, loss_fn, data, *, damping: float,
                       block_size: int | None = None, layout="per_parameter",
                       weight_decay: float = 0.0, minibatch: int = 1,
                       dtype: torch.dtype | None = None, device=None,
                       chunk_size: int | None = None, max_memory: int | None = None,
                       curvature: str = "empirical", likelihood: str = "categorical",
                       mc_samples: int = 1, seed: int = 0, exchange: str = "auto",
                       group=None, timeout: float | None = None) -> ShardedInverseFisher:
    r"""Fits the block inverse of a damped curvature (:func:`ssse.fit_inverse_fisher`) with
    every rank of ``group`` computing the rows of its share of the data and holding only its
    blocks (collective: every rank calls it, with the same model and arguments).

    .. math:: F_b^{-1} = \Big(\lambda I + \frac{1}{N}\sum_{r} u_{r,b}\, u_{r,b}^\top\Big)^{-1},
              \quad b \in \text{this rank's blocks}

    with :math:`N` the rows (or samples, for ``"ggn"``) of *all* ranks; the result equals the
    single-process inverse of all the data to rounding (float64: 1e-12 relative; float32: the
    float64 result rounded once).

    Args:
        model, loss_fn, damping, block_size, layout, weight_decay, minibatch, dtype, device,
            chunk_size, max_memory, curvature, likelihood, mc_samples: as in
            :func:`ssse.fit_inverse_fisher` (``max_memory`` for this rank's chunks; with
            ``minibatch > 1`` the groups are formed within each rank's share). The
            ``"mc"`` draws of rank ``r`` use seed ``seed + r``.
        data: *this rank's share* of the training set (e.g. ``share(n)`` of it); a rank may
            have none.
        exchange: ``"auto"``, ``"reduce_scatter"`` or ``"all_to_all"`` (module docstring).
        group: the process group (default: the world; none initialised: one process).
        timeout: seconds a collective waits for the other ranks (default: the process
            group's own timeout, which also bounds how long a process whose collective failed
            waits at exit for the backend to give up its pending operation: set it with
            ``init_process_group(timeout=...)``).

    Returns:
        This rank's :class:`ShardedInverseFisher`; its ``fit_stats`` hold the exchange used,
        the bytes this rank sent and the bytes of its accumulators.

    Raises:
        DistributedError: another rank failed (its message is quoted) or was lost.
    """
    comm = _Comm(group, timeout)

    def prepare():
        check_module(model)
        check_callable(loss_fn, "loss_fn")
        check_data(data, "data")
        out = dict(damping=check_positive_float(damping, "damping"),
                   weight_decay=check_nonneg_float(weight_decay, "weight_decay"),
                   minibatch=check_positive_int(minibatch, "minibatch"),
                   curvature=check_choice(curvature, "curvature", CURVATURES),
                   likelihood=check_choice(likelihood, "likelihood", LIKELIHOODS),
                   mc_samples=check_positive_int(mc_samples, "mc_samples"),
                   seed=check_int(seed, "seed"),
                   exchange=check_choice(exchange, "exchange", EXCHANGES),
                   chunk_size=check_positive_int(chunk_size, "chunk_size", allow_none=True),
                   max_memory=check_positive_int(max_memory, "max_memory", allow_none=True))
        if out["minibatch"] > 1 and curvature != "empirical":
            raise ValueError(f"minibatch > 1 needs curvature=\"empirical\", got {curvature!r}")
        fm = FlatModel(model)
        out["fm"], out["layout"] = fm, resolve_layout(layout, block_size, fm)
        out["dtype"] = check_dtype(dtype) or fm.dtype
        if out["dtype"] not in (torch.float32, torch.float64):
            raise TypeError(f"the model's dtype is {out['dtype']}; pass dtype=torch.float32 or "
                            "float64")
        out["device"] = check_device(device) or fm.device
        out["digest"] = _digest(fm.flat(), {k: v for k, v in out.items()
                                            if k in ("damping", "weight_decay", "minibatch",
                                                     "curvature", "likelihood", "mc_samples",
                                                     "exchange")},
                                str(out["dtype"]), list(out["layout"].sizes))
        return out

    args, error = _local(prepare)
    comm.agree(error, "fit_inverse_fisher (arguments)")
    comm.same(args["digest"], "fit_inverse_fisher: the model's parameters or the arguments")
    fm, lay, dt, dev = args["fm"], args["layout"], args["dtype"], args["device"]
    sharding = Sharding.balanced(lay, comm.size)
    elem = torch.finfo(dt).bits // 8
    own = sharding.numel(comm.rank)

    # the exchange: the same on every rank
    n_local = data_size(data)
    fits = 8 * lay.numel + own * elem <= _MEMORY_SHARE * available_memory(dev)
    rows = comm.ints([int(fits), -1 if n_local is None else n_local],
                     "fit_inverse_fisher (exchange)")
    choice = _choose_exchange(args["exchange"], comm.size, all(r[0] for r in rows),
                              None if any(r[1] < 0 for r in rows) else sum(r[1] for r in rows),
                              lay.numel, lay.dim, elem)
    acc_bytes = 8 * (lay.numel if choice == "reduce_scatter" else own)

    chunk_rows, budget = args["chunk_size"], args["max_memory"]
    if chunk_rows is None and budget is None:
        fixed = acc_bytes + own * elem if dev == fm.device else 0
        free = int(_MEMORY_SHARE * (available_memory(fm.device) - fixed))
        budget = max(1, min(free, max(int(_CHUNK_SHARE_OF_INVERSE * own * elem),
                                      _MIN_CHUNK_BYTES)))
    info: dict = {}
    stream = _grad_stream(fm, loss_fn, data, "data", weight_decay=args["weight_decay"],
                          chunk_size=chunk_rows, minibatch=args["minibatch"], dtype=dt,
                          max_memory=budget, curvature=args["curvature"],
                          likelihood=args["likelihood"], mc_samples=args["mc_samples"],
                          seed=args["seed"] + comm.rank, info=info)
    fit = _fit_all_to_all if choice == "all_to_all" else _fit_reduce_scatter
    acc, total, per_sample = fit(comm, sharding, stream, info, dt, dev)
    if total == 0:
        raise ValueError("data is empty on every rank: the Fisher needs at least one sample")
    # as ssse.fit_inverse_fisher: a GGN sample's c rows add up to its curvature (N = n)
    normalizer = total / (per_sample if args["curvature"] == "ggn" else 1)

    def invert():
        result = acc.finish(args["damping"], normalizer, curvature=args["curvature"])
        segments = list(result.segments) if isinstance(result, ssse_ext.BlockInverseFisher) \
            else [t for t in result if t.numel()]
        return _local_inverse(segments or [torch.zeros(0, dtype=dt, device=dev)], sharding,
                              comm.rank, args["damping"], normalizer, args["curvature"], total)

    local, error = _local(invert)
    comm.agree(error, "fit_inverse_fisher (the inverse of the blocks)")
    inv = ShardedInverseFisher(local, sharding, comm.rank)
    inv.fit_stats = {"exchange": choice, "rows": total, "bytes_sent": comm.sent.get("rows", 0)
                     + comm.sent.get("grams", 0), "control_bytes": comm.sent.get("control", 0),
                     "accumulator_bytes": acc_bytes, "inverse_bytes": local.nbytes}
    return inv


class _Gather:
    """Feeds accumulators chunks of at least ``acc.gather_rows`` rows (a kernel call on few
    rows is inefficient), concatenating smaller ones."""

    def __init__(self, accs: list, rows: int):
        self.accs, self.rows, self.held, self.count = accs, max(1, rows), [], 0

    def add(self, chunk: torch.Tensor) -> None:
        if chunk.shape[0] == 0:
            return
        self.held.append(chunk)
        self.count += chunk.shape[0]
        if self.count >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.held:
            return
        rows = self.held[0] if len(self.held) == 1 else torch.cat(self.held)
        self.held, self.count = [], 0
        for acc in self.accs:
            acc.add(rows)


def _fit_all_to_all(comm: _Comm, sharding: Sharding, stream, info: dict, dt, dev):
    """Design (b): every chunk's column slices go to their owners, which accumulate their
    blocks over all rows. Returns (the accumulator, rows of all ranks, rows per sample).

    Every round starts with the ranks' status (rows of their next chunk, or done, or failed),
    so a rank whose gradients, accumulation or memory failed stops every rank at the next
    round."""
    width = sharding.width(comm.rank)

    def allocate():
        acc = ssse_ext.GramAccumulator(sharding.sub_layout(comm.rank), dt, dev)
        return acc, _Gather([acc], acc.gather_rows)

    made, error = _local(allocate)
    comm.agree(error, "fit_inverse_fisher (the accumulators)")
    acc, feed = made
    done, total, per_sample = False, 0, 0
    while True:
        chunk = None
        if not done and error is None:
            chunk, error = _chunks_with_status(stream)
            done = chunk is None and error is None
        m = 0 if chunk is None else chunk.shape[0]
        rows = comm.status([int(done), m, info.get("rows_per_sample", 0)], error,
                           "fit_inverse_fisher (the gradients of a chunk)")
        per_sample = max(per_sample, max(r[2] for r in rows))
        if all(r[0] for r in rows):
            break
        counts = [r[1] for r in rows]
        if sum(counts) == 0:
            continue
        if chunk is None:
            chunk = torch.zeros(0, sharding.layout.dim, dtype=dt)
        part = comm.all_to_all_rows(chunk, sharding, counts,
                                    "fit_inverse_fisher (exchange of gradient slices)")
        if width:  # a new receive buffer every round: safe to hold
            _, error = _local(lambda: feed.add(part.to(dev)))
        total += sum(counts)
    _, error = _local(feed.flush)
    comm.agree(error, "fit_inverse_fisher (the accumulation)")
    return acc, total, per_sample


def _choose_exchange(requested: str, size: int, all_fit: bool, rows: int | None, numel: int,
                     dim: int, elem: int) -> str:
    """The exchange ``"auto"`` stands for: ``"reduce_scatter"`` when every rank can hold the
    accumulators of all blocks and it sends fewer bytes than ``"all_to_all"`` would for
    ``rows`` rows in all (per rank: ``8 numel (P-1)/P`` against ``rows dim elem (P-1)/P^2``;
    unknown ``rows``: assumed many), else ``"all_to_all"``."""
    if requested != "auto":
        return requested
    fewer = rows is None or 8 * numel * size < rows * dim * elem
    return "reduce_scatter" if size > 1 and all_fit and fewer else "all_to_all"


def _fit_reduce_scatter(comm: _Comm, sharding: Sharding, stream, info: dict, dt, dev):
    """Design (a): every rank accumulates all blocks for its rows; each owner then receives the
    sum of its blocks, one in-place reduce per group of accumulators."""
    rows_here = 0

    def accumulate():
        nonlocal rows_here
        accs = [ssse_ext.GramAccumulator(sharding.layout, dt, dev, first=f, last=l)
                for f, l in (sharding.blocks(r) for r in range(comm.size))]
        feed = _Gather(accs, accs[comm.rank].gather_rows)
        for chunk in stream:
            feed.add(chunk.to(dev))
            rows_here += chunk.shape[0]
        feed.flush()
        return accs

    accs, error = _local(accumulate)
    rows = comm.status([rows_here, info.get("rows_per_sample", 0)], error,
                       "fit_inverse_fisher (the gradients)")
    total = sum(r[0] for r in rows)
    per_sample = max(r[1] for r in rows)
    for r, acc in enumerate(accs):
        for gram in acc.grams:
            comm.reduce_(gram, r, "fit_inverse_fisher (reduce of the Gram matrices)", "grams")
        if r != comm.rank:
            accs[r] = None  # freed as soon as its owner has it
    return accs[comm.rank], total, per_sample


# ---- erasure -------------------------------------------------------------------------------------

def _rows_of(fm: FlatModel, loss_fn, batches, *, dtype, curvature: str, likelihood: str,
             weight_decay: float, params: dict | None = None) -> torch.Tensor:
    """All rows of ``curvature`` (``"empirical"``: gradients with weight decay; ``"ggn"``:
    Gauss–Newton rows) of this rank's removed samples, possibly none: ``(rows, d)``."""
    chunks = [c for c in _grad_stream(fm, loss_fn, batches, "removed",
                                      weight_decay=weight_decay, chunk_size=None, minibatch=1,
                                      dtype=dtype, params=params, curvature=curvature,
                                      likelihood=likelihood) if c.shape[0]]
    if not chunks:
        return torch.zeros(0, fm.dim, dtype=dtype, device=fm.device)
    return torch.cat(chunks)


def _removal_size(comm: _Comm, k_local: int | None, error, what: str) -> int:
    """The removed samples of all ranks (agreed on)."""
    k = sum(r[0] for r in comm.status([k_local or 0], error, what))
    if k == 0:
        raise ValueError("removed is empty on every rank: nothing to erase")
    return k


def _check_remaining(n: int, k: int) -> None:
    if n <= k:
        raise ValueError(f"n_total must be larger than the number of removed samples k={k} "
                         f"(all ranks), got {n}")


def _owner_step(comm: _Comm, inv: ShardedInverseFisher, step: Callable[[], torch.Tensor],
                what: str) -> torch.Tensor:
    """Runs the owners' part of an update (its new columns of the parameters), agrees, and
    all-gathers the whole vector: the same bits on every rank."""
    def run():
        part = step()
        if not bool(torch.isfinite(part).all()):
            raise FloatingPointError(f"{what} produced NaN or Inf; nothing was changed")
        return part

    part, error = _local(run)
    comm.agree(error, f"{what} (the blocks of the owners)")
    return comm.gather_columns(part, inv.sharding, f"{what} (all-gather of the parameters)")


def _check_sharded_request(model, loss_fn, removed, inv_fisher, comm) -> FlatModel:
    """The checks every sharded erasure starts with; returns the flat model."""
    check_module(model)
    check_callable(loss_fn, "loss_fn")
    check_data(removed, "removed")
    fm = FlatModel(model)
    _check_group(inv_fisher, comm)
    if inv_fisher.dim != fm.dim:
        raise ValueError(f"inv_fisher has dim={inv_fisher.dim}, the model has d={fm.dim} "
                         "trainable parameters")
    return fm


def ssse_update(model: nn.Module, loss_fn, removed, *, inv_fisher: ShardedInverseFisher,
                epsilon: float, n_total: int, weight_decay: float = 0.0, fisher: str = "full",
                gradient: str = "removed", retained=None, minibatch: int = 1,
                inplace: bool = False, group=None,
                timeout: float | None = None) -> dict[str, torch.Tensor]:
    r""":func:`ssse.ssse_update` (paper eq. 8) with a sharded inverse (collective):

    .. math:: \hat\theta_\varepsilon = \theta^* + \frac{\varepsilon}{n-k}\,F^{-1}
              \sum_{i \in S} \nabla \ell_i(\theta^*)

    Args:
        removed: *this rank's share* of :math:`S` (possibly empty); :math:`k` counts all
            ranks'.
        retained: this rank's share of :math:`D \setminus S` for ``gradient="retained"``.
        inv_fisher: this rank's :class:`ShardedInverseFisher` (not modified).
        group, timeout: as in :func:`fit_inverse_fisher`.
        Others: as in :func:`ssse.ssse_update` (``minibatch`` groups within each share).

    Returns:
        A new ``state_dict``, the same bits on every rank. On any error on any rank, every rank
        raises and nothing is changed.
    """
    comm = _Comm(group, timeout)

    def prepare():
        fm = _check_sharded_request(model, loss_fn, removed, inv_fisher, comm)
        eps, n, w, b = check_ssse_settings(epsilon, n_total, weight_decay, fisher, gradient,
                                           minibatch, retained, "this rank's share of D \\ S")
        dt, dev = inv_fisher.dtype, inv_fisher.device
        batches = list(iter_batches(removed, "removed", device=fm.device))
        k = sum(x.shape[0] for x, _ in batches)
        rows = None
        if fisher == "leave_k_out":
            grads = _rows_of(fm, loss_fn, batches, dtype=dt, curvature="empirical",
                             likelihood="categorical", weight_decay=w)
            v = grads.sum(0)
            rows = _group_means(grads, b) if grads.shape[0] else grads
        else:
            v, _ = gradient_sum(model, loss_fn, batches, weight_decay=w, dtype=dt,
                                name="removed")
        if gradient == "retained":
            v_ret, _ = gradient_sum(model, loss_fn, retained, weight_decay=w, dtype=dt,
                                    name="retained")
            v = -v_ret
        digest = _digest(fm.flat(), inv_fisher._fingerprint(), eps, n, w, fisher, gradient, b)
        return fm, eps, n, v.to(dev), rows, k, digest

    prepared, error = _local(prepare)
    k = _removal_size(comm, None if prepared is None else prepared[5], error, "ssse_update")
    fm, eps, n, v, rows, _, digest = prepared
    comm.same(digest, "ssse_update: the model's parameters, the inverse or the arguments")
    _check_remaining(n, k)
    inv, cols = inv_fisher, inv_fisher.columns
    v = comm.all_reduce_sum(v, "ssse_update (sum of the gradients)")
    if rows is not None:
        counts = [r[0] for r in comm.ints([rows.shape[0]], "ssse_update (rows)")]
        rows = comm.all_to_all_rows(rows, inv.sharding, counts,
                                    "ssse_update (exchange of gradient slices)").to(inv.device)

    def step():
        theta = fm.flat(dtype=inv.dtype, device=inv.device)[cols]
        if theta.numel() == 0:
            return theta
        return inv.local.apply_update(theta, v[cols], eps / (n - k), without=rows)

    theta_hat = _owner_step(comm, inv, step, "the SSSE update")
    return finish_update(fm, theta_hat, inplace=inplace, what="the SSSE update")


def newton_erase(model: nn.Module, loss_fn, removed, *, inv_fisher: ShardedInverseFisher,
                 n_total: int, weight_decay: float = 0.0, likelihood: str = "categorical",
                 inplace: bool = False, group=None,
                 timeout: float | None = None) -> dict[str, torch.Tensor]:
    r""":func:`ssse.newton_erase` (the leave-k-out Newton step, nothing to tune) with a
    sharded Gauss–Newton inverse (collective):

    .. math:: \hat\theta = \theta^* + \frac1N (F' - \delta I)^{-1} \sum_{i\in S}
              \nabla\ell_i(\theta^*),\qquad \delta = \lambda - \frac{(n-k)\,w}{N}

    each owner solving its blocks with :math:`F'` its blocks downdated by the Gauss–Newton rows
    of :math:`S` (:meth:`ssse_ext.BlockInverseFisher.solve_changed`). The refinement steps of
    :func:`ssse.newton_erase` are not offered sharded.

    Args:
        removed: *this rank's share* of :math:`S`.
        Others: as in :func:`ssse.newton_erase` and :func:`ssse_update`.

    Returns:
        A new ``state_dict``, the same bits on every rank; on any error nothing is changed.
    """
    comm = _Comm(group, timeout)

    def prepare():
        fm = _check_sharded_request(model, loss_fn, removed, inv_fisher, comm)
        n = check_positive_int(n_total, "n_total")
        w = check_nonneg_float(weight_decay, "weight_decay")
        check_choice(likelihood, "likelihood", LIKELIHOODS)
        if inv_fisher.curvature != "ggn":
            raise ValueError(f'inv_fisher must hold the Gauss-Newton matrix (fit with '
                             f'curvature="ggn"), got curvature={inv_fisher.curvature!r}')
        batches = list(iter_batches(removed, "removed", device=fm.device))
        k = sum(x.shape[0] for x, _ in batches)
        dt = inv_fisher.dtype
        rows = _rows_of(fm, loss_fn, batches, dtype=dt, curvature="ggn", likelihood=likelihood,
                        weight_decay=0.0)
        g, _ = gradient_sum(model, loss_fn, batches, weight_decay=w, dtype=dt, name="removed")
        digest = _digest(fm.flat(), inv_fisher._fingerprint(), n, w, likelihood)
        return fm, n, w, rows, g, k, digest

    prepared, error = _local(prepare)
    k = _removal_size(comm, None if prepared is None else prepared[5], error, "newton_erase")
    fm, n, w, rows, g, _, digest = prepared
    comm.same(digest, "newton_erase: the model's parameters, the inverse or the arguments")
    _check_remaining(n, k)
    delta = _shift(inv_fisher, n, k, w)
    theta_hat = _newton_step(comm, inv_fisher, fm.flat(dtype=torch.float64), rows, g, n,
                             delta, fm.dtype, "the Newton erasure")
    return finish_update(fm, theta_hat.to(fm.device), inplace=inplace,
                         what="the Newton erasure")


def _newton_step(comm: _Comm, inv: ShardedInverseFisher, theta64: torch.Tensor,
                 rows: torch.Tensor, g: torch.Tensor, n: int, delta: float, out_dtype,
                 what: str, check_downdate: bool = False):
    """``theta + (F' - delta I)^{-1} g / N`` in float64, rounded to ``out_dtype``, gathered
    (as :func:`ssse.newton.newton_refined`'s first step); optionally checks that the owners'
    blocks can be downdated by ``rows`` (for :class:`Eraser`). Returns (theta, owner rows)."""
    cols = inv.columns
    g = comm.all_reduce_sum(g, f"{what} (sum of the gradients)")
    counts = [r[0] for r in comm.ints([rows.shape[0]], f"{what} (rows)")]
    mine = comm.all_to_all_rows(rows, inv.sharding, counts,
                                f"{what} (exchange of Gauss-Newton slices)").to(inv.device)
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


class Eraser:
    r""":class:`ssse.Eraser` with a sharded inverse: a sequence of deletion requests served by
    every rank of ``group`` together (every method is collective).

    :meth:`fit` takes each rank's share of the training set and fits the sharded inverse;
    :meth:`erase` takes each rank's share of the request's samples, computes their gradients
    and rows where they are, sends the owners their slices, and applies the step and the
    downdate of every block; all ranks hold the same parameters (:attr:`theta`) afterwards.
    A request that fails on any rank changes nothing on any rank.

    Args:
        exchange, group, timeout: as in :func:`fit_inverse_fisher`.
        Others: as in :class:`ssse.Eraser`.
    """

    def __init__(self, model: nn.Module, loss_fn, *, damping: float,
                 block_size: int | None = None, layout="per_parameter",
                 weight_decay: float = 0.0, minibatch: int = 1,
                 dtype: torch.dtype | None = None, device=None, chunk_size: int | None = None,
                 max_memory: int | None = None, curvature: str = "empirical",
                 likelihood: str = "categorical", mc_samples: int = 1,
                 exchange: str = "auto", group=None, timeout: float | None = None):
        _configure(self, model, loss_fn, damping=damping, block_size=block_size,
                   layout=layout, weight_decay=weight_decay, minibatch=minibatch, dtype=dtype,
                   device=device, chunk_size=chunk_size, max_memory=max_memory,
                   curvature=curvature, likelihood=likelihood, mc_samples=mc_samples)
        self.exchange = check_choice(exchange, "exchange", EXCHANGES)
        self.group = group
        self.timeout = None if timeout is None else check_positive_float(timeout, "timeout")
        self.inv_fisher: ShardedInverseFisher | None = None
        self.n: int | None = None
        self.theta: torch.Tensor | None = None
        self._star: dict | None = None
        self.history: list[tuple[int, float | None]] = []

    def fit(self, train_data, *, n_total: int | None = None) -> "Eraser":
        """Fits the sharded inverse at the model's parameters (:math:`\\theta^*`) from every
        rank's share ``train_data`` of :math:`D`; ``n_total`` as in :meth:`ssse.Eraser.fit`
        (all ranks' samples)."""
        inv = fit_inverse_fisher(self.model, self.loss_fn, train_data, damping=self.damping,
                                 layout=self.layout, weight_decay=self.weight_decay,
                                 minibatch=self.minibatch, dtype=self.dtype, device=self.device,
                                 chunk_size=self.chunk_size, max_memory=self.max_memory,
                                 curvature=self.curvature, likelihood=self.likelihood,
                                 mc_samples=self.mc_samples, exchange=self.exchange,
                                 group=self.group, timeout=self.timeout)
        if n_total is not None:
            n = check_positive_int(n_total, "n_total")
        elif self.minibatch == 1:
            n = round(inv.normalizer / (self.mc_samples if self.curvature == "mc" else 1))
        else:
            comm = _Comm(self.group, self.timeout)
            sizes = comm.ints([data_size(train_data) if is_pair(train_data) else -1],
                              "Eraser.fit (samples)")
            if any(s[0] < 0 for s in sizes):
                raise ValueError("n_total must be given with minibatch > 1 and an iterable "
                                 "train_data (the fit counts mini-batches, not samples)")
            n = sum(s[0] for s in sizes)
        self.inv_fisher, self.n = inv, n
        self.theta = self._fm.flat(dtype=self.dtype, device=self.device)
        self._star = {k: v.clone() for k, v in self._fm.param_dict(self.dtype).items()}
        self.history = []
        return self

    def erase(self, removed, *, epsilon: float | None = None, fisher: str = "full",
              inplace: bool = False) -> dict[str, torch.Tensor]:
        r"""Serves one deletion request (see :meth:`ssse.Eraser.erase`); ``removed`` is this
        rank's share of :math:`S_t` (possibly empty). Without ``epsilon`` (``curvature="ggn"``)
        it takes the leave-k-out Newton step (no refinement). Returns the new ``state_dict``,
        the same bits on every rank; on any error on any rank nothing is changed anywhere."""
        comm = _Comm(self.group, self.timeout)
        inv = self.inv_fisher

        def prepare():
            if inv is None:
                raise RuntimeError("call fit(train_data) before erase()")
            check_data(removed, "removed")
            check_choice(fisher, "fisher", FISHER_VARIANTS)
            eps = None
            if epsilon is None and self.curvature != "ggn":
                raise ValueError('epsilon must be given unless the Eraser was made with '
                                 'curvature="ggn" (the Newton step needs the Gauss-Newton '
                                 'inverse)')
            if epsilon is not None:
                eps = check_positive_float(epsilon, "epsilon")
            batches = list(iter_batches(removed, "removed", device=self._fm.device))
            k = sum(x.shape[0] for x, _ in batches)
            rows, v = self._rows_and_gradient(batches)
            digest = _digest(self.theta, inv._fingerprint(), self.n, eps, fisher)
            return eps, k, rows, v, digest

        prepared, error = _local(prepare)
        k = _removal_size(comm, None if prepared is None else prepared[1], error,
                          "Eraser.erase")
        eps, _, rows, v, digest = prepared
        comm.same(digest, "Eraser.erase: the parameters, the inverse or the arguments")
        if k >= self.n:
            raise ValueError(f"removed has {k} samples (all ranks), but only {self.n} remain")
        cols = inv.columns
        what = "the erasure"
        if eps is None:
            delta = _shift(inv, self.n, k, self.weight_decay)
            theta, mine = _newton_step(comm, inv, self.theta.to(torch.float64), rows, v, self.n,
                                       delta, self.dtype, what, check_downdate=True)
        else:
            v = comm.all_reduce_sum(v, f"{what} (sum of the gradients)")
            counts = [r[0] for r in comm.ints([rows.shape[0]], f"{what} (rows)")]
            mine = comm.all_to_all_rows(rows, inv.sharding, counts,
                                        f"{what} (exchange of row slices)").to(inv.device)
            leave = fisher == "leave_k_out"

            def step():
                theta = self.theta[cols]
                if theta.numel() == 0:
                    return theta
                out = inv.local.apply_update(theta, v[cols], eps / (self.n - k),
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
        state = finish_update(self._fm, theta, inplace=inplace, what=what)
        self.theta, self.n = theta, self.n - k
        self.history.append((k, eps))
        return state

    def _rows_and_gradient(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows (as the fit added them) and summed gradient, both at theta*."""
        fm = self._fm
        if self.curvature == "empirical":
            grads = _rows_of(fm, self.loss_fn, batches, dtype=self.dtype, curvature="empirical",
                             likelihood=self.likelihood, weight_decay=self.weight_decay,
                             params=self._star).to(self.device)
            rows = _group_means(grads, self.minibatch) if grads.shape[0] else grads
            return rows, grads.sum(0)
        rows = _rows_of(fm, self.loss_fn, batches, dtype=self.dtype, curvature="ggn",
                        likelihood=self.likelihood, weight_decay=0.0,
                        params=self._star).to(self.device)
        if self.curvature == "mc":
            rows = rows * math.sqrt(self.mc_samples)
        v, _ = gradient_sum(self.model, self.loss_fn, batches, weight_decay=self.weight_decay,
                            dtype=self.dtype, params=self._star, name="removed")
        return rows, v.to(self.device)

    state_dict = _LocalEraser.state_dict

    def __repr__(self) -> str:
        return (f"distributed.Eraser(n={self.n}, requests={len(self.history)}, "
                f"layout={self.layout}, damping={self.damping:g}, "
                f"curvature={self.curvature!r}, world_size="
                f"{_rank_and_size(self.group)[1]})")


# ---- files: one safetensors file per rank and an index ------------------------------------------

def _shard_name(index: Path, token: str, rank: int, size: int) -> str:
    stem = index.name
    for suffix in (".index.json", ".json"):
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    return f"{stem}.{token}.rank{rank:05d}-of-{size:05d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state_meta(inv: ShardedInverseFisher) -> dict:
    return {"damping": inv.damping, "normalizer": inv.normalizer,
            "num_samples": inv.num_samples, "layout": inv.layout.to_dict(),
            "dtype": str(inv.dtype).removeprefix("torch."), "curvature": inv.curvature}


def save_inverse_fisher(path: str | os.PathLike, inv: ShardedInverseFisher, *, group=None,
                        timeout: float | None = None, **meta: Any) -> Path:
    """Saves a sharded inverse (collective): every rank writes its blocks to a safetensors file
    next to ``path``, then rank 0 writes the index ``path`` (JSON: the layout, the owners of the
    blocks, and each shard's file, blocks, size and SHA-256), with free-form ``meta``.

    Shard names carry a token of this save, and the index is written last (atomically), so an
    existing index at ``path`` and its shards stay valid until the new ones are complete; on
    any error on any rank the new shards are removed and every rank raises. The shards of the
    index replaced are removed afterwards.

    Returns:
        ``path``.
    """
    comm = _Comm(group, timeout)
    path = Path(path)
    _, error = _local(lambda: _check_group(inv, comm))
    comm.agree(error, "save_inverse_fisher (arguments)")
    comm.same(inv._fingerprint(), "save_inverse_fisher: the ranks' inverses")
    word = torch.tensor([secrets.randbits(62) if comm.rank == 0 else 0], dtype=torch.int64)
    token = f"{int(comm.broadcast(word, 0, 'save_inverse_fisher (token)')[0]):016x}"[-12:]
    shard = path.parent / _shard_name(path, token, comm.rank, comm.size)
    first, last = inv.block_range
    seg_bounds, b = [first], first
    for t in inv.local.segments:
        numel = 0
        while numel < t.numel():
            numel += inv.layout.sizes[b] ** 2
            b += 1
        if t.numel():
            seg_bounds.append(b)

    def write():
        from safetensors.torch import save_file

        tensors = {f"packed.{j}": t.detach().cpu().contiguous()
                   for j, t in enumerate(t for t in inv.local.segments if t.numel())}
        header = {"format": SHARD_FORMAT, "format_version": str(FORMAT_VERSION),
                  "ssse": json.dumps({"rank": comm.rank, "world_size": comm.size,
                                      "first": first, "last": last, "segments": seg_bounds,
                                      "token": token, "state": _state_meta(inv)})}
        with atomic_path(shard) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return [shard.stat().st_size, _sha256(shard)]

    def discard():
        if shard.exists():
            shard.unlink()

    written, error = _local(write)
    if error is not None:
        discard()
    try:
        comm.agree(error, "save_inverse_fisher (writing the shards)")
        sizes = [r[0] for r in comm.ints([0 if written is None else written[0]],
                                         "save_inverse_fisher (sizes)")]
        digests = comm.texts("" if written is None else written[1],
                             "save_inverse_fisher (fingerprints)")
        old = None

        def index():
            nonlocal old
            if comm.rank != 0:
                return
            if path.is_file():
                try:
                    old = json.loads(path.read_text())
                except (OSError, ValueError):
                    old = None
            shards = [{"rank": r, "file": _shard_name(path, token, r, comm.size),
                       "first": inv.sharding.bounds[r], "last": inv.sharding.bounds[r + 1],
                       "bytes": sizes[r], "sha256": digests[r]} for r in range(comm.size)]
            write_json(path, {"format": INDEX_FORMAT, "format_version": FORMAT_VERSION,
                              "state": _state_meta(inv), "world_size": comm.size,
                              "owners": list(inv.sharding.bounds), "shards": shards,
                              "meta": meta})

        _, error = _local(index)
        comm.agree(error, "save_inverse_fisher (writing the index)")
    except BaseException:
        discard()
        raise
    if comm.rank == 0 and isinstance(old, dict) and old.get("format") == INDEX_FORMAT:
        keep = {_shard_name(path, token, r, comm.size) for r in range(comm.size)}
        for entry in old.get("shards", []):
            name = entry.get("file") if isinstance(entry, dict) else None
            if isinstance(name, str) and name not in keep and "/" not in name:
                try:
                    (path.parent / name).unlink()
                except OSError:
                    pass
    return path


class _Index:
    """A validated index file."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"no such inverse-Fisher index: {path}")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not an ssse inverse-Fisher index ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path} is not an ssse inverse-Fisher index (format="
                             f"{data.get('format') if isinstance(data, dict) else None!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"{path} has format version {version!r}; this ssse reads up to "
                             f"{FORMAT_VERSION}")
        try:
            state = data["state"]
            self.layout = ssse_ext.BlockLayout.from_dict(state["layout"])
            self.config = ssse_ext.FisherConfig(float(state["damping"]),
                                                float(state["normalizer"]), self.layout,
                                                str(state.get("curvature", "empirical")))
            self.num_samples = int(state["num_samples"])
            self.dtype = {"float32": torch.float32, "float64": torch.float64}[state["dtype"]]
            self.sharding = Sharding(self.layout, tuple(data["owners"]))
            shards = data["shards"]
            if len(shards) != self.sharding.world_size:
                raise ValueError(f"{len(shards)} shards for {self.sharding.world_size} ranks")
            for r, entry in enumerate(shards):
                if (entry["rank"], entry["first"], entry["last"]) != \
                        (r, *self.sharding.blocks(r)) or "/" in entry["file"] or \
                        "\\" in entry["file"]:
                    raise ValueError(f"shard entry {r} does not match the owners")
            self.shards = shards
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid inverse-Fisher index: {exc}") from None
        self.path, self.meta = path, dict(data.get("meta", {}))

    def shard_path(self, rank: int) -> Path:
        return self.path.parent / self.shards[rank]["file"]


def _read_blocks(index: _Index, first: int, last: int, verify: bool) -> list[torch.Tensor]:
    """Blocks ``first .. last - 1`` from the shards that hold them, as segments."""
    from safetensors import safe_open

    offsets, pieces = index.layout.offsets, []
    for r, entry in enumerate(index.shards):
        lo, hi = max(first, entry["first"]), min(last, entry["last"])
        if lo >= hi:
            continue
        path = index.shard_path(r)
        if verify and _sha256(path) != entry["sha256"]:
            raise ValueError(f"the shard of rank {r} ({path}) does not match its fingerprint "
                             f"in {index.path}: it was changed or belongs to another save")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            try:
                meta = json.loads(header["ssse"])
                bounds = [int(b) for b in meta["segments"]]
                ok = header.get("format") == SHARD_FORMAT and meta["rank"] == r and \
                    (meta["first"], meta["last"]) == (entry["first"], entry["last"]) and \
                    bounds[0] == entry["first"] and bounds[-1] == entry["last"]
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"the shard of rank {r} ({path}) is not the shard {index.path} "
                                 "lists")
            for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
                s0, s1 = max(a, lo), min(b, hi)
                if s0 >= s1:
                    continue
                t = f.get_slice(f"packed.{j}")
                piece = t[offsets[s0] - offsets[a]:offsets[s1 - 1] - offsets[a]
                          + index.layout.sizes[s1 - 1] ** 2]
                if not bool(torch.isfinite(piece).all()):
                    raise ValueError(f"the shard of rank {r} ({path}) holds NaN or Inf")
                pieces.append(piece)
    return pieces


def load_inverse_fisher(path: str | os.PathLike, *, group=None, timeout: float | None = None,
                        device=None, dtype: torch.dtype | None = None,
                        verify: bool = True) -> tuple[ShardedInverseFisher, dict]:
    """Loads an inverse saved by :func:`save_inverse_fisher` onto this group (collective): the
    saved partition when the world size is the same, else a balanced one (re-sharding); each
    rank reads only the shards that hold its blocks. Without an initialised process group the
    one process gets every block (:meth:`ShardedInverseFisher.gather` then gives the whole
    inverse).

    Args:
        path: the index file.
        device, dtype: of the result (default: CPU, the saved dtype).
        verify: check every shard read against its SHA-256 in the index.

    Returns:
        ``(this rank's ShardedInverseFisher, the index's meta)``.

    Raises:
        FileNotFoundError: a shard file is missing (on every rank, naming the rank whose shard
            it is).
        ValueError: a file is not what the index says.
    """
    comm = _Comm(group, timeout)
    path = Path(path)
    device = check_device(device)
    dtype = check_dtype(dtype)
    index, error = _local(lambda: _Index(path))
    comm.agree(error, "load_inverse_fisher (the index)")
    saved = index.sharding
    sharding = saved if saved.world_size == comm.size else \
        Sharding.balanced(index.layout, comm.size)
    first, last = sharding.blocks(comm.rank)
    needed = [r for r in range(saved.world_size)
              if max(first, saved.bounds[r]) < min(last, saved.bounds[r + 1])]
    missing = [r for r in needed if not index.shard_path(r).is_file()]
    rows = comm.ints([missing[0] if missing else -1], "load_inverse_fisher (shard files)")
    lost = sorted({row[0] for row in rows if row[0] >= 0})
    if lost:
        r = lost[0]
        raise FileNotFoundError(f"the shard of rank {r} of the saved inverse is missing: "
                                f"{index.shard_path(r)} (listed in {path})"
                                + (f"; also missing: the shards of ranks "
                                   f"{', '.join(map(str, lost[1:]))}" if lost[1:] else ""))

    def read():
        pieces = _read_blocks(index, first, last, verify)
        pieces = [p.to(device=device, dtype=dtype or index.dtype) for p in pieces]
        if not pieces:
            pieces = [torch.zeros(0, dtype=dtype or index.dtype, device=device)]
        local = _local_inverse(pieces, sharding, comm.rank, index.config.damping,
                               index.config.normalizer, index.config.curvature,
                               index.num_samples)
        return ShardedInverseFisher(local, sharding, comm.rank)

    inv, error = _local(read)
    comm.agree(error, "load_inverse_fisher (reading the shards)")
    return inv, index.meta


def is_index(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an index written by :func:`save_inverse_fisher` (not a
    single-file inverse)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        return head.lstrip().startswith(b"{") and INDEX_FORMAT.encode() in head
    except OSError:
        return False
