"""The per-sample rows of a curvature, streamed in chunks within a memory budget: the engine
under every fit, request and baseline (:func:`row_stream`), and the public per-sample
gradients (:func:`per_sample_grads`)."""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
from torch import nn

import ssse_ext
from ssse_ext.validation import check_nonneg_float, check_positive_int

from .batches import (as_batch_list, batch_len, batch_slice, batch_to, check_data, check_loss,
                      check_module, split_batch)

from .budget import MEMORY_SHARE, available_memory, plan_chunk_rows, row_bytes
from .curvature import get_curvature, outputs_2d, resolve_likelihood
from .curvature.likelihoods import PROBE_SAMPLES
from .model import FlatModel, iter_batches, rebatch, warn_if_training

__all__ = ["AUTOCAST_DTYPES", "autocast_rows", "check_autocast", "cut_chunks", "likelihood_of_data", "likelihood_on", "per_sample_grads", "row_stream",
           "rows_per_sample_of", "stacked_rows"]


def rows_per_sample_of(fm: FlatModel, data, dtype: torch.dtype, curvature,
                     mc_samples: int) -> int | None:
    """Rows each sample gives the curvature, known before the data is read (``None`` when they
    depend on the model's outputs and ``data`` is a one-shot iterable)."""
    per_sample = curvature.rows_per_sample(None, mc_samples=mc_samples)
    if per_sample is not None:
        return per_sample
    batches = as_batch_list(data, fm.task)
    if not batches:
        return None
    x, _ = split_batch(batches[0], "data", fm.task)
    if batch_len(x):
        x = batch_to(batch_slice(x, slice(0, 1)), fm.device, dtype)
        params = fm.param_dict(dtype)
        c = outputs_2d(fm, params, fm.frozen_dict(dtype), x).shape[1]
        return curvature.rows_per_sample(c, mc_samples=mc_samples)
    return None


def stacked_rows(stream: Iterator[torch.Tensor], rows: int) -> torch.Tensor:
    """The chunks of ``stream`` written into one ``(rows, d)`` tensor as they come (no second
    copy of the whole); ``rows`` is their total, known beforehand. Chunks that are
    :class:`ssse_ext.Rows` give a :class:`ssse_ext.Rows` with their summed side payload."""
    out, pos, sides = None, 0, []
    for chunk in stream:
        if isinstance(chunk, ssse_ext.Rows):
            sides.append(chunk.side)
            chunk = chunk.rows
        if out is None:
            if chunk.shape[0] == rows:
                out, pos = chunk, rows  # one chunk: it is the result
                continue
            out = torch.empty((rows,) + tuple(chunk.shape[1:]), dtype=chunk.dtype,
                              device=chunk.device)
        out[pos:pos + chunk.shape[0]] = chunk
        pos += chunk.shape[0]
    if out is None or pos != rows:
        raise ValueError("removed is empty: nothing to erase" if pos == 0 else
                         f"the removed samples gave {pos} rows, expected {rows}")
    side = ssse_ext.side.merge_sides(sides)
    return out if side is None else ssse_ext.Rows(out, side)


def cut_chunks(batches, size: int, cut_every: int | None, cut_start: int):
    """:func:`~ssse.model.rebatch` into ``size`` rows, also cut wherever ``cut_start`` plus the
    samples so far is a multiple of ``cut_every``."""
    if cut_every is None:
        yield from rebatch(batches, size)
        return

    def pieces():
        pos = cut_start
        for x, y in batches:
            i, m = 0, batch_len(y)
            while i < m:
                take = min(m - i, cut_every - pos % cut_every)
                yield pos // cut_every, (batch_slice(x, slice(i, i + take)),
                                         batch_slice(y, slice(i, i + take)))
                i, pos = i + take, pos + take

    for _, segment in itertools.groupby(pieces(), key=lambda piece: piece[0]):
        yield from rebatch((batch for _, batch in segment), size)


def likelihood_on(fm: FlatModel, loss_fn, batch, likelihood, *, params: dict | None = None,
                  dtype: torch.dtype | None = None):
    """The likelihood of ``loss_fn`` resolved on the first :data:`PROBE_SAMPLES` samples of
    ``batch`` (:func:`ssse.curvature.resolve_likelihood`): inferred when ``likelihood`` is
    ``None``, else checked."""
    dtype = dtype or fm.dtype
    # cast as the row streams cast their batches (iter_batches), so the loss sees the same
    x, y = (batch_to(batch_slice(part, slice(0, PROBE_SAMPLES)), fm.device, dtype)
            for part in batch)
    params = fm.param_dict(dtype) if params is None else params
    with torch.no_grad():
        output = fm(params, x, fm.frozen_dict(dtype))
    return resolve_likelihood(likelihood, loss_fn, output, y)


