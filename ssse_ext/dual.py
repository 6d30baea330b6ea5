r"""Low-rank ("dual") blocks of the inverse Fisher (docs/maths.md, "Low-rank (dual) blocks").

A block of size :math:`s` whose Fisher comes from :math:`R < s` gradient rows :math:`G_b`
(``R x s``) has the exact inverse (the Woodbury identity)

.. math::
    F_b^{-1} = \Big(\lambda I + \tfrac{1}{N} G_b^\top G_b\Big)^{-1}
             = \tfrac{1}{\lambda}\Big[I - G_b^\top K_b^{-1} G_b\Big],\qquad
    K_b = \lambda N I_R + G_b G_b^\top = L_b L_b^\top ,

with :math:`N` the normaliser, fixed for the life of the inverse (not necessarily :math:`R`).
:class:`DualBlocks` stores :math:`G_b` in the gradients' dtype and the lower Cholesky factor
:math:`L_b` in float64: :math:`R s + R^2` numbers instead of :math:`s^2`. It is exact, and it is
the accurate form where :math:`F_b` is ill-conditioned (rank-deficient with a tiny
:math:`\lambda`), since only the well-conditioned :math:`K_b` is factorised.

Storage (see ``DualSpec`` in ``csrc/common.h``): with row capacity :math:`C \ge R`, dual block
``i`` keeps ``G_i`` as ``[C, s_i]`` at element ``C * (s_0 + ... + s_{i-1})`` of the packed ``g``
tensor and ``L_i`` as ``[C, C]`` at element ``i * C * C`` of the packed float64 ``l`` tensor.
Spare capacity lets the streaming build and :meth:`DualBlocks.update` append rows in place.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import torch

from . import _ops
from .budget import check_memory, format_bytes
from .errors import NotPositiveDefiniteError, RowNotFoundError
from .layout import BlockLayout, check_build_args
from .validation import (FLOAT_DTYPES, check_finite_float, check_positive_float, check_vector,
                         matrix_chunks)

__all__ = [
    "DualBlocks",
    "RowNotFoundError",
    "build_dual_blocks",
    "choose_representation",
    "dual_nbytes",
    "MATCH_RTOL",
]

_ELEMENT_SIZE = {torch.float32: 4, torch.float64: 8}

#: Default relative tolerance of the row matching in :meth:`DualBlocks.downdate`: the square
#: root of the dtype's machine epsilon (float32 3.5e-4, float64 1.5e-8). Gradients recomputed at
#: the same parameters agree to rounding (far inside it), while gradients of different samples
#: differ at O(1) relative distance.
MATCH_RTOL = {torch.float32: math.sqrt(torch.finfo(torch.float32).eps),
              torch.float64: math.sqrt(torch.finfo(torch.float64).eps)}

# Rows of G handed to torch at once when the matching computes norms and exact distances (a
# bounded float64 temporary, never a float64 copy of a whole block).
_MATCH_CHUNK = 1024
# Bytes of float64 distances and rows a batched match of a run of blocks may take.
_MATCH_BYTES = 16 << 20
# What makes a copy fit.
_COPY_REMEDIES = ("free memory on the device (e.g. drop other copies)",
                  "pass max_memory=<bytes> if more memory may be used than is free now")


# ---- sizes --------------------------------------------------------------------------------------

def dual_nbytes(size: int, rows: int, dtype: torch.dtype) -> int:
    """Bytes of one dual block: ``rows * size`` elements of ``dtype`` plus a float64
    ``rows x rows`` factor."""
    return rows * size * _ELEMENT_SIZE[dtype] + rows * rows * 8


def choose_representation(sizes: Sequence[int], rows: int, dtype: torch.dtype) -> list[bool]:
    r"""Per block, whether the dual form takes fewer bytes than the dense inverse.

    Block ``b`` is dual exactly when

    .. math:: R\, s_b\, e + 8 R^2 < s_b^2\, e

    with :math:`R` = ``rows`` (the number of gradient rows), :math:`e` the element size of
    ``dtype`` (4 or 8 bytes) and 8 the bytes of a float64 factor entry; ties go to the dense
    block. Dense blocks are always better when :math:`s_b \le R`.
    """
    if dtype not in _ELEMENT_SIZE:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be a non-negative integer, got {rows!r}")
    e = _ELEMENT_SIZE[dtype]
    return [dual_nbytes(int(s), rows, dtype) < int(s) * int(s) * e for s in sizes]


# ---- validation (the shared rules of ssse_ext.validation) ----------------------------------------

def _chunks(grads, name: str, chunk_size: int | None = None, *, dim=None, dtype=None,
            device=None) -> Iterator[torch.Tensor]:
    """Validated ``(m, d)`` chunks of a tensor or an iterable of tensors (all like the first)."""
    return matrix_chunks(grads, chunk_size, name, dim=dim, dtype=dtype, device=device,
                         like="the dual blocks")


def _block_ids(layout: BlockLayout, blocks) -> tuple[int, ...]:
    if blocks is None:
        return tuple(range(layout.num_blocks))
    blocks = list(blocks)
    if blocks and all(isinstance(b, bool) for b in blocks):
        if len(blocks) != layout.num_blocks:
            raise ValueError(f"a mask of dual blocks must have one entry per block "
                             f"({layout.num_blocks}), got {len(blocks)}")
        return tuple(b for b, dual in enumerate(blocks) if dual)
    ids = []
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < layout.num_blocks:
            raise ValueError(f"blocks must hold block indices in [0, {layout.num_blocks}), got "
                             f"{b!r}")
        ids.append(int(b))
    if sorted(set(ids)) != ids:
        raise ValueError(f"blocks must be increasing and distinct, got {ids}")
    return tuple(ids)


# ---- the dual blocks ----------------------------------------------------------------------------

class DualBlocks:
    r"""A set of dual blocks of a :class:`BlockLayout`, sharing their ``num_rows`` gradient rows.

    Block ``b`` (one of :attr:`block_ids`) holds
    :math:`F_b^{-1} = \frac{1}{\lambda}[I - G_b^\top K_b^{-1} G_b]` as its rows ``G_b``
    (:meth:`rows_of`) and the float64 factor ``L_b`` of :math:`K_b` (:meth:`factor_of`).

    ``blocks @ v`` (:meth:`matvec`) and :meth:`apply` multiply the dual part of a ``(d,)`` or
    ``(d, r)`` vector; :meth:`update` appends rows and :meth:`downdate` removes stored rows
    (both atomic: on error nothing changes); :meth:`to`, :meth:`to_state`/:meth:`from_state`
    copy, move and save. Build with :func:`build_dual_blocks`.
    """

    def __init__(self, layout: BlockLayout, block_ids: Sequence[int], g: torch.Tensor,
                 l: torch.Tensor, *, num_rows: int, capacity: int, damping: float,
                 normalizer: float):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        self.layout = layout
        self.block_ids = _block_ids(layout, block_ids)
        # per block (fixed for the object's life): size, rows-before offset, position
        self._sizes = tuple(layout.sizes[b] for b in self.block_ids)
        self._prefix = [0]
        for size in self._sizes:
            self._prefix.append(self._prefix[-1] + size)
        self._index = {b: i for i, b in enumerate(self.block_ids)}
        self.damping = check_positive_float(damping, "damping")
        self.normalizer = check_positive_float(normalizer, "normalizer")
        if not 0 <= num_rows <= capacity:
            raise ValueError(f"num_rows must be in [0, capacity={capacity}], got {num_rows}")
        total = sum(self.sizes)
        if not isinstance(g, torch.Tensor) or g.dim() != 1 or g.dtype not in FLOAT_DTYPES:
            raise TypeError("g must be a 1-D float32 or float64 tensor")
        if g.numel() != capacity * total:
            raise ValueError(f"g must have capacity * sum(sizes) = {capacity * total} elements, "
                             f"got {g.numel()}")
        if not isinstance(l, torch.Tensor) or l.dim() != 1 or l.dtype != torch.float64:
            raise TypeError("l must be a 1-D float64 tensor")
        if l.numel() != len(self.block_ids) * capacity * capacity:
            raise ValueError(f"l must have num_blocks * capacity**2 = "
                             f"{len(self.block_ids) * capacity * capacity} elements, got "
                             f"{l.numel()}")
        if l.device != g.device:
            raise ValueError(f"g and l must be on the same device, got {g.device} and {l.device}")
        self.g = g.contiguous()
        self.l = l.contiguous()
        self.num_rows = int(num_rows)
        self.capacity = int(capacity)
        self._tables: dict[torch.device, torch.Tensor] = {}

    # ---- properties ----
    @property
    def sizes(self) -> tuple[int, ...]:
        return self._sizes

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.g.dtype

    @property
    def device(self) -> torch.device:
        return self.g.device

    @property
    def nbytes(self) -> int:
        """Bytes held (spare capacity included; :meth:`compact` drops it)."""
        return self.g.numel() * self.g.element_size() + self.l.numel() * 8

    @property
    def shift(self) -> float:
        r""":math:`\lambda N`, the shift of every kernel :math:`K_b`."""
        return self.damping * self.normalizer

    def _g_offsets(self, capacity: int) -> list[int]:
        return [capacity * p for p in self._prefix[:-1]]

    def _g_offset(self, i: int) -> int:
        """Where the rows of the ``i``-th dual block start in ``g``."""
        return self.capacity * self._prefix[i]

    def table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``[num_blocks, 4]`` int64 table (start, size, g_offset, l_offset) of the kernels."""
        c = self.capacity
        rows = [(self.layout.starts[b], self.layout.sizes[b], go, i * c * c)
                for i, (b, go) in enumerate(zip(self.block_ids, self._g_offsets(c)))]
        return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 4)

    def _layout_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        host = self._tables.get(torch.device("cpu"))
        if host is None:
            host = self.table()
            self._tables[torch.device("cpu")] = host
        if self.device.type == "cpu":
            return host, host
        dev = self._tables.get(self.device)
        if dev is None:
            dev = host.to(self.device)
            self._tables[self.device] = dev
        return host, dev

    def _position(self, b: int) -> int:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"block index must be an int, got {type(b).__name__}")
        if b < 0:
            b += self.layout.num_blocks
        try:
            return self._index[b]
        except KeyError:
            raise IndexError(f"block {b} is not one of the dual blocks {list(self.block_ids)}") \
                from None

    def rows_of(self, b: int) -> torch.Tensor:
        """A view of the ``(num_rows, s_b)`` stored rows ``G_b`` of layout block ``b``."""
        i = self._position(b)
        s, go = self._sizes[i], self._g_offset(i)
        return self.g[go:go + self.capacity * s].view(self.capacity, s)[:self.num_rows]

    def factor_of(self, b: int) -> torch.Tensor:
        """A view of the ``(num_rows, num_rows)`` float64 factor storage ``L_b`` of layout block
        ``b`` (its lower triangle is the factor; nothing above it is meaningful)."""
        i = self._position(b)
        c = self.capacity
        return self.l[i * c * c:(i + 1) * c * c].view(c, c)[:self.num_rows, :self.num_rows]

    # ---- capacity ----
    def _reserve(self, needed: int, valid: int, exact: bool = False):
        """Grows the row capacity to at least ``needed`` (doubling unless ``exact``), keeping rows
        ``[0, valid)`` of G and of the factor storage (which may hold a pending Gram strip)."""
        if needed <= self.capacity:
            return
        cap = needed if exact else max(needed, 2 * self.capacity)
        self._recapacitate(cap, valid)

    def _recapacitate(self, cap: int, valid: int):
        old_c = self.capacity
        # the new storage is filled from the old one, so both are held at once
        check_memory("DualBlocks: reserving rows", self._nbytes(cap, self.dtype), self.device,
                     detail=f"{cap} rows of {self.num_blocks} dual blocks next to the "
                            f"{format_bytes(self.nbytes)} held now",
                     remedies=("give the number of rows up front (num_rows= or capacity=), "
                               "so that they are reserved once, exactly",))
        g = torch.zeros(cap * sum(self.sizes), dtype=self.dtype, device=self.device)
        l = torch.zeros(self.num_blocks * cap * cap, dtype=torch.float64, device=self.device)
        for i, (s, go_old, go_new) in enumerate(zip(self.sizes, self._g_offsets(old_c),
                                                    self._g_offsets(cap))):
            g[go_new:go_new + valid * s] = self.g[go_old:go_old + valid * s]
            src = self.l[i * old_c * old_c:(i + 1) * old_c * old_c].view(old_c, old_c)
            l[i * cap * cap:(i + 1) * cap * cap].view(cap, cap)[:valid, :valid] = \
                src[:valid, :valid]
        self.g, self.l, self.capacity = g, l, cap
        self._tables.clear()

    def compact(self) -> "DualBlocks":
        """Drops spare row capacity (a copy of the storage); returns ``self``."""
        if self.capacity != self.num_rows:
            self._recapacitate(self.num_rows, self.num_rows)
        return self

    # ---- products ----
    def _vector(self, v, name: str) -> tuple[torch.Tensor, bool]:
        return check_vector(v, name, dim=self.dim, dtype=self.dtype, device=self.device,
                            like="the dual blocks")

    def apply(self, v: torch.Tensor, *, base: torch.Tensor | None = None, scale: float = 1.0,
              out: torch.Tensor | None = None) -> torch.Tensor:
        r"""``out[b] = base[b] + scale * F_b^{-1} v[b]`` on the parameters of every dual block.

        .. math:: F_b^{-1} v_b = \tfrac{1}{\lambda}\big(v_b - G_b^\top L_b^{-\top} L_b^{-1}
                  G_b v_b\big)

        With ``base = theta`` and ``scale = epsilon / (n - k)`` it is paper eq. 8's step on these
        blocks.

        Args:
            v: ``(d,)`` or ``(d, r)``, the dtype and device of the blocks.
            base: same shape as ``v``, or ``None`` for zero.
            scale: a finite number.
            out: same shape as ``v``, contiguous: written in place on the dual blocks' rows
                only, so that a mixed dense and dual inverse can fill the other rows. When
                ``None``, a new tensor whose other rows are ``base`` (or zero).

        Returns:
            ``out``.
        """
        scale = check_finite_float(scale, "scale")
        vv, vec = self._vector(v, "v")
        bb = None
        if base is not None:
            bb, _ = self._vector(base, "base")
            if bb.shape != vv.shape:
                raise ValueError(f"base and v must have the same shape, got "
                                 f"{tuple(base.shape)} and {tuple(v.shape)}")
        if out is None:
            result = torch.zeros_like(vv) if bb is None else bb.clone()
        else:
            if not isinstance(out, torch.Tensor) or out.shape != v.shape or \
                    out.dtype != self.dtype or out.device != self.device or \
                    not out.is_contiguous():
                raise ValueError(f"out must be a contiguous {self.dtype} tensor of shape "
                                 f"{tuple(v.shape)} on {self.device}")
            if out.data_ptr() == vv.data_ptr() and out.numel():
                raise ValueError("out must not alias v")
            result = out.view(vv.shape)
        host, dev = self._layout_tables()
        _ops.call(_ops.dual_apply_, self.g, self.l, host, dev, self.num_rows, self.capacity,
                  self.damping, vv, bb, float(scale), result)
        if out is not None:
            return out
        return result.view(-1) if vec else result

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``F^{-1} v`` on the dual blocks' rows (zero elsewhere), ``v`` of shape ``(d,)`` or
        ``(d, r)``."""
        return self.apply(v)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def dense_block(self, b: int) -> torch.Tensor:
        """Layout block ``b``'s ``(s_b, s_b)`` inverse in the blocks' dtype (for tests): the
        apply kernel on the identity."""
        i = self._position(b)
        s = self.sizes[i]
        c = self.capacity
        host = torch.tensor([[0, s, self._g_offset(i), i * c * c]], dtype=torch.int64)
        dev = host.to(self.device)
        eye = torch.eye(s, dtype=self.dtype, device=self.device)
        out = torch.empty_like(eye)
        _ops.call(_ops.dual_apply_, self.g, self.l, host, dev, self.num_rows, c, self.damping,
                  eye, None, 1.0, out)
        return out

    # ---- updates ----
    def _append(self, chunks: Iterable[torch.Tensor], total: int | None) -> int:
        """Streams rows in after the stored ones (Gram strip only); returns how many."""
        r0 = self.num_rows
        added = 0
        host, dev = self._layout_tables()
        for chunk in chunks:
            m = chunk.shape[0]
            if m == 0:
                continue
            if r0 + added + m > self.capacity:
                if total is not None:
                    self._reserve(r0 + total, r0 + added, exact=True)
                else:
                    self._reserve(r0 + added + m, r0 + added)
                host, dev = self._layout_tables()
            _ops.call(_ops.dual_gram_, chunk, host, dev, r0 + added, self.g, self.l,
                      self.capacity)
            added += m
        return added

    def _factor(self, r0: int, r1: int, what: str):
        host, dev = self._layout_tables()
        info = _ops.call(_ops.dual_cholesky_, self.l, host, dev, r0, r1, self.capacity,
                         self.shift, False)
        bad = torch.nonzero(info).flatten().tolist()
        if bad:
            i = bad[0]
            b = self.block_ids[i]
            raise NotPositiveDefiniteError(
                f"{what}: the kernel of dual block {b} (parameters {self.layout.starts[b]}.."
                f"{self.layout.starts[b] + self.layout.sizes[b]}) is not positive definite at "
                f"row {int(info[i])}" + (f" (and {len(bad) - 1} other blocks)" if len(bad) > 1
                                        else ""))

    def update(self, grads, *, chunk_size: int | None = None) -> "DualBlocks":
        r"""Appends gradient rows: every block becomes the inverse of
        :math:`F_b + \frac{1}{N}\sum_j g_{j,b} g_{j,b}^\top` (same :math:`N`).

        The rows are copied into ``G``, the new rows of every :math:`K_b` computed against all
        stored rows, and the factor extended in float64: :math:`L_{21} = K_{21} L_{11}^{-\top}`,
        :math:`L_{22} = \mathrm{chol}(K_{22} - L_{21} L_{21}^\top)`.

        Args:
            grads: ``(m, d)`` tensor or an iterable of such chunks, the blocks' dtype and device.
            chunk_size: rows per kernel call (default: each chunk at once).

        Raises:
            NotPositiveDefiniteError: a kernel lost positive definiteness (only through overflow
                or NaN; nothing is changed).
        """
        total = grads.shape[0] if isinstance(grads, torch.Tensor) and grads.dim() == 2 else None
        chunks = _chunks(grads, "grads", chunk_size, dim=self.dim, dtype=self.dtype,
                         device=self.device)
        r0 = self.num_rows
        added = self._append(chunks, total)  # writes only beyond the stored rows
        if added:
            self._factor(r0, r0 + added, "update")
            self.num_rows = r0 + added
        return self

    def _runs(self, k: int):
        """``(first, count)`` runs of dual blocks of one size that are next to each other in
        the layout, ``count`` bounded so that matching ``k`` rows takes about
        :data:`_MATCH_BYTES`."""
        i, nb_blocks = 0, self.num_blocks
        while i < nb_blocks:
            s = self._sizes[i]
            most = max(1, _MATCH_BYTES // (8 * k * (self.num_rows + 2 * s) + 1))
            j = i + 1
            while j < nb_blocks and j - i < most and self._sizes[j] == s and \
                    self.block_ids[j] == self.block_ids[j - 1] + 1:
                j += 1
            yield i, j - i
            i = j

    def downdate(self, grads, *, rtol: float | None = None) -> "DualBlocks":
        r"""Removes stored rows: every block becomes the dual form built from the remaining rows
        (same :math:`N`), the leave-k-out Fisher's inverse.

        Each row to remove is looked up among the stored rows of *each* block: it matches stored
        row ``j`` of block ``b`` when

        .. math:: \lVert G_b[j] - u_b \rVert_2 \le \mathrm{rtol}\,
                  \max(\lVert G_b[j] \rVert_2, \lVert u_b \rVert_2)

        (``u_b`` the row's slice of block ``b``; the closest unclaimed stored row is taken, and a
        stored row is removed at most once, so a gradient added twice must be removed twice).
        The matched rows are deleted from ``G_b`` and the factor of the smaller kernel
        :math:`K_b[\text{keep}, \text{keep}]` is computed in float64 (CPU: stable Cholesky
        updates, :math:`O(k R^2)`; CUDA: a refactor of the trailing part).

        Args:
            grads: ``(k, d)`` tensor or iterable of chunks, the blocks' dtype and device.
            rtol: matching tolerance, default :data:`MATCH_RTOL` of the dtype (float32 3.5e-4,
                float64 1.5e-8).

        Raises:
            RowNotFoundError: a row is not among the stored rows of some block (a membership
                check the dense form cannot do); nothing is changed.
        """
        if rtol is None:
            rtol = MATCH_RTOL[self.dtype]
        elif isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or \
                not (0 <= float(rtol) < 1):
            raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}")
        chunks = [c for c in _chunks(grads, "grads", dim=self.dim, dtype=self.dtype,
                                     device=self.device) if c.shape[0]]
        if not chunks:
            return self
        rows = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        k, R = rows.shape[0], self.num_rows
        if k > R:
            raise RowNotFoundError(f"cannot remove {k} rows: the dual blocks hold {R}")
        removed = torch.empty(self.num_blocks, k, dtype=torch.int64)
        for i0, nb in self._runs(k):
            s, b0, c = self._sizes[i0], self.block_ids[i0], self.capacity
            st = self.layout.starts[b0]
            stored = self.g[c * self._prefix[i0]:c * self._prefix[i0 + nb]].view(nb, c, s)[:, :R]
            found = _match_run(stored, rows[:, st:st + nb * s].reshape(k, nb, s).transpose(0, 1),
                               float(rtol))
            for j in range(nb):
                idx = found[j]
                if idx is None:  # not confirmed at once: the exact search, block by block
                    b = self.block_ids[i0 + j]
                    idx = _match_rows(self.rows_of(b), rows[:, self.layout.slice(b)],
                                      float(rtol), b, self.layout)
                removed[i0 + j] = torch.tensor(sorted(idx), dtype=torch.int64)
        mask = torch.ones(self.num_blocks, R, dtype=torch.bool)
        mask.scatter_(1, removed, False)
        keep = torch.arange(R).expand(self.num_blocks, R)[mask].view(self.num_blocks, R - k)
        first = int(removed[:, 0].min()) if self.num_blocks else 0
        host, dev = self._layout_tables()
        info = _ops.call(_ops.dual_remove_rows_, self.g, self.l, host, dev, R, self.capacity,
                         keep.contiguous().to(self.device), removed.to(self.device), first)
        if bool(info.any()):  # not reachable for finite rows: the updates keep K_b positive
            raise NotPositiveDefiniteError("downdate: a refactored kernel is not positive "
                                           f"definite (info {info.tolist()})")
        self.num_rows = R - k
        return self

    # ---- copies and moves ----
    def _nbytes(self, capacity: int, dtype: torch.dtype) -> int:
        return capacity * sum(self.sizes) * _ELEMENT_SIZE[dtype] + \
            self.num_blocks * capacity * capacity * 8

    def packed_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of a compact copy (no spare capacity, ``G`` in ``dtype``, default its own):
        what :meth:`to` and :meth:`to_state` allocate."""
        return self._nbytes(self.num_rows, dtype or self.dtype)

    def clone(self, *, max_memory: int | None = None) -> "DualBlocks":
        """A copy (spare capacity included); refused with
        :class:`~ssse_ext.errors.InsufficientMemoryError` when it does not fit in
        ``max_memory`` bytes (default what the device has free, :mod:`ssse_ext.budget`)."""
        check_memory("DualBlocks.clone", self.nbytes, self.device, max_memory=max_memory,
                     detail=f"a copy of the {format_bytes(self.nbytes)} dual blocks",
                     remedies=_COPY_REMEDIES)
        return DualBlocks(self.layout, self.block_ids, self.g.clone(), self.l.clone(),
                          num_rows=self.num_rows, capacity=self.capacity, damping=self.damping,
                          normalizer=self.normalizer)

    def _packed(self, dtype=None, device=None, *, rows: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """G (``None`` without ``rows``) and L without spare capacity (new tensors), each block
        copied straight into place: a concatenation would hold a second copy of the whole."""
        R, c = self.num_rows, self.capacity
        device = self.device if device is None else device
        g = torch.empty(R * sum(self.sizes) if rows else 0, dtype=dtype or self.dtype,
                        device=device)
        l = torch.empty(self.num_blocks * R * R, dtype=torch.float64, device=device)
        o = 0
        for s, go in zip(self.sizes, self._g_offsets(c)) if rows else ():
            g[o:o + R * s].view(R, s).copy_(self.g[go:go + c * s].view(c, s)[:R])
            o += R * s
        for i in range(self.num_blocks):
            l[i * R * R:(i + 1) * R * R].view(R, R).copy_(
                self.l[i * c * c:(i + 1) * c * c].view(c, c)[:R, :R].tril())
        return (g if rows else None), l

    def to(self, device=None, dtype: torch.dtype | None = None, *,
           max_memory: int | None = None) -> "DualBlocks":
        """A compact copy on ``device`` and/or with ``G`` in ``dtype`` (the factor stays
        float64); refused with :class:`~ssse_ext.errors.InsufficientMemoryError` when it does
        not fit in ``max_memory`` bytes (default what ``device`` has free,
        :mod:`ssse_ext.budget`)."""
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        check_memory("DualBlocks.to", self.packed_nbytes(dtype),
                     self.device if device is None else device, max_memory=max_memory,
                     detail=f"a compact copy of the {format_bytes(self.nbytes)} dual blocks",
                     remedies=_COPY_REMEDIES)
        g, l = self._packed(dtype, device)
        return DualBlocks(self.layout, self.block_ids, g, l, num_rows=self.num_rows,
                          capacity=self.num_rows, damping=self.damping,
                          normalizer=self.normalizer)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Plain tensors (``g``: the rows, ``l``: the factors, no spare capacity) and JSON-able
        metadata (for safetensors files)."""
        if self.capacity == self.num_rows:  # G is compact already: no copy of the largest part
            g, l = self.g, self._packed(rows=False)[1]
        else:
            g, l = self._packed()
        meta = {"damping": self.damping, "normalizer": self.normalizer,
                "num_rows": self.num_rows, "layout": self.layout.to_dict(),
                "blocks": list(self.block_ids), "dtype": str(self.dtype).removeprefix("torch.")}
        return {"g": g, "l": l}, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "DualBlocks":
        """Inverse of :meth:`to_state`; validates the metadata and the tensors' sizes."""
        try:
            layout = BlockLayout.from_dict(meta["layout"])
            rows = int(meta["num_rows"])
            return cls(layout, [int(b) for b in meta["blocks"]], tensors["g"], tensors["l"],
                       num_rows=rows, capacity=rows, damping=float(meta["damping"]),
                       normalizer=float(meta["normalizer"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a valid dual-blocks state: missing or bad {exc}") from None

    def __repr__(self) -> str:
        return (f"DualBlocks(dim={self.dim}, blocks={list(self.block_ids)}, "
                f"num_rows={self.num_rows}, damping={self.damping:g}, "
                f"normalizer={self.normalizer:g}, dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes})")


def _match_run(stored: torch.Tensor, rows: torch.Tensor, rtol: float) -> list:
    """:func:`_match_rows` for a run of ``nb`` blocks at once (``stored`` ``(nb, R, s)``,
    ``rows`` ``(nb, k, s)``): per block, the indices of the nearest free stored rows when every
    one is confirmed by its exact float64 distance, else ``None`` (that block is then searched
    exactly)."""
    nb, R, _ = stored.shape
    k = rows.shape[1]
    snorm = torch.linalg.vector_norm(stored, dim=2, dtype=torch.float64)      # (nb, R)
    unorm = torch.linalg.vector_norm(rows, dim=2, dtype=torch.float64)        # (nb, k)
    d2 = snorm.square()[:, None, :] + unorm.square()[:, :, None] \
        - 2.0 * torch.bmm(rows, stored.transpose(1, 2)).double()
    order = torch.topk(d2, min(R, k), dim=2, largest=False).indices.cpu().tolist()
    cand = []
    for per_block in order:
        taken: set[int] = set()
        picks = []
        for near in per_block:  # the nearest free row of row t is among its t + 1 nearest
            j = next(j for j in near if j not in taken)
            taken.add(j)
            picks.append(j)
        cand.append(picks)
    idx = torch.tensor(cand, dtype=torch.int64, device=stored.device)         # (nb, k)
    picked = torch.gather(stored, 1, idx[:, :, None].expand(-1, -1, stored.shape[2]))
    diff = torch.linalg.vector_norm(picked.double() - rows.double(), dim=2)
    scale = torch.maximum(torch.gather(snorm, 1, idx), unorm)
    rel = torch.where(scale > 0, diff / scale, torch.where(diff == 0, 0.0, math.inf))
    good = (rel <= rtol).all(dim=1).tolist()
    return [c if ok else None for c, ok in zip(cand, good)]


def _match_rows(stored: torch.Tensor, rows: torch.Tensor, rtol: float, block: int,
                layout: BlockLayout) -> list[int]:
    """Indices of distinct stored rows matching ``rows`` (see :meth:`DualBlocks.downdate`).

    Candidates come from the Euclidean distances through one GEMM in the stored dtype (each row
    takes the nearest stored row not taken by an earlier one), and are confirmed by the exact
    float64 distances in batches; a row whose candidate fails is looked up exactly among every
    stored row not yet taken before it is declared missing.
    """
    R, k = stored.shape[0], rows.shape[0]
    dev = stored.device
    snorm = torch.cat([torch.linalg.vector_norm(stored[i:i + _MATCH_CHUNK], dim=1,
                                                dtype=torch.float64)
                       for i in range(0, R, _MATCH_CHUNK)]) if R else \
        torch.zeros(0, dtype=torch.float64, device=dev)
    unorm = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
    d2 = snorm.square()[None, :] + unorm.square()[:, None] - 2.0 * (rows @ stored.T).double()
    # The nearest free row of row t is among its t + 1 nearest rows.
    order = torch.topk(d2, min(R, k), dim=1, largest=False).indices.cpu().tolist()
    taken: set[int] = set()
    cand = []
    for t in range(k):
        j = next(j for j in order[t] if j not in taken)
        taken.add(j)
        cand.append(j)

    def rel(diff: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.where(scale > 0, diff / scale,
                           torch.where(diff == 0, 0.0, math.inf))

    ok = []
    for t0 in range(0, k, _MATCH_CHUNK // 4):
        idx = torch.tensor(cand[t0:t0 + _MATCH_CHUNK // 4], device=dev)
        u = rows[t0:t0 + len(idx)]
        diff = torch.linalg.vector_norm(stored[idx].double() - u.double(), dim=1)
        ok += (rel(diff, torch.maximum(snorm[idx], unorm[t0:t0 + len(idx)])) <= rtol).tolist()
    if all(ok):
        return cand
    # Rare (near-duplicates, or a row that is not there): exact distances, in row order, to the
    # stored rows not confirmed for other rows.
    taken = {j for j, good in zip(cand, ok) if good}
    for t in (t for t, good in enumerate(ok) if not good):
        best, best_rel = None, math.inf
        u = rows[t].double()
        for i in range(0, R, _MATCH_CHUNK):
            diff = torch.linalg.vector_norm(stored[i:i + _MATCH_CHUNK].double() - u, dim=1)
            r = rel(diff, torch.maximum(snorm[i:i + _MATCH_CHUNK], unorm[t])).cpu().tolist()
            for j, value in enumerate(r):
                if i + j not in taken and value < best_rel:
                    best, best_rel = i + j, value
        if best is None or not best_rel <= rtol:
            start = layout.starts[block]
            near = "" if best is None else (f"; the closest free stored row, {best}, differs by "
                                            f"{best_rel:.2e} relative")
            raise RowNotFoundError(
                f"downdate: row {t} of grads is not among the {R} stored rows of dual block "
                f"{block} (parameters {start}..{start + layout.sizes[block]}) within rtol="
                f"{rtol:.1e}{near}; nothing was changed")
        taken.add(best)
        cand[t] = best
    return cand


# ---- build --------------------------------------------------------------------------------------

def build_dual_blocks(grads, *, damping: float, layout: BlockLayout | None = None,
                      block_size: int | None = None, blocks=None, normalizer: float | None = None,
                      capacity: int | None = None, chunk_size: int | None = None) -> DualBlocks:
    r"""Builds dual blocks from a stream of gradients.

    .. math:: F_b^{-1} = \tfrac{1}{\lambda}\Big[I - G_b^\top (\lambda N I + G_b G_b^\top)^{-1}
              G_b\Big]

    As each chunk of rows arrives it is copied into ``G`` (in its own dtype) and the new rows of
    every kernel Gram matrix :math:`G_b G_b^\top` are accumulated in float64 against all rows so
    far; at the end every kernel :math:`K_b` is factorised in float64 (:math:`N` is then known).

    Args:
        grads: an ``(n, d)`` tensor, or an iterable of ``(m, d)`` chunks consumed once (the
            ``(n, d)`` matrix is never formed beyond ``G`` itself). float32 or float64, CPU or
            CUDA; the blocks get the gradients' dtype and device.
        damping: :math:`\lambda > 0`.
        layout: the :class:`BlockLayout` (``layout.dim`` must be ``d``); or ``block_size`` for
            ``BlockLayout.fixed(d, block_size)``; default one block of ``d``.
        blocks: which layout blocks are dual: ``None`` (all), increasing block indices, or a
            mask with one bool per block (e.g. :func:`choose_representation`'s output).
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
    chunks = _chunks(grads, "grads", chunk_size)
    first = next(chunks, None)
    if first is None:
        raise ValueError("grads is empty: at least one (m, d) chunk is needed to know d")
    d, dtype, device = first.shape[1], first.dtype, first.device
    if layout is None:
        layout = BlockLayout.fixed(d, block_size or max(d, 1)) if d else BlockLayout((), (), 0)
    elif layout.dim != d:
        raise ValueError(f"layout.dim={layout.dim} does not match the gradients' d={d}")
    ids = _block_ids(layout, blocks)
    is_tensor = isinstance(grads, torch.Tensor)
    cap = grads.shape[0] if is_tensor else (capacity if capacity is not None else first.shape[0])
    total = sum(layout.sizes[b] for b in ids)
    need = cap * total * _ELEMENT_SIZE[dtype] + len(ids) * cap * cap * 8
    check_memory("build_dual_blocks", need, device,
                 detail=f"{cap} rows of {len(ids)} dual blocks ({total} parameters) and their "
                        f"float64 factors",
                 remedies=("store fewer blocks in the dual form (blocks=)",))
    out = DualBlocks(layout, ids, torch.zeros(cap * total, dtype=dtype, device=device),
                     torch.zeros(len(ids) * cap * cap, dtype=torch.float64, device=device),
                     num_rows=0, capacity=cap, damping=damping, normalizer=normalizer or 1.0)

    def all_chunks():
        yield first
        yield from chunks

    rows = out._append(all_chunks(), grads.shape[0] if is_tensor else None)
    out.normalizer = normalizer if normalizer is not None else float(max(rows, 1))
    out._factor(0, rows, "build")
    out.num_rows = rows
    if not is_tensor and capacity is None:
        out.compact()
    return out
