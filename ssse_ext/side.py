r"""Rows with a side payload: what a store needs next to the flat rows.

Most stores hold :math:`F_b = \lambda I + \frac1N\sum_r u_{r,b} u_{r,b}^\top` and need nothing
but the rows :math:`u_r`. A store whose Fisher is defined otherwise (the Kronecker factors of a
layer's inputs and output gradients, say) reads a *side payload* that travels with the rows:
:class:`Rows` pairs a ``(m, d)`` tensor with a mapping ``{key: SidePayload}``, and every
function of the inverse that takes rows (build, update, downdate, ``without``,
``solve_changed``) takes a :class:`Rows` as well. A payload summarises its rows and is
*additive*: the payload of two chunks is the sum of theirs, so chunks can be split, gathered
and concatenated freely. Stores that do not read a key ignore it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from .validation import matrix_chunks

__all__ = ["Rows", "SidePayload", "SideSum", "follow_probe", "gathered_rows", "merge_sides",
           "register_side", "side_kwargs", "side_type", "strip_side"]


class SidePayload(abc.ABC):
    """A summary of some rows that a store reads next to them; sums over rows (``+``)."""

    @abc.abstractmethod
    def __add__(self, other: "SidePayload") -> "SidePayload":
        """The payload of both sets of rows (a new object)."""

    @abc.abstractmethod
    def to(self, device) -> "SidePayload":
        """The payload with its tensors on ``device``."""

    # ---- over several processes (:mod:`ssse.sharded_side`): every rank sums the same
    # tensors, each part ends on the rank that owns its block ----
    def skeleton(self) -> dict:
        """What :meth:`zeros` needs to make a payload of zeros of the same shapes (JSON-able):
        a rank whose share of the rows is empty sums that one."""
        raise NotImplementedError(f"{type(self).__name__} cannot be summed over processes")

    @classmethod
    def zeros(cls, skeleton: dict, device) -> "SidePayload":
        """A payload of zeros described by ``skeleton`` (:meth:`skeleton`)."""
        raise NotImplementedError(f"{cls.__name__} cannot be summed over processes")

    def parts(self) -> list[tuple[int, torch.Tensor]]:
        """The payload's tensors in a fixed order, each with the flat index of the first
        parameter of the block it describes: summing them in place sums the payloads."""
        raise NotImplementedError(f"{type(self).__name__} cannot be summed over processes")

    def restricted(self, lo: int, hi: int) -> "SidePayload":
        """The part describing the parameters ``lo .. hi - 1``, their indices counted from
        ``lo`` (a rank's share of the payload, over its columns)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be cut to a rank's blocks")


_SIDE_TYPES: dict[str, type] = {}


def register_side(key: str, cls: type) -> type:
    """Registers the :class:`SidePayload` class that the payloads under ``key`` have (a rank
    without rows makes its zeros from it)."""
    if not (isinstance(cls, type) and issubclass(cls, SidePayload)):
        raise TypeError(f"cls must be a SidePayload subclass, got {cls!r}")
    if _SIDE_TYPES.get(key, cls) is not cls:
        raise ValueError(f"side key {key!r} is taken by {_SIDE_TYPES[key].__name__}")
    _SIDE_TYPES[key] = cls
    return cls


def side_type(key: str) -> type:
    """The :class:`SidePayload` class registered under ``key``."""
    if key not in _SIDE_TYPES:
        raise ValueError(f"no side payload is registered under {key!r} (registered: "
                         f"{', '.join(sorted(_SIDE_TYPES)) or 'none'})")
    return _SIDE_TYPES[key]


def _check_side(side, name: str = "side") -> dict[str, SidePayload]:
    if not isinstance(side, Mapping):
        raise TypeError(f"{name} must be a mapping of names to SidePayload objects, got "
                        f"{type(side).__name__}")
    for key, value in side.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} keys must be non-empty strings, got {key!r}")
        if not isinstance(value, SidePayload):
            raise TypeError(f"{name}[{key!r}] must be a SidePayload, got "
                            f"{type(value).__name__}")
    return dict(side)


