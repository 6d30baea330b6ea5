r"""The inverse of a block-diagonal damped Fisher: a layout and the stores of its blocks.

:class:`BlockInverseFisher` holds :math:`F_b^{-1} = (\lambda I + \frac{1}{N}\sum_r u_{r,b}
u_{r,b}^\top)^{-1}` for every block ``b`` of a :class:`~ssse_ext.BlockLayout`; each block lives
in exactly one *store* (:mod:`ssse_ext.blocks`: dense inverses, the low-rank dual form, ...),
and every operation is a call on each store in turn. Nothing here depends on what the stores
are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import DenseStore, file_prefix, get_store
from .budget import AVAILABLE_MEMORY_ENV, COPY_REMEDIES, check_memory, format_bytes
from .change import UPDATE_METHODS, PendingChange, check_change
from .health import FisherProbe, Health
from .layout import BlockLayout
from .lowrank import LowRankChange, check_change_memory
from .side import gathered_rows, side_kwargs
from .validation import (FLOAT_DTYPES, check_dtype, check_finite_float, check_positive_float,
                         check_update_operands, check_vector)

__all__ = ["BlockInverseFisher", "FisherConfig", "UPDATE_METHODS", "check_label"]


def check_label(value, name: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


@dataclass(frozen=True)
class FisherConfig:
    r"""What defines the Fisher :math:`F_b = \lambda I + \frac{1}{N}\sum_r u_{r,b} u_{r,b}^\top`
    of every block.

    Attributes:
        damping: :math:`\lambda > 0`.
        normalizer: :math:`N > 0` (the number of samples or mini-batches by default); fixed for
            the life of the inverse, so later updates and downdates use the same :math:`N`.
        layout: the block layout of the flat parameter vector.
        curvature: what the rows were, a label recorded for the model-level library (e.g.
            ``"empirical"``, ``"ggn"``; see :mod:`ssse.curvature`); opaque here.
        params: the names of the parameters the flat vector concatenates, in order, recorded
            for the model-level library (``None``: not recorded); opaque here.
    """

    damping: float
    normalizer: float
    layout: BlockLayout
    curvature: str = "empirical"
    params: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "damping", check_positive_float(self.damping, "damping"))
        object.__setattr__(self, "normalizer",
                           check_positive_float(self.normalizer, "normalizer"))
        if not isinstance(self.layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(self.layout).__name__}")
        check_label(self.curvature, "curvature")
        if self.params is not None:
            names = tuple(self.params) if isinstance(self.params, (list, tuple)) else None
            if not names or not all(isinstance(k, str) and k for k in names):
                raise ValueError(f"params must be a non-empty sequence of parameter names, got "
                                 f"{self.params!r}")
            object.__setattr__(self, "params", names)


def _is_packed(stores: list) -> bool:
    """Whether ``stores`` is the constructor's earlier argument, packed dense segments."""
    return not stores or all(isinstance(t, torch.Tensor) for t in stores)


def _from_packed(packed, config: FisherConfig, dual) -> list:
    """The stores of the constructor's earlier form: ``packed`` (a 1-D tensor or a sequence of
    segments) holding densely every block that ``dual`` (or ``None``) does not."""
    segments = [packed] if isinstance(packed, torch.Tensor) else list(packed)
    held = set() if dual is None else set(dual.block_ids)
    ids = [b for b in range(config.layout.num_blocks) if b not in held]
    if not segments:
        if ids or dual is None:
            raise ValueError(f"packed is empty, the layout has {len(ids)} dense blocks")
        segments = [torch.zeros(0, dtype=dual.dtype, device=dual.device)]
    dense = DenseStore(config.layout, ids, segments, damping=config.damping,
                       normalizer=config.normalizer)
    return [dense] + ([dual] if dual is not None and dual.num_blocks else [])


def _ranges(ids) -> list[list[int]]:
    """Increasing ids as ``[first, last)`` ranges (compact in a file's header)."""
    out: list[list[int]] = []
    for b in ids:
        if out and out[-1][1] == b:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return out


def _ids(ranges) -> list[int]:
    return [b for first, last in ranges for b in range(int(first), int(last))]


