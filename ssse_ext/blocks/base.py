r"""The protocol of a store of curvature blocks (DESIGN §2).

A :class:`~ssse_ext.BlockInverseFisher` is a :class:`~ssse_ext.BlockLayout` and a few
*stores*; each store owns a set of the layout's blocks and holds
:math:`F_b^{-1} = (\lambda I + \frac{1}{N}\sum_r u_{r,b} u_{r,b}^\top)^{-1}` for each of them in
its own representation (dense inverses, the low-rank dual form, ...). The inverse only
dispatches: every operation is a call on each store, and a store class is added by writing one
subclass of :class:`BlockStore` and registering it (:func:`ssse_ext.blocks.register_store`).

Shapes: ``d`` is ``layout.dim``, ``k`` the number of rows of a change, ``r`` the columns of a
right-hand side, ``s_b`` the size of block ``b``. A store reads and writes only the parameters
of its own blocks in every ``(d, ...)`` tensor it is given.

Every change is atomic across stores: :meth:`BlockStore.check_change` computes and checks
everything (positive definiteness with :data:`ssse_ext.lowrank.PD_MARGIN` for every block,
rows found, memory) without changing anything visible, and :meth:`BlockStore.write` then
applies the plan and cannot fail, so an inverse refuses a change before any store is written.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple, Sequence

import torch

from ..layout import BlockLayout
from ..validation import (FLOAT_DTYPES, check_finite_float, check_positive_float,
                          check_vector)

__all__ = ["BlockStore", "BuildCost", "ChangeFactors", "StoreBuilder", "block_ids_of",
           "element_size"]


def copied_to(t: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
    """``t`` on ``device`` in ``dtype``, always a new tensor (``Tensor.to`` returns ``t``
    itself when nothing changes, and a store's copy must not share its storage)."""
    m = t.to(device=device, dtype=dtype)
    return m.clone() if m.data_ptr() == t.data_ptr() and m.numel() else m


def element_size(dtype: torch.dtype) -> int:
    """Bytes of one float32 or float64 element."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return torch.empty(0, dtype=dtype).element_size()


def block_ids_of(layout: BlockLayout, blocks=None) -> tuple[int, ...]:
    """Validated block ids of ``layout``: ``None`` (all), increasing distinct ids, or a mask
    with one bool per block."""
    if blocks is None:
        return tuple(range(layout.num_blocks))
    blocks = list(blocks)
    if blocks and all(isinstance(b, bool) for b in blocks):
        if len(blocks) != layout.num_blocks:
            raise ValueError(f"a mask of blocks must have one entry per block "
                             f"({layout.num_blocks}), got {len(blocks)}")
        return tuple(b for b, held in enumerate(blocks) if held)
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < layout.num_blocks:
            raise ValueError(f"blocks must hold block indices in [0, {layout.num_blocks}), got "
                             f"{b!r}")
    if sorted(set(blocks)) != blocks:
        raise ValueError(f"blocks must be increasing and distinct, got {blocks}")
    return tuple(int(b) for b in blocks)


class BuildCost(NamedTuple):
    """What a store's build holds on its device, from :meth:`BlockStore.build_cost`.

    Attributes:
        streaming: bytes held while the rows stream in (accumulators, stored rows, kernel
            workspace), next to the build's row buffer.
        peak: bytes held at the store's peak once the rows are in (while it finishes), its
            result included.
        stored: bytes of the finished store.
        detail: what the bytes are, in words, for a refusal's message.
    """

    streaming: int
    peak: int
    stored: int
    detail: str


class ChangeFactors(abc.ABC):
    r"""A store's part of :math:`(F + \mathrm{sign}\,R^\top R / N)^{-1}`, computed once by
    :meth:`BlockStore.without` and applied to many vectors (float64 throughout)."""

    @abc.abstractmethod
    def solve(self, v: torch.Tensor, out: torch.Tensor) -> None:
        r"""On the store's parameters, replaces :math:`F^{-1} v` by the changed inverse's
        product.

        Args:
            v: ``(d, r)`` float64.
            out: ``(d, r)`` float64 holding :math:`F^{-1} v` (the stored inverse's product) on
                the store's parameters; overwritten there, other rows untouched.
        """


class StoreBuilder(abc.ABC):
    """A store under construction from a stream of rows (:meth:`BlockStore.builder`)."""

    @abc.abstractmethod
    def add(self, rows: torch.Tensor) -> None:
        """Takes a validated ``(m, d)`` chunk of rows (every builder of a build sees the same
        chunks, in order)."""

    def can_reread(self) -> None:
        """Told before the first chunk when the build can read the rows once more (a source
        that is not a one-shot iterator): :meth:`another_pass` may then ask for it instead of
        holding rows. Default: ignored."""

    def another_pass(self) -> bool:
        """Asked once, after every chunk and the side payload: ``True`` makes the build read
        the rows again (only after :meth:`can_reread`) and give them to this builder through
        :meth:`add` before :meth:`finish`, e.g. for a statistic in a basis known only now.
        Default: ``False``."""
        return False

    def add_side(self, side) -> None:
        """Takes the side payload of the rows added (:class:`~ssse_ext.side.Rows`; a mapping
        ``{key: SidePayload}``, summed over the whole stream, given before :meth:`finish`).
        Default: ignored (the store's Fisher is defined by the rows alone)."""

    @abc.abstractmethod
    def finish(self, normalizer: float) -> "BlockStore":
        """The store of the rows added, with the normaliser :math:`N` (known only now for a
        stream of unknown length); the builder is spent."""

    def finish_for_requests(self, normalizer: float, *,
                            max_memory: int | None = None) -> list["BlockStore"]:
        """The stores that hold the blocks of :meth:`finish` in an inverse built to serve
        requests (``representation="requests"``), once their statistics are known: by default
        the store of :meth:`finish` alone; a builder whose store keeps more than requests need
        may hand some blocks to smaller stores
        (:func:`~ssse_ext.blocks.gram.requests_stores`)."""
        return [self.finish(normalizer)]


class BlockStore(abc.ABC):
    r"""A set of blocks of a layout holding :math:`F_b^{-1}` in one representation.

    Subclasses set the class attributes and implement every abstract method; the base class
    keeps the block ids, damping and normaliser and validates the arguments of :meth:`apply`.

    Attributes:
        name: the registry name, recorded per block in files and in
            :attr:`~ssse_ext.BlockInverseFisher.representation`.
        prefix: the prefix of the store's tensor names in files (default ``name``).
        methods: the build methods (:data:`ssse_ext.build.BUILD_METHODS`, ``"auto"`` being
            ``"cholesky"``) that can build it.
        auto: whether ``representation="auto"`` may choose it (by :meth:`nbytes_for`).
        takes_side: the store's Fisher is defined by a side payload of the rows
            (:mod:`ssse_ext.side`) rather than by the rows alone: :meth:`check_change`,
            :meth:`without` and :meth:`solve_changed` then take ``side=`` (the payload, or
            ``None`` when the rows came without one), and the health probe's sketch of its
            blocks is written by :meth:`write_sketch` instead of being followed from the rows.
        probe_by_products: its dense blocks are too costly to copy for a health probe (a block
            of ``s`` parameters held in far fewer than ``s**2`` numbers): an inverse holding
            it probes every block through products instead of sampling dense copies.
        layout: the layout the block ids refer to.
        block_ids: the increasing ids of the blocks held (given as ids or a mask, see
            :func:`block_ids_of`).
        damping: :math:`\lambda`.
        normalizer: :math:`N`, fixed for the life of the store.
    """

    name: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ("cholesky",)
    auto: ClassVar[bool] = True
    takes_side: ClassVar[bool] = False
    probe_by_products: ClassVar[bool] = False

    def __init__(self, layout: BlockLayout, block_ids: Sequence[int], *, damping: float,
                 normalizer: float):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        self.layout = layout
        self.block_ids = block_ids_of(layout, block_ids)
        self.damping = check_positive_float(damping, "damping")
        self.normalizer = check_positive_float(normalizer, "normalizer")
        self._index = {b: i for i, b in enumerate(self.block_ids)}

    # ---- what is held ----
    @property
    def sizes(self) -> tuple[int, ...]:
        """The sizes of the blocks held, in :attr:`block_ids` order."""
        return tuple(self.layout.sizes[b] for b in self.block_ids)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of the vectors and rows it takes (its storage may be wider)."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where it is held."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held."""

    def position(self, b: int) -> int:
        """The index of layout block ``b`` (negative counts from the layout's end) in
        :attr:`block_ids`; ``IndexError`` when the store does not hold it."""
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"block index must be an int, got {type(b).__name__}")
        if b < 0:
            b += self.layout.num_blocks
        try:
            return self._index[b]
        except KeyError:
            raise IndexError(f"block {b} is not one of the {self.name} blocks "
                             f"{list(self.block_ids)}") from None

    # ---- products ----
    def _apply_args(self, v, base, scale, out
                    ) -> tuple[torch.Tensor, torch.Tensor | None, float, torch.Tensor, bool]:
        """``v``, ``base`` as contiguous ``(d, r)``, ``scale``, the ``(d, r)`` result to write
        (``out`` itself, or a new tensor holding ``base`` or zero) and whether ``v`` was a
        vector."""
        scale = check_finite_float(scale, "scale")
        like = f"the {self.name} blocks"
        vv, vec = check_vector(v, "v", dim=self.dim, dtype=self.dtype, device=self.device,
                               like=like)
        bb = None
        if base is not None:
            bb, _ = check_vector(base, "base", dim=self.dim, dtype=self.dtype,
                                 device=self.device, like=like)
            if bb.shape != vv.shape:
                raise ValueError(f"base and v must have the same shape, got "
                                 f"{tuple(base.shape)} and {tuple(v.shape)}")
        if out is None:
            return vv, bb, scale, (torch.zeros_like(vv) if bb is None else bb.clone()), vec
        if not isinstance(out, torch.Tensor) or out.shape != v.shape or \
                out.dtype != self.dtype or out.device != self.device or \
                not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {self.dtype} tensor of shape "
                             f"{tuple(v.shape)} on {self.device}")
        if out.data_ptr() == vv.data_ptr() and out.numel():
            raise ValueError("out must not alias v")
        return vv, bb, scale, out.view(vv.shape), vec

    def apply(self, v: torch.Tensor, *, base: torch.Tensor | None = None, scale: float = 1.0,
              out: torch.Tensor | None = None) -> torch.Tensor:
        r"""``out[b] = base[b] + scale * F_b^{-1} v[b]`` on the parameters of every block held
        (paper eq. 8's step with ``base = theta``, ``scale = epsilon / (n - k)``).

        Args:
            v: ``(d,)`` or ``(d, r)``, the store's dtype and device.
            base: ``v``'s shape, or ``None`` for zero.
            scale: a finite number.
            out: ``v``'s shape, contiguous: written on the store's parameters only (the other
                stores of an inverse fill the rest). ``None``: a new tensor whose other rows
                are ``base`` (or zero).

        Returns:
            ``out`` (or the new tensor, in ``v``'s shape).
        """
        vv, bb, scale, result, vec = self._apply_args(v, base, scale, out)
        self.apply_into(vv, bb, scale, result)
        if out is not None:
            return out
        return result.view(-1) if vec else result

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``F^{-1} v`` on the store's parameters (zero elsewhere)."""
        return self.apply(v)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    @abc.abstractmethod
    def apply_into(self, v: torch.Tensor, base: torch.Tensor | None, scale: float,
                   out: torch.Tensor) -> None:
        """:meth:`apply` on validated contiguous ``(d, r)`` tensors (``base`` may be ``None``):
        what an inverse calls, once per store, on arguments it has checked."""

    @abc.abstractmethod
    def dense_block(self, b: int) -> torch.Tensor:
        """A new ``(s_b, s_b)`` tensor holding block ``b``'s inverse, in :attr:`dtype`."""

    def block(self, b: int) -> torch.Tensor:
        """Block ``b``'s ``(s_b, s_b)`` inverse: a view of the storage where the store holds
        it as such (writing to it changes the store), else a new tensor."""
        return self.dense_block(b)

    # ---- changes ----
    @abc.abstractmethod
    def check_change(self, rows: torch.Tensor, sign: int, *, method: str, chunk_size: int | None,
                     what: str) -> Any:
        r"""Plans adding (``sign=+1``) or removing (``-1``) the rows :math:`R` for every block:
        :math:`F_b \leftarrow F_b + \mathrm{sign}\,R_b^\top R_b / N`. Computes in float64
        whatever decides success (for a removal: positive definiteness of every changed block
        with the margin :data:`~ssse_ext.lowrank.PD_MARGIN`, or that the rows are stored),
        raising before anything visible changes; the plan is then applied by :meth:`write`.

        Args:
            rows: validated contiguous ``(k, d)`` rows, ``k >= 1``, the store's dtype and device.
            sign: ``+1`` or ``-1``.
            method: ``"woodbury"`` or ``"sherman_morrison"`` (how dense inverses are rewritten;
                stores that keep an exact factorisation may ignore it).
            chunk_size: rows per kernel call, or ``None``.
            what: the operation's name, for messages.

        Raises:
            NotPositiveDefiniteError, RowNotFoundError, InsufficientMemoryError: nothing was
                changed.
        """

    def check_and_apply(self, rows: torch.Tensor, sign: int, v: torch.Tensor, out: torch.Tensor,
                        *, changed: bool, method: str, chunk_size: int | None, what: str,
                        **side) -> Any:
        r""":meth:`check_change`'s plan, and the store's rows of :math:`F_b^{-1} v_b` written
        into ``out`` (``(d, r)`` float64, zeros on the store's rows): with the blocks before
        the change, or with ``changed`` after it, :math:`(F_b + \mathrm{sign}\,R_b^\top R_b /
        N)^{-1} v_b`. ``v``: ``(d, r)``, the store's dtype. ``side``: as for
        :meth:`check_change`. This default checks, then applies (:meth:`solve_changed` or
        :meth:`apply_into`); a store that can read its blocks once for both overrides it."""
        plan = self.check_change(rows, sign, method=method, chunk_size=chunk_size, what=what,
                                 **side)
        if changed:
            self.solve_changed(rows, v.to(torch.float64), out, sign=sign, shift=0.0, what=what,
                               **side)
        else:
            part = torch.zeros_like(v)
            self.apply_into(v, None, 1.0, part)
            out += part  # zeros outside the store's rows
        return plan

    @abc.abstractmethod
    def write(self, plan: Any) -> None:
        """Applies a plan of :meth:`check_change` (the last one made; it cannot fail)."""

    @abc.abstractmethod
    def change_nbytes(self, k: int, *, method: str = "woodbury", keep: bool = False,
                      shift: float = 0.0) -> tuple[int, int]:
        """``(work, kept)``: the bytes :meth:`check_change` (with ``method``),
        :meth:`solve_changed` (with ``shift``) or :meth:`without` (``keep``) allocate for
        ``k`` rows: ``work`` is freed before the call returns, ``kept`` lives in the
        factors."""

    @abc.abstractmethod
    def without(self, rows: torch.Tensor, sign: int, *, what: str) -> ChangeFactors:
        r"""The factors of :math:`(F_b + \mathrm{sign}\,R_b^\top R_b / N)^{-1}` for every block,
        each checked positive definite with the margin first; the store is not modified."""

    @abc.abstractmethod
    def solve_changed(self, rows: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor, *,
                      sign: int, shift: float, what: str) -> None:
        r"""Writes :math:`(F_b + \mathrm{sign}\,R_b^\top R_b / N - \mathrm{shift}\,I)^{-1}
        \mathrm{rhs}_b` into ``out`` on the store's parameters, in float64 and bounded memory,
        every block checked with the margin (``NotPositiveDefiniteError`` otherwise).

        Args:
            rows: ``(k, d)``, the store's dtype and device.
            rhs, out: ``(d, r)`` float64.
        """

    def write_sketch(self, probe) -> None:
        r"""Writes :math:`N (F_b - \lambda I) X_b` of every block held into the probe's
        sketch (:class:`~ssse_ext.health.FisherProbe`), from the store's exact statistics; only
        stores with :attr:`takes_side` are asked."""
        raise NotImplementedError(f"the {self.name} store does not write a probe's sketch")

    # ---- copies and files ----
    @abc.abstractmethod
    def copy_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the copy :meth:`to` makes in ``dtype`` (default :attr:`dtype`)."""

    @abc.abstractmethod
    def to(self, device=None, dtype: torch.dtype | None = None, *,
           max_memory: int | None = None) -> "BlockStore":
        """A copy on ``device`` and/or for ``dtype``, refused
        (:class:`~ssse_ext.errors.InsufficientMemoryError`) before anything is copied when it
        does not fit in ``max_memory`` bytes (default what the device has free)."""

    @abc.abstractmethod
    def clone(self, *, max_memory: int | None = None) -> "BlockStore":
        """A copy on the same device sharing nothing, refused like :meth:`to`."""

    @abc.abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (named without :attr:`prefix`) and JSON-able metadata; the layout, block
        ids, damping and normaliser are recorded by the inverse."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, *, layout: BlockLayout,
                   block_ids: Sequence[int], damping: float, normalizer: float,
                   dtype: torch.dtype) -> "BlockStore":
        """Inverse of :meth:`state`, with what the inverse recorded (``dtype``: its
        :attr:`dtype`); ``ValueError`` for tensors or metadata that do not describe such a
        store."""

    @classmethod
    def regrouped(cls, pieces: Sequence[tuple["BlockStore", int]], *, layout: BlockLayout,
                  block_ids: Sequence[int]) -> "BlockStore":
        """A store of this kind holding, as the blocks ``block_ids`` of ``layout``, the blocks
        ``pieces``: one ``(store, b)`` per id, in order (block ``b`` of ``store``, a store of
        this kind, all of the same dtype, device, damping and normaliser). This is how a saved
        inverse moves to another number of ranks; the result may share tensors with the
        pieces' stores, which the caller drops. A store that cannot give its blocks apart
        refuses in one line (``ValueError``)."""
        raise ValueError(f"the {cls.name} blocks cannot be moved to another partition: load "
                         f"the inverse on as many ranks as saved it")

    @staticmethod
    def regrouped_stores(pieces: Sequence[tuple["BlockStore", int]]) -> list["BlockStore"]:
        """The distinct stores of ``pieces``, checked to agree as :meth:`regrouped` needs."""
        stores = list({id(st): st for st, _ in pieces}.values())
        first = stores[0]
        for st in stores[1:]:
            if (type(st), st.dtype, st.device, st.damping, st.normalizer) != \
                    (type(first), first.dtype, first.device, first.damping, first.normalizer):
                raise ValueError(f"the {first.name} blocks to regroup differ in kind, dtype, "
                                 f"device, damping or normaliser")
        return stores

    # ---- costs, for choosing and planning (class level) ----
    @classmethod
    @abc.abstractmethod
    def nbytes_for(cls, size: int, rows: int | None, dtype: torch.dtype) -> float:
        """Bytes of one block of ``size`` parameters fitted from ``rows`` rows
        (``None``: unknown, ``math.inf`` when the bytes depend on it)."""

    @classmethod
    @abc.abstractmethod
    def state_nbytes(cls, sizes: Sequence[int], meta: dict, dtype: torch.dtype) -> int:
        """Bytes of the store that :meth:`state`'s metadata ``meta`` describes, for blocks of
        ``sizes``, in ``dtype``, before any tensor is read."""

    @classmethod
    @abc.abstractmethod
    def build_cost(cls, layout: BlockLayout, block_ids: Sequence[int], *, rows: int,
                   dtype: torch.dtype, device: torch.device, method: str) -> BuildCost:
        """What building the blocks ``block_ids`` from ``rows`` rows with ``method`` holds
        on ``device`` (:class:`BuildCost`)."""

    @classmethod
    def build_peak_bytes(cls, layout: BlockLayout, block_ids: Sequence[int], *, rows: int,
                         dtype: torch.dtype, device: torch.device, method: str) -> int:
        """The peak bytes of :meth:`build_cost`."""
        return cls.build_cost(layout, block_ids, rows=rows, dtype=dtype, device=device,
                              method=method).peak

    @classmethod
    @abc.abstractmethod
    def builder(cls, layout: BlockLayout, block_ids: Sequence[int], *, dtype: torch.dtype,
                device: torch.device, method: str, damping: float, normalizer: float | None,
                rows: int | None, probe=None, max_memory: int | None = None) -> StoreBuilder:
        """A :class:`StoreBuilder` of the blocks ``block_ids``.

        Args:
            method: a build method of :attr:`methods`.
            normalizer: :math:`N` when known up front (a recurrence needs it), else ``None``.
            rows: the rows that will be added, when known (to reserve storage once).
            probe: a :class:`~ssse_ext.health.FisherProbe` to which the builder adds these
                blocks' Fisher, or ``None``.
            max_memory: the bytes its accumulators may take (default what is free).
        """