class Rows:
    """``(m, d)`` rows and the side payload of the same samples.

    Args:
        rows: the ``(m, d)`` tensor (validated where it is used, as plain rows are).
        side: ``{key: SidePayload}`` (the stores that read ``key`` know its type).

    It behaves like its tensor where the row pipelines need it: :attr:`shape`, :attr:`dtype`,
    :attr:`device` and :meth:`to` (which moves the payload too).
    """

    __slots__ = ("rows", "side")

    def __init__(self, rows: torch.Tensor, side: Mapping[str, SidePayload]):
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"rows must be a torch.Tensor, got {type(rows).__name__}")
        self.rows = rows
        self.side = _check_side(side)

    shape = property(lambda self: self.rows.shape)
    dtype = property(lambda self: self.rows.dtype)
    device = property(lambda self: self.rows.device)

    def to(self, *args, **kwargs) -> "Rows":
        """:meth:`torch.Tensor.to` of the rows; the payload follows to their device."""
        rows = self.rows.to(*args, **kwargs)
        return Rows(rows, {k: v.to(rows.device) for k, v in self.side.items()})

    def __repr__(self) -> str:
        return f"Rows(shape={tuple(self.rows.shape)}, side={sorted(self.side)})"


def merge_sides(sides: Iterable[Mapping[str, SidePayload] | None]) -> dict | None:
    """The sum of payloads key by key (``None`` entries skipped; ``None`` when all are)."""
    out: dict[str, SidePayload] | None = None
    for side in sides:
        if side is None:
            continue
        out = {} if out is None else out
        for key, value in side.items():
            out[key] = value if key not in out else out[key] + value
    return out


class SideSum:
    """Accumulates the payloads of a stream (:meth:`add`), summed key by key in :attr:`total`
    (``None`` until one arrives)."""

    def __init__(self):
        self.total: dict[str, SidePayload] | None = None

    def add(self, side: Mapping[str, SidePayload]) -> None:
        self.total = merge_sides([self.total, side])


def strip_side(grads, take: Callable[[Mapping[str, SidePayload]], None]):
    """``grads`` (a tensor, a :class:`Rows`, or an iterable of either) with every
    :class:`Rows` replaced by its tensor; ``take`` receives each payload as its chunk passes
    (at once for a tensor or a :class:`Rows`, lazily for an iterable)."""
    if isinstance(grads, Rows):
        take(grads.side)
        return grads.rows
    if isinstance(grads, torch.Tensor):
        return grads
    try:
        source = iter(grads)
    except TypeError:
        return grads  # not iterable: left for the caller's check to name

    def stripped():
        for chunk in source:
            if isinstance(chunk, Rows):
                take(chunk.side)
                chunk = chunk.rows
            yield chunk
    return stripped()


def side_kwargs(store: Any, side: Mapping[str, SidePayload] | None) -> dict:
    """``{"side": side}`` for a store that reads side payloads (``takes_side``), else ``{}``:
    the keyword its change methods take."""
    return {"side": side} if getattr(store, "takes_side", False) else {}


def follow_probe(probe, stores, rows: torch.Tensor, sign: int) -> None:
    """A health probe (:class:`~ssse_ext.health.FisherProbe`) follows a change of ``rows``:
    from the rows for the stores whose Fisher they define, from the stores' own statistics
    (:meth:`~ssse_ext.blocks.BlockStore.write_sketch`) for those that read a side payload."""
    own = [store for store in stores if getattr(store, "takes_side", False)]
    if own:
        rows = rows.clone()
        for store in own:
            for b in store.block_ids:
                rows[:, store.layout.slice(b)] = 0
    probe.follow(rows, sign)
    for store in own:
        store.write_sketch(probe)


def gathered_rows(grads, name: str, *, dim: int, dtype, device
                  ) -> tuple[torch.Tensor, dict | None]:
    """All rows of ``grads`` (a tensor, a :class:`Rows`, or an iterable of either) as one
    validated ``(k, dim)`` tensor, and their summed side payload on ``device`` (``None``:
    none)."""
    sides: list = []
    chunks = [c for c in matrix_chunks(strip_side(grads, sides.append), None, name, dim=dim,
                                       dtype=dtype, device=device) if c.shape[0]]
    side = merge_sides(sides)
    if side is not None:
        side = {k: v.to(device) for k, v in side.items()}
    if not chunks:
        return torch.zeros(0, dim, dtype=dtype, device=device), side
    return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)), side
