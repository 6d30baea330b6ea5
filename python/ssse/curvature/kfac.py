r"""Kronecker-factored curvatures: K-FAC (``"kfac"``) and EK-FAC (``"ekfac"``).

Every weight :math:`W` (``out x in``) of an ``nn.Linear``, of a GPT-2-style ``Conv1D``
(weight stored ``(in, out)``) or of an ``nn.Conv2d`` (one group, zero padding; read as
``out x (in kh kw)``, its positions the output locations and its inputs the patches there)
among the selected parameters becomes one block, held by the Kronecker-factored store of the
same name (:mod:`ssse_ext.blocks.kronecker`): with the layer's inputs :math:`a_{i,t}` and
output gradients :math:`g_{i,t} = \partial\ell_i/\partial z_{i,t}` at the positions :math:`t` of
sample :math:`i`,

.. math:: A = \frac1N \sum_{i,t} a_{i,t} a_{i,t}^\top,\qquad
          S = \frac1N \sum_{i,t} g_{i,t} g_{i,t}^\top,\qquad
          F_W \approx S \otimes A \;(\text{K-FAC}),

and EK-FAC replaces the eigenvalues of :math:`S \otimes A` by
:math:`\frac1N\sum_i (Q_S^\top G_i Q_A)^{\circ 2}`, :math:`G_i` the per-sample gradient
(docs/maths.md). Every other parameter (biases, norms, embeddings) keeps the blocks of the
layout asked for, with the empirical Fisher of its per-sample gradients in the dense or dual
form (``representation=``): the inverse is mixed, and ``inv.representation`` says which block
is which.

The rows are the per-sample gradients (without weight decay: the regulariser's curvature is
the damping's part) with the factor sums of the same samples as their side payload
(:class:`ssse_ext.Rows`); one more batched forward and backward pass per chunk gives the
factors. With ``fisher="ggn"`` (``"kfac_ggn"``, ``"ekfac_ggn"``) the curvature factored is the
Gauss–Newton matrix instead (:mod:`ssse.curvature.ggn`): the rows are its :math:`c` rows per
sample :math:`J_i^\top B_i e_r`, the output gradients :math:`g_{i,t,r}` those of
:math:`B_i e_r` back through the network (one backward pass per output row),
:math:`S = \frac1N\sum_{i,t,r} g g^\top`, so the stored matrix needs no labels and serves the
leave-k-out Newton step (:func:`ssse.newton_erase`); EK-FAC's fit reads re-readable data twice (the bases, then the eigenvalues in them).
A request (:class:`ssse.Eraser`) downdates the factor sums and the rows' blocks exactly;
EK-FAC's ``refresh``
(``"basis-kept"``, the default, or ``"exact"``, which keeps the rows of its blocks) says how
its eigenvalues follow a removal. ``storage`` (``"exact"``, the default, or ``"compact"``:
the eigenbases only in the inverse's dtype, a third of their bytes for float32;
:mod:`ssse_ext.blocks.kronecker`) says how the blocks keep their bases (``"kfac_compact"`` and
``"ekfac_compact"`` are registered); :func:`kfac` and :func:`ekfac` make curvatures with other
options.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import ssse_ext
from ssse_ext.blocks import Pinned
from ssse_ext.blocks.kronecker import (DEFAULT_STORAGE, DEFAULT_TOLERANCE, KRONECKER_KEY,
                                       REFRESH_MODES, STORAGE_MODES, KroneckerFactors)
from ssse_ext.validation import check_choice, check_nonneg_float

from ..model import per_sample_losses
from . import register_curvature
from .base import Curvature, outputs_2d
from .empirical import group_gradients
from .ggn import ggn_rows
from .layer_grads import captured_calls, layer_kind
from .likelihoods import get_likelihood

__all__ = ["EKFAC", "FISHERS", "KFAC", "ekfac", "kfac", "kronecker_weights", "layer_factors"]

#: The matrices a Kronecker-factored curvature factors: the empirical Fisher of the per-sample
#: gradients, or the Gauss–Newton matrix (:mod:`ssse.curvature.ggn`).
FISHERS = ("empirical", "ggn")


def _kind(module: nn.Module) -> str | None:
    """The Kronecker treatment of a module's weight: ``"linear"``, ``"conv1d"`` (stored
    ``(in, out)``), ``"conv2d"`` (patches; one group, zero padding given by numbers) or
    ``None``."""
    if isinstance(module, nn.Conv2d):
        plain = module.groups == 1 and module.padding_mode == "zeros" and \
            (not isinstance(module.padding, str) or module.padding == "valid")
        return "conv2d" if plain else None
    return layer_kind(module)


def kronecker_weights(fm) -> dict[str, tuple[str, int, str]]:
    """``{parameter name: (module path, flat start, kind)}`` of the selected parameters of
    ``fm`` that are weights of supported layers: ``nn.Linear`` (``"linear"``), ``Conv1D``
    (``"conv1d"``, stored transposed) and ``nn.Conv2d`` with one group and zero padding
    (``"conv2d"``, its weight read as ``out x (in kh kw)``)."""
    modules = dict(fm.model.named_modules())
    out, start = {}, 0
    for name, numel in zip(fm.names, fm.numels):
        path, _, attr = name.rpartition(".")
        kind = _kind(modules[path]) if attr == "weight" and path in modules else None
        if kind is not None:
            out[name] = (path, start, kind)
        start += numel
    return out


def _positions(module: nn.Module, kind: str, a: torch.Tensor, g: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer call's inputs and output gradients as float64 ``(positions, in)`` and
    ``(positions, out)``: every leading index is a position; a convolution's positions are its
    output locations, its inputs the patches there (the expanded input)."""
    if kind == "conv2d":
        padding = 0 if module.padding == "valid" else module.padding
        a = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=padding,
                     stride=module.stride).transpose(1, 2)            # (m, L, in kh kw)
        g = g.flatten(2).transpose(1, 2)                               # (m, L, out)
    return (a.reshape(-1, a.shape[-1]).to(torch.float64),
            g.reshape(-1, g.shape[-1]).to(torch.float64))


