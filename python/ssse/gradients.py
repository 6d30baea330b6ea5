r"""Per-sample gradients of a model and the block inverse of its damped empirical Fisher.

The per-sample loss of paper §3 includes the L2 regulariser used in training:

.. math:: \ell_i(\theta) = \mathrm{loss}(f_\theta(x_i), y_i) + \frac{w}{2}\,\lVert\theta\rVert^2

where :math:`\theta` is the flat vector of the trainable parameters in ``named_parameters()``
order and :math:`w` the ``weight_decay``.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.func import jvp, vmap
from tqdm.auto import tqdm

import ssse_ext
from ssse_ext.validation import (check_callable, check_choice, check_data, check_device,
                                 check_dtype, check_int, check_module, check_nonneg_float,
                                 check_nonneg_int, check_positive_float, check_positive_int,
                                 is_pair)
from ssse_ext.budget import AVAILABLE_MEMORY_ENV, available_memory, check_memory, format_bytes
from ssse_ext.dual import dual_nbytes
from ssse_ext.fisher import build_peak_bytes

from ._faults import crash_point
from ._utils import (BATCH_SIZE, FlatModel, data_size, iter_batches, per_sample_losses,
                     rebatch, warn_if_training)
from .curvature import (check_likelihood, get_curvature, options_with, outputs_2d,
                        resolve_likelihood)
from .curvature.likelihoods import PROBE_SAMPLES

__all__ = ["per_sample_grads", "fit_inverse_fisher", "gradient_sum", "hessian_vector_products",
           "resolve_layout", "LAYOUTS"]

#: Block-layout policies accepted by ``layout=`` (or pass a :class:`ssse_ext.BlockLayout`):
#: ``"per_parameter"`` (no block crosses a parameter tensor), ``"fixed"`` (consecutive chunks
#: of the flat vector, the paper's) and ``"rows"`` (one block per output row of a linear model,
#: the paper's multi-attribute layout).
LAYOUTS = ("per_parameter", "fixed", "rows")

#: Most rows per chunk of per-sample gradients when the chunk is sized by memory.
MAX_CHUNK_ROWS = 1024
# Copies of a gradient row alive at once while a chunk is made: vmap's per-parameter output
# and the flattened row (the weight-decay term is added in place).
_ROW_COPIES = 2
# Activation memory of one sample's forward pass, times this, covers what vmap(grad) keeps for
# the backward pass and its temporaries.
_ACTIVATION_COPIES = 4
# Share of the memory available now that a fit plans to use when max_memory is not given.
_MEMORY_SHARE = 0.8
# By default a fit's gradient chunks take at most this share of the inverse's size (and at
# least _MIN_CHUNK_BYTES): with the float64 accumulators (twice a float32 inverse) and one
# group of the result, the fit's peak stays within 2.5 times the inverse.
_CHUNK_SHARE_OF_INVERSE = 0.35
_MIN_CHUNK_BYTES = 64 << 20
# An erasure request's rows are computed in chunks of at most this share of the inverse's size
# (and at least _MIN_CHUNK_BYTES): its extra memory stays O(k d) plus a small share.
_REQUEST_SHARE_OF_INVERSE = 0.1


def _activation_elements(fm: FlatModel, params: dict, frozen: dict, x: torch.Tensor) -> int:
    """Elements of every module output in one sample's forward pass."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        outs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(o.numel() for o in outs if isinstance(o, torch.Tensor))

    handles = [m.register_forward_hook(hook) for m in fm.model.modules()]
    try:
        with torch.no_grad():
            fm(params, x[:1], frozen)
    finally:
        for h in handles:
            h.remove()
    return total


def _row_bytes(fm: FlatModel, params: dict, frozen: dict, x: torch.Tensor, minibatch: int,
              dtype: torch.dtype) -> int:
    """Estimated bytes one row of per-sample (or per-group) gradients costs while it is made:
    copies of the ``d``-vector and the activations that ``vmap(grad)`` keeps."""
    elem = torch.finfo(dtype).bits // 8
    acts = _activation_elements(fm, params, frozen, x) if x.shape[0] else 0
    return elem * (_ROW_COPIES * fm.dim + _ACTIVATION_COPIES * minibatch * acts)


def _rows_per_sample(fm: FlatModel, data, dtype: torch.dtype, curvature,
                     mc_samples: int) -> int | None:
    """Rows each sample gives the curvature, known before the data is read (``None`` when they
    depend on the model's outputs and ``data`` is a one-shot iterable)."""
    per_sample = curvature.rows_per_sample(None, mc_samples=mc_samples)
    if per_sample is not None:
        return per_sample
    first = data if is_pair(data) else (data[0] if isinstance(data, (list, tuple)) and data
                                        else None)
    if first is None or not is_pair(first):
        return None
    for x, _ in iter_batches((first[0][:1], first[1][:1]), "data", device=fm.device,
                             dtype=dtype):
        if x.shape[0]:
            params = fm.param_dict(dtype)
            c = outputs_2d(fm, params, fm.frozen_dict(dtype), x).shape[1]
            return curvature.rows_per_sample(c, mc_samples=mc_samples)
    return None


