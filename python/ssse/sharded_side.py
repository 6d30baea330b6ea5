r"""The side payloads of rows over several processes (:mod:`ssse_ext.side`): the stores that
read one (the Kronecker-factored blocks' factor sums) need the payload of *all* ranks' rows,
for their own blocks only.

Every rank's payload is a sum over its rows, so the payload of all rows is the sum over the
ranks: each part (:meth:`~ssse_ext.side.SidePayload.parts`, one per block it describes) is
reduced onto the rank that owns its block, then each rank keeps the part over its columns
(:meth:`~ssse_ext.side.SidePayload.restricted`). A rank without rows sums zeros of the same
shapes, described by the payload's :meth:`~ssse_ext.side.SidePayload.skeleton` as the ranks
with rows sent it. Bytes sent: each part once to its owner.
"""

from __future__ import annotations

import bisect
import json

import torch

import ssse_ext
from ssse_ext.side import side_type, strip_side

from .comm import Comm, run_local

__all__ = ["owned_side", "split_rows", "with_side"]


def split_rows(rows) -> tuple[torch.Tensor, dict | None]:
    """``(tensor, side payload or None)`` of a tensor or a :class:`ssse_ext.Rows`."""
    sides: list = []
    tensor = strip_side(rows, sides.append)
    return tensor, (sides[0] if sides else None)


def _skeleton(side: dict | None) -> str:
    if not side:
        return ""
    return json.dumps({key: side[key].skeleton() for key in sorted(side)}, sort_keys=True)


def owned_side(comm: Comm, sharding, side: dict | None, what: str, *,
               device=None) -> dict | None:
    """The sum over every rank of its ``side`` payload (this rank's rows'; ``None``: none), cut
    to this rank's columns of ``sharding`` (collective); ``None`` when no rank has one."""
    mine, error = run_local(lambda: _skeleton(side))
    comm.agree(error, f"{what} (the side payload)")
    texts = comm.texts(mine, f"{what} (the side payload)", whole=True)
    shapes = sorted({t for t in texts if t})
    if len(shapes) > 1:
        raise ValueError(f"{what}: the ranks' rows carry side payloads of different shapes "
                         "(different models or curvature options)")
    if not shapes:
        return None
    skeleton = json.loads(shapes[0])
    dev = torch.device("cpu") if device is None else torch.device(device)

    def total():
        out = {}
        for key, skel in skeleton.items():
            zeros = side_type(key).zeros(skel, dev)
            out[key] = zeros + side[key].to(dev) if side and key in side else zeros
        return out

    summed, error = run_local(total)
    comm.agree(error, f"{what} (the side payload)")
    starts = sharding.layout.starts
    for key in sorted(summed):
        for start, t in summed[key].parts():
            block = bisect.bisect_right(starts, start) - 1
            comm.reduce_(t, sharding.owner(block), f"{what} (sum of the side payload)", "side")
    cols = sharding.columns(comm.rank)
    return {key: payload.restricted(cols.start, cols.stop) for key, payload in summed.items()}


def with_side(rows: torch.Tensor, side: dict | None):
    """``rows`` as :class:`ssse_ext.Rows` with ``side`` (the tensor itself when ``None``)."""
    return rows if side is None else ssse_ext.Rows(rows, side)
