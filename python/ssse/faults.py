"""Named crash points, for the tests of what a crash leaves behind.

``SSSE_CRASH_AT=NAME`` (or ``NAME:N``) makes the process kill itself with ``SIGKILL`` — a real
``kill -9``: no ``finally`` block, no ``atexit`` handler runs — the first (or ``N``-th) time it
reaches the crash point ``NAME``. The tests set it in a subprocess; nothing else does. The
points: ``atomic-write`` (a temporary file written, not yet renamed into place),
``fit-checkpoint`` (a checkpoint of the fit written), and the steps of a ledger request
(:mod:`ssse.ledger`).
"""

from __future__ import annotations

import os
import signal

__all__ = ["crash_point"]

_VARIABLE = "SSSE_CRASH_AT"
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Dies here with ``SIGKILL`` when ``SSSE_CRASH_AT`` names this point (and count)."""
    target = os.environ.get(_VARIABLE)
    if not target:
        return
    point, _, count = target.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
