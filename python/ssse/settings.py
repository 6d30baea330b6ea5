"""The checks of a fit's settings that the one-process fit, every rank of a sharded one and an
:class:`~ssse.Eraser` make alike."""

from __future__ import annotations

import torch

from ssse_ext.validation import (check_device, check_dtype, check_int, check_nonneg_float,
                                 check_nonneg_int, check_positive_float, check_positive_int)

from .curvature import check_likelihood, get_curvature, options_with
from .layouts import resolve_layout
from .model import FlatModel

__all__ = ["check_fit_settings", "check_minibatch"]


def check_minibatch(minibatch: int, curv) -> None:
    """Refuses a mini-batch Fisher (``minibatch > 1``) of a curvature that does not allow one
    (the fit's check, and an Eraser's)."""
    if minibatch > 1 and not curv.allows_minibatch:
        raise ValueError(f"minibatch > 1 needs {options_with('allows_minibatch')}, got "
                         f"curvature={curv.name!r}")


def check_fit_settings(a: dict, fm: FlatModel) -> dict:
    """The checks of :func:`ssse.fit_inverse_fisher`'s settings ``a`` (its arguments by name)
    that the local fit and every rank of the sharded one make alike: all but the model, the
    loss, the data and ``representation``, ``checkpoint``, ``every``; ``fm`` the flat model.
    Returns them checked, with the curvature (``curv``) and the layout resolved."""
    curv = get_curvature(a["curvature"])
    out = dict(damping=check_positive_float(a["damping"], "damping"),
               weight_decay=check_nonneg_float(a["weight_decay"], "weight_decay"),
               minibatch=check_positive_int(a["minibatch"], "minibatch"),
               curvature=curv.name, curv=curv,
               likelihood=check_likelihood(a["likelihood"]),
               mc_samples=check_positive_int(a["mc_samples"], "mc_samples"),
               seed=check_int(a["seed"], "seed"),
               probe_vectors=check_nonneg_int(a["probe_vectors"], "probe_vectors"),
               chunk_size=check_positive_int(a["chunk_size"], "chunk_size", allow_none=True),
               max_memory=check_positive_int(a["max_memory"], "max_memory", allow_none=True))
    check_minibatch(out["minibatch"], curv)
    out["layout"] = curv.layout_for(fm, resolve_layout(a["layout"], a["block_size"], fm))
    out["dtype"] = check_dtype(a["dtype"]) or fm.dtype
    if out["dtype"] not in (torch.float32, torch.float64):
        raise TypeError(f"the model's dtype is {out['dtype']}; pass dtype=torch.float32 or "
                        "float64")
    out["device"] = check_device(a["device"]) or fm.device
    return out
