r"""Deletion requests with sample ids, recorded in an append-only JSON-lines ledger, and the
crash rule of a served model (the ledger, the model file and the inverse file).

One line per request served (:func:`record`), never rewritten::

    {"ledger": 1, "request": "r-17", "time": "2026-01-05T10:00:00+00:00", "k": 5,
     "ids_sha256": "...", "id_digests": ["3f1c...", ...], "method": "ssse", "epsilon": 0.5,
     "fisher": "full", "curvature": "empirical", "refine_steps": 0, "n_before": 300,
     "n_after": 295, "model_before": "sha256:...", "model_after": "sha256:...",
     "inverse_before": "sha256:...", "inverse_after": "sha256:...",
     "health": {"residual": 2e-08, "block": 3, "tolerance": 0.00035, "vectors": 3}}

Sample ids are not stored in clear: ``ids_sha256`` hashes the sorted ids of the request, and
``id_digests`` holds 64 bits of the SHA-256 of each id, enough to refuse an id erased before.
Fingerprints are :func:`ssse.io.fingerprint` of the model's ``state_dict`` and of the inverse's
tensors (its blocks and health probe).

**Crash rule** (:func:`commit`, :func:`recover`). A request writes, in this order: the new
inverse and the new model to *pending* files next to the live ones (each atomically), then its
ledger line (``fsync``: the commit point), then renames each pending file onto the live one.
A crash anywhere leaves a state that the next run (:func:`recover`, under the ledger's lock)
settles before doing anything else: without the ledger line, the request never happened
(its pending files are deleted: rolled back); with it, the request is completed (the pending
files whose fingerprint is the line's ``*_after`` replace the live files: rolled forward). A
torn last line (a crash while appending it) counts as absent and is cut off.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ._faults import crash_point
from .io import FileFormatError, _fsync_dir, read_metadata

__all__ = ["LEDGER_VERSION", "Ledger", "LedgerBusyError", "check_ids", "commit", "id_digests",
           "ids_sha256", "pending_path", "record", "recover"]

#: Version of the ledger's line format.
LEDGER_VERSION = 1


class LedgerBusyError(RuntimeError):
    """Another process holds the ledger's lock."""


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


# ---- the ledger file ------------------------------------------------------------------------

class Ledger:
    """An append-only JSON-lines file of served requests (one line each).

    Args:
        path: the file (created on the first request; its folder must exist or be creatable).
    """

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file path, got {type(path).__name__}")
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"the ledger {self.path} is a directory, expected a file")

    def _read(self) -> tuple[list[dict], int, bool]:
        """The complete entries, the byte length they take, and whether a torn line follows."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0, False
        entries, pos = [], 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                return entries, pos, True  # a line without its newline: cut short
            try:
                entry = json.loads(data[pos:end])
            except ValueError:
                raise ValueError(f"the ledger {self.path} is corrupt at byte {pos} (not a JSON "
                                 "line); it is append-only: restore it from a copy") from None
            if not isinstance(entry, dict) or "request" not in entry:
                raise ValueError(f"the ledger {self.path} is corrupt at byte {pos} (not a "
                                 "request)")
            entries.append(entry)
            pos = end + 1
        return entries, pos, False

    def entries(self) -> list[dict]:
        """Every complete line, in order (a torn last line is ignored; see :meth:`repair`)."""
        return self._read()[0]

    def repair(self) -> bool:
        """Cuts off a torn last line (a crash while appending); whether there was one."""
        _, length, torn = self._read()
        if torn:
            with open(self.path, "r+b") as f:
                f.truncate(length)
                os.fsync(f.fileno())
        return torn

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

    def append(self, entry: dict) -> None:
        """Appends one line and makes it durable (``fsync``, and the folder's on creation)."""
        line = (json.dumps(entry, sort_keys=False) + "\n").encode()
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:
            _fsync_dir(self.path.parent)

    @contextlib.contextmanager
    def lock(self) -> Iterator["Ledger"]:
        """Holds an exclusive lock on the ledger (``LedgerBusyError`` when another process holds
        it): one request at a time, recovery included."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LedgerBusyError(f"the ledger {self.path} is in use by another process; "
                                      "try again when it is done") from None
            try:
                yield self
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"


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
    each writer saves the new version (with ``fingerprint`` = ``entry[name + "_after"]`` in its
    header) to the path it is given. Call under :meth:`Ledger.lock`, after :func:`recover`."""
    for name, (path, write) in writes.items():
        write(pending_path(path))
        crash_point(f"ledger-pending-{name}")
    ledger.append(entry)
    crash_point("ledger-appended")
    for name, (path, _) in writes.items():
        os.replace(pending_path(path), path)
        crash_point(f"ledger-renamed-{name}")
    for folder in {Path(p).parent for p, _ in writes.values()}:
        _fsync_dir(folder)


def recover(ledger: Ledger, files: dict[str, Path]) -> list[str]:
    """Settles what a crash left (see the module docstring) for the live files ``files[name]``
    (``name`` as in the ledger's ``{name}_after`` fields); returns one line per action taken.
    Call under :meth:`Ledger.lock`."""
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
            _fsync_dir(path.parent)
            done.append(f"completed request {last['request']!r} interrupted by a crash: "
                        f"{path} is now its result")
        else:
            pending.unlink()
            done.append(f"rolled back a request interrupted before it was recorded: removed "
                        f"{pending}")
    return done
