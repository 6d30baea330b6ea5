"""Stores of curvature blocks: one protocol (:class:`BlockStore`), one module per
representation, and the registry the rest of the package asks.

A new representation is one subclass of :class:`BlockStore` and one call of
:func:`register_store`; :func:`~ssse_ext.build_inverse_fisher` then builds it with
``representation=<its name>`` (or chooses it per block under ``"auto"`` when it takes the
fewest bytes), and :class:`~ssse_ext.BlockInverseFisher` applies, changes, copies and saves it
without knowing what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .base import (BlockStore, BuildCost, ChangeFactors, StoreBuilder, block_ids_of,
                   element_size)
from .dense import DenseStore
from .dense64 import Dense64Store
from .dual import DualBlocks, DualBuilder, dual_nbytes
from .gram import REQUEST_TOLERANCE, GramStore, representation_for_requests
from .kronecker import EKFACStore, KroneckerFactors, KroneckerStore

__all__ = [
    "AUTO",
    "REPRESENTATIONS",
    "REQUESTS",
    "REQUEST_TOLERANCE",
    "STORES",
    "BlockStore",
    "BuildCost",
    "ChangeFactors",
    "Dense64Store",
    "DenseStore",
    "DualBlocks",
    "DualBuilder",
    "EKFACStore",
    "GramStore",
    "KroneckerFactors",
    "KroneckerStore",
    "Pinned",
    "StoreBuilder",
    "block_ids_of",
    "choose_stores",
    "dual_nbytes",
    "element_size",
    "file_prefix",
    "get_store",
    "register_store",
    "representation_for_requests",
    "resolve_representation",
    "serves_requests",
]

#: ``representation=`` value choosing, per block, among every store registered with
#: ``auto = True``.
AUTO = "auto"
#: ``representation=`` value for an inverse that will serve deletion requests: the stores of
#: ``"auto"`` with ``"dense64"`` for ``"dense"``; once a dense64 block's Gram is known, it is
#: held in ``"dense"``, ``"dense64"`` or ``"gram"``, the first whose Woodbury downdates stay
#: within :data:`REQUEST_TOLERANCE` to first order (:func:`~ssse_ext.blocks.gram.requests_stores`):
#: chosen by accuracy as well as bytes.
REQUESTS = "requests"

_REGISTRY: dict[str, type[BlockStore]] = {}


class _Names(Sequence):
    """A read-only, live view of the registered names in registration order, then
    ``extra``."""

    def __init__(self, *extra: str):
        self._extra = extra

    def _names(self) -> tuple[str, ...]:
        return tuple(_REGISTRY) + self._extra

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


#: The names of the registered stores (a live view: a store registered later appears).
STORES: Sequence[str] = _Names()
#: What ``representation=`` takes as one name: the registered stores and ``"auto"``.
REPRESENTATIONS: Sequence[str] = _Names(AUTO, REQUESTS)


def register_store(cls: type[BlockStore]) -> type[BlockStore]:
    """Registers a :class:`BlockStore` subclass under its ``name`` (usable as a decorator).

    Raises ``TypeError`` for a class that is not a concrete :class:`BlockStore`, and
    ``ValueError`` for a name or file prefix already taken by another class or ``"auto"``.
    """
    if not (isinstance(cls, type) and issubclass(cls, BlockStore)) or \
            getattr(cls, "__abstractmethods__", None):
        raise TypeError(f"a store must be a concrete subclass of BlockStore, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name or name in (AUTO, REQUESTS) or "." in name:
        raise ValueError(f"a store's name must be a non-empty string other than {AUTO!r} "
                         f"and {REQUESTS!r}, without '.', got {name!r}")
    if _REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"a store named {name!r} is registered already "
                         f"({_REGISTRY[name].__qualname__})")
    prefix = _prefix(cls)
    taken = {_prefix(other): n for n, other in _REGISTRY.items() if other is not cls}
    if prefix in taken or "." in prefix or prefix == "probe":
        raise ValueError(f"the file prefix {prefix!r} of store {name!r} is taken")
    _REGISTRY[name] = cls
    return cls


def _prefix(cls: type[BlockStore]) -> str:
    return cls.prefix or cls.name


def get_store(name: str) -> type[BlockStore]:
    """The store class registered as ``name`` (``ValueError`` naming the registered ones)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"no block store is registered as {name!r}; registered: "
                         f"{tuple(_REGISTRY)}") from None


def file_prefix(name: str) -> str:
    """The prefix of the tensor names of store ``name`` in files."""
    return _prefix(get_store(name))


