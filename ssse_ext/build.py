r"""Building the block inverse from a stream of rows, and the memory a build needs.

.. math:: F_b^{-1} = \Big(\lambda I + \frac{1}{N} \sum_{i=1}^{n} g_{i,b}\, g_{i,b}^\top\Big)^{-1}

**Methods.** ``"auto"``/``"cholesky"`` (default): float64 Gram accumulation then a
Cholesky-based inverse in float64, whatever the result's dtype: relative error about
:math:`\kappa(F_b)\,u_{64}` (:math:`u_{64} = 1.1\cdot10^{-16}`) plus the final rounding
(float32: ~3e-8 up to :math:`\kappa \approx 10^8`); a
:class:`~ssse_ext.health.ConditionWarning` names the blocks where :math:`\kappa\,u_{64}` exceeds
:math:`\sqrt{\epsilon}` of the dtype (measured: 2.7e-2 at :math:`\kappa = 5.8\cdot10^{14}`,
benchmarks/bench_accuracy.py). ``"sherman_morrison"``: the paper's literal recurrence (eq. 7)
from :math:`F_0^{-1} = I/\lambda`, one row at a time in the input dtype; it passes through
inverses far worse conditioned than the result (float32, :math:`\lambda = 10^{-4}`: error 4e-4
for unit-scale gradients, 4e-3 for gradients of scale 3), kept for fidelity and cross-checks.
``"woodbury"``: the same recurrence in rank-64 steps with float64 arithmetic, the blocks
rounded to the input dtype once per ``chunk_size`` rows (float32: ~4e-8 on the same cases).
The recurrences need :math:`N` up front and check their result with a health probe.

**Representations.** Every block is held by one registered store (:mod:`ssse_ext.blocks`).
``representation="auto"`` picks per block the store that takes the fewest bytes for the number
of rows (:func:`~ssse_ext.blocks.choose_stores`): known for a tensor, from ``num_rows`` for an
iterable (otherwise only stores whose size does not depend on it). The stores are exact, so
this changes only the memory: a block of ``s`` parameters from ``R < s`` rows keeps ``R s``
numbers and a float64 ``R x R`` factor in the dual form instead of ``s^2`` numbers (1000
float32 rows of 120000 parameters in blocks of 40000: 0.5 GB instead of 19 GB, plus 38 GB of
float64 accumulators while it is built). A store name, or a sequence of them, restricts the
choice; a store is built only by the methods it lists (the dual form by the stable one).

**Requests.** A dense block rewritten by Woodbury downdates amplifies its rounding by its
condition number, so a float32 inverse at small :math:`\lambda` drifts from the fit on the
remaining rows request after request (benchmarks/bench_requests.py). The ``"gram"`` store
(:class:`~ssse_ext.GramStore`) keeps each block's float64 Gram and inverts the changed blocks
again, so requests never drift, for 8 more bytes per element; the ``"dense64"`` store
(:class:`~ssse_ext.blocks.Dense64Store`) holds a float32 inverse's blocks in float64, which its
Woodbury downdates change (a drift of :math:`\kappa^2 u_{64}`). Neither is chosen
by bytes: by name, or by accuracy with ``representation="requests"`` (or ``requests=True``),
which builds from float64 Grams every block ``"auto"`` would hold densely and then holds it in
``"dense"``, ``"dense64"`` or ``"gram"`` by its bound :math:`B \ge \kappa`
(:func:`~ssse_ext.blocks.gram.requests_stores`: the first whose Woodbury downdates keep
:math:`B^2 u` within :data:`~ssse_ext.blocks.REQUEST_TOLERANCE`, 1e-5 in float32 and 1e-10
in float64).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch

from .blocks import (AUTO, REPRESENTATIONS, REQUESTS, STORES, DenseStore, DualBlocks,
                     DualBuilder, block_ids_of, choose_stores, element_size, get_store,
                     representation_for_requests, resolve_representation, serves_requests)
from .blocks.dense_gram import DenseGram, gather_rows
from .blocks.gram import requests_stores
from .budget import check_memory, format_bytes, memory_limit
from .errors import NotPositiveDefiniteError
from .health import DEFAULT_COLUMNS, FisherProbe, HealthWarning
from .inverse import BlockInverseFisher, FisherConfig, check_label
from .layout import BlockLayout, check_build_args
from .lowrank import WOODBURY_ELEMENTS
from .side import Rows, SideSum, strip_side
from .validation import (check_choice, check_dtype, check_nonneg_int, check_positive_int,
                         matrix_chunks)

__all__ = ["BUILD_METHODS", "DEFAULT_BLOCK_SIZE", "REPRESENTATIONS", "GramAccumulator",
           "StoreBuild", "build_dual_blocks", "build_inverse_fisher", "build_peak_bytes"]

#: ``auto`` = ``cholesky`` (the stable build), and the two recurrences (see the module).
BUILD_METHODS = ("auto", "cholesky", "sherman_morrison", "woodbury")
_RECURRENCES = ("sherman_morrison", "woodbury")
#: Largest block size ``B`` when neither ``block_size`` nor a layout is given.
DEFAULT_BLOCK_SIZE = 1024
# Rows per kernel call of the chunked recurrence (the kernels work in rank-64 steps).
_DEFAULT_WOODBURY_CHUNK = 1024
# float64 (d, columns) tensors of a health probe alive while it checks a result: the sketch,
# the random vectors, F X in float64 and in two parts of the inverse's dtype, the products.
_PROBE_COPIES = 10


# ---- planning -------------------------------------------------------------------------------

class _Plan(NamedTuple):
    names: list      # per block, the store that holds it
    peak: int        # bytes
    detail: str
    gather: int      # rows gathered per call (0: chunks pass as they come)


def _owned(names: Sequence[str]) -> dict[str, list[int]]:
    """Per store name (in registration order), the blocks it holds."""
    return {n: [b for b, m in enumerate(names) if m == n] for n in STORES if n in names}


def _build_plan(layout: BlockLayout, dtype: torch.dtype, rows: int | None, representation,
                method: str, device: torch.device, probe_vectors: int,
                cost_rows: int | None = None) -> _Plan:
    """The stores chosen for ``rows`` rows and the peak bytes of the build: every store's
    streaming bytes next to the row buffer, or every store's peak, whichever is larger, plus
    the health probe. ``cost_rows``: the rows the stores' sizes are estimated for (default
    ``rows``, or none)."""
    names = choose_stores(layout.sizes, rows, dtype, representation=representation,
                          method=method)
    cost_rows = (rows or 0) if cost_rows is None else cost_rows
    costs = [get_store(n).build_cost(layout, ids, rows=cost_rows, dtype=dtype, device=device,
                                     method=method) for n, ids in _owned(names).items()]
    recurrence = method in _RECURRENCES
    d = layout.dim
    gather = 0 if recurrence else gather_rows(d, sum(c.stored for c in costs), dtype)
    buffer = gather * d * element_size(dtype)
    probe = _PROBE_COPIES * 8 * d * (max(probe_vectors, 1) if recurrence else probe_vectors)
    peak = max(sum(c.streaming for c in costs) + buffer, sum(c.peak for c in costs)) + probe
    detail = "; ".join([c.detail for c in costs] +
                       [f"row buffer and probe {format_bytes(buffer + probe)}"])
    return _Plan(names, peak, detail, gather)


def build_peak_bytes(layout: BlockLayout, dtype: torch.dtype = torch.float32, *,
                     rows: int | None = None, representation="auto",
                     method: str = "auto", device="cpu",
                     probe_vectors: int = DEFAULT_COLUMNS) -> int:
    """Estimated peak bytes :func:`build_inverse_fisher` allocates on ``device`` for this
    layout and ``rows`` rows (``None``: unknown, which makes ``"auto"`` choose only stores
    whose size does not depend on it): what every chosen store holds while the rows stream
    in and while it finishes (:meth:`~ssse_ext.blocks.BlockStore.build_cost`), the row
    buffer, the health probe. The rows themselves are not counted."""
    check_dtype(dtype)
    check_choice(method, "method", BUILD_METHODS)
    return _build_plan(layout, dtype, rows, representation, method, torch.device(device),
                       probe_vectors).peak


def _halving_helps(names: Sequence[str], layout: BlockLayout, rows: int,
                   dtype: torch.dtype) -> bool:
    """Whether two blocks of half the size take fewer bytes than one, in some chosen store."""
    for name, s in {(n, s) for n, s in zip(names, layout.sizes) if s > 1}:
        cost = get_store(name).nbytes_for
        if cost(s, rows, dtype) > 2 * cost(math.ceil(s / 2), rows, dtype):
            return True
    return False


def _checked_plan(layout: BlockLayout, first: torch.Tensor, rows: int | None, representation,
                  method: str, probe_vectors: int, max_memory: int | None) -> _Plan:
    """The build's plan, refused when its peak exceeds what it may use, naming the changes
    that would make it fit. An iterable of unknown length is planned for its first chunk."""
    dtype, device = first.dtype, first.device
    cost_rows = first.shape[0] if rows is None else rows
    plan = _build_plan(layout, dtype, rows, representation, method, device, probe_vectors,
                       cost_rows)
    if plan.peak <= memory_limit(device, max_memory)[0]:
        return plan
    remedies = []
    if rows is not None and not serves_requests(representation) and (
            representation != AUTO or method in _RECURRENCES):
        auto = _build_plan(layout, dtype, rows, AUTO, "auto", device, probe_vectors).peak
        if auto < plan.peak:
            prefix = 'method="auto", ' if method in _RECURRENCES else ""
            remedies.append(f'pass {prefix}representation="auto" (exact as well: about '
                            f'{format_bytes(auto)} here)')
    elif serves_requests(representation) and rows is not None:
        auto = _build_plan(layout, dtype, rows, AUTO, method, device, probe_vectors).peak
        if auto < plan.peak:
            remedies.append(f'pass representation="auto" (about {format_bytes(auto)} here; '
                            f'its dense blocks\' downdates drift from a fresh fit, which the '
                            f'health probe reports)')
    elif (representation == AUTO or serves_requests(representation)) and rows is None:
        remedies.append(f'pass num_rows= (the rows the iterable yields) so that '
                        f'representation={representation!r} can choose stores whose size '
                        f'depends on it')
    if _halving_helps(plan.names, layout, cost_rows, dtype):
        remedies.append(f"pass a smaller block_size or layout (the largest block has "
                        f"{layout.max_block_size} parameters)")
    remedies.append("pass max_memory=<bytes> if more memory may be used than is free now")
    check_memory("build_inverse_fisher", plan.peak, device, max_memory=max_memory,
                 detail=plan.detail, remedies=remedies)
    return plan


# ---- the build ------------------------------------------------------------------------------

def build_inverse_fisher(grads, *, damping: float, block_size: int | None = None,
                         layout: BlockLayout | None = None, normalizer: float | None = None,
                         chunk_size: int | None = None, method: str = "auto",
                         rows_per_sample: int = 1, curvature: str = "empirical",
                         representation="auto", num_rows: int | None = None,
                         probe_vectors: int = DEFAULT_COLUMNS,
                         max_memory: int | None = None,
                         requests: bool = False) -> BlockInverseFisher:
    r"""Builds the block inverse of the damped Fisher from a stream of rows (see the module for
    the methods and the representations).

    Args:
        grads: an ``(n, d)`` tensor, or an iterable of ``(m, d)`` chunks consumed one at a time
            (the ``(n, d)`` matrix is never formed). float32 or float64, CPU or CUDA; the
            result has the rows' dtype and device. Each may be a :class:`~ssse_ext.side.Rows`
            instead: its side payload, summed over the stream, goes to every store's builder
            (the Kronecker-factored stores read their factors from it). Or a function
            returning such an iterable: a store that needs the rows twice (EK-FAC's
            eigenvalues, in a basis known only at the end) then reads them twice instead of
            holding them; so does a tensor or a list of chunks.
        damping: :math:`\lambda > 0`.
        block_size: ``B`` for ``BlockLayout.fixed(d, B)`` when ``layout`` is not given
            (default ``min(d, 1024)``).
        layout: an explicit :class:`BlockLayout` (its ``dim`` must equal ``d``).
        normalizer: :math:`N`; default the rows consumed divided by ``rows_per_sample``. The
            stable build needs it only at the end (one pass over an iterable suffices); the
            recurrences need it up front for an iterable (a ``ValueError`` otherwise).
        chunk_size: rows per kernel call (``woodbury``: default 1024).
        method: ``"auto"`` (= ``"cholesky"``), ``"sherman_morrison"`` or ``"woodbury"``.
        rows_per_sample: rows each sample contributes (e.g. ``c`` Gauss–Newton rows), for the
            default normaliser.
        curvature: what the rows are, a label recorded in the result's :class:`FisherConfig`.
        representation: ``"auto"``, ``"requests"`` (the module), a registered store name
            (``"dense"``, ``"dual"``, ...), a sequence of them, or
            :class:`~ssse_ext.blocks.Pinned` (some blocks pinned to named stores, e.g. the
            Kronecker-factored weights).
        num_rows: the rows an iterable will yield, for ``representation="auto"``.
        probe_vectors: random vectors per block of the result's health probe
            (:meth:`BlockInverseFisher.health`; 0: none).
        max_memory: the bytes the build may allocate (:func:`build_peak_bytes`; the rows are
            the caller's). Default: what the rows' device has free
            (:func:`ssse_ext.budget.available_memory`). A build that would need more is refused
            with :class:`~ssse_ext.errors.InsufficientMemoryError` before it allocates anything
            of that size (of an iterable, only the first chunk is read).
        requests: the inverse will serve deletion requests (downdates): the same as
            ``representation="requests"`` (the module); ``ValueError`` with any other
            ``representation`` than ``"auto"``.

    Returns:
        The :class:`BlockInverseFisher`, with ``num_samples`` the number of rows consumed.
    """
    damping, normalizer, block_size = check_build_args(damping, normalizer, layout, block_size)
    check_choice(method, "method", BUILD_METHODS)
    rows_per_sample = check_positive_int(rows_per_sample, "rows_per_sample")
    check_label(curvature, "curvature")
    if not isinstance(requests, bool):
        raise TypeError(f"requests must be a bool, got {type(requests).__name__}")
    if requests:
        representation_for_requests(representation)  # refuses an explicit choice
        representation = REQUESTS
    resolve_representation(representation, method)
    num_rows = check_positive_int(num_rows, "num_rows", allow_none=True)
    probe_vectors = check_nonneg_int(probe_vectors, "probe_vectors")
    chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if max_memory is not None:
        max_memory = check_nonneg_int(max_memory, "max_memory")
    if method in _RECURRENCES:
        if not isinstance(grads, (torch.Tensor, Rows)) and normalizer is None:
            raise ValueError(f"normalizer must be given when grads is an iterable and "
                             f"method={method!r} (the recurrence uses N at every step)")
        if method == "woodbury" and chunk_size is None:
            chunk_size = _DEFAULT_WOODBURY_CHUNK
    sides, reread = SideSum(), _rereader(grads)
    grads = grads() if reread is grads else grads
    is_tensor = isinstance(grads, (torch.Tensor, Rows))
    rows = grads.shape[0] if is_tensor else num_rows
    chunks = matrix_chunks(strip_side(grads, sides.add), chunk_size)
    first = next(chunks, None)
    if first is None:
        raise ValueError("grads is empty: at least one (m, d) chunk is needed to know d")
    d = first.shape[1]
    if layout is None:
        layout = BlockLayout.fixed(d, block_size or max(1, min(d, DEFAULT_BLOCK_SIZE)))
    elif layout.dim != d:
        raise ValueError(f"layout.dim={layout.dim} does not match the gradients' d={d}")
    plan = _checked_plan(layout, first, rows, representation, method, probe_vectors,
                         max_memory)
    readers = sorted({n for n in plan.names if get_store(n).takes_side})
    if readers and sides.total is None:  # known from the first chunk, before the stream
        raise ValueError(f"representation={representation!r} puts blocks in the "
                         f"{' and '.join(readers)} store, which reads a side payload of the "
                         f"rows (ssse_ext.Rows); the rows carry none")
    if method in _RECURRENCES and normalizer is None:
        normalizer = max(grads.shape[0], 1) / rows_per_sample
    return _build(itertools.chain([first], chunks), layout, plan, damping=damping,
                  normalizer=normalizer, dtype=first.dtype, device=first.device, method=method,
                  rows_per_sample=rows_per_sample, capacity=rows, curvature=curvature,
                  probe_vectors=probe_vectors, max_memory=max_memory, sides=sides,
                  reread=reread, chunk_size=chunk_size,
                  requests=serves_requests(representation))


def _build(chunks, layout: BlockLayout, plan: _Plan, *, damping: float,
           normalizer: float | None, dtype: torch.dtype, device: torch.device, method: str,
           rows_per_sample: int, capacity: int | None, curvature: str, probe_vectors: int,
           max_memory: int | None, sides: SideSum, reread, chunk_size: int | None,
           requests: bool = False) -> BlockInverseFisher:
    """Feeds every chunk to one builder per chosen store (twice to those that ask, when
    ``reread`` gives the rows again), then finishes them (``requests``: into the stores
    their blocks take to serve requests,
    :meth:`~ssse_ext.blocks.StoreBuilder.finish_for_requests`)."""
    recurrence = method in _RECURRENCES
    build = StoreBuild(layout, plan, dtype=dtype, device=device, method=method, damping=damping,
                       normalizer=normalizer, rows=capacity, probe_vectors=probe_vectors,
                       max_memory=max_memory, reread=reread is not None)
    stream = _gathered(chunks, plan.gather) if plan.gather else chunks
    rows, largest = _feed([build], stream, method, damping)
    if normalizer is None:
        normalizer = max(rows, 1) / rows_per_sample
    if sides.total is not None:  # summed over the stream: every chunk has been read
        build.add_side(sides.total)
    if build.another_pass():  # the same rows once more; their side payload is known already
        for chunk in matrix_chunks(strip_side(reread(), lambda side: None), chunk_size,
                                   dim=layout.dim, dtype=dtype, device=device):
            build.add(chunk)
    stores = []
    for builder in build.builders:  # a loop, not a comprehension: the warnings count frames
        stores += builder.finish_for_requests(normalizer, max_memory=max_memory) if requests \
            else [builder.finish(normalizer)]
    inv = BlockInverseFisher(stores, FisherConfig(damping, normalizer, layout, curvature), rows,
                             probe=build.probe)
    if recurrence:
        _warn_unhealthy(inv, method, damping, largest)
        if not probe_vectors:
            inv.probe = None
    return inv


class StoreBuild:
    """The builders of one build's stores, one per store chosen, for a caller that drives the
    rows itself (the sharded fit, :mod:`ssse.sharded_fit`, feeds each owner the columns of its
    blocks of every rank's rows): :meth:`add` every chunk, :meth:`add_side` the side payload
    of all of them, then, while :meth:`another_pass` asks, the same rows again; :meth:`finish`.

    Make it with :meth:`planned`, which chooses the stores for ``representation`` and refuses
    a build that does not fit the memory before it allocates."""

    def __init__(self, layout: BlockLayout, plan: _Plan, *, dtype: torch.dtype, device,
                 method: str = "auto", damping: float, normalizer: float | None = None,
                 rows: int | None = None, probe_vectors: int = DEFAULT_COLUMNS,
                 max_memory: int | None = None, reread: bool = False):
        self.layout, self.damping, self.device = layout, damping, torch.device(device)
        self.peak = plan.peak  # the bytes the build allocates at most (planned)
        # a recurrence always checks its result with a probe (it may have lost its accuracy)
        columns = max(probe_vectors, 1) if method in _RECURRENCES else probe_vectors
        self.probe = FisherProbe(layout, columns=columns, device=device) if columns else None
        owned = _owned(plan.names) or {resolve_representation(AUTO, method)[0]: []}
        self.builders = [get_store(name).builder(
            layout, ids, dtype=dtype, device=device, method=method, damping=damping,
            normalizer=normalizer, rows=rows, probe=self.probe, max_memory=max_memory)
            for name, ids in owned.items()]
        if reread:
            for builder in self.builders:
                builder.can_reread()
        self.feeding = self.builders

    @classmethod
    def planned(cls, layout: BlockLayout, representation, *, dtype: torch.dtype, device,
                damping: float, rows: int | None = None, probe_vectors: int = DEFAULT_COLUMNS,
                max_memory: int | None = None, reread: bool = False) -> "StoreBuild":
        """The builders for ``rows`` rows (``None``: unknown) of ``layout`` stored as
        ``representation`` (as :func:`build_inverse_fisher` takes it); ``reread``: the caller
        can give the rows a second time (else the stores that need them twice hold them)."""
        check_dtype(dtype)
        first = torch.zeros(0, layout.dim, dtype=dtype, device=device)
        plan = _checked_plan(layout, first, rows, representation, "auto", probe_vectors,
                             max_memory)
        return cls(layout, plan, dtype=dtype, device=device, damping=damping, rows=rows,
                   probe_vectors=probe_vectors, max_memory=max_memory, reread=reread)

    def add(self, chunk: torch.Tensor) -> None:
        """One chunk of ``(m, dim)`` rows to every builder (of the second pass: to those that
        asked for it)."""
        for builder in self.feeding:
            builder.add(chunk)

    def add_side(self, side: dict) -> None:
        """The side payload of all the rows, once they have all been added."""
        side = {k: v.to(self.device) for k, v in side.items()}
        for builder in self.builders:
            builder.add_side(side)

    def another_pass(self) -> bool:
        """Whether some store needs the rows once more (then :meth:`add` them again)."""
        self.feeding = [builder for builder in self.builders if builder.another_pass()]
        return bool(self.feeding)

    def finish(self, normalizer: float, *, curvature: str,
               num_samples: int) -> BlockInverseFisher:
        """The inverse of the blocks (each store's :meth:`~StoreBuilder.finish`)."""
        stores = []
        for builder in self.builders:  # a loop, not a comprehension: the warnings count frames
            stores.append(builder.finish(normalizer))
        return BlockInverseFisher(stores, FisherConfig(self.damping, normalizer, self.layout,
                                                       curvature), num_samples,
                                  probe=self.probe)


def _rereader(grads):
    """A function giving the rows of ``grads`` again (``grads`` itself when it is such a
    function), or ``None`` for a one-shot iterator."""
    if callable(grads) and not isinstance(grads, (torch.Tensor, Rows)):
        return grads
    if isinstance(grads, (torch.Tensor, Rows, list, tuple)):
        return lambda: grads
    return None


def _feed(builders, stream, method: str, damping: float) -> tuple[int, float]:
    """Every chunk to every builder; returns the rows fed and, for a recurrence, the largest
    squared row norm (its failures are explained by it)."""
    rows, largest = 0, 0.0
    for chunk in stream:
        if chunk.shape[0] == 0:
            continue
        if method in _RECURRENCES:
            step = max(1, WOODBURY_ELEMENTS // max(chunk.shape[1], 1))  # no float64 copy
            norms = torch.cat([c.to(torch.float64).pow(2).sum(1) for c in chunk.split(step)])
            largest = max(largest, float(norms.max()))
            if not math.isfinite(largest):
                raise FloatingPointError(
                    "build: the squared norm of a row overflowed float64 (1.8e308, rows of "
                    "norm about 1e154 or more); scale the loss or the inputs down")
        try:
            for builder in builders:
                builder.add(chunk)
        except NotPositiveDefiniteError as exc:
            if method not in _RECURRENCES:
                raise
            raise NotPositiveDefiniteError(
                f"{exc}: the recurrence (method={method!r}) is unstable at this damping "
                f"({damping:g}) and gradient scale (rows of norm up to "
                f"{math.sqrt(largest):.1e}): its intermediate inverses are far worse "
                f"conditioned than the result. Use the default build (method=\"auto\"), which "
                f"computes the same matrix stably") from None
        rows += chunk.shape[0]
    return rows, largest


def _warn_unhealthy(inv: BlockInverseFisher, method: str, damping: float,
                    largest: float) -> None:
    health = inv.probe.check(inv, warn=False)
    if not health.ok:
        warnings.warn(
            f"build (method={method!r}): the accuracy check failed: |F(F^-1 x) - x|/|x| = "
            f"{health.residual:.1e} in block {health.block} (threshold {health.tolerance:.1e}; "
            f"rounding to {str(inv.dtype).removeprefix('torch.')} explains {health.floor:.0e})"
            f": the recurrence is unstable at this damping ({damping:g}) and gradient scale "
            f"(rows of norm up to {math.sqrt(largest):.1e}); the default build "
            f"(method=\"auto\") computes the same matrix stably", HealthWarning, stacklevel=4)


def _gathered(chunks: Iterable[torch.Tensor], rows: int) -> Iterator[torch.Tensor]:
    """The rows of ``chunks`` in order, chunks of fewer than ``rows`` rows gathered in one
    reused buffer (a kernel call on few rows is inefficient); larger chunks pass through."""
    buf, filled = None, 0
    for chunk in chunks:
        m = chunk.shape[0]
        if m == 0:
            continue
        if m >= rows:
            if filled:
                yield buf[:filled]
                filled = 0
            yield chunk
            continue
        if buf is None:
            buf = torch.empty(rows, chunk.shape[1], dtype=chunk.dtype, device=chunk.device)
        if filled + m > rows:
            yield buf[:filled]
            filled = 0
        buf[filled:filled + m] = chunk
        filled += m
    if filled:
        yield buf[:filled]


# ---- the dense accumulators, and the dual blocks alone -------------------------------------

class GramAccumulator(DenseGram):
    r"""The stable build's state of dense blocks: the float64 Gram accumulators
    :math:`\sum_r u_{r,b} u_{r,b}^\top` of blocks ``first .. last - 1`` of a layout (all by
    default), fed row chunks with :meth:`add` and turned into the inverse by :meth:`finish`
    (see :class:`~ssse_ext.blocks.dense_gram.DenseGram` for the arguments, the groups and
    :meth:`state`/:meth:`load_state`)."""

    def finish(self, damping: float, normalizer: float, *, curvature: str = "empirical",
               probe: FisherProbe | None = None,
               requests: bool = False) -> BlockInverseFisher | list[torch.Tensor]:
        """Inverts every group (freeing it) into the segments of the result: a
        :class:`BlockInverseFisher` when all blocks were accumulated (``probe`` travelling
        with it), else the list of segments of the accumulated blocks. The accumulator is
        spent. See :meth:`~ssse_ext.blocks.dense_gram.DenseGram.invert` for the checks.
        ``requests`` (all blocks accumulated): the blocks held as
        ``representation="requests"`` holds them
        (:func:`~ssse_ext.blocks.gram.requests_stores`)."""
        if requests:
            if len(self.blocks) != self.layout.num_blocks:
                raise ValueError("requests=True needs every block of the layout accumulated")
            stores = requests_stores(self, damping, normalizer, probe=probe, stacklevel=2)
            return BlockInverseFisher(stores, FisherConfig(damping, normalizer, self.layout,
                                                           curvature), self.rows, probe=probe)
        segments = self.invert(damping, normalizer, probe=probe, stacklevel=2)
        if len(self.blocks) != self.layout.num_blocks:
            return segments
        store = DenseStore(self.layout, self.blocks,
                           segments or [torch.zeros(0, dtype=self.dtype, device=self.device)],
                           damping=damping, normalizer=normalizer)
        return BlockInverseFisher([store], FisherConfig(damping, normalizer, self.layout,
                                                        curvature), self.rows, probe=probe)


def build_dual_blocks(grads, *, damping: float, layout: BlockLayout | None = None,
                      block_size: int | None = None, blocks=None, normalizer: float | None = None,
                      capacity: int | None = None, chunk_size: int | None = None) -> DualBlocks:
    r"""Builds :class:`~ssse_ext.DualBlocks` alone from a stream of rows.

    .. math:: F_b^{-1} = \tfrac{1}{\lambda}\Big[I - G_b^\top (\lambda N I + G_b G_b^\top)^{-1}
              G_b\Big]

    Args:
        grads: an ``(n, d)`` tensor, or an iterable of ``(m, d)`` chunks consumed once.
            float32 or float64, CPU or CUDA; the blocks get the rows' dtype and device.
        damping: :math:`\lambda > 0`.
        layout: the :class:`BlockLayout` (``layout.dim`` must be ``d``); or ``block_size`` for
            ``BlockLayout.fixed(d, block_size)``; default one block of ``d``.
        blocks: which layout blocks are dual: ``None`` (all), increasing block indices, or a
            mask with one bool per block.
        normalizer: :math:`N > 0`, default the number of rows consumed.
        capacity: rows to reserve up front for an iterable (default: grow by doubling, then
            drop the spare capacity at the end); a tensor reserves exactly its rows.
        chunk_size: rows per kernel call (default: each chunk at once).

    Raises:
        NotPositiveDefiniteError: a kernel is not positive definite (overflow or NaN only).
    """
    damping, normalizer, block_size = check_build_args(damping, normalizer, layout, block_size)
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                 or capacity < 0):
        raise ValueError(f"capacity must be a non-negative integer, got {capacity!r}")
    chunks = matrix_chunks(grads, chunk_size, like="the dual blocks")
    first = next(chunks, None)
    if first is None:
        raise ValueError("grads is empty: at least one (m, d) chunk is needed to know d")
    d, dtype, device = first.shape[1], first.dtype, first.device
    if layout is None:
        layout = BlockLayout.fixed(d, block_size or max(d, 1)) if d else BlockLayout((), (), 0)
    elif layout.dim != d:
        raise ValueError(f"layout.dim={layout.dim} does not match the gradients' d={d}")
    ids = block_ids_of(layout, blocks)
    is_tensor = isinstance(grads, torch.Tensor)
    cap = grads.shape[0] if is_tensor else (capacity if capacity is not None else first.shape[0])
    total = sum(layout.sizes[b] for b in ids)
    check_memory("build_dual_blocks", cap * total * element_size(dtype) + len(ids) * cap * cap * 8,
                 device, detail=f"{cap} rows of {len(ids)} dual blocks ({total} parameters) "
                                f"and their float64 factors",
                 remedies=("store fewer blocks in the dual form (blocks=)",))
    builder = DualBuilder(layout, ids, dtype, device, damping=damping, capacity=cap,
                          exact=is_tensor, compact=not is_tensor and capacity is None)
    rows = 0
    for chunk in itertools.chain([first], chunks):
        builder.add(chunk)
        rows += chunk.shape[0]
    return builder.finish(normalizer if normalizer is not None else float(max(rows, 1)))
