"""Deprecated: the library's own functions take ``comm=`` (:mod:`ssse.comm`) since 0.3.0.

The names here keep working for one minor version and warn (``DeprecationWarning``) with the
call that replaces them:

- ``init()``: ``comm = ssse.comm.init()``;
- ``fit_inverse_fisher(..., group=g, timeout=t, exchange=e)``:
  ``ssse.fit_inverse_fisher(..., comm=ssse.comm.TorchComm(g, t, e))``;
- ``ssse_update``, ``newton_erase``, ``Eraser``: the same names in :mod:`ssse`, with ``comm=``;
- ``save_inverse_fisher``, ``load_inverse_fisher``: ``ssse.sharding.save_sharded``,
  ``ssse.sharding.load_sharded``;
- ``share(n)``: ``comm.share(n)``;
- ``Sharding``, ``ShardedInverseFisher``, ``is_index``: :mod:`ssse.sharding`;
  ``DistributedError``, ``launched``, ``DEFAULT_TIMEOUT``, ``EXCHANGES``,
  ``WATCHDOG_EXIT_CODE``: :mod:`ssse.comm`.

Unlike the new calls, the functions here shard even in one process (a group of one).
"""

from __future__ import annotations

import inspect
import warnings

from . import comm as comm_api
from . import erasure, newton, sharding
from .comm import TorchComm
from . import fit as fit_module
from .sharded_erase import newton_erase_sharded, ssse_update_sharded
from .sharded_fit import fit_sharded

# the names that moved as they were come from __getattr__ (and warn)
__all__ = ["Eraser", "fit_inverse_fisher", "init", "load_inverse_fisher", "newton_erase",
           "save_inverse_fisher", "share", "ssse_update"]

# (module, name there)
_MOVED = {"DEFAULT_TIMEOUT": (comm_api, "DEFAULT_TIMEOUT"),
          "EXCHANGES": (comm_api, "EXCHANGES"),
          "WATCHDOG_EXIT_CODE": (comm_api, "WATCHDOG_EXIT_CODE"),
          "DistributedError": (comm_api, "DistributedError"),
          "launched": (comm_api, "launched"),
          "Sharding": (sharding, "Sharding"),
          "ShardedInverseFisher": (sharding, "ShardedInverseFisher"),
          "is_index": (sharding, "is_index")}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"ssse.distributed.{old} is deprecated and will be removed in 0.4: use {new}",
                  DeprecationWarning, stacklevel=3)


def __getattr__(name: str):
    if name in _MOVED:
        module, there = _MOVED[name]
        _deprecated(name, f"{module.__name__}.{there}")
        return getattr(module, there)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bound(fn, *args, **kwargs) -> dict:
    """The arguments of ``fn`` by name, defaults included (``fn``'s own checks follow)."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def init(*, backend=None, device=None, timeout: float = comm_api.DEFAULT_TIMEOUT):
    """Deprecated: ``comm = ssse.comm.init(...)``; returns ``(comm.rank, comm.size)``."""
    _deprecated("init", "comm = ssse.comm.init(...)")
    comm = comm_api.init(backend=backend, device=device, timeout=timeout)
    return comm.rank, comm.size


def share(n: int, *, group=None) -> range:
    """Deprecated: ``comm.share(n)``."""
    _deprecated("share", "comm.share(n)")
    return TorchComm(group).share(n)


def fit_inverse_fisher(model, loss_fn, data, *, exchange: str = "auto", group=None,
                       timeout: float | None = None, **options):
    """Deprecated: ``ssse.fit_inverse_fisher(..., comm=comm)``."""
    _deprecated("fit_inverse_fisher", "ssse.fit_inverse_fisher(..., comm=comm)")
    comm = TorchComm(group, timeout, exchange)
    return fit_sharded(comm, _bound(fit_module.fit_inverse_fisher, model, loss_fn, data,
                                    comm=comm, **options))


def ssse_update(model, loss_fn, removed, *, group=None, timeout: float | None = None,
                **options):
    """Deprecated: ``ssse.ssse_update(..., comm=comm)``."""
    _deprecated("ssse_update", "ssse.ssse_update(..., comm=comm)")
    comm = TorchComm(group, timeout)
    return ssse_update_sharded(comm, _bound(erasure.ssse_update, model, loss_fn, removed,
                                            comm=comm, **options))


def newton_erase(model, loss_fn, removed, *, group=None, timeout: float | None = None,
                 **options):
    """Deprecated: ``ssse.newton_erase(..., comm=comm)``."""
    _deprecated("newton_erase", "ssse.newton_erase(..., comm=comm)")
    comm = TorchComm(group, timeout)
    return newton_erase_sharded(comm, _bound(newton.newton_erase, model, loss_fn, removed,
                                             comm=comm, **options))


def save_inverse_fisher(path, inv, *, group=None, timeout: float | None = None, **meta):
    """Deprecated: ``ssse.sharding.save_sharded(path, inv, comm=comm)``."""
    _deprecated("save_inverse_fisher", "ssse.sharding.save_sharded(path, inv, comm=comm)")
    return sharding.save_sharded(path, inv, comm=TorchComm(group, timeout), **meta)


def load_inverse_fisher(path, *, group=None, timeout: float | None = None, **options):
    """Deprecated: ``ssse.sharding.load_sharded(path, comm=comm)``."""
    _deprecated("load_inverse_fisher", "ssse.sharding.load_sharded(path, comm=comm)")
    return sharding.load_sharded(path, comm=TorchComm(group, timeout), **options)


class Eraser(erasure.Eraser):
    """Deprecated: ``ssse.Eraser(..., comm=comm)``."""

    def __init__(self, model, loss_fn, *, exchange: str = "auto", group=None,
                 timeout: float | None = None, **options):
        _deprecated("Eraser", "ssse.Eraser(..., comm=comm)")
        super().__init__(model, loss_fn, comm=TorchComm(group, timeout, exchange), **options)
