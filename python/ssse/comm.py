r"""Collectives for the library's functions: one protocol, two implementations.

:class:`Comm` is one process (the default of every ``comm=`` argument): it has rank 0 of 1 and
every collective returns its input. :class:`TorchComm` runs the same collectives over a
``torch.distributed`` process group (gloo between CPUs, NCCL between GPUs), with a timeout on
every one, a watchdog that ends a process stuck past it, and the failure of any rank turned
into an exception on every rank (:class:`DistributedError`). Under ``torchrun``, :func:`init`
makes the process group and returns its :class:`TorchComm`::

    comm = ssse.comm.init()
    inv = ssse.fit_inverse_fisher(model, loss_fn, my_share, damping=1e-3, comm=comm)

Every rank passes its share of the data (:meth:`Comm.share`); the functions agree on a failure
before raising, so a rank that raises makes every rank raise and nothing is half-changed.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.distributed as dist

from ssse_ext.validation import check_choice, check_device, check_int, check_positive_float

if TYPE_CHECKING:
    from .sharding import Sharding

__all__ = ["IN_FLIGHT", "Comm", "DEFAULT_TIMEOUT", "DistributedError", "EXCHANGES", "Hold",
           "InFlight", "TorchComm", "WATCHDOG_EXIT_CODE", "Watchdog", "digest", "init",
           "launched", "one_process", "run_local"]

#: Seconds a collective may wait for the other ranks (torch's own default for gloo and NCCL).
DEFAULT_TIMEOUT = 1800.0
#: How a sharded fit exchanges its rows (:mod:`ssse.sharded_fit`).
EXCHANGES = ("auto", "reduce_scatter", "all_to_all")
#: Exit status of a process ended by the watchdog.
WATCHDOG_EXIT_CODE = 70
# Characters of a failed rank's message sent to the others.
_MAX_MESSAGE = 2000
# The watchdog fires this long after a collective's own timeout: the backend should have raised
# by then, so the process is stuck for good.
_WATCHDOG_GRACE = 10.0
# Seconds a collective waits beyond the process group's timeout when that is the timeout used.
_BACKEND_FIRST = 2.0
# Seconds a collective that ended waits for gloo to let go of its tensors before leaving them
# held (InFlight): gloo's worker does so at once unless it is descheduled.
_RELEASE_WAIT = 1.0


class DistributedError(RuntimeError):
    """Another rank failed (its message is included), exited, or did not reach a collective
    within the timeout."""


# ---- the tensors of collectives, held until the backend has let go of them ---------------------
#
# A backend keeps references to a collective's tensors and drops them on a thread of its own:
# gloo's worker a moment *after* it woke the thread that waits, NCCL's watchdog once the
# kernels are done. torch keeps a tensor's Python object alive while C++ shares the tensor, so
# the thread that drops the last C++ reference besides the Python object's own must take the
# GIL to release that object. If the interpreter is finalising by then, Python ends the thread
# (``pthread_exit``) inside a ``noexcept`` destructor and the process aborts with ``terminate
# called without an active exception``, whatever its work had done.
#
# So every collective's tensors get one more C++ reference, from a :class:`torch.ScriptList`,
# taken before the collective is issued: the backend's release is then never the last one
# besides the Python object's, and needs no GIL. The hold is dropped here, under the GIL, once
# the tensors' use counts show that the backend has let go; what the backend still holds when
# the interpreter exits is never dropped.

# Longest pause between two looks at a backend that has finished but not yet let go: its
# release follows the end of the operation by microseconds unless its thread is descheduled.
_MAX_PAUSE = 1e-3


class Hold:
    """One collective's tensors: a C++ reference to each, and the use counts with it."""

    __slots__ = ("tensors", "_cpp", "counts")

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        self._cpp = torch.ScriptList(tensors)
        self.counts = [t._use_count() for t in tensors]

    def released(self) -> bool:
        """Whether every reference taken since the hold was made is gone."""
        return all(t._use_count() <= c for t, c in zip(self.tensors, self.counts))


class InFlight:
    """The holds of this process's collectives that the backend may still reference."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holds: list[Hold] = []
        self._at_exit_registered = False

    def hold(self, items: Iterable) -> Hold:
        """Holds the tensors among ``items`` (tensors in lists included). Call it *before*
        the collective is issued: an exception at any later point, Ctrl-C included, leaves
        them held."""
        tensors: list[torch.Tensor] = []
        for item in items:
            if isinstance(item, torch.Tensor):
                tensors.append(item)
            elif isinstance(item, (list, tuple)):
                tensors.extend(t for t in item if isinstance(t, torch.Tensor))
        h = Hold(tensors)
        with self._lock:
            self._holds.append(h)
            if not self._at_exit_registered:
                atexit.register(self._at_exit)
                self._at_exit_registered = True
        return h

    def wait(self, h: Hold, seconds: float) -> bool:
        """Waits up to ``seconds`` for the backend to let go of ``h`` (a collective that has
        ended), then drops every hold it let go of; returns whether it let go of ``h``."""
        deadline = time.monotonic() + seconds
        pause = 0.0
        while not h.released() and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(max(2 * pause, 1e-5), _MAX_PAUSE)
        self.drop_released()
        return h.released()

    def drop_released(self) -> int:
        """Drops the holds the backend let go of; returns how many are left."""
        with self._lock:
            self._holds = [h for h in self._holds if not h.released()]
            return len(self._holds)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is held."""
        with self._lock:
            return any(x is t for h in self._holds for x in h.tensors)

    def __len__(self) -> int:
        with self._lock:
            return len(self._holds)

    def _at_exit(self) -> None:
        if not self.drop_released():
            return
        # Operations still pending (one that timed out here while the backend waits on the
        # other ranks): finalisation would drop their holds and leave the backend's release
        # the last one again, so they must outlive the interpreter.
        import ctypes

        with self._lock:
            left, self._holds = self._holds, []
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(left))


