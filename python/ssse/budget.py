"""Memory planning of the model-level library: how many bytes a chunk of per-sample rows, a
fit and a request may take, and the refusal of a fit that does not fit (before anything is
computed)."""

from __future__ import annotations

import math

import torch

import ssse_ext
from ssse_ext.budget import AVAILABLE_MEMORY_ENV, available_memory, check_memory, format_bytes
from ssse_ext.fisher import build_peak_bytes

from .batches import batch_leaves, batch_len, batch_slice
from .model import FlatModel

__all__ = ["MAX_CHUNK_ROWS", "activation_elements", "check_fit_memory", "plan_chunk_rows",
           "request_budget", "result_bytes", "row_bytes"]

#: Most rows per chunk of per-sample gradients when the chunk is sized by memory.
MAX_CHUNK_ROWS = 1024
# Copies of a gradient row alive at once while a chunk is made: vmap's per-parameter output
# and the flattened row (the weight-decay term is added in place).
ROW_COPIES = 2
# Activation memory of one sample's forward pass, times this, covers what vmap(grad) keeps for
# the backward pass and its temporaries.
ACTIVATION_COPIES = 4
# Share of the memory available now that a fit plans to use when max_memory is not given.
MEMORY_SHARE = 0.8
# By default a fit's gradient chunks take at most this share of the inverse's size (and at
# least MIN_CHUNK_BYTES): with the float64 accumulators (twice a float32 inverse) and one
# group of the result, the fit's peak stays within 2.5 times the inverse.
CHUNK_SHARE_OF_INVERSE = 0.35
MIN_CHUNK_BYTES = 64 << 20
# An erasure request's rows are computed in chunks of at most this share of the inverse's size
# (and at least MIN_CHUNK_BYTES): its extra memory stays O(k d) plus a small share.
REQUEST_SHARE_OF_INVERSE = 0.1


def activation_elements(fm: FlatModel, params: dict, frozen: dict, x) -> int:
    """Elements of every module output in one sample's forward pass."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        total += sum(o.numel() for o in batch_leaves(output))

    handles = [m.register_forward_hook(hook) for m in fm.model.modules()]
    try:
        with torch.no_grad():
            fm(params, batch_slice(x, slice(0, 1)), frozen)
    finally:
        for h in handles:
            h.remove()
    return total


def row_bytes(fm: FlatModel, params: dict, frozen: dict, x, minibatch: int,
              dtype: torch.dtype) -> int:
    """Estimated bytes one row of per-sample (or per-group) gradients costs while it is made:
    copies of the ``d``-vector and the activations that ``vmap(grad)`` keeps."""
    elem = torch.finfo(dtype).bits // 8
    acts = activation_elements(fm, params, frozen, x) if batch_len(x) else 0
    return elem * (ROW_COPIES * fm.dim + ACTIVATION_COPIES * minibatch * acts)


def result_bytes(layout: ssse_ext.BlockLayout, dtype: torch.dtype, rows: int | None,
                 representation) -> int:
    """Bytes of a fit's result: per block, what the store ``representation`` chooses for it
    holds (:func:`ssse_ext.blocks.choose_stores`)."""
    names = ssse_ext.blocks.choose_stores(layout.sizes, rows, dtype,
                                          representation=representation)
    elem = torch.finfo(dtype).bits // 8
    sizes = (ssse_ext.blocks.get_store(name).nbytes_for(s, rows, dtype)
             for s, name in zip(layout.sizes, names))
    # a store whose size depends on rows not known yet: count the block's dense size
    return int(sum(b if math.isfinite(b) else s * s * elem
                   for b, s in zip(sizes, layout.sizes)))


def check_fit_memory(fm: FlatModel, lay: ssse_ext.BlockLayout, *, dtype: torch.dtype, device,
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
    row = ROW_COPIES * fm.dim * elem * per_sample
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
    if given, else :data:`REQUEST_SHARE_OF_INVERSE` of the inverse (at least
    :data:`MIN_CHUNK_BYTES`, at most the share of the memory available now)."""
    if max_memory is not None:
        return max_memory
    free = int(MEMORY_SHARE * available_memory(device))
    return max(1, min(free, max(int(REQUEST_SHARE_OF_INVERSE * inverse_bytes),
                                MIN_CHUNK_BYTES)))


def plan_chunk_rows(per_row: int, budget: int) -> int:
    """Rows per chunk for a memory budget: as many as fit, between 1 and MAX_CHUNK_ROWS."""
    return max(1, min(MAX_CHUNK_ROWS, int(budget // max(per_row, 1))))