def layer_factors(fm, weights: dict, loss_fn, params: dict, frozen: dict, x, y, *,
                  refresh: str = "basis-kept", tolerance: float = DEFAULT_TOLERANCE,
                  storage: str = DEFAULT_STORAGE, likelihood=None) -> KroneckerFactors:
    r"""The float64 sums :math:`\sum_{i,t} a a^\top` and :math:`\sum_{i,t} g g^\top` of the
    layers of ``weights`` (:func:`kronecker_weights`) over the samples of ``(x, y)``, from one
    forward and one backward pass of their summed losses (samples must not interact: a model
    in eval mode). With a ``likelihood``, the Gauss–Newton sums instead: the output gradients
    are those of each :math:`B_i e_r` (one backward pass per output row ``r``), summed over
    ``r``, and ``y`` is not read. A layer called several times adds up its calls; one never
    reached gives zeros. ``refresh``, ``tolerance`` and ``storage`` are the stores' options it
    carries (:class:`~ssse_ext.blocks.kronecker.KroneckerFactors`)."""
    options = KroneckerFactors({}, refresh=refresh, tolerance=tolerance,
                               storage=storage).options()
    modules = dict(fm.model.named_modules())
    paths = [path for path, _, _ in weights.values()]
    if likelihood is None:
        losses, calls, grads = captured_calls(
            fm, paths, lambda leaves: per_sample_losses(loss_fn, fm(leaves, x, frozen), y),
            params)
        passes = [grads]
    else:
        lik = get_likelihood(likelihood)

        def outputs(leaves):
            z = fm(leaves, x, frozen)
            return z.reshape(z.shape[0], -1) if isinstance(z, torch.Tensor) else \
                outputs_2d(fm, leaves, frozen, x)  # refuses outputs that are not one tensor

        losses, calls, passes = captured_calls(fm, paths, outputs, params,
                                               directions=lik.factor)
    factors, kinds = {}, {}
    for path, start, kind in weights.values():
        w = modules[path].weight
        out_f, in_f = (w.shape[1], w.shape[0]) if kind == "conv1d" else \
            (w.shape[0], w[0].numel())
        factors[start] = (torch.zeros(in_f, in_f, dtype=torch.float64, device=losses.device),
                          torch.zeros(out_f, out_f, dtype=torch.float64, device=losses.device),
                          kind == "conv1d")
        kinds[path] = (start, kind)
    for j, (path, a, _) in enumerate(calls):
        start, kind = kinds[path]
        reached = False
        for grads in passes:
            g = grads[j]
            if g is None:
                continue
            a2, g2 = _positions(modules[path], kind, a, g)
            factors[start][1].add_(g2.T @ g2)
            reached = True
        if reached:  # the inputs count once per call, whatever the output rows
            factors[start][0].add_(a2.T @ a2)
    return KroneckerFactors(factors, **options)


