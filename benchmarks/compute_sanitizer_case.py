"""A small case that runs every CUDA kernel once, for compute-sanitizer (memcheck, racecheck).

Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation and an
out-of-bounds access cannot land silently inside torch's cached pool.
"""

import sys

import torch

from ssse_ext import BlockLayout, NotPositiveDefiniteError, build_dual_blocks, build_inverse_fisher


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    # Blocks of 5, 64, 65 and 70 parameters: partial tiles, a tile-sized block, two pivot steps.
    layout = BlockLayout((0, 5, 69, 134), (5, 64, 65, 70), 204)
    for dtype in (torch.float32, torch.float64):
        g = (0.5 * torch.randn(150, 204, dtype=torch.float64)).to(dtype).to(dev)
        inv = build_inverse_fisher(g[:100], damping=0.5, layout=layout, normalizer=150.0)
        inv.update(g[100:], chunk_size=100)               # two fused sub-chunks in one call
        inv.downdate(g[:3], method="sherman_morrison")    # literal rank-1 kernels
        build_inverse_fisher(g[:70], damping=1.0, layout=layout, method="woodbury")
        try:
            inv.clone().downdate(20.0 * g[:30])           # fails: every kernel's skip path
        except NotPositiveDefiniteError:
            pass
        v = torch.randn(204, 5, dtype=dtype, device=dev)
        out = inv.apply_update(v, v, 0.25)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and torch.isfinite(inv.packed).all()
        # Dual blocks: a factor of 100 rows (two tiles, the second partial) extended by 50 rows,
        # three rows removed from the middle (trailing refactor), the apply and one dense block.
        dual = build_dual_blocks(g[:100], damping=0.5, layout=layout, normalizer=150.0)
        dual.update(g[100:])
        dual.downdate(g[[70, 3, 120]])
        out = dual.apply(v, base=v, scale=0.25)
        blk = dual.dense_block(3)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and torch.isfinite(blk).all() and dual.num_rows == 147
    print("compute-sanitizer case: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
