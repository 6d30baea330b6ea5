"""Fitting the block inverse of a damped curvature at a model's parameters."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

import ssse_ext
from ssse_ext.budget import available_memory
from ssse_ext.validation import check_choice, check_positive_int

from .batches import check_data, check_loss, check_module, is_batch, task_of

from .budget import (CHUNK_SHARE_OF_INVERSE, MEMORY_SHARE, MIN_CHUNK_BYTES, check_fit_memory,
                     result_bytes)
from .checkpoint import fit_resumable
from .comm import one_process
from .curvature import get_curvature
from .model import FlatModel, data_size, warn_if_training
from .rows import check_autocast, row_stream, rows_per_sample_of
from .settings import check_fit_settings
from .sharded_fit import fit_sharded

__all__ = ["fit_inverse_fisher"]


def fit_inverse_fisher(model: nn.Module, loss_fn, data, *, damping: float,
                       block_size: int | None = None, layout="per_parameter",
                       weight_decay: float = 0.0, minibatch: int = 1,
                       dtype: torch.dtype | None = None, device=None,
                       chunk_size: int | None = None, max_memory: int | None = None,
                       curvature="empirical", likelihood=None,
                       mc_samples: int = 1, seed: int = 0, representation: str = "auto",
                       progress: bool = True, checkpoint: str | os.PathLike | None = None,
                       every: int | None = None, probe_vectors: int = 3,
                       comm=None, params=None, autocast=None) -> ssse_ext.BlockInverseFisher:
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
        curvature: ``"empirical"``, ``"ggn"``, ``"mc"`` (see above), ``"kfac"`` or
            ``"ekfac"`` (Kronecker-factored blocks for the weights of linear and convolution
            layers, :mod:`ssse.curvature.kfac`; the layout keeps each such weight whole) or
            the name of another registered :class:`ssse.curvature.Curvature` (or the object).
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
            (``representation="auto"`` means ``"dense"`` with a checkpoint, and
            ``"requests"`` chooses among ``"dense"``, ``"dense64"`` and ``"gram"`` only;
            ``"dual"`` is refused).
        every: samples between checkpoints, a multiple of ``minibatch``: the gradient chunks
            are cut there, so a checkpoint falls on every multiple of it; default: at the end
            of the first chunk after 5 minutes since the last one. A fit resumes only with the
            ``every`` and the number of torch threads it was started with (both change the
            result's last bits).
        probe_vectors: random vectors per block of the health probe
            (:meth:`ssse_ext.BlockInverseFisher.health`, 0: none). The fit checks the result
            with it and warns (:class:`ssse_ext.health.HealthWarning`) above the dtype's
            tolerance.
        comm: a :class:`ssse.comm.Comm` of several processes (e.g. ``ssse.comm.init()`` under
            ``torchrun``) shards the fit: ``data`` is then this rank's share, and the result
            this rank's :class:`ssse.sharding.ShardedInverseFisher`, equal to the blocks of
            the one-process fit of all the data to rounding (:mod:`ssse.sharded_fit`; refused
            there: ``representation="dual"``, ``checkpoint``, ``every``; no progress bar and
            no health probe). Default: one process.
        params: the parameters to fit on and erase (:func:`ssse.model.select_parameters`:
            names, glob patterns such as ``"*lora_*"``, modules or a predicate; default: every
            parameter with ``requires_grad``). The inverse records their names
            (``inv.params``), and an erasure with another selection is refused.
        autocast: ``torch.bfloat16`` or ``torch.float16`` computes the rows under
            :func:`torch.autocast` (the Gram and the inverse still accumulate in float64);
            default: the rows in ``dtype``.

    Returns:
        A :class:`ssse_ext.BlockInverseFisher` with ``num_samples`` the number of rows.
    """
    if not one_process(comm):
        if not get_curvature(curvature).shardable:
            raise ValueError(f"comm: curvature={get_curvature(curvature).name!r} is not "
                             "offered with several processes (its blocks are not sharded); "
                             "fit in one process")
        return fit_sharded(comm, dict(locals()))
    check_module(model)
    check_data(data, "data", task_of(check_loss(loss_fn)))
    check_choice(representation, "representation", ssse_ext.fisher.REPRESENTATIONS)
    fm = FlatModel(model, params=params, loss_fn=loss_fn)
    checked = check_fit_settings(dict(locals()), fm)
    damping, weight_decay, minibatch, curv, mc_samples, seed, probe_vectors, chunk_size, \
        max_memory, lay, dtype, device = (checked[k] for k in (
            "damping", "weight_decay", "minibatch", "curv", "mc_samples", "seed",
            "probe_vectors", "chunk_size", "max_memory", "layout", "dtype", "device"))
    requests = checkpoint is not None and representation == "requests"
    representation = _check_checkpointing(checkpoint, every, minibatch, representation, data,
                                          fm.task)
    representation = curv.representation_for(fm, lay, representation)
    if checkpoint is not None and not isinstance(representation, str):
        raise ValueError(f"checkpoint: curvature={curv.name!r} keeps blocks in its own store, "
                         "which a resumable fit does not: fit without a checkpoint")
    warn_if_training(model, "fit_inverse_fisher")
    n = data_size(data, fm.task)
    total = None if n is None else math.ceil(n / minibatch)
    max_memory = _plan_memory(fm, lay, data, curv, dtype=dtype, device=device, total=total,
                              mc_samples=mc_samples, representation=representation,
                              probe_vectors=probe_vectors, chunk_size=chunk_size,
                              max_memory=max_memory, checkpoint=checkpoint is not None)
    bar = tqdm(total=total, unit="grad", desc="inverse Fisher", disable=not progress,
               leave=False)
    stream_args = dict(weight_decay=weight_decay, minibatch=minibatch, dtype=dtype,
                       max_memory=max_memory, curvature=curv.name, likelihood=likelihood,
                       mc_samples=mc_samples, seed=seed,
                       autocast=check_autocast(autocast, dtype))
    try:
        if checkpoint is not None:
            settings = {"damping": damping, "layout": lay.to_dict(), "samples": n,
                        "device": device.type, "probe_vectors": probe_vectors, **stream_args}
            settings["dtype"] = str(dtype).removeprefix("torch.")
            settings["likelihood"] = getattr(likelihood, "spec", likelihood)
            del settings["max_memory"]
            settings["autocast"] = None if autocast is None else str(autocast)
            # the chunks are cut at the checkpoints, and torch's reductions split their sums
            # by thread: either one changes the last bits of the result
            settings.update(every=every, threads=torch.get_num_threads())
            inv = fit_resumable(fm, loss_fn, data, lay, device=device, chunk_size=chunk_size,
                                stream_args=stream_args, settings=settings,
                                path=Path(checkpoint), every=every, bar=bar,
                                probe_vectors=probe_vectors, requests=requests)
        else:
            inv = _fit_streamed(fm, loss_fn, data, lay, curv, damping=damping, device=device,
                                chunk_size=chunk_size, stream_args=stream_args, total=total,
                                representation=representation, probe_vectors=probe_vectors,
                                bar=bar)
    finally:
        bar.close()
    inv.config = dataclasses.replace(inv.config, params=tuple(fm.names))
    inv.health(what="the fit")
    return inv


