r"""Finding the stored rows of dual blocks that a removal names (:meth:`DualBlocks.downdate
<ssse_ext.DualBlocks.downdate>`).

A row to remove matches stored row ``j`` of block ``b`` when
:math:`\lVert G_b[j] - u_b \rVert_2 \le \mathrm{rtol}\,\max(\lVert G_b[j] \rVert_2,
\lVert u_b \rVert_2)`; each row takes the closest stored row not taken by an earlier one.
"""

from __future__ import annotations

import math

import torch

from ..errors import RowNotFoundError
from ..layout import BlockLayout

__all__ = ["MATCH_RTOL", "match_rows", "match_run"]

#: Default relative tolerance of the row matching in :meth:`DualBlocks.downdate
#: <ssse_ext.DualBlocks.downdate>`: the square root of the dtype's machine epsilon (float32
#: 3.5e-4, float64 1.5e-8). Gradients recomputed at the same parameters agree to rounding (far
#: inside it), while gradients of different samples differ at O(1) relative distance.
MATCH_RTOL = {torch.float32: math.sqrt(torch.finfo(torch.float32).eps),
              torch.float64: math.sqrt(torch.finfo(torch.float64).eps)}

# Rows of G handed to torch at once when the matching computes norms and exact distances (a
# bounded float64 temporary, never a float64 copy of a whole block).
_MATCH_CHUNK = 1024


def match_run(stored: torch.Tensor, rows: torch.Tensor, rtol: float) -> list:
    """:func:`match_rows` for a run of ``nb`` blocks at once (``stored`` ``(nb, R, s)``,
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


def match_rows(stored: torch.Tensor, rows: torch.Tensor, rtol: float, block: int,
                layout: BlockLayout) -> list[int]:
    """Indices of distinct stored rows matching ``rows`` (see :meth:`~ssse_ext.DualBlocks.downdate`).

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
