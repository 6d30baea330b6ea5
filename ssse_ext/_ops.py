"""The kernels as ``torch.library`` custom ops (so they compose with ``torch.compile``).

These are the low-level entry points: they assume validated, contiguous inputs (the public API in
:mod:`ssse_ext.fisher` checks everything first) and route to the CPU or CUDA kernels. Every
buffer, scratch space included, is a torch tensor allocated here, so torch's allocator owns all
memory; CUDA kernels run on the current stream.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import _C

__all__ = ["gram_accumulate_", "gram_product_", "rows_product_", "inverse_from_gram", "sherman_morrison_",
           "woodbury_check", "woodbury_write_", "apply_inverse",
           "dual_gram_", "dual_cholesky_", "dual_apply_", "dual_remove_rows_",
           "cuda_available", "call", "CUDA_KERNEL_SETS", "cuda_kernels", "set_cuda_kernels",
           "use_cuda_kernels"]

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}

#: CUDA kernel sets: ``simt`` (default: the kernels verified on an H200), ``tc`` (float64 tensor
#: cores: Gram, blocked inverse, Woodbury update; vectorised apply) and ``tc-m8n8k4`` (``tc`` with
#: the Gram's tensor-core instruction as m8n8k4 pairs, for measurements on sm_90).
CUDA_KERNEL_SETS = ("simt", "tc", "tc-m8n8k4")


def cuda_available() -> bool:
    """Whether the extension was compiled with CUDA kernels."""
    return bool(_C.build_info()["cuda_compiled"])


def cuda_kernels() -> str:
    """The CUDA kernel set that later calls use (see :data:`CUDA_KERNEL_SETS`)."""
    return _C.cuda_kernels()


def set_cuda_kernels(name: str) -> None:
    """Selects the CUDA kernel set of later calls (process-wide); also set at import from the
    environment variable ``SSSE_CUDA_KERNELS``."""
    if name not in CUDA_KERNEL_SETS:
        raise ValueError(f"CUDA kernel set must be one of {CUDA_KERNEL_SETS}, got {name!r}")
    _C.set_cuda_kernels(name)


@contextlib.contextmanager
def use_cuda_kernels(name: str):
    """Context manager: the CUDA kernel set ``name`` inside the block, the previous one after."""
    previous = cuda_kernels()
    set_cuda_kernels(name)
    try:
        yield
    finally:
        set_cuda_kernels(previous)


# The default stays "simt" until a GPU run has verified "tc" (tests/test_cuda*.py under both).
if os.environ.get("SSSE_CUDA_KERNELS"):
    set_cuda_kernels(os.environ["SSSE_CUDA_KERNELS"])


def _code(t: torch.Tensor) -> int:
    return _DTYPE_CODE[t.dtype]


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _need_cuda(name: str):
    if not hasattr(_C, name):
        raise RuntimeError(f"ssse_ext was built without the CUDA kernel {name!r}; rebuild with "
                           "nvcc available (SSSE_CUDA=ON) to use CUDA tensors")
    return getattr(_C, name)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _gram_accumulate__impl(grads: torch.Tensor, layout: torch.Tensor, layout_dev: torch.Tensor,
                     gram: torch.Tensor) -> None:
    """``gram_b += X_b^T X_b`` (lower triangles, float64) for every block of the layout table."""
    m, d = grads.shape
    if grads.is_cuda:
        fn = _need_cuda("gram_accumulate_cuda")
        work = _workspace(_C.gram_accumulate_workspace_bytes(layout.data_ptr(), layout.shape[0]),
                          grads.device)
        fn(_code(grads), grads.data_ptr(), m, d, layout.data_ptr(), layout_dev.data_ptr(),
           layout.shape[0], gram.data_ptr(), work.data_ptr(), work.numel(), _stream(grads.device))
    else:
        _C.gram_accumulate(_code(grads), grads.data_ptr(), m, d, layout.data_ptr(),
                           layout.shape[0], gram.data_ptr(), _threads())


gram_accumulate_ = torch.library.custom_op("ssse_ext::gram_accumulate_", mutates_args=("gram",))(_gram_accumulate__impl)


@gram_accumulate_.register_fake
def _(grads, layout, layout_dev, gram):
    return None


def _gram_product__impl(gram: torch.Tensor, layout: torch.Tensor, x: torch.Tensor,
                        out: torch.Tensor) -> None:
    """``out_b += gram_b x_b`` for every block of the layout table (CPU, float64): ``gram_b``
    symmetric, read from its lower triangle; ``x`` and ``out`` ``(d, r)``."""
    _C.gram_product(gram.data_ptr(), layout.data_ptr(), layout.shape[0], x.data_ptr(),
                    x.shape[1], out.data_ptr(), _threads())


gram_product_ = torch.library.custom_op("ssse_ext::gram_product_",
                                        mutates_args=("out",))(_gram_product__impl)


@gram_product_.register_fake
def _(gram, layout, x, out):
    return None


def _rows_product__impl(rows: torch.Tensor, layout: torch.Tensor, x: torch.Tensor, sign: float,
                        sketch: torch.Tensor) -> None:
    """``sketch_b += sign R_b^T (R_b x_b)`` for every block of the layout table (CPU): ``rows``
    ``(m, d)`` in their own dtype, ``x`` and ``sketch`` ``(d, r)`` float64."""
    m, d = rows.shape
    _C.rows_product(_code(rows), rows.data_ptr(), m, d, layout.data_ptr(), layout.shape[0],
                    x.data_ptr(), x.shape[1], float(sign), sketch.data_ptr(), _threads())


rows_product_ = torch.library.custom_op("ssse_ext::rows_product_",
                                        mutates_args=("sketch",))(_rows_product__impl)


@rows_product_.register_fake
def _(rows, layout, x, sign, sketch):
    return None


def _inverse_from_gram_impl(gram: torch.Tensor, layout: torch.Tensor, layout_dev: torch.Tensor,
                      damping: float, normalizer: float,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(damping I + gram_b / normalizer)^{-1}`` per block, in ``dtype``; returns (inv, info)."""
    nb = layout.shape[0]
    out = torch.empty(gram.shape, dtype=dtype, device=gram.device)
    info = torch.zeros(nb, dtype=torch.int64, device=gram.device)
    if gram.is_cuda:
        fn = _need_cuda("inverse_from_gram_cuda")
        work = torch.empty(_C.inverse_from_gram_workspace_bytes(layout.data_ptr(), nb),
                           dtype=torch.uint8, device=gram.device)
        fn(_DTYPE_CODE[dtype], gram.data_ptr(), layout.data_ptr(), layout_dev.data_ptr(), nb,
           damping, normalizer, out.data_ptr(), info.data_ptr(), work.data_ptr(), work.numel(),
           _stream(gram.device))
    else:
        _C.inverse_from_gram(_DTYPE_CODE[dtype], gram.data_ptr(), layout.data_ptr(), nb, damping,
                             normalizer, out.data_ptr(), info.data_ptr(), _threads())
    return out, info


