r"""Deletion requests with sample ids, recorded in an append-only JSON-lines ledger, and the
crash rule of a served model (the ledger, the model file and the inverse file).

One line per request served (:func:`record`), never rewritten::

    {"ledger": 2, "prev": "9c1e...", "request": "r-17", "time": "2026-01-05T10:00:00+00:00",
     "k": 5, "ids_sha256": "...", "id_digests": ["3f1c...", ...], "method": "ssse",
     "epsilon": 0.5, "fisher": "full", "curvature": "empirical", "refine_steps": 0,
     "n_before": 300, "n_after": 295, "model_before": "sha256:...", "model_after": "sha256:...",
     "inverse_before": "sha256:...", "inverse_after": "sha256:...",
     "health": {"residual": 2e-08, "block": 3, "tolerance": 0.00035, "vectors": 3}}

Sample ids are not stored in clear: ``ids_sha256`` hashes the sorted ids of the request, and
``id_digests`` holds 64 bits of the SHA-256 of each id, enough to refuse an id erased before.
Fingerprints are :func:`ssse.io.fingerprint` of the model's ``state_dict`` and of the inverse's
tensors (its blocks and health probe).

**The chain.** ``prev`` is the SHA-256 (hex) of the previous line's bytes without its newline
(:func:`entry_digest`); the first line's is :data:`GENESIS`. Every read verifies the chain and
refuses (:class:`LedgerError`, naming the line) a ledger with a line removed, inserted,
duplicated, reordered or edited before its last line. The last line has no successor to vouch
for it: the files a ledger serves record the digest of the line that produced them
(``ledger_entry`` in their headers; :func:`check_served`), so a ledger cut short, emptied, or
edited at its end is refused too. Lines of version 1 (written before the chain) carry no
``prev``; they are read as a prefix only, and the first chained line after them holds the
SHA-256 of all their bytes instead of :data:`GENESIS`, which covers them from then on.

**Crash rule** (:func:`commit`, :func:`recover`). A request writes, in this order: the new
inverse and the new model to *pending* files next to the live ones (each atomically), then its
ledger line (``fsync``: the commit point), then renames each pending file onto the live one.
A crash anywhere leaves a state that the next run (:func:`recover`, under the locks of the
ledger and of the files it serves) settles before doing anything else: without the ledger
line, the request never happened (its pending files are deleted: rolled back); with it, the
request is completed (the pending files whose fingerprint is the line's ``*_after`` replace the
live files: rolled forward). A last line that does not parse (a crash while appending it) is
torn: it counts as absent and is cut off. A last line that parses and fits the chain is
complete, newline or not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .faults import crash_point
from .io import FileFormatError, fsync_dir, read_metadata

__all__ = ["GENESIS", "LEDGER_VERSION", "Ledger", "LedgerBusyError", "LedgerError",
           "LedgerState", "check_ids", "check_served", "commit", "entry_digest", "id_digests",
           "ids_sha256", "lock_file", "pending_path", "record", "recover"]

#: Version of the ledger's line format (2: chained by ``prev``; 1: unchained, read only).
LEDGER_VERSION = 2
#: ``prev`` of a ledger's first line.
GENESIS = "0" * 64


class LedgerBusyError(RuntimeError):
    """Another process holds the lock of the ledger, or of a file it serves."""


class LedgerError(ValueError):
    """The ledger is broken (its chain does not hold), or does not describe the files it is
    said to serve."""


# ---- ids ------------------------------------------------------------------------------------

def check_ids(ids, name: str = "ids") -> list:
    """A non-empty sequence of distinct sample ids, all ``int`` (not ``bool``) or all ``str``."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) and \
            not hasattr(ids, "tolist"):
        raise TypeError(f"{name} must be a sequence of ints or strings, got "
                        f"{type(ids).__name__}")
    out = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if not out:
        raise ValueError(f"{name} must not be empty")
    ints = all(isinstance(i, int) and not isinstance(i, bool) for i in out)
    if not ints and not all(isinstance(i, str) for i in out):
        bad = next((i for i in out if isinstance(i, bool) or not isinstance(i, (int, str))),
                   None)
        if bad is None:
            raise TypeError(f"{name} must hold ints or strings, not a mix of both")
        raise TypeError(f"{name} must hold ints or strings, got {type(bad).__name__} {bad!r}")
    if len(set(out)) != len(out):
        seen, dup = set(), None
        for i in out:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise ValueError(f"{name} must be distinct, got {dup!r} twice")
    return out


def ids_sha256(ids) -> str:
    """SHA-256 of the sorted ids (JSON), the identity of a request's set of samples."""
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()


def id_digests(ids) -> list[str]:
    """64 bits (16 hex digits) of the SHA-256 of every id, in sorted order."""
    return [hashlib.sha256(json.dumps(i).encode()).hexdigest()[:16] for i in sorted(ids)]


