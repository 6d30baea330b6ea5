r"""The stable build of dense blocks: streamed float64 Gram matrices, then a Cholesky-based
inverse (DESIGN §1, "Numerical stability").

:class:`DenseGram` holds :math:`\sum_r u_{r,b} u_{r,b}^\top` of a set of blocks in float64, in
groups of consecutive blocks, and inverts one group at a time into a segment of the result, so
that the accumulators and the whole result never coexist.
"""

from __future__ import annotations

import torch

from .. import _C, _ops
from ..budget import check_memory, format_bytes
from ..errors import NotPositiveDefiniteError
from ..health import FisherProbe, ill_conditioned_blocks, warn_ill_conditioned
from ..layout import BlockLayout
from ..validation import all_finite, check_dtype, check_positive_float
from .base import element_size

__all__ = ["DenseGram", "check_kept_build", "cuda_workspace", "dense_build_nbytes",
           "gather_rows", "gram_build_workspace", "groups", "kept_build_cost",
           "raise_if_failed"]

# The stable build keeps its float64 accumulators in about this many groups of blocks (and
# inverts them one group at a time); groups smaller than _MIN_GROUP_NUMEL are not split further.
_GROUPS = 8
_MIN_GROUP_NUMEL = 1 << 22
# Rows gathered per Gram call from a stream of smaller chunks, memory allowing: the row buffer
# takes at most an eighth of the result, or _MIN_GATHER_BYTES.
_GATHER_ROWS = 256
_MIN_GATHER_BYTES = 64 << 20
# Before inverting, the stable build checks its float64 accumulators a run of blocks at a time
# (the condition estimate, then the health probe), at most _RUN_ELEMENTS elements unless a
# single block is larger (ssse_ext.health): measured, two float64 copies of the run at once in
# a build and three for the condition estimate alone (the copy, its damped form, the factor).
_CHECK_COPIES = 3
_RUN_ELEMENTS = 1 << 22


def raise_if_failed(info: torch.Tensor, what: str, layout: BlockLayout, rows: str,
                    block_ids=None) -> None:
    """Raises :class:`NotPositiveDefiniteError` for the first block whose kernel ``info`` is
    not zero; ``info`` has one entry per block of ``block_ids`` (default: of the layout)."""
    bad = torch.nonzero(info).flatten().tolist()
    if bad:
        b = bad[0] if block_ids is None else block_ids[bad[0]]
        raise NotPositiveDefiniteError(
            f"{what}: block {b} (parameters {layout.starts[b]}..{layout.starts[b] + layout.sizes[b]})"
            f" is no longer positive definite at {rows} {int(info[bad[0]])}"
            + (f" (and {len(bad) - 1} other blocks)" if len(bad) > 1 else ""))


def cuda_workspace(name: str, *args) -> int:
    """The workspace a CUDA kernel asks for (0 when the extension was built without CUDA)."""
    fn = getattr(_C, name, None)
    return int(fn(*args)) if fn is not None else 0



def gram_build_workspace(layout, block_ids, device) -> int:
    """The largest CUDA workspace of a Gram build over ``block_ids`` (its accumulation and its
    inversion, group by group; 0 off CUDA)."""
    if device.type != "cuda":
        return 0
    sizes = [layout.sizes[b] for b in block_ids]
    workspace = 0
    for g0, g1 in groups(sizes, group_cap(sizes)):
        host = layout.table(blocks=block_ids[g0:g1])
        workspace = max(workspace, *(cuda_workspace(name, host.data_ptr(), g1 - g0)
                                     for name in ("inverse_from_gram_workspace_bytes",
                                                  "gram_accumulate_workspace_bytes")))
    return workspace

def groups(sizes, max_numel: int) -> list[tuple[int, int]]:
    """Consecutive ranges ``(first, last)`` of positions in ``sizes`` holding at most
    ``max_numel`` packed elements (a larger block gets a range of its own)."""
    out, first, numel = [], 0, 0
    for b, s in enumerate(sizes):
        if numel and numel + s * s > max_numel:
            out.append((first, b))
            first, numel = b, 0
        numel += s * s
    if first < len(sizes):
        out.append((first, len(sizes)))
    return out