def _result_bytes(layout: ssse_ext.BlockLayout, dtype: torch.dtype, rows: int | None,
                  representation: str) -> int:
    """Bytes of a fit's result: dense blocks, and dual blocks' rows and float64 factors."""
    elem = torch.finfo(dtype).bits // 8
    if representation == "dense" or rows is None:
        dual = [False] * layout.num_blocks
    elif representation == "dual":
        dual = [True] * layout.num_blocks
    else:
        dual = ssse_ext.choose_representation(layout.sizes, rows, dtype)
    return sum(dual_nbytes(s, rows, dtype) if low else s * s * elem
               for s, low in zip(layout.sizes, dual))


def _check_fit_memory(fm: FlatModel, lay: ssse_ext.BlockLayout, *, dtype: torch.dtype, device,
                      rows: int | None, per_sample: int, representation: str,
                      probe_vectors: int, chunk_size: int | None, max_memory: int | None,
                      checkpoint: bool) -> int:
    """Refuses a fit whose peak does not fit before anything is computed; returns the bytes
    of the inverse's build (:func:`ssse_ext.fisher.build_peak_bytes`) on ``device``.

    The gradient chunks come on top, on the model's device (and a copy on ``device``): one row
    per sample at least, ``chunk_size`` samples when given, else up to ``max_memory``."""
    elem = torch.finfo(dtype).bits // 8
    build = build_peak_bytes(lay, dtype, rows=rows, representation=representation,
                             device=device, probe_vectors=probe_vectors)
    row = _ROW_COPIES * fm.dim * elem * per_sample
    if chunk_size is not None:
        chunk = chunk_size * row
    elif max_memory is not None:
        chunk = max(row, min(max_memory, MAX_CHUNK_ROWS * row))
    else:
        chunk = row  # the default plan sizes the chunks to what the build leaves
    remedies = []
    if representation == "dense" and rows is not None:
        auto = build_peak_bytes(lay, dtype, rows=rows, representation="auto", device=device,
                                probe_vectors=probe_vectors)
        if auto < build:
            where = "without checkpoint= (a resumable fit keeps dense blocks) and " \
                if checkpoint else ""
            remedies.append(f'fit {where}with representation="auto" (exact as well: about '
                            f"{format_bytes(auto)} for the inverse here)")
    elif representation == "auto" and rows is None:
        remedies.append("pass the data as an (X, y) pair or a list of batches, whose size "
                        'is known, so that representation="auto" can store blocks in the '
                        "low-rank form")
    remedies.append(f"pass a smaller block_size or layout (the largest block has "
                    f"{lay.max_block_size} parameters)")
    if chunk_size is not None or max_memory is not None:
        remedies.append(f"pass a smaller chunk_size= or max_memory= (the gradient chunks take "
                        f"about {format_bytes(chunk)})")
    remedies.append(f"set {AVAILABLE_MEMORY_ENV}=<bytes> if more memory may be used than is "
                    f"free now")
    # the chunks are made on the model's device, then held (or copied) on the inverse's
    check_memory("fit_inverse_fisher", build + chunk, device,
                 detail=f"the inverse, its float64 accumulators and scratch "
                        f"{format_bytes(build)}; gradient chunks {format_bytes(chunk)}",
                 remedies=remedies)
    if torch.device(device) != fm.device:
        check_memory("fit_inverse_fisher", chunk, fm.device, detail="the gradient chunks",
                     remedies=remedies)
    return build


def request_budget(inverse_bytes: int, device, max_memory: int | None = None) -> int:
    """Bytes the rows of an erasure request may take while they are computed: ``max_memory``
    if given, else :data:`_REQUEST_SHARE_OF_INVERSE` of the inverse (at least
    :data:`_MIN_CHUNK_BYTES`, at most the share of the memory available now)."""
    if max_memory is not None:
        return max_memory
    free = int(_MEMORY_SHARE * available_memory(device))
    return max(1, min(free, max(int(_REQUEST_SHARE_OF_INVERSE * inverse_bytes),
                                _MIN_CHUNK_BYTES)))


def stacked_rows(stream: Iterator[torch.Tensor], rows: int) -> torch.Tensor:
    """The chunks of ``stream`` written into one ``(rows, d)`` tensor as they come (no second
    copy of the whole); ``rows`` is their total, known beforehand."""
    out, pos = None, 0
    for chunk in stream:
        if out is None:
            if chunk.shape[0] == rows:
                return chunk  # one chunk: it is the result
            out = torch.empty((rows,) + tuple(chunk.shape[1:]), dtype=chunk.dtype,
                              device=chunk.device)
        out[pos:pos + chunk.shape[0]] = chunk
        pos += chunk.shape[0]
    if out is None or pos != rows:
        raise ValueError("removed is empty: nothing to erase" if pos == 0 else
                         f"the removed samples gave {pos} rows, expected {rows}")
    return out


