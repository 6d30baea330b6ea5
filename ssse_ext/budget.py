"""The memory a call may use, and the one refusal when it would need more.

Inverses of large blocks are big (a dense block of 40000 parameters is 6.4 GB in float32, and
its float64 accumulator twice that): an allocation that does not fit is not an exception but
the kernel's out-of-memory killer on the CPU, which takes the whole process (and the work of
everything else in it) down without a message. So every call that allocates memory
proportional to the inverse first estimates its peak and compares it with what it may use:

- ``max_memory=`` when the call takes one;
- else the environment variable :data:`AVAILABLE_MEMORY_ENV` (bytes), when set;
- else what the device has free now: on the CPU ``MemAvailable`` of ``/proc/meminfo``, lowered
  to the room left under the process's cgroup memory limit when there is one (a container's
  limit kills at the limit, whatever the machine has); on CUDA ``torch.cuda.mem_get_info`` plus
  what torch's caching allocator holds unused.

A call that would not fit raises :class:`~ssse_ext.errors.InsufficientMemoryError` (a
``MemoryError``) before allocating anything of that size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .errors import InsufficientMemoryError

__all__ = ["AVAILABLE_MEMORY_ENV", "available_memory", "check_memory", "format_bytes",
           "memory_limit"]

#: Environment variable: the bytes a call may use on any device when it is not given
#: ``max_memory=``, instead of what the device has free (e.g. to leave room for other work).
AVAILABLE_MEMORY_ENV = "SSSE_AVAILABLE_MEMORY"

# Where an unknown device type (mps, xpu, ...) or an exotic platform leaves the figure: no
# refusal, as before the checks existed.
_UNKNOWN = 1 << 62
# cgroup v1 reports "no limit" as a page-rounded 2**63 - 1.
_NO_LIMIT = 1 << 60
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")
_MEMINFO = Path("/proc/meminfo")


#: What frees room for a copy of an inverse (``clone``, ``to``, a loaded file).
COPY_REMEDIES = ("free memory on the device (e.g. drop other copies of the inverse)",
                 "pass max_memory=<bytes> if more memory may be used than is free now")


def format_bytes(n: int) -> str:
    """``n`` as exact bytes and in binary units, e.g. ``"6,400,000,000 bytes (5.96 GiB)"``."""
    n = int(n)
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n:,} bytes ({n / (1 << shift):.2f} {unit})"
    return f"{n:,} bytes"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _inactive_file(path: Path, keys: Sequence[str]) -> int:
    """Reclaimable page cache the cgroup's usage counts (it is given back before an OOM)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    stats = dict(line.split(None, 1) for line in lines if " " in line)
    for key in keys:
        if key in stats and stats[key].strip().isdigit():
            return int(stats[key])
    return 0


#: The memory cgroup directories to read, per (contents of /proc/self/cgroup, cgroup root):
#: the walk is done once, the limits and usages are read every time.
_CGROUP_DIRS: dict[tuple[str, str], list[tuple[Path, tuple]]] = {}


def _cgroup_dirs(text: str) -> list[tuple[Path, tuple]]:
    """``(directory, (limit file, usage file, stat file, inactive keys))`` of this process's
    memory cgroups and their ancestors, for the ``/proc/self/cgroup`` contents ``text``."""
    key = (text, str(_CGROUP_ROOT))
    dirs = _CGROUP_DIRS.get(key)
    if dirs is not None:
        return dirs
    dirs = []
    for entry in text.splitlines():
        parts = entry.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2, unified
            root, files = _CGROUP_ROOT, ("memory.max", "memory.current", "memory.stat",
                                         ("inactive_file",))
        elif "memory" in controllers.split(","):  # v1
            root, files = _CGROUP_ROOT / "memory", (
                "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat",
                ("total_inactive_file", "inactive_file"))
        else:
            continue
        here = root / rel.lstrip("/")
        # inside a cgroup namespace the process's own path may not exist: its ancestors do
        for directory in [here, *here.parents]:
            if not directory.is_relative_to(root):
                break
            dirs.append((directory, files))
    _CGROUP_DIRS[key] = dirs
    return dirs


def _cgroup_room() -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroup and its ancestors
    (v2 ``memory.max``, v1 ``memory.limit_in_bytes``); ``None`` without a limit."""
    try:
        text = _PROC_CGROUP.read_text()
    except OSError:
        return None
    room = None
    for directory, files in _cgroup_dirs(text):
        limit = _read_int(directory / files[0])
        if limit is None or limit >= _NO_LIMIT:
            continue
        usage = _read_int(directory / files[1]) or 0
        used = max(usage - _inactive_file(directory / files[2], files[3]), 0)
        free = max(limit - used, 0)
        room = free if room is None else min(room, free)
    return room


def _cpu_available() -> int:
    avail = None
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
            avail = _UNKNOWN
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def _env_figure() -> int | None:
    raw = os.environ.get(AVAILABLE_MEMORY_ENV)
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip().replace("_", "")
    if not text.isdigit():
        raise ValueError(f"{AVAILABLE_MEMORY_ENV} must be a number of bytes (a non-negative "
                         f"integer), got {raw!r}")
    return int(text)


def available_memory(device=None) -> int:
    """Bytes a call may allocate now on ``device`` (default the CPU) when it is not given
    ``max_memory=``: :data:`AVAILABLE_MEMORY_ENV` when set, else what the device has free
    (see the module's description)."""
    env = _env_figure()
    if env is not None:
        return env
    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu":
        return _cpu_available()
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0])
        # memory torch's caching allocator holds but does not use is free for torch tensors
        return free + int(torch.cuda.memory_reserved(device)) - \
            int(torch.cuda.memory_allocated(device))
    return _UNKNOWN


def memory_limit(device=None, max_memory: int | None = None) -> tuple[int, str]:
    """The bytes a call may use on ``device`` and where the figure comes from (for messages)."""
    if max_memory is not None:
        if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 0:
            raise ValueError(f"max_memory must be a non-negative integer number of bytes or "
                             f"None, got {max_memory!r}")
        return int(max_memory), f"max_memory={max_memory}"
    figure = available_memory(device)
    if _env_figure() is not None:
        return figure, f"{AVAILABLE_MEMORY_ENV}={figure}"
    return figure, f"free on {torch.device('cpu' if device is None else device)}"


def check_memory(what: str, needed: int, device=None, *, max_memory: int | None = None,
                 detail: str = "", remedies: Sequence[str] = ()) -> None:
    """Raises :class:`~ssse_ext.errors.InsufficientMemoryError` (one line) when ``needed``
    bytes exceed what ``what`` may use on ``device`` (:func:`memory_limit`).

    ``detail`` says what the bytes are (e.g. ``"the dense blocks' float64 Gram matrices"``);
    ``remedies`` are the changes that make the call fit, offered in order."""
    device = torch.device("cpu" if device is None else device)
    limit, source = memory_limit(device, max_memory)
    needed = int(needed)
    if needed <= limit:
        return
    parts = [f"{what}: needs about {format_bytes(needed)} on {device}"
             + (f" ({detail})" if detail else "")
             + f", but {format_bytes(limit)} are available ({source})"]
    if remedies:
        parts.append("to fit, " + "; or ".join(remedies))
    parts.append("nothing was allocated or changed")
    raise InsufficientMemoryError("; ".join(parts), needed=needed, available=limit,
                                  device=device)