def group_cap(sizes) -> int:
    """The packed elements of one group of :class:`DenseGram` for blocks of ``sizes``."""
    return max(sum(s * s for s in sizes) // _GROUPS, _MIN_GROUP_NUMEL)


def gather_rows(dim: int, stored_bytes: int, dtype: torch.dtype) -> int:
    """Rows worth gathering before a kernel call: up to 256, the row buffer within an eighth
    of ``stored_bytes`` (or 64 MiB)."""
    row_bytes = max(dim * element_size(dtype), 1)
    return min(_GATHER_ROWS, max(1, stored_bytes // _GROUPS // row_bytes,
                                 _MIN_GATHER_BYTES // row_bytes))


def _check_run_numel(sizes, cap: int) -> int:
    """Largest run of blocks (of one group) the health checks copy at once."""
    return max((min(cap, max(_RUN_ELEMENTS, s * s)) for s in sizes), default=0)


def dense_build_nbytes(sizes, dtype: torch.dtype) -> int:
    """Peak bytes of a :class:`DenseGram` of blocks of these sizes, from its float64
    accumulators to the finished inverse (without the row buffer and CUDA workspace)."""
    elem = element_size(dtype)
    numel = sum(s * s for s in sizes)
    parts = [sum(s * s for s in sizes[g0:g1]) for g0, g1 in groups(sizes, group_cap(sizes))]
    # the checks before the inversion copy a run of blocks at a time, all accumulators held
    check = 8 * numel + _CHECK_COPIES * 8 * _check_run_numel(sizes, max(parts, default=0))
    # while a group is inverted, the results of the earlier groups and of this one sit next
    # to the float64 accumulators of this group and the later ones
    invert = max((8 * sum(parts[g:]) + elem * sum(parts[:g + 1])
                  for g in range(len(parts))), default=0)
    return max(check, invert)


def kept_build_cost(name: str, layout, block_ids, dtype: torch.dtype, device, *,
                    stored: int, held: int, spare: int, what: str):
    """The :class:`~ssse_ext.blocks.BuildCost` of a store of dense-family blocks built from
    float64 Grams (:class:`DenseGram`) that keeps ``stored`` bytes per element: the Grams
    while the rows stream in; at the end at most ``held`` bytes per element of every block
    and ``spare`` per element of the largest group. ``what``: what it stores, in words."""
    from .base import BuildCost
    sizes = [layout.sizes[b] for b in block_ids]
    numel = sum(s * s for s in sizes)
    largest = max((sum(sizes[i] ** 2 for i in range(g0, g1))
                   for g0, g1 in groups(sizes, group_cap(sizes))), default=0)
    workspace = gram_build_workspace(layout, block_ids, device)
    peak = max(dense_build_nbytes(sizes, dtype), held * numel + spare * largest)
    return BuildCost(8 * numel + workspace, peak + workspace, stored * numel,
                     f"{len(sizes)} {name} blocks of up to {max(sizes, default=0)}: "
                     f"{format_bytes(stored * numel)} stored ({what})")


def check_kept_build(cls, layout, block_ids, *, dtype, device, method, rows,
                     max_memory) -> None:
    """Refuses the build of store ``cls`` when its :meth:`build_cost` peak does not fit."""
    cost = cls.build_cost(layout, tuple(block_ids), rows=rows or 0, dtype=dtype,
                          device=torch.device(device), method=method)
    check_memory(f"{cls.__name__}.builder", cost.peak, device, max_memory=max_memory,
                 detail=cost.detail,
                 remedies=(f"hold fewer blocks as {cls.name} (representation=) or use "
                           f"smaller blocks",
                           "pass max_memory=<bytes> if more memory may be used than is free "
                           "now"))


class DenseGram:
    r"""The float64 Gram accumulators :math:`\sum_r u_{r,b} u_{r,b}^\top` of blocks
    ``first .. last - 1`` of a layout (all by default), fed row chunks with :meth:`add` and
    inverted by :meth:`invert`.

    The accumulators are held in groups of consecutive blocks; :meth:`invert` inverts each group
    into a segment of the result and frees it before the next, so the float64 accumulators and
    the whole result never coexist: the peak is the accumulators plus one group's result (for a
    float32 result, about 2.1 times its size). :meth:`state` and :meth:`load_state` save and
    restore the accumulators (a resumable fit); several accumulators of the same blocks over
    different rows add up exactly (``grams`` tensors, e.g. reduced across processes).

    Args:
        layout: the block layout; its ``dim`` is the rows' width.
        dtype: float32 or float64, the result's dtype (the rows' too).
        device: where the accumulators live.
        first, last: the range of blocks accumulated (a shard of the layout).
        blocks: the increasing block ids accumulated, instead of ``first`` and ``last``.
        max_memory: the bytes the accumulators and the result may take together (default
            what ``device`` has free, :mod:`ssse_ext.budget`): more is refused with
            :class:`~ssse_ext.errors.InsufficientMemoryError` before anything is allocated.
    """

    def __init__(self, layout: BlockLayout, dtype: torch.dtype, device, *, first: int = 0,
                 last: int | None = None, blocks=None, max_memory: int | None = None):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        check_dtype(dtype)
        last = layout.num_blocks if last is None else last
        if not 0 <= first <= last <= layout.num_blocks:
            raise ValueError(f"first and last must satisfy 0 <= first <= last <= "
                             f"{layout.num_blocks}, got {first} and {last}")
        ids = list(range(first, last)) if blocks is None else [int(b) for b in blocks]
        if any(not 0 <= b < layout.num_blocks for b in ids) or ids != sorted(set(ids)):
            raise ValueError(f"blocks must be increasing block indices of the layout, got "
                             f"{list(blocks)[:5]}...")
        self.layout, self.dtype, self.device = layout, dtype, torch.device(device)
        self.first, self.last, self.blocks = first, last, tuple(ids)
        sizes = [layout.sizes[b] for b in ids]
        numel = sum(s * s for s in sizes)
        self.groups = groups(sizes, group_cap(sizes))
        check_memory(type(self).__name__, dense_build_nbytes(sizes, dtype), self.device,
                     max_memory=max_memory,
                     detail=f"{len(ids)} blocks of up to {max(sizes, default=0)}: "
                            f"{format_bytes(8 * numel)} of float64 accumulators, then "
                            f"{format_bytes(element_size(dtype) * numel)} of inverses",
                     remedies=("accumulate fewer or smaller blocks (a smaller block_size, or a "
                               "shard of the layout)",
                               "pass max_memory=<bytes> if more memory may be used than is "
                               "free now"))
        self._tables = []
        for g0, g1 in self.groups:
            host = layout.table(blocks=ids[g0:g1])
            self._tables.append((host, host if self.device.type == "cpu"
                                 else host.to(self.device)))
        self.grams = [torch.zeros(sum(layout.sizes[b] ** 2 for b in ids[g0:g1]),
                                  dtype=torch.float64, device=self.device)
                      for g0, g1 in self.groups]
        self.rows = 0

    @property
    def gather_rows(self) -> int:
        """Rows worth gathering before a call: up to 256, the row buffer within an eighth of
        the result (or 64 MiB)."""
        numel = sum(self.layout.sizes[b] ** 2 for b in self.blocks)
        return gather_rows(self.layout.dim, numel * element_size(self.dtype), self.dtype)

    def add(self, rows: torch.Tensor) -> None:
        """Accumulates a validated ``(m, dim)`` chunk of rows (the accumulators' device, the
        result's dtype)."""
        if rows.shape[0] == 0:
            return
        for gram, (host, dev) in zip(self.grams, self._tables):
            _ops.call(_ops.gram_accumulate_, rows, host, dev, gram)
        self.rows += rows.shape[0]

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (``gram.0``, ...) and metadata of the accumulation so far."""
        meta = {"rows": self.rows, "blocks": list(self.blocks),
                "groups": [list(g) for g in self.groups],
                "dtype": str(self.dtype).removeprefix("torch.")}
        return {f"gram.{j}": g for j, g in enumerate(self.grams)}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> "DenseGram":
        """Restores :meth:`state` (of an accumulator of the same layout and blocks)."""
        if [list(g) for g in self.groups] != meta.get("groups") or \
                list(self.blocks) != meta.get("blocks"):
            raise ValueError("the saved accumulators are for other blocks of the layout")
        for j, g in enumerate(self.grams):
            saved = tensors[f"gram.{j}"]
            if saved.shape != g.shape:
                raise ValueError(f"gram.{j} has shape {tuple(saved.shape)}, expected "
                                 f"{tuple(g.shape)}")
            g.copy_(saved)
        self.rows = int(meta["rows"])
        return self

    def invert(self, damping: float, normalizer: float, *, probe: FisherProbe | None = None,
               stacklevel: int = 1, keep=False, dtype: torch.dtype | None = None,
               consume=None) -> list[torch.Tensor]:
        """Inverts every group (freeing it) into the segments of the result, one packed 1-D
        tensor per group in ``dtype`` (default the accumulator's); the accumulator is spent.
        With ``keep`` (a bool, or a function of the group's index), each group is inverted
        from a copy and the accumulators stay in :attr:`grams` (one group's copy at a time:
        the kernel factors its input in place). ``consume(g, packed)``, when given, takes each
        group's result as soon as it is computed instead of the returned list (empty then).

        Before anything is inverted, every group is checked: accumulators that overflowed
        float64 raise ``FloatingPointError``; blocks so ill-conditioned that their inverse
        loses more than half the digits of the result's dtype get a
        :class:`~ssse_ext.health.ConditionWarning`
        (:func:`~ssse_ext.health.ill_conditioned_blocks`); ``probe`` (a
        :class:`~ssse_ext.health.FisherProbe` of the layout) receives the accumulated Fisher
        of these blocks. ``stacklevel``: the frame the warning names, counted from the caller
        (1).
        """
        damping = check_positive_float(damping, "damping")
        normalizer = check_positive_float(normalizer, "normalizer")
        if probe is not None and (not isinstance(probe, FisherProbe) or
                                  probe.layout != self.layout):
            raise ValueError("probe must be a FisherProbe of the accumulator's layout")
        bad: list[tuple[int, float]] = []
        for gram, (g0, g1) in zip(self.grams, self.groups):
            ids = self.blocks[g0:g1]
            if not all_finite(gram):
                self._raise_overflow(gram, ids)
            bad += ill_conditioned_blocks(gram, self.layout, ids, damping=damping,
                                          normalizer=normalizer, dtype=self.dtype)
            if probe is not None:
                probe.add_gram(gram, ids)
        warn_ill_conditioned(bad, self.layout, damping=damping, rows=self.rows,
                             dtype=self.dtype, stacklevel=stacklevel + 1)
        segments = []
        for g, ((g0, g1), (host, dev)) in enumerate(zip(self.groups, self._tables)):
            kept = keep(g) if callable(keep) else keep
            work = self.grams[g].clone() if kept else self.grams[g]
            packed, info = _ops.call(_ops.inverse_from_gram, work, host, dev, damping,
                                     normalizer, dtype or self.dtype)
            del work
            if not kept:
                self.grams[g] = None  # freed before the next group's result is allocated
            raise_if_failed(info, "build", self.layout, "pivot", self.blocks[g0:g1])
            if consume is None:
                segments.append(packed)
            else:
                consume(g, packed)
        return segments

    def _raise_overflow(self, gram: torch.Tensor, ids) -> None:
        o = 0
        for b in ids:
            s = self.layout.sizes[b]
            if not all_finite(gram[o:o + s * s]):
                break
            o += s * s
        raise FloatingPointError(
            f"build: the float64 Gram matrix of block {b} (parameters {self.layout.starts[b]}.."
            f"{self.layout.starts[b] + self.layout.sizes[b]}) overflowed: the squares of the "
            f"rows exceed the float64 range (1.8e308, rows of norm about 1e154 or more); scale "
            f"the loss or the inputs down")