def _plan_memory(fm: FlatModel, lay, data, curv, *, dtype, device, total, mc_samples: int,
                 representation, probe_vectors: int, chunk_size, max_memory,
                 checkpoint: bool) -> int | None:
    """Refuses a fit that does not fit in memory (before anything is computed); returns the
    bytes a chunk of rows may take (``max_memory``, or a share of what is free and of the
    result's size when neither it nor ``chunk_size`` is given)."""
    per_sample = rows_per_sample_of(fm, data, dtype, curv, mc_samples)
    rows = None if total is None or per_sample is None else total * per_sample
    build = check_fit_memory(fm, lay, dtype=dtype, device=device, rows=rows,
                             per_sample=per_sample or 1, representation=representation,
                             probe_vectors=probe_vectors, chunk_size=chunk_size,
                             max_memory=max_memory, checkpoint=checkpoint)
    if chunk_size is not None or max_memory is not None:
        return max_memory
    result = result_bytes(lay, dtype, rows, representation)
    fixed = build if device == fm.device else 0
    free = int(MEMORY_SHARE * (available_memory(fm.device) - fixed))
    return max(1, min(free, max(int(CHUNK_SHARE_OF_INVERSE * result), MIN_CHUNK_BYTES)))


def _check_checkpointing(checkpoint, every, minibatch: int, representation: str, data,
                         task) -> str:
    """Checks ``checkpoint`` and ``every``; returns the representation the fit builds."""
    every = check_positive_int(every, "every", allow_none=True)
    if every is not None and every % minibatch:
        raise ValueError(f"every ({every}) must be a multiple of minibatch ({minibatch}): a "
                         "checkpoint cannot split a mini-batch")
    if checkpoint is None:
        if every is not None:
            raise ValueError("every needs a checkpoint path")
        return representation
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path, got {type(checkpoint).__name__}")
    if representation not in ("auto", "dense", "requests"):
        raise ValueError(f"representation={representation!r} cannot be checkpointed (a "
                         'resumable fit keeps dense blocks): pass "dense", "auto" or '
                         '"requests"')
    if not is_batch(data, task) and isinstance(data, Iterator):
        raise TypeError(f"data must be one batch or a re-iterable collection of "
                        f"batches to resume a fit from a checkpoint, got a one-shot "
                        f"{type(data).__name__}")
    # what the resumable fit builds (and plans memory for): dense-family blocks from float64
    # Grams, no dual form; "requests" then holds each block as its requests need it
    return "dense64" if representation == "requests" else "dense"