@dataclass(frozen=True)
class Pinned:
    """A ``representation=`` that pins some blocks to named stores and chooses the others as
    ``rest`` does (e.g. the Kronecker-factored weights of a model in their store, every other
    parameter in the dense or dual form).

    Attributes:
        blocks: ``{block id: store name}``.
        rest: the representation of the other blocks (``"auto"``, a name or a sequence).
    """

    blocks: Mapping[int, str]
    rest: object = AUTO

    def __post_init__(self):
        if not isinstance(self.blocks, Mapping):
            raise TypeError(f"blocks must be a mapping of block ids to store names, got "
                            f"{type(self.blocks).__name__}")
        for b, name in self.blocks.items():
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(f"blocks must map block ids (ints >= 0), got {b!r}")
            get_store(name)
        if isinstance(self.rest, Pinned):
            raise TypeError("rest must be a representation other than Pinned")
        object.__setattr__(self, "blocks", dict(self.blocks))


def resolve_representation(representation, method: str = "cholesky") -> tuple[str, ...]:
    """The stores ``representation=`` allows with the build ``method``, in registration order.

    Args:
        representation: ``"auto"`` (every store with ``auto = True``), ``"requests"``
            (the same with ``"dense64"`` for ``"dense"``), a store name, a sequence of store
            names, or :class:`Pinned`.
        method: a build method; ``"auto"`` means ``"cholesky"``.

    Raises:
        ValueError: an unknown name, or no allowed store is built by ``method`` (stores that
            are not are left out of a sequence; a pinned store must be built by it).
    """
    method = "cholesky" if method == AUTO else method
    if isinstance(representation, Pinned):
        pinned = set(representation.blocks.values())
        for name in pinned:
            if method not in _REGISTRY[name].methods:
                raise ValueError(f"representation pins blocks to the {name} store, which is "
                                 f"built by {_REGISTRY[name].methods}, got method={method!r}")
        rest = resolve_representation(representation.rest, method)
        return tuple(n for n in _REGISTRY if n in pinned or n in rest)
    if representation == REQUESTS:
        names = list(representation_for_requests(AUTO))
    elif representation == AUTO:
        names = [n for n, cls in _REGISTRY.items() if cls.auto]
    else:
        given = [representation] if isinstance(representation, str) else \
            list(representation) if isinstance(representation, (list, tuple)) else None
        if not given or any(not isinstance(n, str) or n not in _REGISTRY for n in given):
            raise ValueError(f"representation must be {AUTO!r}, {REQUESTS!r}, a registered "
                             f"store name or a sequence of them (registered: "
                             f"{tuple(_REGISTRY)}), got {representation!r}")
        names = [n for n in _REGISTRY if n in given]
    built = tuple(n for n in names if method in _REGISTRY[n].methods)
    if not built:
        raise ValueError(
            f"representation={representation!r} needs a build method of its stores ("
            + "; ".join(f"{n}: {_REGISTRY[n].methods}" for n in names)
            + f"), got method={method!r}")
    return built


def serves_requests(representation) -> bool:
    """Whether ``representation`` (or the rest of a :class:`Pinned`) is :data:`REQUESTS`."""
    if isinstance(representation, Pinned):
        representation = representation.rest
    return isinstance(representation, str) and representation == REQUESTS


def choose_stores(sizes: Sequence[int], rows: int | None, dtype: torch.dtype, *,
                  representation="auto", method: str = "cholesky") -> list[str]:
    """Per block, the store :class:`Pinned` names, else the allowed store
    (:func:`resolve_representation`) whose :meth:`~BlockStore.nbytes_for` is the smallest for
    a block of that size fitted from ``rows`` rows (``None``: unknown, which rules out stores
    whose bytes depend on it); ties go to the store registered first."""
    element_size(dtype)
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise ValueError(f"rows must be a non-negative integer, got {rows!r}")
    pinned: Mapping[int, str] = {}
    if isinstance(representation, Pinned):
        resolve_representation(representation, method)
        pinned, representation = representation.blocks, representation.rest
        if any(b >= len(sizes) for b in pinned):
            raise ValueError(f"representation pins block {max(pinned)}, the layout has "
                             f"{len(sizes)} blocks")
    names = resolve_representation(representation, method)
    classes = [get_store(n) for n in names]
    out = []
    for b, s in enumerate(sizes):
        if b in pinned:
            out.append(pinned[b])
            continue
        costs = [cls.nbytes_for(int(s), rows, dtype) for cls in classes]
        out.append(names[costs.index(min(costs))])
    return out


register_store(DenseStore)
register_store(DualBlocks)
register_store(GramStore)
register_store(Dense64Store)
register_store(KroneckerStore)
register_store(EKFACStore)
