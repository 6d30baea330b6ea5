"""Every CPU micro-kernel (chosen once per process) gives the same, correct results."""

import pytest
import torch

from .testing import CHAIN, STABLE, worst_under_isa

# argv: the tolerances of the build (STABLE) and of an update, downdate and apply (CHAIN), for
# float32 then float64; the script prints the worst error as a fraction of its tolerance.
SCRIPT = r"""
import sys
import torch, ssse_ext
from ssse_ext import reference
build_tol = {torch.float32: float(sys.argv[1]), torch.float64: float(sys.argv[2])}
chain_tol = {torch.float32: float(sys.argv[3]), torch.float64: float(sys.argv[4])}
torch.manual_seed(3)
worst = 0.0
for dtype in (torch.float32, torch.float64):
    for n, d, B in [(1, 5, 5), (77, 131, 45), (300, 257, 257)]:
        g = torch.randn(n, d, dtype=torch.float64)
        inv = ssse_ext.build_inverse_fisher(g.to(dtype), damping=0.05, block_size=B)
        ref = reference.block_closed_form(g, inv.layout, 0.05)
        for a, b in zip(inv.blocks, ref):
            err = ((a.double() - b).norm() / b.norm()).item()
            worst = max(worst, err / build_tol[dtype])
        inv.update(g[:9].to(dtype)).downdate(g[:9].to(dtype))
        v = torch.randn(d, 20, dtype=torch.float64)
        out = inv.matvec(v.to(dtype))
        expect = torch.block_diag(*ref) @ v
        worst = max(worst, ((out.double() - expect).norm() / expect.norm()).item()
                    / chain_tol[dtype])
        for r in (1, 3):  # the dot products of the apply and of the check's products
            v = torch.randn(d, r, dtype=torch.float64)
            expect = torch.block_diag(*ref) @ v
            for out in (inv.matvec(v.to(dtype)),
                        inv.checked_change(g[:2].to(dtype), apply=v.to(dtype)).applied):
                worst = max(worst, ((out.double() - expect).norm() / expect.norm()).item()
                            / chain_tol[dtype])
# the downdate's two kernel passes on edge shapes: blocks narrower than a register tile, more
# rows than a block is wide, slabs deeper than one, the in-place and the packed products
from ssse_ext import _ops
for dtype in (torch.float32, torch.float64):
    for s, m in [(5, 7), (47, 3), (257, 30), (300, 70)]:
        layout = ssse_ext.BlockLayout.from_boundaries([0, s, 2 * s])
        g = torch.randn(2 * s + m, 2 * s, dtype=torch.float64)
        n = float(g.shape[0])
        inv = ssse_ext.build_inverse_fisher(g.to(dtype), damping=0.5, layout=layout,
                                            representation="dense")
        packed, host = inv.packed.clone(), layout.table()
        wt, _, info, _ = _ops.call(_ops.woodbury_check, packed, host,
                                   g[2 * s:].to(dtype).contiguous(), n, -1)
        assert not info.any()
        _ops.call(_ops.woodbury_write_, packed, host, wt, m, -1)
        ref = reference.block_closed_form(g[:2 * s].to(dtype).double(), layout, 0.5, n)
        for b, (o, sb) in enumerate(zip(layout.offsets, layout.sizes)):
            blk = packed[o:o + sb * sb].view(sb, sb)
            if not torch.equal(blk, blk.T):  # a written block stays bitwise symmetric
                worst = float("inf")
            err = ((blk.double() - ref[b]).norm() / ref[b].norm()).item()
            worst = max(worst, err / chain_tol[dtype])
print(ssse_ext.build_info()["cpu_isa"], worst)
"""


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_micro_kernel(isa):
    tols = [STABLE[torch.float32], STABLE[torch.float64], CHAIN[torch.float32],
            CHAIN[torch.float64]]
    # every error below its dtype's tolerance
    assert worst_under_isa(SCRIPT, isa, tols, timeout=300) < 1.0