def _fit_streamed(fm: FlatModel, loss_fn, data, lay: ssse_ext.BlockLayout, curv, *,
                  damping: float, device, chunk_size: int | None, stream_args: dict,
                  total: int | None, representation, probe_vectors: int,
                  bar) -> ssse_ext.BlockInverseFisher:
    """The build fed by the row stream, chunk by chunk (the rows matrix never exists)."""
    info: dict = {}
    stream = row_stream(fm, loss_fn, data, "data", chunk_size=chunk_size, info=info,
                        **stream_args)
    first = next(stream, None)  # the model's or the loss's error surfaces unchanged
    if first is None:
        raise ValueError("data is empty: the Fisher needs at least one sample")
    per_sample = info["rows_per_sample"]

    read: list = []

    def chunks():
        if read:  # a store reads the rows twice (EK-FAC): the same chunks, not counted again
            yield from (rows.to(device) for rows in row_stream(
                fm, loss_fn, data, "data", chunk_size=info["chunk_size"], **stream_args))
            return
        read.append(True)
        for rows in itertools.chain([first], stream):
            bar.update(rows.shape[0] // per_sample)
            yield rows.to(device)

    # N = n times the curvature's weight of a sample: the c Gauss-Newton rows of a sample add
    # up to its curvature (N = n); each Monte-Carlo draw is one estimate of it (N = n *
    # mc_samples, the number of rows)
    rows = None if total is None else total * per_sample
    weight = curv.normalizer_weight(mc_samples=stream_args["mc_samples"])
    again = is_batch(data, fm.task) or not isinstance(data, Iterator)  # data can be re-read
    return ssse_ext.build_inverse_fisher(
        chunks if again else chunks(), damping=damping, layout=lay,
        rows_per_sample=per_sample // weight, curvature=curv.name,
        representation=representation, num_rows=rows, probe_vectors=probe_vectors)