inverse_from_gram = torch.library.custom_op("ssse_ext::inverse_from_gram", mutates_args=("gram",))(_inverse_from_gram_impl)


@inverse_from_gram.register_fake
def _(gram, layout, layout_dev, damping, normalizer, dtype):
    return (torch.empty(gram.shape, dtype=dtype, device=gram.device),
            torch.empty(layout.shape[0], dtype=torch.int64, device=gram.device))


def _sherman_morrison__impl(inv: torch.Tensor, layout: torch.Tensor, layout_dev: torch.Tensor,
                      grads: torch.Tensor, normalizer: float, sign: int,
                      chunked: bool) -> torch.Tensor:
    """Adds (sign=+1) or removes (sign=-1) the rows of ``grads``; returns the per-block info."""
    m, d = grads.shape
    nb = layout.shape[0]
    info = torch.zeros(nb, dtype=torch.int64, device=inv.device)
    if inv.is_cuda:
        fn = _need_cuda("sherman_morrison_cuda")
        work = _workspace(_C.sherman_morrison_workspace_bytes(_code(inv), chunked,
                                                              layout.data_ptr(), nb),
                          inv.device)
        fn(_code(inv), chunked, inv.data_ptr(), layout.data_ptr(), layout_dev.data_ptr(), nb,
           grads.data_ptr(), m, d, normalizer, sign, info.data_ptr(), work.data_ptr(),
           work.numel(), _stream(inv.device))
    else:
        _C.sherman_morrison(_code(inv), chunked, inv.data_ptr(), layout.data_ptr(), nb,
                            grads.data_ptr(), m, d, normalizer, sign, info.data_ptr(), _threads())
    return info


