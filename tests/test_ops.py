"""The kernels as torch.library custom ops: schema, fake implementations, torch.compile."""

import itertools

import pytest
import torch

import ssse_ext
from ssse_ext import _ops, BlockLayout

from .testing import DEVICES, DTYPES, SOLVE, rel_err

PRODUCT = list(itertools.product(DTYPES, DEVICES))


def _setup(dtype, device, n=11, d=10, block=4):
    layout = BlockLayout.fixed(d, block)
    host = layout.table()
    dev = host.to(device)
    g = torch.randn(n, d, dtype=dtype, device=device)
    inv = ssse_ext.build_inverse_fisher(g, damping=0.5, layout=layout)
    return layout, host, dev, g, inv


@pytest.mark.parametrize("dtype,device", PRODUCT)
def test_opcheck_all_ops(dtype, device):
    layout, host, dev, g, inv = _setup(dtype, device)
    gram = torch.zeros(layout.numel, dtype=torch.float64, device=device)
    torch.library.opcheck(_ops.gram_accumulate_, (g, host, dev, gram))
    torch.library.opcheck(_ops.inverse_from_gram,
                          (gram.clone() + 0.0, host, dev, 0.5, 11.0, dtype))
    for chunked in (True, False):
        torch.library.opcheck(_ops.sherman_morrison_,
                              (inv.packed.clone(), host, dev, g[:3].contiguous(), 11.0, 1, chunked))
    v = torch.randn(10, 2, dtype=dtype, device=device)
    torch.library.opcheck(_ops.apply_inverse, (inv.packed, host, dev, v, None, 1.0,
                                               torch.empty_like(v)))
    torch.library.opcheck(_ops.apply_inverse, (inv.packed, host, dev, v, v.clone(), -2.0,
                                               torch.empty_like(v)))


def test_apply_under_torch_compile():
    layout, host, dev, g, inv = _setup(torch.float64, "cpu")

    @torch.compile(backend="eager", fullgraph=True)
    def step(theta, v):
        out = torch.empty_like(v)
        _ops.apply_inverse(inv.packed, host, dev, v, theta, 0.25, out)
        return out

    theta, v = torch.randn(10, 1, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    expect = theta + 0.25 * inv.dense() @ v
    assert rel_err(step(theta, v), expect) < SOLVE[torch.float64]


def test_public_api_under_torch_compile():
    # Eager calls bypass the dispatcher; under torch.compile the custom op is traced instead.
    layout, host, dev, g, inv = _setup(torch.float64, "cpu")
    v = torch.randn(10, dtype=torch.float64)
    compiled = torch.compile(lambda x: inv.apply_update(x, v, 0.5), backend="eager")
    assert rel_err(compiled(v), v + 0.5 * inv.dense() @ v) < SOLVE[torch.float64]


def test_build_info():
    info = ssse_ext.build_info()
    assert {"version", "cuda_compiled", "cuda_architectures", "cuda_device_count",
            "cpu_isa"} <= info.keys()
    assert isinstance(info["cuda_compiled"], bool)
    assert info["cpu_isa"] in ("avx512", "avx2", "generic")
    if not info["cuda_compiled"]:
        assert info["cuda_device_count"] == 0
    if not torch.cuda.is_available():
        assert info["cuda_device_count"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_tensors_without_gpu_fail_cleanly():
    # Without a driver the extension still imports; CUDA work is refused by torch itself.
    with pytest.raises((RuntimeError, AssertionError)):
        ssse_ext.build_inverse_fisher(torch.randn(3, 4, device="cuda"), damping=1.0)