#: The process's holds (of every process group: the use counts tell them apart).
IN_FLIGHT = InFlight()


# ---- collectives: timeouts, agreement, watchdog -------------------------------------------------

class Watchdog:
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
                # A daemon, never joined: it must outlive a stuck collective, and it holds
                # only numbers and strings, so ending it with the interpreter frees nothing
                # in C++.
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
                sys.stderr.write(f"ssse: watchdog: {late[0]} is still waiting "
                                 f"{self.grace:g} s after its timeout; another rank is gone "
                                 f"or stuck. Exiting with status {WATCHDOG_EXIT_CODE}.\n")
                sys.stderr.flush()
                self.exit_fn(WATCHDOG_EXIT_CODE)


_WATCHDOG = Watchdog()
# torch >= 2.12 renamed all_gather_into_tensor (same semantics)
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def rank_and_size(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    if group is not None:
        raise ValueError("group was given but torch.distributed is not initialised")
    return 0, 1


def group_timeout(group) -> float:
    """The process group's own timeout (what its backend waits), or :data:`DEFAULT_TIMEOUT`
    where torch does not tell it."""
    try:
        pg = group or dist.group.WORLD
        device = torch.device("cuda") if dist.get_backend(group) == "nccl" else \
            torch.device("cpu")
        return float(pg._get_backend(device).options._timeout.total_seconds())
    except Exception:  # a private torch API: any change falls back to the default
        return DEFAULT_TIMEOUT


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


class Comm:
    """One process: rank 0 of 1, and every collective returns its input (a copy where the
    many-process collective returns a new tensor, so that callers may write to the result).

    The protocol of the collectives the library runs; :class:`TorchComm` implements it over a
    process group. Each collective names ``what`` it is for (the messages of failures) and
    counts the bytes this rank sends, by ``kind``, in :attr:`sent`. :attr:`exchange` is how a
    sharded fit exchanges its rows (:data:`EXCHANGES`; :mod:`ssse.sharded_fit`)."""

    def __init__(self):
        self.group = None
        self.rank, self.size = 0, 1
        self.timeout = DEFAULT_TIMEOUT
        self.exchange = "auto"
        self.device = torch.device("cpu")
        self.sent: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    def share(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (samples, removal indices): ranks get
        ``n // P`` or ``n // P + 1`` items, in rank order."""
        n = check_int(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        lo = self.rank * (n // self.size) + min(self.rank, n % self.size)
        return range(lo, lo + n // self.size + (self.rank < n % self.size))

    def sent_since(self, before: dict[str, int], *kinds: str) -> int:
        """Bytes of ``kinds`` sent since :attr:`sent` was ``before`` (a copy of it)."""
        return sum(self.sent.get(k, 0) - before.get(k, 0) for k in kinds)

    def _count(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)

    def _run(self, what: str, fn, *args, **kwargs) -> None:
        raise RuntimeError(f"{what}: a one-process Comm runs no collective")

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

    def texts(self, text: str, what: str, *, whole: bool = False) -> list[str]:
        """Every rank's short text (UTF-8 bytes in tensors: nothing is pickled), cut to
        2000 bytes unless ``whole`` (then as long as the longest)."""
        data = text.encode("utf-8")
        data = data if whole else data[:_MAX_MESSAGE]
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
            messages = self.texts("" if error is None else first_line(error), what)
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
        """The ``(d,)`` vector (or ``(d, r)`` matrix) whose rows ``sharding.columns(q)`` are rank
        ``q``'s ``part`` (``(width,)`` or ``(width, r)``, the same ``r`` on every rank): the
        same bits on every rank."""
        if self.size == 1:
            return part.clone()
        tail = tuple(part.shape[1:])
        per = torch.Size(tail).numel()  # elements per column
        widths = [sharding.width(q) * per for q in range(self.size)]
        buf = torch.zeros(max(widths), dtype=part.dtype, device=self.device)
        buf[:part.numel()] = part.reshape(-1).to(self.device)
        rows = self.all_gather(buf, what, kind="parameters")
        return torch.cat([rows[q, :widths[q]].view((-1,) + tail) for q in range(self.size)]
                         ).to(part.device)

    def exchange_rows(self, rows: torch.Tensor, sharding: Sharding, what: str) -> torch.Tensor:
        """Every rank's ``(m_q, d)`` rows (this rank's: ``rows``) cut to this rank's columns,
        ``(sum_q m_q, width)`` in rank order (:meth:`all_to_all_rows` once the ranks have told
        their counts)."""
        counts = [r[0] for r in self.ints([rows.shape[0]], f"{what} (rows)")]
        return self.all_to_all_rows(rows, sharding, counts, f"{what} (exchange of row slices)")

    def gather_step(self, step: Callable[[], torch.Tensor], sharding: Sharding,
                    what: str) -> torch.Tensor:
        """Runs the rank-local ``step``, which returns this rank's columns of a result (as
        :meth:`gather_columns` takes them), agrees on its failure (raised on every rank), and
        all-gathers the whole result: the same bits on every rank."""
        part, error = run_local(step)
        self.agree(error, f"{what} (the blocks of the owners)")
        return self.gather_columns(part, sharding, f"{what} (all-gather of the parameters)")


class TorchComm(Comm):
    """The collectives over a ``torch.distributed`` process group ``group`` (default: the
    world), each waiting at most ``timeout`` seconds (default: the group's own timeout, which
    also bounds how long a process whose collective failed waits at exit for the backend to
    give up its pending operation: set it with ``init_process_group(timeout=...)``). A lost or
    late rank becomes :class:`DistributedError`. Without an initialised process group it is a
    group of one. ``exchange``: how a sharded fit exchanges its rows (:data:`EXCHANGES`)."""

    def __init__(self, group=None, timeout: float | None = None, exchange: str = "auto"):
        super().__init__()
        self.exchange = check_choice(exchange, "exchange", EXCHANGES)
        if timeout is not None:
            timeout = check_positive_float(timeout, "timeout")
        self.group = group
        self.rank, self.size = rank_and_size(group)
        self.timeout = timeout or (group_timeout(group) if self.size > 1 else DEFAULT_TIMEOUT)
        # With the group's own timeout, wait a little longer than the backend: it gives up its
        # operation first, so none is left pending when DistributedError is raised (a pending
        # gloo operation makes the process wait at exit, until the backend gives up).
        self._wait = self.timeout + (_BACKEND_FIRST if timeout is None else 0.0)
        if self.size > 1 and dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _run(self, what: str, fn, *args, **kwargs) -> None:
        # Held from before the call until the backend has let go of the tensors, which it
        # does on its own thread after the wait returns (InFlight: why that thread
        # must not be the last to let go while the interpreter shuts down).
        held = IN_FLIGHT.hold(args)
        token = _WATCHDOG.enter(f"rank {self.rank}: {what}", self._wait)
        try:
            ended = False
            try:
                work = fn(*args, group=self.group, async_op=True, **kwargs)
                if work is not None:
                    work.wait(timeout=datetime.timedelta(seconds=self._wait))
                ended = True
            finally:
                work = None  # it references the tensors too
                # gloo lets go within microseconds of the end, so the tensors are free again
                # when a collective returns; NCCL's watchdog lets go once the kernels are
                # done, and a failed operation may still be pending: those holds are dropped
                # by a later collective, or kept for good at exit
                gloo_ended = ended and self.device.type == "cpu"
                IN_FLIGHT.wait(held, _RELEASE_WAIT if gloo_ended else 0.0)
        except Exception as exc:
            raise DistributedError(
                f"rank {self.rank} of {self.size}: {what} failed: another rank exited, failed "
                f"outside ssse, or did not reach this step within the timeout of "
                f"{self.timeout:g} s ({first_line(exc)})") from exc
        finally:
            _WATCHDOG.leave(token)



def one_process(comm: Comm | None) -> bool:
    """Whether ``comm`` (``None``: the default) stands for one process: the local path."""
    if comm is None:
        return True
    if not isinstance(comm, Comm):
        raise TypeError(f"comm must be a ssse.comm.Comm (e.g. ssse.comm.init()), got "
                        f"{type(comm).__name__}")
    return comm.size == 1


def run_local(step: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Runs a rank-local step, returning its result or the exception it raised (for
    :meth:`Comm.status`)."""
    try:
        return step(), None
    except Exception as exc:  # every failure is agreed on by all ranks before raising
        return None, exc


def digest(*parts) -> bytes:
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


def init(*, backend: str | None = None, device=None, timeout: float = DEFAULT_TIMEOUT,
         exchange: str = "auto") -> TorchComm:
    """Initialises the default process group from the launcher's environment (``torchrun``),
    unless one exists, and returns the :class:`TorchComm` of the world.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL for a CUDA ``device``, gloo otherwise.
        device: the device the process computes on; a CUDA device becomes
            ``cuda:LOCAL_RANK`` (one GPU per process) and is made current.
        timeout: seconds a collective may wait for the other ranks.
        exchange: how a sharded fit exchanges its rows (:data:`EXCHANGES`).
    """
    timeout = check_positive_float(timeout, "timeout")
    device = check_device(device)
    if dist.is_initialized():
        return TorchComm(exchange=exchange)
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
    return TorchComm(exchange=exchange)