def _store_entries(meta: dict, num_blocks: int) -> list[dict]:
    """Per store: its name, block ranges and own metadata. Files written before stores were
    recorded (version 0.3) held the dense blocks' segments and an optional ``dual`` entry,
    under the same tensor names as now."""
    if "stores" in meta:
        return list(meta["stores"])
    low = meta.get("dual")
    held = [] if low is None else [int(b) for b in low["blocks"]]
    rest = sorted(set(range(num_blocks)) - set(held))
    entries = [{"name": "dense", "blocks": _ranges(rest),
                "segments": int(meta.get("segments", 1))}]
    if low is not None:
        entries.append({"name": "dual", "blocks": _ranges(held),
                        "num_rows": int(low["num_rows"])})
    return entries


class BlockInverseFisher:
    r"""The inverse of a block-diagonal damped Fisher (docs/maths.md): a layout and the block
    stores that hold it (:mod:`ssse_ext.blocks`), each owning a set of blocks.

    ``inv @ v`` multiplies a ``(d,)`` or ``(d, r)`` tensor; :meth:`update` and :meth:`downdate`
    add or remove rows in place, atomically and without a copy of the inverse (every store
    checks its blocks before any store is written); :meth:`apply_update` is the SSSE step of
    paper eq. 8, optionally with the Fisher downdated on the fly.

    Args:
        stores: the :class:`~ssse_ext.blocks.BlockStore` objects, together holding every block
            of ``config.layout`` once, with its damping and normaliser, one dtype and device.
            Also accepted: the dense blocks' packed storage (a 1-D tensor or a sequence of
            segments) with ``dual`` holding the other blocks.
        config: damping, normaliser, layout and curvature label.
        num_samples: the rows the Fisher holds.
        probe: the :class:`~ssse_ext.health.FisherProbe` that follows every change, or
            ``None``.
        dual: with packed storage only, the :class:`~ssse_ext.DualBlocks` of the other
            blocks.
    """

    def __init__(self, stores, config: FisherConfig, num_samples: int, *,
                 probe: FisherProbe | None = None, dual=None):
        if not isinstance(config, FisherConfig):
            raise TypeError(f"config must be a FisherConfig, got {type(config).__name__}")
        stores = [stores] if isinstance(stores, torch.Tensor) else list(stores)
        if _is_packed(stores):
            stores = _from_packed(stores, config, dual)
        elif dual is not None:
            raise ValueError("dual is given with packed storage only")
        self._stores = tuple(stores)
        self._owner = self._owners(config)
        self.config = config
        self.num_samples = int(num_samples)
        #: Changes written since the inverse was made (a :class:`~ssse_ext.change.PendingChange`
        #: checked before another one was written is refused).
        self.changes = 0
        if probe is not None and (not isinstance(probe, FisherProbe) or
                                  probe.layout != config.layout):
            raise ValueError("probe must be a FisherProbe of the same layout")
        #: The :class:`~ssse_ext.health.FisherProbe` that follows every update and downdate
        #: (``None`` when the inverse was made without one); see :meth:`health`.
        self.probe = probe

    def _owners(self, config: FisherConfig) -> tuple:
        """Per block, the store that holds it; every store checked against ``config``."""
        if not self._stores:
            raise ValueError("an inverse needs at least one store")
        layout, first = config.layout, self._stores[0]
        owner: list = [None] * layout.num_blocks
        for store in self._stores:
            name = getattr(store, "name", type(store).__name__)
            if store.layout != layout or store.damping != config.damping or \
                    store.normalizer != config.normalizer:
                raise ValueError(f"the {name} store must have the inverse's layout, damping "
                                 f"and normaliser")
            if store.dtype != first.dtype or store.device != first.device:
                raise ValueError(f"the {name} store is {store.dtype} on {store.device}, the "
                                 f"inverse is {first.dtype} on {first.device}")
            for b in store.block_ids:
                if owner[b] is not None:
                    raise ValueError(f"block {b} is held by two stores ({owner[b].name} and "
                                     f"{name})")
                owner[b] = store
        missing = [b for b, s in enumerate(owner) if s is None]
        if missing:
            raise ValueError(f"blocks {missing[:5]} are held by no store")
        return tuple(owner)

    # ---- properties ----
    layout = property(lambda self: self.config.layout, doc="The block layout.")
    damping = property(lambda self: self.config.damping, doc=r"The damping :math:`\lambda`.")
    normalizer = property(lambda self: self.config.normalizer, doc="The normaliser :math:`N`.")
    curvature = property(lambda self: self.config.curvature, doc="What the rows were.")
    params = property(lambda self: self.config.params,
                      doc="The names of the parameters covered, in order (``None``: not recorded).")
    dim = property(lambda self: self.config.layout.dim, doc="The parameters covered, d.")
    dtype = property(lambda self: self._stores[0].dtype, doc="The dtype of vectors and rows.")
    device = property(lambda self: self._stores[0].device)

    @property
    def stores(self) -> tuple:
        """The block stores, each holding its own blocks."""
        return self._stores

    @property
    def representation(self) -> tuple[str, ...]:
        """Per block, the name of the store that holds it (e.g. ``"dense"``, ``"dual"``)."""
        return tuple(store.name for store in self._owner)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored inverse."""
        return sum(store.nbytes for store in self._stores)

    @property
    def blocks(self) -> list[torch.Tensor]:
        """The ``(s_b, s_b)`` blocks: views where a store holds a block as such (writing to
        them changes the inverse), computed copies elsewhere."""
        return [store.block(b) for b, store in enumerate(self._owner)]

    def dense_block(self, i: int) -> torch.Tensor:
        """A copy of block ``i`` as an ``(s_i, s_i)`` tensor."""
        nb = self.layout.num_blocks
        if not -nb <= i < nb:
            raise IndexError(f"block index {i} out of range for {nb} blocks")
        return self._owner[i % nb].dense_block(i % nb)

    def dense(self) -> torch.Tensor:
        """The whole ``(d, d)`` block-diagonal matrix (for tests and small models)."""
        elem = torch.empty(0, dtype=self.dtype).element_size()
        check_memory("BlockInverseFisher.dense", self.dim ** 2 * elem,
                     self.device, detail=f"a {self.dim} x {self.dim} matrix",
                     remedies=("use dense_block(i) or blocks for one block at a time",))
        return torch.block_diag(*self.blocks) if self.layout.num_blocks else \
            torch.zeros(0, 0, dtype=self.dtype, device=self.device)

    # ---- the earlier attributes, kept: the stores named "dense" and "dual" ----
    def _named(self, name: str):
        return next((store for store in self._stores if store.name == name), None)

    @property
    def segments(self) -> tuple[torch.Tensor, ...]:
        """The packed storage of the dense store, one 1-D tensor per range of its blocks."""
        store = self._named("dense")
        return store.segments if store is not None else \
            (torch.zeros(0, dtype=self.dtype, device=self.device),)

    @property
    def packed(self) -> torch.Tensor:
        """The dense store's packed storage as one 1-D tensor (a copy when held in several
        segments)."""
        store = self._named("dense")
        return store.packed if store is not None else \
            torch.zeros(0, dtype=self.dtype, device=self.device)

    @property
    def dual(self):
        """The dual (low-rank) store, or ``None``."""
        return self._named("dual")

    # ---- products ----
    def _vector(self, v, name: str) -> tuple[torch.Tensor, bool]:
        return check_vector(v, name, dim=self.dim, dtype=self.dtype, device=self.device)

    def _rows(self, grads, name: str = "grads") -> tuple[torch.Tensor, dict | None]:
        """The rows of ``grads`` as one tensor and their side payload (:mod:`ssse_ext.side`)."""
        return gathered_rows(grads, name, dim=self.dim, dtype=self.dtype, device=self.device)

    def apply_update(self, theta: torch.Tensor, v: torch.Tensor, scale: float = 1.0, *,
                     without=None) -> torch.Tensor:
        r"""``theta + scale * F^{-1} v`` in one pass: paper eq. 8 with
        ``scale = epsilon / (n - k)`` and ``v`` the summed gradient of the removed samples.

        Args:
            theta, v: ``(d,)`` or ``(d, r)``, the inverse's dtype and device.
            scale: a finite number.
            without: optional ``(k, d)`` rows :math:`R` (or an iterable of chunks) to remove
                from the Fisher on the fly: then ``F`` is the leave-k-out
                :math:`F - R^\top R / N` (see :meth:`without`); the inverse is not modified.

        Returns a new tensor; ``theta`` and the inverse are not modified.

        Raises:
            NotPositiveDefiniteError: ``without`` would leave a block not positive definite.
        """
        if without is not None:
            return self.without(without).apply_update(theta, v, scale)
        scale = check_finite_float(scale, "scale")
        base, vv, vec = check_update_operands(theta, v, dim=self.dim, dtype=self.dtype,
                                              device=self.device)
        out = self._apply(vv, base, scale)
        return out.view(-1) if vec else out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``F^{-1} v`` for ``v`` of shape ``(d,)`` or ``(d, r)``."""
        vv, vec = self._vector(v, "v")
        out = self._apply(vv, None, 1.0)
        return out.view(-1) if vec else out

    def _apply(self, vv: torch.Tensor, base: torch.Tensor | None, scale: float) -> torch.Tensor:
        out = torch.empty_like(vv)
        for store in self._stores:  # each writes the rows of its own blocks
            store.apply_into(vv, base, scale, out)
        return out

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def without(self, rows, *, sign: int = -1) -> LowRankChange:
        r"""This inverse with the rows :math:`R` removed from the Fisher (``sign=-1``, the
        leave-k-out Fisher :math:`F - R^\top R / N`) or added (``sign=+1``), applied on the
        fly by the Woodbury identity in float64: the inverse is not modified and nothing of
        its size is copied (the extra memory is :math:`O(k\,d)`; for blocks smaller than
        ``k`` it is their size in float64).

        Raises:
            NotPositiveDefiniteError: a block would not stay positive definite (the rows were
                never added, say).
        """
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign!r}")
        rows, side = self._rows(rows, "rows")
        return LowRankChange(self, rows, sign, side=side)

    def solve_changed(self, rows, rhs: torch.Tensor, *, sign: int = -1,
                      shift: float = 0.0) -> torch.Tensor:
        r""":math:`(F + \mathrm{sign}\,R^\top R / N - \mathrm{shift}\cdot I)^{-1}\,\mathrm{rhs}`
        in float64, for the ``(k, d)`` rows :math:`R` (or an iterable of chunks) and ``rhs`` of
        shape ``(d,)`` or ``(d, r)``, computed store by store and batch of blocks by batch of
        blocks without modifying the inverse (extra memory bounded, independent of its size).
        Every block is checked (:class:`NotPositiveDefiniteError`: nothing is returned).
        """
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign!r}")
        shift = check_finite_float(shift, "shift")
        rhs_, vec = self._vector(rhs.to(self.dtype), "rhs")
        out = torch.empty(rhs_.shape, dtype=torch.float64, device=self.device)
        rhs64 = rhs.to(torch.float64).reshape(rhs_.shape)
        rows, side = self._rows(rows, "rows")
        what = "solve with changed rows"
        check_change_memory(self._stores, rows.shape[0], self.dim, self.device, what,
                            shift=shift)
        for store in self._stores:
            store.solve_changed(rows, rhs64, out, sign=sign, shift=shift, what=what,
                                **side_kwargs(store, side))
        return out.view(-1) if vec else out

    # ---- updates ----
    def checked_change(self, grads, *, sign: int = -1, method: str = "woodbury",
                       chunk_size: int | None = None, apply=None,
                       changed: bool = False) -> PendingChange:
        r"""Checks the change of :meth:`downdate` (``sign=-1``) or :meth:`update` (``+1``) on
        every block and writes nothing: :meth:`~ssse_ext.change.PendingChange.commit` writes
        it and cannot fail; a dropped one leaves the inverse as it is (:mod:`ssse_ext.change`).

        Args:
            grads, method, chunk_size: as for :meth:`update`.
            apply: optional ``(d,)`` or ``(d, r)`` vectors :math:`v`, the inverse's dtype: the
                check also gives :math:`F^{-1} v` (the blocks before the change) or, with
                ``changed``, :math:`(F + \mathrm{sign}\,R^\top R / N)^{-1} v` (for stores
                defined by a side payload, the blocks the change leaves), in float64 as
                ``applied``, from the same pass over the blocks where a store can (the dense
                stores on the CPU: an erasure's step of eq. 8 and its downdate).

        Raises:
            NotPositiveDefiniteError, RowNotFoundError: as :meth:`downdate`; nothing changed.
        """
        return check_change(self, self._stores, grads, sign, method=method,
                            chunk_size=chunk_size, apply=apply, changed=changed)

    def _change(self, grads, sign: int, method: str, chunk_size: int | None,
                timings: dict | None) -> "BlockInverseFisher":
        change = check_change(self, self._stores, grads, sign, method=method,
                              chunk_size=chunk_size, timed=timings is not None)
        change.commit(timings=timings)
        if timings is not None:
            timings["check"] = change.check_seconds
        return self

    def update(self, grads, *, method: str = "woodbury", chunk_size: int | None = None,
               timings: dict | None = None) -> "BlockInverseFisher":
        r"""Adds rows: every block becomes :math:`(F_b + \frac{1}{N}\sum_j g_j g_j^\top)^{-1}`.

        Args:
            grads: ``(m, d)`` tensor or iterable of such chunks, same dtype and device.
            method: ``"woodbury"`` (chunked rank-m form, float64 arithmetic) or
                ``"sherman_morrison"`` (literal rank-1 recurrence of paper eq. 7), for the
                stores that rewrite dense inverses.
            chunk_size: rows per kernel call (default: all on the CPU, 1024 on a GPU; the
                kernels work through them in rank-64 steps, and a call converts each block
                once).
            timings: a dict that receives the seconds of the check of every block
                (``"check"``), of the writes (``"write"``) and of the probe's update
                (``"probe"``).

        Raises:
            NotPositiveDefiniteError: a denominator lost positivity (the inverse is unchanged).
        """
        return self._change(grads, +1, method, chunk_size, timings)

    def downdate(self, grads, *, method: str = "woodbury", chunk_size: int | None = None,
                 timings: dict | None = None) -> "BlockInverseFisher":
        r"""Removes rows that were added: with the normaliser :math:`N` fixed, the blocks
        become :math:`(\lambda I + \frac{1}{N}\sum_{i \notin R} g_i g_i^\top)^{-1}` (the
        leave-k-out Fisher) using only the removed rows :math:`R`. ``method``, ``chunk_size``
        and ``timings``: as for :meth:`update`.

        Raises:
            NotPositiveDefiniteError, RowNotFoundError: the result would not be positive
                definite, or a store that keeps its rows does not find one (the rows were
                never added, say); the inverse is unchanged.
        """
        return self._change(grads, -1, method, chunk_size, timings)

    def health(self, *, what: str = "", warn: bool = True, blocks=None) -> Health | None:
        r"""How far this inverse is from the exact inverse of its Fisher:
        :math:`\max_b \lVert F^{-1}_{\mathrm{stored}} (F X_b) - X_b\rVert / \lVert X_b\rVert` on
        the probe's random vectors (:class:`~ssse_ext.health.FisherProbe`, kept exact in float64
        through every update and downdate); ``None`` without a probe. With ``warn``, a
        :class:`~ssse_ext.health.HealthWarning` when a block's residual is above
        :math:`\max(\sqrt{\epsilon}, 10\times` what rounding it to its dtype explains)
        (:meth:`~ssse_ext.health.FisherProbe.check`).

        ``blocks``: ``None`` probes every block (three products with the whole inverse); an
        int or a sequence of block ids probes only some, at the cost of a float64 copy and
        three products of each (:meth:`~ssse_ext.health.FisherProbe.check`); with a store
        that has no dense copies to give (``probe_by_products``) the probe is a full one."""
        if self.probe is None:
            return None
        full = any(store.probe_by_products for store in self._stores)
        return self.probe.check(self, what=what, warn=warn, blocks=None if full else blocks)

    # ---- copies and moves ----
    def _probe_nbytes(self) -> int:
        return 0 if self.probe is None else self.probe.sketch.numel() * 8

    def _copies(self, copy, sizes, max_memory: int | None) -> list:
        """``copy(store, budget)`` of every store, each given what is left of ``max_memory``
        after the copies before it (``sizes``: their bytes)."""
        out, left = [], max_memory
        for store, size in zip(self._stores, sizes):
            out.append(copy(store, left))
            left = None if left is None else max(left - size, 0)
        return out

    def clone(self, *, max_memory: int | None = None) -> "BlockInverseFisher":
        """A copy on the same device. ``max_memory``: the bytes the copy may take (default
        what the device has free, :mod:`ssse_ext.budget`); a copy that does not fit is refused
        with :class:`~ssse_ext.errors.InsufficientMemoryError` before anything is copied."""
        check_memory("BlockInverseFisher.clone", self.nbytes + self._probe_nbytes(),
                     self.device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} inverse",
                     remedies=COPY_REMEDIES)
        stores = self._copies(lambda s, left: s.clone(max_memory=left),
                              [s.nbytes for s in self._stores], max_memory)
        return BlockInverseFisher(stores, self.config, self.num_samples,
                                  probe=None if self.probe is None else self.probe.clone())

    def to(self, device=None, dtype: torch.dtype | None = None, *,
           max_memory: int | None = None) -> "BlockInverseFisher":
        """A copy on ``device`` and/or in ``dtype`` (float32 or float64); this inverse is
        unchanged. ``max_memory``: the bytes the copy may take on ``device`` (default what that
        device has free, :mod:`ssse_ext.budget`); a copy that does not fit is refused with
        :class:`~ssse_ext.errors.InsufficientMemoryError` before anything is copied."""
        check_dtype(dtype)
        target = self.device if device is None else torch.device(device)
        sizes = [s.copy_nbytes(dtype) for s in self._stores]
        check_memory("BlockInverseFisher.to", sum(sizes) + self._probe_nbytes(), target,
                     max_memory=max_memory,
                     detail=f"a {str(dtype or self.dtype).removeprefix('torch.')} copy of the "
                            f"{format_bytes(self.nbytes)} inverse",
                     remedies=COPY_REMEDIES)
        stores = self._copies(lambda s, left: s.to(device, dtype, max_memory=left), sizes,
                              max_memory)
        probe = None if self.probe is None else self.probe.to(device or self.device)
        return BlockInverseFisher(stores, self.config, self.num_samples, probe=probe)

    # ---- files ----
    @staticmethod
    def state_nbytes(meta: dict, dtype: torch.dtype | None = None) -> int:
        """Bytes of the inverse described by :meth:`to_state`'s metadata (in ``dtype``, default
        its own), computed from the metadata alone, before any tensor is read; ``ValueError``
        for metadata that does not describe an inverse."""
        try:
            layout = BlockLayout.from_dict(meta["layout"])
            own = getattr(torch, str(meta["dtype"]), None)
            if own not in FLOAT_DTYPES:
                raise TypeError(f"dtype {meta['dtype']!r}")
            total = 0
            for entry in _store_entries(meta, layout.num_blocks):
                sizes = [layout.sizes[b] for b in _ids(entry["blocks"])]
                total += get_store(str(entry["name"])).state_nbytes(sizes, entry, dtype or own)
            columns = int(meta["probe"]["columns"]) if meta.get("probe") else 0
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"not a valid inverse-Fisher state: missing or bad {exc}") from None
        return total + columns * layout.dim * 8

    @classmethod
    def check_load_memory(cls, meta: dict, *, device=None, dtype: torch.dtype | None = None,
                          max_memory: int | None = None) -> None:
        """Refuses (:class:`~ssse_ext.errors.InsufficientMemoryError`) to load the inverse
        that :meth:`to_state`'s metadata ``meta`` describes when it does not fit, before
        anything is read: its tensors are read into CPU memory, then (when ``device`` or
        ``dtype`` is given) copied by :meth:`to`, the read copy still held. ``max_memory``
        caps the CPU bytes (default what is free, :mod:`ssse_ext.budget`); the copy on
        another device is checked against what that device has free."""
        check_dtype(dtype)
        read = cls.state_nbytes(meta)
        target = torch.device("cpu") if device is None else torch.device(device)
        copy = 0 if device is None and dtype is None else cls.state_nbytes(meta, dtype)
        remedies = ("load it on a machine or device with more memory",
                    f"set {AVAILABLE_MEMORY_ENV}=<bytes> if more memory may be used than is "
                    f"free now")
        cpu = read + (copy if target.type == "cpu" else 0)
        check_memory("loading the inverse Fisher", cpu, "cpu", max_memory=max_memory,
                     detail=f"{format_bytes(read)} read" + (
                         f" and a {format_bytes(copy)} copy" if cpu > read else ""),
                     remedies=remedies)
        if target.type != "cpu":
            check_memory("loading the inverse Fisher", copy, target,
                         detail=f"the {format_bytes(copy)} copy on {target}",
                         remedies=remedies)

    def to_state(self, *, check: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and plain metadata describing this inverse (for safetensors files): per
        store, its name, its blocks (as ``[first, last)`` ranges) and its own metadata under
        ``stores``, its tensors named ``<prefix>.<name>`` (e.g. ``packed.0``, ``dual.g``).
        With ``check``, an inverse changed since it was made or loaded is refused
        (:class:`~ssse_ext.HealthError`) unless it passes a full health probe
        (:meth:`~ssse_ext.health.FisherProbe.check_before_writing`)."""
        if check and self.probe is not None:
            self.probe.check_before_writing(self)
        meta = {"damping": self.damping, "normalizer": self.normalizer,
                "num_samples": self.num_samples, "layout": self.layout.to_dict(),
                "dtype": str(self.dtype).removeprefix("torch."), "curvature": self.curvature,
                "stores": []}
        if self.params is not None:
            meta["params"] = list(self.params)
        tensors = {}
        for store in self._stores:
            own, entry = store.state()
            meta["stores"].append({"name": store.name, "blocks": _ranges(store.block_ids),
                                   **entry})
            prefix = store.prefix or store.name
            tensors.update({f"{prefix}.{k}": t for k, t in own.items()})
        if self.probe is not None:  # the probe's sketch travels with the inverse it checks
            probe_tensors, meta["probe"] = self.probe.state()
            tensors.update(probe_tensors)
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "BlockInverseFisher":
        """Inverse of :meth:`to_state` (also reads the states of version 0.3, which recorded
        the dense segments and the dual blocks without a ``stores`` entry, or a single
        ``packed`` tensor); validates the metadata."""
        try:
            layout = BlockLayout.from_dict(meta["layout"])
            config = FisherConfig(float(meta["damping"]), float(meta["normalizer"]), layout,
                                  str(meta.get("curvature", "empirical")),
                                  None if meta.get("params") is None else list(meta["params"]))
            num_samples = int(meta["num_samples"])
            dtype = getattr(torch, str(meta["dtype"]), None)
            if dtype not in FLOAT_DTYPES:
                raise TypeError(f"dtype {meta['dtype']!r}")
            if "packed" in tensors:
                tensors = {("packed.0" if k == "packed" else k): t for k, t in tensors.items()}
            stores = []
            for entry in _store_entries(meta, layout.num_blocks):
                name = str(entry["name"])
                prefix = file_prefix(name) + "."
                own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
                stores.append(get_store(name).from_state(
                    own, entry, layout=layout, block_ids=_ids(entry["blocks"]),
                    damping=config.damping, normalizer=config.normalizer, dtype=dtype))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a valid inverse-Fisher state: missing or bad {exc}") from None
        probe = None
        if "probe" in meta:
            probe = FisherProbe.from_state(layout, tensors, meta["probe"])
        inv = cls(stores, config, num_samples)
        inv.probe = None if probe is None else probe.to(inv.device)
        return inv

    def __repr__(self) -> str:
        held = ", ".join(f"{s.name}={s.num_blocks}" for s in self._stores)
        return (f"BlockInverseFisher(dim={self.dim}, blocks={self.layout.num_blocks} ({held}), "
                f"max_block={self.layout.max_block_size}, damping={self.damping:g}, "
                f"normalizer={self.normalizer:g}, num_samples={self.num_samples}, "
                f"dtype={self.dtype}, device={self.device})")