def record(request_id: str, ids, *, method: str, epsilon: float | None, fisher: str | None,
           curvature: str, refine_steps: int, n_before: int, n_after: int,
           health: dict | None, **fingerprints: str | None) -> dict:
    """A ledger line (see the module docstring); ``fingerprints``: ``model_before``,
    ``model_after``, ``inverse_before``, ``inverse_after``."""
    return {"ledger": LEDGER_VERSION, "request": request_id,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "k": len(ids), "ids_sha256": ids_sha256(ids), "id_digests": id_digests(ids),
            "method": method, "epsilon": epsilon, "fisher": fisher, "curvature": curvature,
            "refine_steps": refine_steps, "n_before": n_before, "n_after": n_after,
            **{k: fingerprints.get(k) for k in ("model_before", "model_after", "inverse_before",
                                                "inverse_after")},
            "health": health}


# ---- locks ----------------------------------------------------------------------------------

def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.ssse-lock")


@contextlib.contextmanager
def lock_file(path: str | os.PathLike, what: str = "the file") -> Iterator[Path]:
    """Holds an exclusive lock on ``path`` (yields it with symbolic links resolved), or raises
    :class:`LedgerBusyError` at once when another process holds it (``what`` names the file in
    that message).

    The lock is taken on a lock file beside the file (``.NAME.ssse-lock``), not on the file
    itself: served files are replaced by renames, which would leave a lock on the version they
    replace, and a ledger must not exist before its first request. The lock file, and any
    folder created for it, are removed on release."""
    import fcntl

    path = Path(path).resolve()
    lock = _lock_path(path)
    created = []
    folder = path.parent
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    for folder in reversed(created):
        folder.mkdir(exist_ok=True)
    fd = None
    try:
        while fd is None:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = None
                raise LedgerBusyError(f"{what} {path} is in use by another process (a request "
                                      "or a recovery on it); try again when it is done") from None
            # a holder unlinks the lock file before it unlocks: a lock on a file opened before
            # that is no lock at all
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
            if current is None or not os.path.samestat(os.fstat(fd), current):
                os.close(fd)
                fd = None
        yield path
    finally:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty: the request wrote there
                break


# ---- the ledger file ------------------------------------------------------------------------

def _encode(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=False).encode()


def entry_digest(entry: dict) -> str:
    """The SHA-256 (hex) of the line that records ``entry``: the next line's ``prev``."""
    return hashlib.sha256(_encode(entry)).hexdigest()


@dataclasses.dataclass(frozen=True)
class LedgerState:
    """What a verified read of a ledger found (:meth:`Ledger.verify`).

    Attributes:
        path: the ledger.
        exists: whether the file exists.
        entries: the complete lines, in order.
        digests: the SHA-256 of each of those lines (without its newline).
        length: the bytes those lines take.
        torn: whether a torn last line follows them (a crash while appending).
        terminated: whether the last complete line ends with its newline.
        unchained: how many leading lines are of version 1 (no chain).
        next_prev: the ``prev`` of the next line.
    """

    path: Path
    exists: bool
    entries: list
    digests: list
    length: int
    torn: bool
    terminated: bool
    unchained: int
    next_prev: str

    @property
    def last(self) -> dict | None:
        return self.entries[-1] if self.entries else None