sherman_morrison_ = torch.library.custom_op("ssse_ext::sherman_morrison_", mutates_args=("inv",))(_sherman_morrison__impl)


@sherman_morrison_.register_fake
def _(inv, layout, layout_dev, grads, normalizer, sign, chunked):
    return torch.empty(layout.shape[0], dtype=torch.int64, device=inv.device)


def _woodbury_check_impl(inv: torch.Tensor, layout: torch.Tensor, rows: torch.Tensor,
                         normalizer: float, sign: int, vecs: torch.Tensor | None = None,
                         changed: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""CPU: ``(wt, pivots, info, out)`` of a Woodbury change of the dense blocks of the layout
    table by the ``(k, d)`` rows (see csrc/cpu/woodbury.h; in the inverse's dtype, or float32
    for a float64 inverse): ``wt`` float64, every block's
    :math:`W_b^\top` (``k x s_b``) one after the other; ``pivots`` ``(num_blocks, k)``;
    ``info`` ``(num_blocks,)``. With ``vecs`` ``(d, r)`` (the inverse's dtype), ``out``
    float64 holds the rows ``check_rows(layout)`` of :math:`F_b^{-1} V_b` (on the blocks
    that pass; zeros elsewhere), or with ``changed`` of the changed blocks' inverses times
    :math:`V_b`, from the same pass over the blocks; without, ``out`` is empty. Nothing is
    written to ``inv``."""
    k, d = rows.shape
    nb = layout.shape[0]
    wt = torch.empty(k * int(layout[:, 1].sum()) if nb else 0, dtype=torch.float64)
    pivots = torch.empty(nb, k, dtype=torch.float64)
    info = torch.empty(nb, dtype=torch.int64)
    r = 0 if vecs is None else vecs.shape[1]
    lo, hi = check_rows(layout)
    out = torch.zeros((0, 0) if vecs is None else (hi - lo, r), dtype=torch.float64)
    _C.woodbury_check(_code(inv), inv.data_ptr(), layout.data_ptr(), nb, rows.data_ptr(), k, d,
                      normalizer, sign, wt.data_ptr(), pivots.data_ptr(), info.data_ptr(),
                      _threads(), 0 if vecs is None else vecs.data_ptr(), r, bool(changed),
                      out.data_ptr() if r else 0, lo if r else 0, rows_dtype=_code(rows))
    return wt, pivots, info, out


def check_rows(layout: torch.Tensor) -> tuple[int, int]:
    """The rows ``(lo, hi)`` of the inverse that the blocks of a layout table (start, size,
    offset) cover from the first to the last: those of :func:`woodbury_check`'s ``out``."""
    if not layout.shape[0]:
        return 0, 0
    return int(layout[:, 0].min()), int((layout[:, 0] + layout[:, 1]).max())


woodbury_check = torch.library.custom_op("ssse_ext::woodbury_check",
                                         mutates_args=())(_woodbury_check_impl)


@woodbury_check.register_fake
def _(inv, layout, rows, normalizer, sign, vecs=None, changed=False):
    k, nb = rows.shape[0], layout.shape[0]
    n = torch.library.get_ctx().new_dynamic_size()
    shape = (0, 0) if vecs is None else (torch.library.get_ctx().new_dynamic_size(),
                                         vecs.shape[1])
    return (inv.new_empty(n, dtype=torch.float64), inv.new_empty(nb, k, dtype=torch.float64),
            inv.new_empty(nb, dtype=torch.int64), inv.new_empty(shape, dtype=torch.float64))


def _woodbury_write__impl(inv: torch.Tensor, layout: torch.Tensor, wt: torch.Tensor, k: int,
                          sign: int) -> None:
    r"""CPU: every block of the layout table minus ``sign`` :math:`W_b W_b^\top`, from
    :func:`woodbury_check`'s ``wt``."""
    _C.woodbury_write(_code(inv), inv.data_ptr(), layout.data_ptr(), layout.shape[0],
                      wt.data_ptr(), k, sign, _threads())


woodbury_write_ = torch.library.custom_op("ssse_ext::woodbury_write_",
                                          mutates_args=("inv",))(_woodbury_write__impl)


@woodbury_write_.register_fake
def _(inv, layout, wt, k, sign):
    return None


def _apply_inverse_impl(inv: torch.Tensor, layout: torch.Tensor, layout_dev: torch.Tensor,
                        v: torch.Tensor, base: torch.Tensor | None, scale: float,
                        out: torch.Tensor) -> None:
    """``out = base + scale * blockdiag(F^{-1}) v`` for ``v`` of shape ``(d, r)``, on the rows
    of the blocks in ``layout`` (other rows of ``out`` are left as they are)."""
    d, r = v.shape
    if v.is_cuda:
        fn = _need_cuda("apply_inverse_cuda")
        work = _workspace(_C.apply_inverse_workspace_bytes(layout.data_ptr(), layout.shape[0]),
                          v.device)
        fn(_code(v), inv.data_ptr(), layout.data_ptr(), layout_dev.data_ptr(), layout.shape[0],
           v.data_ptr(), d, r, _ptr(base), scale, out.data_ptr(), work.data_ptr(), work.numel(),
           _stream(v.device))
    else:
        _C.apply_inverse(_code(v), inv.data_ptr(), layout.data_ptr(), layout.shape[0],
                         v.data_ptr(), d, r, _ptr(base), scale, out.data_ptr(), _threads())


apply_inverse = torch.library.custom_op("ssse_ext::apply_inverse",
                                        mutates_args=("out",))(_apply_inverse_impl)


@apply_inverse.register_fake
def _(inv, layout, layout_dev, v, base, scale, out):
    return None


# ---- dual (low-rank) blocks: table rows (start, size, g_offset, l_offset), see csrc/common.h ----

def _dual_gram__impl(grads: torch.Tensor, table: torch.Tensor, table_dev: torch.Tensor, r0: int,
                     g: torch.Tensor, l: torch.Tensor, ldl: int) -> None:
    """Copies the rows of ``grads`` to rows ``[r0, r0 + m)`` of every ``G_b`` and writes the new
    rows of the raw Gram matrix ``G_b G_b^T`` (float64, lower part) into the factor storage."""
    m, d = grads.shape
    if grads.is_cuda:
        _need_cuda("dual_gram_cuda")(
            _code(grads), grads.data_ptr(), m, d, table.data_ptr(), table_dev.data_ptr(),
            table.shape[0], r0, g.data_ptr(), l.data_ptr(), ldl, _stream(grads.device))
    else:
        _C.dual_gram(_code(grads), grads.data_ptr(), m, d, table.data_ptr(), table.shape[0], r0,
                     g.data_ptr(), l.data_ptr(), ldl, _threads())


dual_gram_ = torch.library.custom_op("ssse_ext::dual_gram_", mutates_args=("g", "l"))(_dual_gram__impl)


@dual_gram_.register_fake
def _(grads, table, table_dev, r0, g, l, ldl):
    return None


def _dual_cholesky__impl(l: torch.Tensor, table: torch.Tensor, table_dev: torch.Tensor, r0: int,
                         r1: int, ldl: int, shift: float, strip_solved: bool) -> torch.Tensor:
    """Extends every factor from rows ``[0, r0)`` to ``[0, r1)``; returns the per-block info."""
    nb = table.shape[0]
    info = torch.zeros(nb, dtype=torch.int64, device=l.device)
    if l.is_cuda:
        fn = _need_cuda("dual_cholesky_cuda")
        work = torch.empty(_C.dual_cholesky_workspace_bytes(nb), dtype=torch.uint8,
                           device=l.device)
        fn(l.data_ptr(), table.data_ptr(), table_dev.data_ptr(), nb, r0, r1, ldl, shift,
           strip_solved, info.data_ptr(), work.data_ptr(), work.numel(), _stream(l.device))
    else:
        _C.dual_cholesky(l.data_ptr(), table.data_ptr(), nb, r0, r1, ldl, shift, strip_solved,
                         info.data_ptr(), _threads())
    return info


dual_cholesky_ = torch.library.custom_op("ssse_ext::dual_cholesky_", mutates_args=("l",))(_dual_cholesky__impl)


@dual_cholesky_.register_fake
def _(l, table, table_dev, r0, r1, ldl, shift, strip_solved):
    return torch.empty(table.shape[0], dtype=torch.int64, device=l.device)


def _dual_apply__impl(g: torch.Tensor, l: torch.Tensor, table: torch.Tensor,
                      table_dev: torch.Tensor, rows: int, ldl: int, damping: float,
                      v: torch.Tensor, base: torch.Tensor | None, scale: float,
                      out: torch.Tensor) -> None:
    """``out_b = base_b + scale F_b^{-1} v_b`` on the rows of every dual block of the table
    (``v``, ``base`` and ``out`` of shape ``(d, r)``); other rows of ``out`` are untouched."""
    d, r = v.shape
    nb = table.shape[0]
    if v.is_cuda:
        fn = _need_cuda("dual_apply_cuda")
        work = torch.empty(_C.dual_apply_workspace_bytes(nb, rows, r), dtype=torch.uint8,
                           device=v.device)
        fn(_code(v), g.data_ptr(), l.data_ptr(), table.data_ptr(), table_dev.data_ptr(), nb,
           rows, ldl, damping, v.data_ptr(), d, r, _ptr(base), scale, out.data_ptr(),
           work.data_ptr(), work.numel(), _stream(v.device))
    else:
        _C.dual_apply(_code(v), g.data_ptr(), l.data_ptr(), table.data_ptr(), nb, rows, ldl,
                      damping, v.data_ptr(), d, r, _ptr(base), scale, out.data_ptr(), _threads())


dual_apply_ = torch.library.custom_op("ssse_ext::dual_apply_", mutates_args=("out",))(_dual_apply__impl)


@dual_apply_.register_fake
def _(g, l, table, table_dev, rows, ldl, damping, v, base, scale, out):
    return None


def _dual_remove_rows__impl(g: torch.Tensor, l: torch.Tensor, table: torch.Tensor,
                            table_dev: torch.Tensor, rows: int, ldl: int, keep: torch.Tensor,
                            removed: torch.Tensor, first: int) -> torch.Tensor:
    """Deletes the stored rows ``removed`` (``(num_blocks, k)``, ascending) of every block, keeping
    ``keep`` (``(num_blocks, rows - k)``, ascending); returns the per-block info."""
    nb = table.shape[0]
    k = removed.shape[1] if removed.dim() == 2 else 0
    info = torch.zeros(nb, dtype=torch.int64, device=l.device)
    if l.is_cuda:
        fn = _need_cuda("dual_remove_rows_cuda")
        work = torch.empty(_C.dual_remove_rows_workspace_bytes(nb, rows, k, first),
                           dtype=torch.uint8, device=l.device)
        fn(_code(g), g.data_ptr(), l.data_ptr(), table.data_ptr(), table_dev.data_ptr(), nb, rows,
           ldl, keep.data_ptr(), removed.data_ptr(), k, first, info.data_ptr(), work.data_ptr(),
           work.numel(), _stream(l.device))
    else:
        _C.dual_remove_rows(_code(g), g.data_ptr(), l.data_ptr(), table.data_ptr(), nb, rows, ldl,
                            keep.data_ptr(), removed.data_ptr(), k, first, info.data_ptr(),
                            _threads())
    return info


dual_remove_rows_ = torch.library.custom_op("ssse_ext::dual_remove_rows_", mutates_args=("g", "l"))(_dual_remove_rows__impl)


@dual_remove_rows_.register_fake
def _(g, l, table, table_dev, rows, ldl, keep, removed, first):
    return torch.empty(table.shape[0], dtype=torch.int64, device=l.device)


_EAGER = {
    gram_accumulate_: _gram_accumulate__impl,
    gram_product_: _gram_product__impl,
    rows_product_: _rows_product__impl,
    inverse_from_gram: _inverse_from_gram_impl,
    sherman_morrison_: _sherman_morrison__impl,
    apply_inverse: _apply_inverse_impl,
    woodbury_check: _woodbury_check_impl,
    woodbury_write_: _woodbury_write__impl,
    dual_gram_: _dual_gram__impl,
    dual_cholesky_: _dual_cholesky__impl,
    dual_apply_: _dual_apply__impl,
    dual_remove_rows_: _dual_remove_rows__impl,
}


def call(op, *args):
    """Runs ``op`` through torch's dispatcher while ``torch.compile`` traces, and its plain
    implementation otherwise: the dispatcher's first call imports torch._dynamo (over a second),
    a cost eager callers — a command-line erasure, say — should not pay."""
    if torch.compiler.is_compiling():
        return op(*args)
    return _EAGER[op](*args)