def likelihood_of_data(fm: FlatModel, loss_fn, data, likelihood, *, name: str = "data",
                       dtype: torch.dtype | None = None):
    """:func:`likelihood_on` the first non-empty batch of ``data``; returns ``(likelihood,
    data)``, with ``data`` still whole when it was a one-shot iterator."""
    if as_batch_list(data, fm.task) is not None:
        source, rest = iter_batches(data, name, task=fm.task), data
    elif isinstance(data, Iterator):
        held: list = []
        source = iter_batches((held.append(b) or b for b in data), name, task=fm.task)
        rest = None
    else:
        source, rest = iter_batches(data, name, task=fm.task), data
    first = next((b for b in source if batch_len(b[1])), None)
    if rest is None:
        rest = itertools.chain(held, data)
    if first is None:
        raise ValueError(f"{name} is empty: the likelihood is read from its first batch")
    return likelihood_on(fm, loss_fn, first, likelihood, dtype=dtype), rest


def row_stream(fm: FlatModel, loss_fn, data, name: str, *, weight_decay: float,
                 chunk_size: int | None, minibatch: int, dtype: torch.dtype,
                 params: dict | None = None, max_memory: int | None = None,
                 curvature="empirical", likelihood=None,
                 mc_samples: int = 1, seed: int = 0, info: dict | None = None,
                 generator: torch.Generator | None = None, cut_every: int | None = None,
                 cut_start: int = 0, autocast: torch.dtype | None = None
                 ) -> Iterator[torch.Tensor]:
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
    ``cut_start``). With ``autocast`` (a dtype), the rows are computed under
    :func:`torch.autocast` and returned in ``dtype``."""
    curv = get_curvature(curvature)
    params = fm.param_dict(dtype) if params is None else params
    frozen = fm.frozen_dict(dtype)
    theta = torch.cat([params[k].reshape(-1) for k in fm.names])
    batches = iter_batches(data, name, device=fm.device, dtype=dtype, task=fm.task)
    first = next((b for b in batches if batch_len(b[1])), None)
    if first is None:
        return
    lik = likelihood_on(fm, loss_fn, first, likelihood, params=params, dtype=dtype) \
        if curv.needs_likelihood else None
    per_sample = curv.rows_per_sample(None, mc_samples=mc_samples)
    if per_sample is None:
        one = batch_slice(first[0], slice(0, 1))
        per_sample = curv.rows_per_sample(outputs_2d(fm, params, frozen, one).shape[1],
                                          mc_samples=mc_samples)
    if info is not None:
        info["rows_per_sample"], info["likelihood"] = per_sample, lik
    if chunk_size is None:
        if max_memory is None:
            max_memory = int(MEMORY_SHARE * available_memory(fm.device))
        per_row = row_bytes(fm, params, frozen, first[0], minibatch, dtype)
        chunk_size = plan_chunk_rows(per_row * per_sample, max_memory)
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
    for x, y in cut_chunks(itertools.chain([first], batches), chunk_size * minibatch, cut_every,
                        cut_start):
        if info is not None:
            info["samples"] = info.get("samples", 0) + batch_len(y)
        with autocast_rows(fm.device, autocast):
            rows = curv.rows(fm, params, frozen, x, y, loss_fn=loss_fn, likelihood=lik,
                             generator=generator, mc_samples=mc_samples, minibatch=minibatch,
                             state=state).to(dtype)
        if weight_decay and curv.includes_weight_decay:
            rows.add_(theta, alpha=weight_decay)  # in place: no second copy of the chunk
        yield rows


#: What ``autocast=`` may ask for: the reduced precisions :func:`torch.autocast` computes in.
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def check_autocast(autocast, dtype: torch.dtype) -> torch.dtype | None:
    """``autocast``: ``None`` or one of :data:`AUTOCAST_DTYPES`, for rows in ``dtype``."""
    if autocast is None:
        return None
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got "
                         f"{autocast!r}")
    if dtype == torch.float64:
        raise ValueError("autocast computes float32 work in reduced precision; with "
                         "dtype=torch.float64 it would do nothing: pass dtype=torch.float32 "
                         "or autocast=None")
    return autocast


def autocast_rows(device: torch.device, autocast: torch.dtype | None):
    """The :func:`torch.autocast` context of ``autocast`` on ``device`` (a no-op for ``None``)."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=autocast)


def per_sample_grads(model: nn.Module, loss_fn, data, *, weight_decay: float = 0.0,
                     chunk_size: int | None = None, minibatch: int = 1,
                     max_memory: int | None = None, params=None) -> Iterator[torch.Tensor]:
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
            attribute or per token) are summed. Or a :class:`~ssse.Task`.
        data: one batch or an iterable of batches (:mod:`ssse.batches`: ``(inputs, targets)``
            pairs, mappings with ``"labels"``, or what a :class:`~ssse.Task` reads).
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
        params: the parameters :math:`\theta` (:func:`~ssse.model.select_parameters`: names,
            glob patterns, modules or a predicate; default: those with ``requires_grad``).

    Yields:
        ``(m, d)`` tensors in the model's dtype and on its device.
    """
    check_module(model)
    check_loss(loss_fn)
    fm = FlatModel(model, params=params, loss_fn=loss_fn)
    check_data(data, "data", fm.task)
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
    minibatch = check_positive_int(minibatch, "minibatch")
    max_memory = check_positive_int(max_memory, "max_memory", allow_none=True)
    warn_if_training(model, "per_sample_grads")
    return row_stream(fm, loss_fn, data, "data", weight_decay=weight_decay,
                        chunk_size=chunk_size, minibatch=minibatch, dtype=fm.dtype,
                        max_memory=max_memory)