class Ledger:
    """An append-only JSON-lines file of served requests (one line each), chained by the
    SHA-256 of each line (see the module docstring).

    Args:
        path: the file (created when the first request is appended; its folder must exist or
            be creatable).
    """

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file path, got {type(path).__name__}")
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"the ledger {self.path} is a directory, expected a file")

    def _broken(self, line: int, why: str) -> LedgerError:
        return LedgerError(f"the ledger {self.path} is broken at line {line}: {why}; a ledger is "
                           "append-only: restore it from a copy")

    def verify(self) -> LedgerState:
        """Reads the ledger and verifies its chain; :class:`LedgerError` (naming the line) for
        a broken one. A missing file is an empty ledger."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return LedgerState(self.path, False, [], [], 0, False, True, 0, GENESIS)
        entries, digests, seen = [], [], {}
        chained, unchained, pos, terminated, torn = False, 0, 0, True, False
        while pos < len(data):
            end = data.find(b"\n", pos)
            last = end < 0
            raw = data[pos:] if last else data[pos:end]
            n = len(entries) + 1
            try:
                entry = json.loads(raw)
            except ValueError:
                if last:  # cut short by a crash while it was appended
                    torn = True
                    break
                raise self._broken(n, "not a JSON line") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("request"), str):
                raise self._broken(n, "not a request")
            version = entry.get("ledger", 1)
            if isinstance(version, int) and version > LEDGER_VERSION:
                raise self._broken(n, f"it is of ledger version {version}; this ssse reads up "
                                      f"to {LEDGER_VERSION}")
            if "prev" in entry:
                if chained:
                    want = digests[-1]
                elif entries:  # the first chained line after unchained ones covers them all
                    want = hashlib.sha256(data[:pos]).hexdigest()
                else:
                    want = GENESIS
                if entry["prev"] != want:
                    after = f"line {n - 1}" if entries else "the start of a ledger"
                    raise self._broken(n, f"it does not follow {after} (its chain hash "
                                          "differs): a line was removed, inserted, duplicated, "
                                          "reordered or edited")
                chained = True
            elif chained or version != 1:
                raise self._broken(n, "it has no chain hash (prev)")
            else:
                unchained += 1
            request = entry["request"]
            if request in seen:
                raise self._broken(n, f"request {request!r} again (first at line "
                                      f"{seen[request]})")
            seen[request] = n
            entries.append(entry)
            digests.append(hashlib.sha256(raw).hexdigest())
            terminated = not last
            pos = len(data) if last else end + 1
        if chained:
            next_prev = digests[-1]
        elif entries:
            next_prev = hashlib.sha256(data[:pos] + (b"" if terminated else b"\n")).hexdigest()
        else:
            next_prev = GENESIS
        return LedgerState(self.path, True, entries, digests, pos, torn, terminated, unchained,
                           next_prev)

    def entries(self) -> list[dict]:
        """Every complete line, in order (a torn last line is ignored; see :meth:`repair`)."""
        return self.verify().entries

    def head(self) -> str | None:
        """The digest of the last line (``None``: no line yet)."""
        digests = self.verify().digests
        return digests[-1] if digests else None

    def repair(self) -> bool:
        """Cuts off a torn last line (a crash while appending); whether there was one."""
        state = self.verify()
        if state.torn:
            with open(self.path, "r+b") as f:
                f.truncate(state.length)
                os.fsync(f.fileno())
        return state.torn

    def requests(self) -> set[str]:
        return {e["request"] for e in self.entries()}

    def erased_digests(self) -> set[str]:
        return {d for e in self.entries() for d in e.get("id_digests", ())}

    def check(self, request_id: str, ids) -> None:
        """Refuses (``ValueError``) a request id already in the ledger, or an id it records as
        erased; nothing is written."""
        entries = self.entries()
        for e in entries:
            if e["request"] == request_id:
                raise ValueError(f"request {request_id!r} is already in the ledger {self.path} "
                                 f"(served {e.get('time')}): refused, nothing was changed")
        done = {d for e in entries for d in e.get("id_digests", ())}
        again = [i for i, d in zip(sorted(ids), id_digests(ids)) if d in done]
        if again:
            raise ValueError(f"{len(again)} of the ids were already erased (the ledger "
                             f"{self.path} records them), e.g. {again[:5]}: refused, nothing "
                             "was changed")

    def seal(self, entry: dict) -> dict:
        """``entry`` as the next line of this ledger: a copy with this format's version and its
        ``prev``, so that its :func:`entry_digest` is known before it is appended (the files a
        request writes record it). Call under :meth:`lock`, and append nothing else before it."""
        return self._seal(entry, self.verify())

    @staticmethod
    def _seal(entry: dict, state: LedgerState) -> dict:
        rest = {k: v for k, v in entry.items() if k not in ("ledger", "prev")}
        return {"ledger": LEDGER_VERSION, "prev": state.next_prev, **rest}

    def append(self, entry: dict) -> str:
        """Appends one line and makes it durable (``fsync``, and the folder's on creation);
        returns its digest. ``entry`` is sealed (:meth:`seal`) unless it was; a sealed entry
        that no longer follows the ledger's end is refused (:class:`LedgerError`). A torn last
        line is cut off first. Call under :meth:`lock` when other processes may append."""
        state = self.verify()
        if "prev" not in entry:
            entry = self._seal(entry, state)
        elif entry["prev"] != state.next_prev:
            raise LedgerError(f"the ledger {self.path} changed since the request was prepared "
                              "(it no longer ends with the line the request follows): nothing "
                              "was appended")
        line = _encode(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            if state.torn:
                f.truncate(state.length)
            f.write((b"" if state.terminated else b"\n") + line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if not state.exists:
            fsync_dir(self.path.parent)
        return hashlib.sha256(line).hexdigest()

    def lock(self) -> contextlib.AbstractContextManager:
        """Holds an exclusive lock on the ledger (:func:`lock_file`; ``LedgerBusyError`` when
        another process holds it): one request at a time, recovery included. Creates no
        ledger."""
        return lock_file(self.path, "the ledger")

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"


def check_served(state: LedgerState, what: str, path: str | os.PathLike, meta: dict,
                 fingerprint: str | None = None) -> None:
    """Refuses (:class:`LedgerError`) a file served with the ledger ``state`` whose header
    ``meta`` does not record the ledger's last line (``ledger_entry``, its digest; for files
    written before the chain, ``ledger_request``), saying whether the file is ahead of the
    ledger or behind it; and, when ``fingerprint`` (of the file's tensors) is given, one that is
    not what that line left (``{what}_after``). ``what``: ``"model"`` or ``"inverse"``."""
    digest, request = meta.get("ledger_entry"), meta.get("ledger_request")
    entries, where = state.entries, state.path
    if not entries:
        if digest is None and request is None:
            return
        empty = "is empty" if state.exists else "does not exist"
        raise LedgerError(f"{path} records request {request!r} of a ledger, but the ledger "
                          f"{where} {empty}: the {what} is ahead of the ledger (give the ledger "
                          "that served it, or restore that ledger from a copy)")
    last, n = entries[-1], len(entries)
    tail = f"the ledger {where} ends with request {last['request']!r} (line {n})"
    if digest is None and request is None:
        raise LedgerError(f"{path} records no request, but {tail}: the {what} is behind the "
                          f"ledger (an older copy, or not the {what} this ledger serves)")
    if digest is not None:
        at = [i for i, d in enumerate(state.digests) if d == digest]
    else:
        at = [i for i, e in enumerate(entries) if e["request"] == request]
    if not at:
        if request == last["request"]:
            raise LedgerError(f"{path} records request {request!r}, but line {n} of the ledger "
                              f"{where}, which records it, is not the line {path} was written "
                              "with: the ledger was edited at its end")
        raise LedgerError(f"{path} records request {request!r}, which the ledger does not hold "
                          f"({tail}): the {what} is ahead of the ledger, or was served with "
                          "another ledger")
    if at[-1] != n - 1:
        raise LedgerError(f"{path} records request {request!r} (line {at[-1] + 1}), but {tail}: "
                          f"the {what} is behind the ledger (an older copy)")
    if fingerprint is not None and fingerprint != last.get(f"{what}_after"):
        raise LedgerError(f"{path} is not the {what} the ledger's last request "
                          f"({last['request']!r}) left: it was changed outside the ledger")


# ---- the crash rule -------------------------------------------------------------------------

def pending_path(path: str | os.PathLike) -> Path:
    """Where a request writes the new version of ``path`` before its ledger line."""
    path = Path(path)
    return path.with_name(f".{path.name}.ssse-pending{path.suffix}")


def _file_fingerprint(path: Path) -> str | None:
    """The ``fingerprint`` recorded in an ssse file's header (``None``: none, or unreadable)."""
    try:
        return read_metadata(path)[1].get("fingerprint")
    except (FileNotFoundError, FileFormatError):
        return None


def commit(ledger: Ledger, entry: dict, writes: dict[str, tuple[Path, Callable[[Path], None]]]
           ) -> None:
    """Serves a request to files by the crash rule: ``writes[name] = (live path, writer)``;
    each writer saves the new version (with ``fingerprint`` = ``entry[name + "_after"]`` and
    ``ledger_entry`` = :func:`entry_digest` of ``entry`` in its header) to the path it is given.
    ``entry``: sealed by :meth:`Ledger.seal`. Call under :meth:`Ledger.lock` and the files'
    :func:`lock_file`, after :func:`recover`."""
    for name, (path, write) in writes.items():
        write(pending_path(path))
        crash_point(f"ledger-pending-{name}")
    ledger.append(entry)
    crash_point("ledger-appended")
    for name, (path, _) in writes.items():
        os.replace(pending_path(path), path)
        crash_point(f"ledger-renamed-{name}")
    for folder in {Path(p).parent for p, _ in writes.values()}:
        fsync_dir(folder)


def recover(ledger: Ledger, files: dict[str, Path]) -> list[str]:
    """Settles what a crash left (see the module docstring) for the live files ``files[name]``
    (``name`` as in the ledger's ``{name}_after`` fields); returns one line per action taken.
    Call under :meth:`Ledger.lock` and the files' :func:`lock_file`."""
    done = []
    if ledger.repair():
        done.append(f"cut off the torn last line of {ledger.path} (a request interrupted "
                    "before it was recorded)")
    entries = ledger.entries()
    last = entries[-1] if entries else None
    for name, path in files.items():
        path = Path(path)
        pending = pending_path(path)
        if not pending.exists():
            continue
        after = None if last is None else last.get(f"{name}_after")
        if after is not None and _file_fingerprint(pending) == after and \
                _file_fingerprint(path) != after:
            os.replace(pending, path)
            fsync_dir(path.parent)
            done.append(f"completed request {last['request']!r} interrupted by a crash: "
                        f"{path} is now its result")
        else:
            pending.unlink()
            done.append(f"rolled back a request interrupted before it was recorded: removed "
                        f"{pending}")
    return done
