"""A small case that runs every CUDA kernel of every kernel set once, for compute-sanitizer
(memcheck, racecheck).

Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation and an
out-of-bounds access cannot land silently inside torch's cached pool.
"""

import os
import sys

import torch

import ssse_ext
from ssse_ext import BlockLayout, NotPositiveDefiniteError, build_dual_blocks, build_inverse_fisher


def run(dev) -> None:
    torch.manual_seed(0)
    # Blocks of 5, 64, 65, 70 and 130 parameters: partial tiles, a tile-sized block, a small-block
    # group, two and three pivot steps; then many tiny blocks (groups, planned grids).
    layouts = [BlockLayout((0, 5, 69, 134, 204), (5, 64, 65, 70, 130), 334),
               BlockLayout.per_parameter([(3,), (2, 2), (7,), (40, 3), (1,)] * 6, 64)]
    if os.environ.get("SSSE_SANITIZER_QUICK"):  # racecheck is slow: the first layout only
        layouts = layouts[:1]
    for layout in layouts:
        d = layout.dim
        for dtype in (torch.float32, torch.float64):
            g = (0.5 * torch.randn(150, d, dtype=torch.float64)).to(dtype).to(dev)
            inv = build_inverse_fisher(g[:100], damping=0.5, layout=layout, normalizer=150.0,
                                       representation="dense")
            inv.update(g[100:], chunk_size=100)               # two fused sub-chunks in one call
            inv.downdate(g[:3], method="sherman_morrison")    # literal rank-1 kernels
            build_inverse_fisher(g[:70], damping=1.0, layout=layout, method="woodbury",
                                 representation="dense")
            try:
                inv.clone().downdate(20.0 * g[:30])           # fails: every kernel's skip path
            except NotPositiveDefiniteError:
                pass
            v = torch.randn(d, 5, dtype=dtype, device=dev)
            out = inv.apply_update(v, v, 0.25)
            out1 = inv @ v[:, 0]
            torch.cuda.synchronize()
            assert torch.isfinite(out).all() and torch.isfinite(out1).all()
            assert torch.isfinite(inv.packed).all()
            # Dual blocks: a factor of 100 rows (two tiles, the second partial) extended by 50
            # rows, three rows removed from the middle (trailing refactor), the apply and one
            # dense block.
            dual = build_dual_blocks(g[:100], damping=0.5, layout=layout, normalizer=150.0)
            dual.update(g[100:])
            dual.downdate(g[[70, 3, 120]])
            out = dual.apply(v, base=v, scale=0.25)
            blk = dual.dense_block(layout.num_blocks - 1)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all() and torch.isfinite(blk).all()
            assert dual.num_rows == 147


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    sets = os.environ.get("SSSE_SANITIZER_KERNELS", "simt,tc").split(",")
    for kernels in sets:
        with ssse_ext.use_cuda_kernels(kernels):
            run(dev)
        print(f"compute-sanitizer case ({kernels}): ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