class KFAC(Curvature):
    """K-FAC blocks for the supported weights, the empirical Fisher for the rest (see the
    module docstring).

    Args:
        name: the name to register it under.
        storage: ``"exact"`` or ``"compact"`` (:mod:`ssse_ext.blocks.kronecker`).
        fisher: the matrix factored, one of :data:`FISHERS`: ``"empirical"`` (the per-sample
            gradients; needs labels) or ``"ggn"`` (the Gauss–Newton matrix, :math:`c` rows
            per sample; needs the likelihood, not the labels, and serves the Newton step).
    """

    name = "kfac"
    store = "kfac"
    needs_labels = True
    includes_weight_decay = False
    refresh = "basis-kept"
    tolerance = DEFAULT_TOLERANCE
    storage = DEFAULT_STORAGE
    fisher = "empirical"

    def __init__(self, name: str = "kfac", *, storage: str = DEFAULT_STORAGE,
                 fisher: str = "empirical"):
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        self.name = name
        self.storage = check_choice(storage, "storage", STORAGE_MODES)
        self.fisher = check_choice(fisher, "fisher", FISHERS)
        ggn = self.fisher == "ggn"
        self.needs_labels, self.needs_likelihood, self.supports_newton = not ggn, ggn, ggn

    def rows_per_sample(self, num_outputs, *, mc_samples=1):
        return num_outputs if self.fisher == "ggn" else 1

    def layout_for(self, fm, layout):
        """``layout`` with each supported weight one block, cut at every parameter (none is
        cut when no weight is supported)."""
        numel = dict(zip(fm.names, fm.numels))
        whole = [(st, st + numel[k]) for k, (_, st, _) in kronecker_weights(fm).items()]
        if not whole:
            return layout
        cuts, pos = set(layout.starts), 0
        for n in fm.numels:
            cuts.add(pos)
            pos += n
        cuts = sorted(c for c in cuts if c < layout.dim and
                      not any(s < c < e for s, e in whole))
        return ssse_ext.BlockLayout.from_boundaries(cuts, layout.dim)

    def representation_for(self, fm, layout, representation):
        """``representation`` with the blocks of supported weights pinned to this curvature's
        store (:class:`ssse_ext.blocks.Pinned`)."""
        starts = {start for _, start, _ in kronecker_weights(fm).values()}
        pinned = {b: self.store for b, st in enumerate(layout.starts) if st in starts}
        return Pinned(pinned, representation) if pinned else representation

    def rows(self, fm, params, frozen, x, y, *, loss_fn, likelihood, generator, mc_samples,
             minibatch, state):
        if "kronecker_weights" not in state:
            state["kronecker_weights"] = kronecker_weights(fm)
        if self.fisher == "ggn":
            rows = ggn_rows(fm, params, frozen, x, likelihood)
        else:
            rows = group_gradients(fm, loss_fn, params, frozen, x, y, 1, state).detach()
        factors = layer_factors(fm, state["kronecker_weights"], loss_fn, params, frozen, x, y,
                                refresh=self.refresh, tolerance=self.tolerance,
                                storage=self.storage,
                                likelihood=likelihood if self.fisher == "ggn" else None)
        return ssse_ext.Rows(rows, {KRONECKER_KEY: factors})


class EKFAC(KFAC):
    """EK-FAC blocks for the supported weights (see the module docstring).

    Args:
        name: the name to register it under.
        refresh: ``"basis-kept"`` or ``"exact"`` (:mod:`ssse_ext.blocks.kronecker`).
        tolerance: the basis movement ``"basis-kept"`` tolerates before it projects.
        storage: ``"exact"`` or ``"compact"`` (:mod:`ssse_ext.blocks.kronecker`).
        fisher: ``"empirical"`` or ``"ggn"``, as for :class:`KFAC`.
    """

    store = "ekfac"

    def __init__(self, name: str = "ekfac", *, refresh: str = "basis-kept",
                 tolerance: float = DEFAULT_TOLERANCE, storage: str = DEFAULT_STORAGE,
                 fisher: str = "empirical"):
        super().__init__(name, storage=storage, fisher=fisher)
        self.refresh = check_choice(refresh, "refresh", REFRESH_MODES)
        self.tolerance = check_nonneg_float(tolerance, "tolerance")
        if not math.isfinite(self.tolerance):
            raise ValueError(f"tolerance must be finite, got {tolerance!r}")


def kfac(name: str, *, storage: str = DEFAULT_STORAGE, fisher: str = "empirical") -> KFAC:
    """Registers (and returns) a K-FAC curvature under ``name`` with its own options, e.g.
    ``kfac("kfac_ggn_compact", storage="compact", fisher="ggn")``; then
    ``curvature="kfac_ggn_compact"`` (``"kfac_compact"`` is registered already)."""
    return register_curvature(KFAC(name, storage=storage, fisher=fisher))


def ekfac(name: str, *, refresh: str = "basis-kept", tolerance: float = DEFAULT_TOLERANCE,
          storage: str = DEFAULT_STORAGE, fisher: str = "empirical") -> EKFAC:
    """Registers (and returns) an EK-FAC curvature under ``name`` with its own options, e.g.
    ``ekfac("ekfac_exact", refresh="exact")``; then ``curvature="ekfac_exact"``
    (``"ekfac_compact"``, the bases in the inverse's dtype, is registered already)."""
    return register_curvature(EKFAC(name, refresh=refresh, tolerance=tolerance,
                                    storage=storage, fisher=fisher))


KFAC_CURVATURE = register_curvature(KFAC())
EKFAC_CURVATURE = register_curvature(EKFAC())
# the bases in the inverse's dtype (a third of their bytes for float32), by name for the CLI
# and for inverse files, which record the curvature by name
KFAC_COMPACT_CURVATURE = register_curvature(KFAC("kfac_compact", storage="compact"))
EKFAC_COMPACT_CURVATURE = register_curvature(EKFAC("ekfac_compact", storage="compact"))
KFAC_GGN_CURVATURE = register_curvature(KFAC("kfac_ggn", fisher="ggn"))
EKFAC_GGN_CURVATURE = register_curvature(EKFAC("ekfac_ggn", fisher="ggn"))