def _plan_chunk_rows(per_row: int, budget: int) -> int:
    """Rows per chunk for a memory budget: as many as fit, between 1 and MAX_CHUNK_ROWS."""
    return max(1, min(MAX_CHUNK_ROWS, int(budget // max(per_row, 1))))


def _chunks(batches, size: int, cut_every: int | None, cut_start: int):
    """:func:`~ssse._utils.rebatch` into ``size`` rows, also cut wherever ``cut_start`` plus the
    samples so far is a multiple of ``cut_every``."""
    if cut_every is None:
        yield from rebatch(batches, size)
        return

    def pieces():
        pos = cut_start
        for x, y in batches:
            i = 0
            while i < x.shape[0]:
                take = min(x.shape[0] - i, cut_every - pos % cut_every)
                yield pos // cut_every, (x[i:i + take], y[i:i + take])
                i, pos = i + take, pos + take

    for _, segment in itertools.groupby(pieces(), key=lambda piece: piece[0]):
        yield from rebatch((batch for _, batch in segment), size)


def likelihood_on(fm: FlatModel, loss_fn, batch, likelihood, *, params: dict | None = None,
                  dtype: torch.dtype | None = None):
    """The likelihood of ``loss_fn`` resolved on the first :data:`PROBE_SAMPLES` samples of
    ``batch`` (:func:`ssse.curvature.resolve_likelihood`): inferred when ``likelihood`` is
    ``None``, else checked."""
    dtype = dtype or fm.dtype
    x, y = batch
    x, y = x[:PROBE_SAMPLES].to(fm.device), y[:PROBE_SAMPLES].to(fm.device)
    # cast as the row streams cast their batches (iter_batches), so the loss sees the same
    if x.is_floating_point():
        x = x.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    params = fm.param_dict(dtype) if params is None else params
    with torch.no_grad():
        output = fm(params, x, fm.frozen_dict(dtype))
    return resolve_likelihood(likelihood, loss_fn, output, y)


def likelihood_of_data(fm: FlatModel, loss_fn, data, likelihood, *, name: str = "data",
                       dtype: torch.dtype | None = None):
    """:func:`likelihood_on` the first non-empty batch of ``data``; returns ``(likelihood,
    data)``, with ``data`` still whole when it was a one-shot iterator."""
    if is_pair(data) or isinstance(data, (list, tuple)):
        source, rest = iter_batches(data, name), data
    elif isinstance(data, Iterator):
        held: list = []
        source = (held.append(b) or b for b in data)
        rest = None
    else:
        source, rest = iter_batches(data, name), data
    first = next((b for b in source if is_pair(b) and b[0].shape[0]), None)
    if rest is None:
        rest = itertools.chain(held, data)
    if first is None:
        raise ValueError(f"{name} is empty: the likelihood is read from its first batch")
    return likelihood_on(fm, loss_fn, first, likelihood, dtype=dtype), rest


def _grad_stream(fm: FlatModel, loss_fn, data, name: str, *, weight_decay: float,
                 chunk_size: int | None, minibatch: int, dtype: torch.dtype,
                 params: dict | None = None, max_memory: int | None = None,
                 curvature="empirical", likelihood=None,
                 mc_samples: int = 1, seed: int = 0, info: dict | None = None,
                 generator: torch.Generator | None = None, cut_every: int | None = None,
                 cut_start: int = 0) -> Iterator[torch.Tensor]:
    """The validated rows of ``curvature`` (a name or a registered
    :class:`~ssse.curvature.Curvature`) for the samples of ``data`` at ``params``, with
    ``weight_decay`` times the parameters added where the curvature's rows include it. The
    likelihood of a curvature that needs one is resolved on the first batch
    (:func:`likelihood_on`). Each chunk covers ``chunk_size`` samples, or as many as
    ``max_memory`` bytes allow (default: the memory available now).
    ``info["rows_per_sample"]`` receives the rows per sample, ``info["likelihood"]`` the
    resolved likelihood, ``info["chunk_size"]`` the samples per chunk (groups with
    ``minibatch > 1``) and ``info["samples"]`` the samples read so far; ``generator`` makes the
    draws of a random curvature (default: a new one seeded with ``seed``). With ``cut_every``,
    no chunk spans a multiple of ``cut_every`` samples (the stream's first sample being sample
    ``cut_start``)."""
    curv = get_curvature(curvature)
    params = fm.param_dict(dtype) if params is None else params
    frozen = fm.frozen_dict(dtype)
    theta = torch.cat([params[k].reshape(-1) for k in fm.names])
    batches = iter_batches(data, name, device=fm.device, dtype=dtype)
    first = next((b for b in batches if b[0].shape[0]), None)
    if first is None:
        return
    lik = likelihood_on(fm, loss_fn, first, likelihood, params=params, dtype=dtype) \
        if curv.needs_likelihood else None
    per_sample = curv.rows_per_sample(None, mc_samples=mc_samples)
    if per_sample is None:
        per_sample = curv.rows_per_sample(outputs_2d(fm, params, frozen, first[0][:1]).shape[1],
                                          mc_samples=mc_samples)
    if info is not None:
        info["rows_per_sample"], info["likelihood"] = per_sample, lik
    if chunk_size is None:
        if max_memory is None:
            max_memory = int(_MEMORY_SHARE * available_memory(fm.device))
        per_row = _row_bytes(fm, params, frozen, first[0], minibatch, dtype)
        chunk_size = _plan_chunk_rows(per_row * per_sample, max_memory)
        if curv.rows_option and per_row * per_sample > max_memory:  # a chunk is one sample
            raise ValueError(f"{curv.rows_option}: one sample's {per_sample} rows of the "
                             f"{curv.name} curvature take about {per_row * per_sample:,} bytes, "
                             f"more than the {max_memory:,} bytes a chunk may use; ask for "
                             f"fewer")
    if info is not None:
        info["chunk_size"] = chunk_size
    if curv.random and generator is None:
        generator = torch.Generator(device=fm.device).manual_seed(seed)
    state: dict = {}
    for x, y in _chunks(itertools.chain([first], batches), chunk_size * minibatch, cut_every,
                        cut_start):
        if info is not None:
            info["samples"] = info.get("samples", 0) + x.shape[0]
        rows = curv.rows(fm, params, frozen, x, y, loss_fn=loss_fn, likelihood=lik,
                         generator=generator, mc_samples=mc_samples, minibatch=minibatch,
                         state=state)
        if weight_decay and curv.includes_weight_decay:
            rows.add_(theta, alpha=weight_decay)  # in place: no second copy of the chunk
        yield rows


def per_sample_grads(model: nn.Module, loss_fn, data, *, weight_decay: float = 0.0,
                     chunk_size: int | None = None, minibatch: int = 1,
                     max_memory: int | None = None) -> Iterator[torch.Tensor]:
    r"""Streams the per-sample gradients :math:`g_i = \nabla_\theta \ell_i(\theta)` (paper §3).

    Built on ``torch.func`` (``functional_call`` + ``vmap(grad)``); a module that ``vmap``
    cannot batch falls back to a per-sample loop with a ``RuntimeWarning``. Buffers (e.g.
    BatchNorm statistics in eval mode) and frozen parameters are held fixed. The model is called
    in its current mode: call ``model.eval()`` first for BatchNorm and Dropout.

    Args:
        model: the model :math:`f_\theta`; :math:`\theta` = its trainable parameters, flattened
            in ``named_parameters()`` order.
        loss_fn: ``loss_fn(model(x), y)`` returning per-sample losses of shape ``(batch,)``
            (``reduction="none"``); elements beyond the batch dimension (e.g. one per
            attribute) are summed.
        data: an ``(X, y)`` pair of tensors or an iterable of ``(x, y)`` batches.
        weight_decay: :math:`w \ge 0`; adds :math:`w\,\theta` to every gradient (the gradient
            of :math:`\frac{w}{2}\lVert\theta\rVert^2`).
        chunk_size: rows per yielded chunk (default: as many as ``max_memory`` allows, up to
            :data:`MAX_CHUNK_ROWS`).
        minibatch: ``b``; with ``b > 1`` each row is the mean gradient of ``b`` consecutive
            samples (the paper's mini-batch Fisher, b = 10 on CIFAR-10); a last group of fewer
            than ``b`` samples gives the mean of those.
        max_memory: bytes for one chunk (its rows and the activations ``vmap`` keeps), which
            decides the rows per chunk when ``chunk_size`` is not given (default: 80 % of the
            memory available now on the model's device).

    Yields:
        ``(m, d)`` tensors in the model's dtype and on its device.
    """
    check_module(model)
    check_callable(loss_fn, "loss_fn")
    check_data(data, "data")
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
    minibatch = check_positive_int(minibatch, "minibatch")
    max_memory = check_positive_int(max_memory, "max_memory", allow_none=True)
    warn_if_training(model, "per_sample_grads")
    fm = FlatModel(model)
    return _grad_stream(fm, loss_fn, data, "data", weight_decay=weight_decay,
                        chunk_size=chunk_size, minibatch=minibatch, dtype=fm.dtype,
                        max_memory=max_memory)


def resolve_layout(layout, block_size: int | None, model_or_shapes) -> ssse_ext.BlockLayout:
    """The :class:`ssse_ext.BlockLayout` for ``layout`` (one of :data:`LAYOUTS` or a
    ``BlockLayout``) over a model's trainable parameters (an ``nn.Module``, a
    :class:`~ssse._utils.FlatModel` or the parameters' shapes)."""
    block_size = check_positive_int(block_size, "block_size", allow_none=True)
    module = model_or_shapes.model if isinstance(model_or_shapes, FlatModel) else model_or_shapes
    if isinstance(model_or_shapes, nn.Module):
        model_or_shapes = FlatModel(model_or_shapes)
    shapes = (model_or_shapes.shapes if isinstance(model_or_shapes, FlatModel)
              else list(model_or_shapes))
    d = sum(math.prod(s) for s in shapes)
    if isinstance(layout, ssse_ext.BlockLayout):
        if block_size is not None:
            raise ValueError("give block_size or a BlockLayout as layout, not both")
        if layout.dim != d:
            raise ValueError(f"layout covers dim={layout.dim} parameters, the model has d={d} "
                             "trainable parameters")
        return layout
    if not isinstance(layout, str):
        raise TypeError(f"layout must be one of {LAYOUTS} or a ssse_ext.BlockLayout, got "
                        f"{type(layout).__name__}")
    check_choice(layout, "layout", LAYOUTS)
    if layout == "rows":
        if block_size is not None:
            raise ValueError('layout="rows" fixes the blocks: drop block_size')
        return row_layout(module)
    if layout == "per_parameter":
        return ssse_ext.BlockLayout.per_parameter(shapes, block_size or ssse_ext.DEFAULT_BLOCK_SIZE)
    return ssse_ext.BlockLayout.fixed(d, block_size or max(1, min(d, ssse_ext.DEFAULT_BLOCK_SIZE)))


def row_layout(model: nn.Module) -> ssse_ext.BlockLayout:
    """One block per output row of a linear model, plus one for its bias: the paper's
    multi-attribute layout, where attribute ``i``'s weights form block ``i``."""
    if not isinstance(model, nn.Linear) or not model.weight.requires_grad:
        raise ValueError(f'layout="rows" needs a trainable torch.nn.Linear model, got '
                         f"{type(model).__name__}")
    out_f, in_f = model.weight.shape
    cuts = [in_f * (r + 1) for r in range(out_f)]
    bias = model.bias is not None and model.bias.requires_grad
    return ssse_ext.BlockLayout.from_boundaries(cuts, out_f * in_f + (out_f if bias else 0))


def fit_inverse_fisher(model: nn.Module, loss_fn, data, *, damping: float,
                       block_size: int | None = None, layout="per_parameter",
                       weight_decay: float = 0.0, minibatch: int = 1,
                       dtype: torch.dtype | None = None, device=None,
                       chunk_size: int | None = None, max_memory: int | None = None,
                       curvature="empirical", likelihood=None,
                       mc_samples: int = 1, seed: int = 0, representation: str = "auto",
                       progress: bool = True, checkpoint: str | os.PathLike | None = None,
                       every: int | None = None,
                       probe_vectors: int = 3) -> ssse_ext.BlockInverseFisher:
    r"""Fits the block inverse of a damped curvature at the model's parameters.

    .. math:: F_b^{-1} = \Big(\lambda I + \frac{1}{N}\sum_{r} u_{r,b}\, u_{r,b}^\top\Big)^{-1}

    (computed stably by :func:`ssse_ext.build_inverse_fisher`; see docs/maths.md), with the
    rows :math:`u_r` of :mod:`ssse.curvature` streamed chunk by chunk (the rows matrix never
    exists). ``"empirical"`` (the paper's): :math:`u_i = g_i`, the per-sample gradients of
    :func:`per_sample_grads` (weight decay included) and :math:`N` the number of samples, or
    of mini-batches when ``minibatch > 1``. ``"ggn"``: the Gauss–Newton matrix of the loss
    (the true Fisher for softmax or sigmoid outputs), ``c`` rows per sample and :math:`N = n`;
    with ``damping`` equal to the training's weight decay :math:`w` the stored matrix is the
    curvature of the training objective :math:`wI + \frac1n\sum_i G_i` (the regulariser's
    curvature is the damping, so its gradient term is not in the rows). ``"mc"``: the true
    Fisher by ``mc_samples`` sampled labels per sample, :math:`N = n \cdot` ``mc_samples``.
    The ``"ggn"`` and ``"mc"`` rows need the inputs only, not the labels (those of the first
    batch serve to check the likelihood against ``loss_fn``).

    Args:
        model, loss_fn, data, weight_decay, minibatch: as in :func:`per_sample_grads`
            (``minibatch > 1`` with ``"empirical"`` only).
        damping: :math:`\lambda > 0`.
        block_size: the largest block ``B`` (default 1024, or ``d`` if smaller for ``"fixed"``).
        layout: ``"per_parameter"`` (no block crosses a parameter tensor), ``"fixed"``
            (consecutive chunks of the flat vector, as in the paper), ``"rows"`` (one block per
            output row of an ``nn.Linear``) or a :class:`ssse_ext.BlockLayout`.
        dtype: dtype of the gradients and the inverse (default: the model's).
        device: device of the inverse (default: the model's); gradients are computed on the
            model's device.
        chunk_size: rows of per-sample gradients computed (and accumulated) per call; by
            default as many as ``max_memory`` allows, up to :data:`MAX_CHUNK_ROWS`.
        max_memory: bytes for one chunk of per-sample gradients: its rows (a few copies of
            each ``d``-vector) and the activations ``vmap`` keeps per sample (estimated from
            one forward pass). It decides the rows per chunk. The float64 accumulators (8 bytes
            per stored entry) and the result come on top; they are fixed by the layout. Default:
            0.35 times the inverse's size (at least 64 MiB), so that the fit's peak stays within
            2.5 times the inverse, and at most 80 % of the memory available now on the model's
            device (``mem_get_info`` on CUDA, available RAM on the CPU) after those. A larger
            budget gives larger chunks, which run faster.

            Before any gradient is computed, the fit's peak (the build's, as
            :func:`ssse_ext.fisher.build_peak_bytes` estimates it, plus the chunks) is compared
            with what the device has free (:func:`ssse_ext.budget.available_memory`; the
            environment variable ``SSSE_AVAILABLE_MEMORY`` sets that figure in bytes): a fit
            that does not fit is refused with :class:`ssse_ext.errors.InsufficientMemoryError`
            (a ``MemoryError``) naming both byte counts and what would make it fit.
        curvature: ``"empirical"``, ``"ggn"``, ``"mc"`` (see above) or the name of another
            registered :class:`ssse.curvature.Curvature` (or the object).
        likelihood: the output distribution for the curvatures that need one (``"ggn"``,
            ``"mc"``): ``None`` (default) infers it from ``loss_fn``
            (``nn.CrossEntropyLoss``: ``"categorical"``, ``nn.BCEWithLogitsLoss``:
            ``"bernoulli"``, ``nn.MSELoss``: ``"gaussian"``; another callable is compared with
            each registered likelihood on the first batch and refused unless exactly one
            agrees); a name or a :class:`ssse.curvature.Likelihood` is checked against
            ``loss_fn`` the same way (:func:`ssse.curvature.resolve_likelihood`).
        mc_samples, seed: draws per sample and their seed for ``"mc"``.
        representation: how blocks are stored (:func:`ssse_ext.build_inverse_fisher`):
            ``"auto"`` (default) picks per block the dense inverse or the exact low-rank form
            of its rows, whichever is smaller (known when ``data`` is an ``(X, y)`` pair; all
            dense for an iterable), ``"dense"`` or ``"dual"``.
        progress: show a progress bar.
        checkpoint: a file path: makes the fit resumable. The float64 Gram accumulators, the
            number of samples consumed and (``"mc"``) the random state are saved there
            atomically every ``every`` samples, and once more when the data is exhausted; a
            fit started again with the same model, data and settings resumes from it and
            finishes bit-identically (same device, dtype and threads) to an uninterrupted one.
            A checkpoint of another fit (other parameters or settings) is refused. ``data``
            must be an ``(X, y)`` pair or re-iterable, and is read in the same order. The file
            is left in place (delete it once the result is saved); its chunks are added as
            they come, so the result may differ in the last bits from a fit without a
            checkpoint when chunks are small. A resumable fit keeps dense blocks
            (``representation="auto"`` means ``"dense"`` with a checkpoint; ``"dual"`` is
            refused).
        every: samples between checkpoints, a multiple of ``minibatch``: the gradient chunks
            are cut there, so a checkpoint falls on every multiple of it; default: at the end
            of the first chunk after 5 minutes since the last one. A fit resumes only with the
            ``every`` and the number of torch threads it was started with (both change the
            result's last bits).
        probe_vectors: random vectors per block of the health probe
            (:meth:`ssse_ext.BlockInverseFisher.health`, 0: none). The fit checks the result
            with it and warns (:class:`ssse_ext.health.HealthWarning`) above the dtype's
            tolerance.

    Returns:
        A :class:`ssse_ext.BlockInverseFisher` with ``num_samples`` the number of rows.
    """
    check_module(model)
    check_callable(loss_fn, "loss_fn")
    check_data(data, "data")
    damping = check_positive_float(damping, "damping")
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    minibatch = check_positive_int(minibatch, "minibatch")
    dtype = check_dtype(dtype)
    curv = get_curvature(curvature)
    check_likelihood(likelihood)
    check_choice(representation, "representation", ssse_ext.fisher.REPRESENTATIONS)
    mc_samples = check_positive_int(mc_samples, "mc_samples")
    seed = check_int(seed, "seed")
    probe_vectors = check_nonneg_int(probe_vectors, "probe_vectors")
    every = check_positive_int(every, "every", allow_none=True)
    if every is not None and every % minibatch:
        raise ValueError(f"every ({every}) must be a multiple of minibatch ({minibatch}): a "
                         "checkpoint cannot split a mini-batch")
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a file path, got {type(checkpoint).__name__}")
        if representation == "dual":
            raise ValueError('representation="dual" cannot be checkpointed (a resumable fit '
                             'keeps dense blocks): pass "dense" or "auto"')
        representation = "dense"  # what the resumable fit builds (and plans memory for)
        if not is_pair(data) and isinstance(data, Iterator):
            raise TypeError(f"data must be an (X, y) pair or a re-iterable collection of "
                            f"batches to resume a fit from a checkpoint, got a one-shot "
                            f"{type(data).__name__}")
    elif every is not None:
        raise ValueError("every needs a checkpoint path")
    if minibatch > 1 and not curv.allows_minibatch:
        raise ValueError(f"minibatch > 1 needs {options_with('allows_minibatch')}, got "
                         f"curvature={curv.name!r}")
    warn_if_training(model, "fit_inverse_fisher")
    fm = FlatModel(model)
    lay = resolve_layout(layout, block_size, fm)
    dtype = dtype or fm.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the model's dtype is {dtype}; pass dtype=torch.float32 or float64")
    device = check_device(device) or fm.device
    chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
    max_memory = check_positive_int(max_memory, "max_memory", allow_none=True)
    n = data_size(data)
    total = None if n is None else math.ceil(n / minibatch)
    per_sample = _rows_per_sample(fm, data, dtype, curv, mc_samples)
    rows = None if total is None or per_sample is None else total * per_sample
    build = _check_fit_memory(fm, lay, dtype=dtype, device=device, rows=rows,
                              per_sample=per_sample or 1, representation=representation,
                              probe_vectors=probe_vectors, chunk_size=chunk_size,
                              max_memory=max_memory, checkpoint=checkpoint is not None)
    if chunk_size is None and max_memory is None:
        result = _result_bytes(lay, dtype, rows, representation)
        fixed = build if device == fm.device else 0
        free = int(_MEMORY_SHARE * (available_memory(fm.device) - fixed))
        max_memory = max(1, min(free, max(int(_CHUNK_SHARE_OF_INVERSE * result),
                                          _MIN_CHUNK_BYTES)))
    bar = tqdm(total=total, unit="grad", desc="inverse Fisher", disable=not progress,
               leave=False)

    stream_args = dict(weight_decay=weight_decay, minibatch=minibatch, dtype=dtype,
                       max_memory=max_memory, curvature=curv.name, likelihood=likelihood,
                       mc_samples=mc_samples, seed=seed)
    try:
        if checkpoint is not None:
            settings = {"damping": damping, "layout": lay.to_dict(), "samples": n,
                        "device": device.type, "probe_vectors": probe_vectors, **stream_args}
            settings["dtype"] = str(dtype).removeprefix("torch.")
            settings["likelihood"] = getattr(likelihood, "spec", likelihood)
            del settings["max_memory"]
            # the chunks are cut at the checkpoints, and torch's reductions split their sums
            # by thread: either one changes the last bits of the result
            settings.update(every=every, threads=torch.get_num_threads())
            inv = _fit_resumable(fm, loss_fn, data, lay, device=device, chunk_size=chunk_size,
                                 stream_args=stream_args, settings=settings,
                                 path=Path(checkpoint), every=every, bar=bar,
                                 probe_vectors=probe_vectors)
        else:
            info: dict = {}
            stream = _grad_stream(fm, loss_fn, data, "data", chunk_size=chunk_size, info=info,
                                  **stream_args)
            first = next(stream, None)  # the model's or the loss's error surfaces unchanged
            if first is None:
                raise ValueError("data is empty: the Fisher needs at least one sample")
            per_sample = info["rows_per_sample"]

            def chunks():
                for rows in itertools.chain([first], stream):
                    bar.update(rows.shape[0] // per_sample)
                    yield rows.to(device)

            # N = n times the curvature's weight of a sample: the c Gauss-Newton rows of a
            # sample add up to its curvature (N = n); each Monte-Carlo draw is one estimate of
            # it (N = n * mc_samples, the number of rows)
            rows = None if total is None else total * per_sample
            inv = ssse_ext.build_inverse_fisher(
                chunks(), damping=damping, layout=lay,
                rows_per_sample=per_sample // curv.normalizer_weight(mc_samples=mc_samples),
                curvature=curv.name,
                representation=representation, num_rows=rows, probe_vectors=probe_vectors)
    finally:
        bar.close()
    inv.health(what="the fit")
    return inv


#: Seconds between checkpoints of a resumable fit when ``every`` is not given.
CHECKPOINT_SECONDS = 300.0


def _skip_samples(data, count: int):
    """``data`` without its first ``count`` samples (an ``(X, y)`` pair, or a generator over
    the remaining batches of a re-iterable)."""
    if count == 0:
        return data
    if is_pair(data):
        return data[0][count:], data[1][count:]

    def rest():
        left = count
        for batch in data:
            if left and is_pair(batch):
                m = batch[0].shape[0]
                if m <= left:
                    left -= m
                    continue
                batch, left = (batch[0][left:], batch[1][left:]), 0
            yield batch
    return rest()


def _fit_resumable(fm: FlatModel, loss_fn, data, lay: ssse_ext.BlockLayout, *, device,
                   chunk_size: int | None, stream_args: dict, settings: dict, path: Path,
                   every: int | None, bar, probe_vectors: int) -> ssse_ext.BlockInverseFisher:
    """The stable build driven chunk by chunk, checkpointed to ``path`` (see
    :func:`fit_inverse_fisher`). Chunks are added as they come (no gathering), so that the
    accumulation is the same sequence of kernel calls whatever the checkpoints."""
    from .io import FileFormatError, fingerprint, load_checkpoint, save_checkpoint

    ident = {"model": fingerprint(fm.model.state_dict()), **settings}
    minibatch = stream_args["minibatch"]
    acc = ssse_ext.GramAccumulator(lay, stream_args["dtype"], device)
    generator = None
    curv = get_curvature(stream_args["curvature"])
    if curv.random:
        generator = torch.Generator(device=fm.device).manual_seed(stream_args["seed"])
    cursor, per_sample, complete = 0, None, False
    if path.exists():
        try:
            tensors, meta = load_checkpoint(path)
            saved = meta["fit"]
            if not isinstance(saved, dict):
                raise KeyError("fit")
        except (FileFormatError, KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint {path} is not a checkpoint of a fit ({exc}); delete "
                             "it or choose another path") from None
        for key in sorted(set(ident) | set(saved)):
            if key == "samples" and None in (saved.get(key), ident.get(key)):
                continue  # an iterable of batches does not tell its size
            if key == "threads" and key in saved and saved[key] != ident[key]:
                raise ValueError(f"checkpoint {path} was made with {saved.get(key)} threads, "
                                 f"this process has {ident.get(key)}: the sums would split "
                                 f"otherwise and change the result; resume with "
                                 f"torch.set_num_threads({saved.get(key)}) (ssse --threads "
                                 f"{saved.get(key)}), or delete it")
            if key == "every" and key in saved and saved[key] != ident[key]:
                raise ValueError(f"checkpoint {path} was made with every={saved.get(key)} "
                                 f"(--every), got {ident.get(key)}: the chunks are cut at the "
                                 f"checkpoints; resume with the same, or delete it")
            if saved.get(key) != ident.get(key):
                what = "the model's parameters or buffers" if key == "model" else \
                    f"{key} ({saved.get(key)!r} there, {ident.get(key)!r} here)"
                raise ValueError(f"checkpoint {path} belongs to another fit: {what} differ; "
                                 "delete it or choose another path")
        if chunk_size is not None and chunk_size != meta["chunk_size"]:
            raise ValueError(f"checkpoint {path} was made with chunk_size={meta['chunk_size']}, "
                             f"got {chunk_size}: resuming needs the same chunks")
        acc.load_state({k: v.to(device) for k, v in tensors.items() if k.startswith("gram.")},
                       meta["accumulator"])
        if generator is not None:
            generator.set_state(tensors["rng"])
        chunk_size, per_sample = int(meta["chunk_size"]), int(meta["rows_per_sample"])
        cursor, complete = int(meta["cursor"]), bool(meta["complete"])
        bar.update(math.ceil(cursor / minibatch))

    def save(done: bool):
        state, acc_meta = acc.state()
        tensors = {k: v.to("cpu") for k, v in state.items()}
        if generator is not None:
            tensors["rng"] = generator.get_state()
        save_checkpoint(path, tensors, {"fit": ident, "cursor": cursor,
                                        "chunk_size": chunk_size, "rows_per_sample": per_sample,
                                        "accumulator": acc_meta, "complete": done})
        crash_point("fit-checkpoint")

    if not complete:
        info: dict = {}
        stream = _grad_stream(fm, loss_fn, _skip_samples(data, cursor), "data",
                              chunk_size=chunk_size, info=info, generator=generator,
                              cut_every=every, cut_start=cursor, **stream_args)
        start = saved_at = cursor
        saved_time = time.monotonic()
        for rows in stream:
            acc.add(rows.to(device))
            chunk_size, per_sample = info["chunk_size"], info["rows_per_sample"]
            cursor = start + info["samples"]
            bar.update(rows.shape[0] // per_sample)
            due = cursor // every > saved_at // every if every is not None else \
                time.monotonic() - saved_time >= CHECKPOINT_SECONDS
            if due:
                save(False)
                saved_at, saved_time = cursor, time.monotonic()
        if acc.rows == 0:
            raise ValueError("data is empty: the Fisher needs at least one sample")
        save(True)
    rows_per_sample = per_sample // curv.normalizer_weight(mc_samples=stream_args["mc_samples"])
    probe = ssse_ext.FisherProbe(lay, columns=probe_vectors, device=device) \
        if probe_vectors else None
    return acc.finish(settings["damping"], max(acc.rows, 1) / rows_per_sample,
                      curvature=stream_args["curvature"], probe=probe)


def gradient_sum(model: nn.Module, loss_fn, data, *, weight_decay: float = 0.0,
                 dtype: torch.dtype | None = None, params: dict | None = None,
                 name: str = "data") -> tuple[torch.Tensor, int]:
    r""":math:`\sum_{i} \nabla_\theta \ell_i(\theta)` over ``data`` (one backward pass per batch)
    and the number of samples.

    Args:
        model, loss_fn, data, weight_decay: as in :func:`per_sample_grads`.
        dtype: compute dtype (default: the model's).
        params: ``{name: tensor}`` trainable parameters to evaluate at (default: the model's).

    Returns:
        ``(grad, n)``: a ``(d,)`` tensor on the model's device and the sample count.
    """
    check_module(model)
    check_callable(loss_fn, "loss_fn")
    check_data(data, name)
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    fm = FlatModel(model)
    dtype = check_dtype(dtype) or fm.dtype
    params = fm.param_dict(dtype) if params is None else params
    frozen = fm.frozen_dict(dtype)
    total = torch.zeros(fm.dim, dtype=dtype, device=fm.device)
    count = 0
    for x, y in iter_batches(data, name, batch_size=BATCH_SIZE, device=fm.device, dtype=dtype):
        if x.shape[0] == 0:
            continue
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            loss = per_sample_losses(loss_fn, fm(leaves, x, frozen), y).sum()
            gs = torch.autograd.grad(loss, [leaves[k] for k in fm.names], allow_unused=True)
        total += torch.cat([(torch.zeros_like(leaves[k]) if g is None else g).reshape(-1)
                            for k, g in zip(fm.names, gs)])
        count += x.shape[0]
    if weight_decay:
        theta = torch.cat([params[k].reshape(-1) for k in fm.names]).to(dtype)
        total += weight_decay * count * theta
    return total, count


def hessian_vector_products(model: nn.Module, loss_fn, data, vectors: torch.Tensor, *,
                            weight_decay: float = 0.0, dtype: torch.dtype | None = None,
                            chunk: int = 16) -> tuple[torch.Tensor, int]:
    r""":math:`\big(\sum_i \nabla^2_\theta \ell_i(\theta)\big) V` for the columns of ``vectors``
    (forward-over-reverse, ``torch.func.jvp`` of ``grad``), and the number of samples.

    Args:
        vectors: ``(d,)`` or ``(d, r)``.
        chunk: columns pushed through the data at once.

    Returns:
        ``(HV, n)`` with ``HV`` the shape of ``vectors`` (the *sum* over samples; divide by
        ``n`` for the mean Hessian).
    """
    check_module(model)
    check_callable(loss_fn, "loss_fn")
    check_data(data, "data")
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    fm = FlatModel(model)
    dtype = check_dtype(dtype) or fm.dtype
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or \
            vectors.shape[0] != fm.dim:
        raise ValueError(f"vectors must be a ({fm.dim},) or ({fm.dim}, r) tensor, got "
                         f"{getattr(vectors, 'shape', type(vectors).__name__)}")
    vec = vectors.dim() == 1
    V = (vectors.reshape(-1, 1) if vec else vectors).to(dtype=dtype, device=fm.device)
    params = fm.param_dict(dtype)
    frozen = fm.frozen_dict(dtype)
    theta = torch.cat([params[k].reshape(-1) for k in fm.names])
    out = torch.zeros_like(V)
    count = 0

    for x, y in iter_batches(data, "data", batch_size=BATCH_SIZE, device=fm.device, dtype=dtype):
        if x.shape[0] == 0:
            continue

        def g(t):
            return torch.func.grad(
                lambda tt: per_sample_losses(loss_fn, fm(fm.unflatten(tt), x, frozen), y).sum())(t)

        def hvp(v):
            return jvp(g, (theta,), (v,))[1]

        for j in range(0, V.shape[1], chunk):
            block = V[:, j:j + chunk].T.contiguous()
            out[:, j:j + chunk] += vmap(hvp)(block).T
        count += x.shape[0]
    if weight_decay:
        out += weight_decay * count * V
    out = out.detach()
    return (out.view(-1) if vec else out), count
