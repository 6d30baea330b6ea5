"""The kernels as torch.library custom ops: schema, fake implementations, torch.compile."""

import itertools
import os

import pytest
import torch

import ssse_ext
from ssse_ext import _C, _ops, BlockLayout

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


# ---- kernel-layer checks shared by the CPU and CUDA bindings; the CUDA kernel set ---------------

def _raw_args(dtype=torch.float64, n=5, d=10, block=4):
    layout = BlockLayout.fixed(d, block)
    host = layout.table()
    g = torch.randn(n, d, dtype=dtype)
    inv = ssse_ext.build_inverse_fisher(g, damping=0.5, layout=layout).packed.clone()
    return layout, host, g, inv


def test_bindings_check_their_arguments_and_name_the_value():
    layout, host, g, inv = _raw_args()
    info = torch.zeros(layout.num_blocks, dtype=torch.int64)
    nb = layout.num_blocks
    with pytest.raises(ValueError, match="m must be >= 0, got -1"):
        _C.sherman_morrison(1, True, inv.data_ptr(), host.data_ptr(), nb, g.data_ptr(), -1, 10,
                            5.0, 1, info.data_ptr(), 1)
    with pytest.raises(ValueError, match="sign must be \\+1 or -1, got 2"):
        _C.sherman_morrison(1, True, inv.data_ptr(), host.data_ptr(), nb, g.data_ptr(), 5, 10,
                            5.0, 2, info.data_ptr(), 1)
    with pytest.raises(ValueError, match="normalizer must be > 0, got -3"):
        _C.sherman_morrison(1, True, inv.data_ptr(), host.data_ptr(), nb, g.data_ptr(), 5, 10,
                            -3.0, 1, info.data_ptr(), 1)
    v = torch.randn(10, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="out must not alias v"):
        _C.apply_inverse(1, inv.data_ptr(), host.data_ptr(), nb, v.data_ptr(), 10, 1, 0, 1.0,
                         v.data_ptr(), 1)
    with pytest.raises(ValueError, match="damping must be > 0, got 0"):
        _C.inverse_from_gram(1, inv.data_ptr(), host.data_ptr(), nb, 0.0, 1.0, inv.data_ptr(),
                             info.data_ptr(), 1)
    with pytest.raises(ValueError, match="num_blocks must be >= 0, got -2"):
        _C.gram_accumulate(1, g.data_ptr(), 5, 10, host.data_ptr(), -2, inv.data_ptr(), 1)


@pytest.mark.skipif(not ssse_ext.build_info()["cuda_compiled"], reason="needs the CUDA bindings")
def test_cuda_bindings_check_the_same_arguments_before_any_device_call():
    # The checks run on the host before a pointer is touched, so host pointers do here.
    layout, host, g, inv = _raw_args()
    nb = layout.num_blocks
    p = host.data_ptr()
    with pytest.raises(ValueError, match="m must be >= 0, got -1"):
        _C.sherman_morrison_cuda(1, True, 1, p, p, nb, 1, -1, 10, 5.0, 1, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="out must not alias v"):
        _C.apply_inverse_cuda(1, 1, p, p, nb, 8, 10, 1, 0, 1.0, 8, 0, 0, 0)
    with pytest.raises(ValueError, match="normalizer must be > 0, got 0"):
        _C.inverse_from_gram_cuda(1, 1, p, p, nb, 1.0, 0.0, 1, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="m must be >= 0, got -4"):
        _C.gram_accumulate_cuda(1, 1, -4, 10, p, p, nb, 1, 0, 0, 0)


def test_cuda_kernel_set_switch():
    assert ssse_ext.cuda_kernels() in ssse_ext.CUDA_KERNEL_SETS
    before = ssse_ext.cuda_kernels()
    with ssse_ext.use_cuda_kernels("tc"):
        assert ssse_ext.cuda_kernels() == "tc" == ssse_ext.build_info()["cuda_kernels"]
        with ssse_ext.use_cuda_kernels("simt"):
            assert ssse_ext.cuda_kernels() == "simt"
        assert ssse_ext.cuda_kernels() == "tc"
    assert ssse_ext.cuda_kernels() == before
    with pytest.raises(ValueError, match="got 'fast'"):
        ssse_ext.set_cuda_kernels("fast")
    assert ssse_ext.cuda_kernels() == before


def test_cuda_kernel_set_from_the_environment():
    import subprocess
    import sys
    code = "import ssse_ext; print(ssse_ext.cuda_kernels())"
    env = dict(os.environ, SSSE_CUDA_KERNELS="tc")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tc"
    env.pop("SSSE_CUDA_KERNELS")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "simt"  # the default until a GPU run has verified tc


@pytest.mark.skipif(not ssse_ext.build_info()["cuda_compiled"], reason="needs the CUDA bindings")
def test_tc_workspaces_are_bounded_on_a_resnet18_size_layout():
    # Host-side sizing only (no device): the tc Gram and inverse need a plan of O(num_blocks),
    # the Woodbury update at most its 512 MiB cap however large the model.
    shapes = RESNET18_SHAPES
    layout = BlockLayout.per_parameter(shapes, 256)
    assert layout.num_blocks == 43692
    host = layout.table()
    nb = layout.num_blocks
    with ssse_ext.use_cuda_kernels("simt"):
        assert _C.gram_accumulate_workspace_bytes(host.data_ptr(), nb) == 0
    with ssse_ext.use_cuda_kernels("tc"):
        gram = _C.gram_accumulate_workspace_bytes(host.data_ptr(), nb)
        inverse = _C.inverse_from_gram_workspace_bytes(host.data_ptr(), nb)
        update = _C.sherman_morrison_workspace_bytes(0, True, host.data_ptr(), nb)
        apply = _C.apply_inverse_workspace_bytes(host.data_ptr(), nb)
    assert 0 < gram <= 16 * nb + 4096 and 0 < inverse <= 16 * nb + 4096
    assert 0 < update <= (512 << 20) + 16 * nb
    assert apply <= 16 * nb + 4096
    with ssse_ext.use_cuda_kernels("simt"):  # for comparison: 64 rows of d doubles, twice
        assert _C.sherman_morrison_workspace_bytes(0, True, host.data_ptr(), nb) > 2 * 64 * 4 * layout.dim


# torchvision's resnet18 (10 classes) parameter shapes in named_parameters() order.
def _resnet18_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first_in = cin if block == 0 else cout
            shapes += [(cout, first_in, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
        cin = cout
    shapes += [(10, 512), (10,)]
    return shapes


RESNET18_SHAPES = _resnet18_shapes()
