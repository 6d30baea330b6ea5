"""Moving blocks kept in stores other than the dense one (the Kronecker-factored ones, the
float64 ones) between partitions: a save loaded on another number of ranks than wrote it
(:func:`regrouped_local`), a whole inverse shared over ranks (:func:`share_of`, for
``from_full``) and the shares gathered into the whole (:func:`gathered`, for ``gather``).

A save's new partition balances the blocks' bytes in their stores (as the sharded fit does),
read from every shard's header. Each rank then reads, whole, the saved shards that hold its blocks,
and every store kind gathers its blocks into one store of the rank's layout
(:meth:`ssse_ext.blocks.BlockStore.regrouped`); the loaded blocks may share tensors with the
shards read, which are dropped. As when dense blocks are re-sharded, the health probe's sketch
stays with the saved partition: the loaded shares carry none.
"""

from __future__ import annotations

import json

import torch

import ssse_ext
from ssse_ext.blocks import get_store
from ssse_ext.blocks.base import BlockStore

from .partition import Sharding


def store_names(index) -> list[str]:
    """Per block of the saved layout, the name of the store that holds it, from every shard's
    header: ``FileNotFoundError`` for a missing shard, ``ValueError`` naming the shard for
    one that does not list its stores, and for a store that cannot give its blocks apart."""
    from safetensors import safe_open

    saved = index.sharding.world_size
    names: list[str | None] = [None] * index.layout.num_blocks
    for r in range(saved):
        path = index.shard_path(r)
        if not path.is_file():
            raise FileNotFoundError(f"the shard of rank {r} of the saved inverse is missing: "
                                    f"{path} (listed in {index.path})")
        first = index.sharding.bounds[r]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
            for entry in json.loads(header["ssse"])["local_state"]["stores"]:
                for lo, hi in entry["blocks"]:
                    for b in range(first + int(lo), first + int(hi)):
                        names[b] = str(entry["name"])
        except Exception as exc:  # safetensors raises its own error for a damaged header
            raise ValueError(f"the shard of rank {r} ({path}) does not list its stores "
                             f"({exc})") from None
    missing = [b for b, name in enumerate(names) if name is None]
    if missing:
        raise ValueError(f"no shard of {index.path} holds blocks {missing[:5]}")
    fixed = sorted({n for n in names if not movable(n)})
    if fixed:
        raise ValueError(f"{index.path} keeps blocks in the {', '.join(fixed)} store, whose "
                         f"blocks cannot move to another partition: load it on {saved} ranks")
    return names


def movable(name: str) -> bool:
    """Whether the store ``name`` can give its blocks apart (:meth:`BlockStore.regrouped`)."""
    return get_store(name).regrouped.__func__ is not BlockStore.regrouped.__func__


def regrouped_local(index, sharding: Sharding, rank: int,
                    read_state) -> ssse_ext.BlockInverseFisher:
    """Rank ``rank``'s blocks of ``sharding`` as one inverse of its sub-layout, from the saved
    shards that hold them (``read_state(r)``: saved rank ``r``'s inverse)."""
    first, last = sharding.blocks(rank)
    saved = index.sharding
    pieces: dict[str, list] = {}
    for r in range(saved.world_size):
        lo, hi = max(first, saved.bounds[r]), min(last, saved.bounds[r + 1])
        if lo < hi:
            start = saved.bounds[r]
            _take(pieces, read_state(r), lo - start, hi - start, start - first)
    try:
        return _assembled(pieces, sharding.sub_layout(rank), index.config, index.dtype,
                          index.num_samples)
    except ValueError as exc:
        raise ValueError(f"{index.path}, saved on {saved.world_size} ranks: {exc}") from None


def share_of(inv: ssse_ext.BlockInverseFisher, sharding: Sharding,
             rank: int) -> ssse_ext.BlockInverseFisher:
    """Rank ``rank``'s blocks of ``sharding`` of the whole inverse ``inv``, each in its own
    store (a copy); ``ValueError`` naming a store of them that cannot give its blocks apart."""
    first, last = sharding.blocks(rank)
    pieces: dict[str, list] = {}
    _take(pieces, inv, first, last, -first)
    local = _assembled(pieces, sharding.sub_layout(rank), inv.config, inv.dtype,
                       inv.num_samples, inv.device)
    return ssse_ext.BlockInverseFisher([st.clone() for st in local.stores], local.config,
                                       local.num_samples)


def _take(pieces: dict[str, list], inv: ssse_ext.BlockInverseFisher, lo: int, hi: int,
          shift: int) -> None:
    """Adds the blocks ``lo .. hi - 1`` of ``inv`` to ``pieces`` (per store name, ``(id in the
    new layout, (store, its id))``) as the blocks ``b + shift`` of the new layout."""
    for st in inv.stores:
        for b in st.block_ids:
            if lo <= b < hi:
                pieces.setdefault(st.name, []).append((b + shift, (st, b)))


def _assembled(pieces: dict[str, list], layout, config, dtype, num_samples: int,
               device=None) -> ssse_ext.BlockInverseFisher:
    """One inverse of ``layout`` from ``pieces`` (:func:`_take`; none: an empty inverse on
    ``device``)."""
    config = ssse_ext.FisherConfig(config.damping, config.normalizer, layout, config.curvature)
    for held in pieces.values():
        held.sort(key=lambda item: item[0])
    if not pieces:  # a rank without blocks
        return ssse_ext.BlockInverseFisher([torch.zeros(0, dtype=dtype, device=device)], config,
                                           num_samples)
    stores = [get_store(name).regrouped([p for _, p in held], layout=layout,
                                        block_ids=[b for b, _ in held])
              for name, held in pieces.items()]
    return ssse_ext.BlockInverseFisher(stores, config, num_samples)


def gathered(local: ssse_ext.BlockInverseFisher, sharding: Sharding, comm,
             what: str) -> ssse_ext.BlockInverseFisher:
    """The whole inverse on every rank of ``comm``, each block in its own store (collective):
    every rank's share travels as its state (safetensors bytes and JSON metadata; nothing is
    pickled); the health probe's sketch stays behind. Refused on every rank, before anything
    is copied, when the copies would not fit in the memory free on a rank (on the CPU: the
    received shares twice, as bytes and as stores, the whole inverse assembled, and this
    rank's bytes; on the inverse's device: the whole inverse)."""
    from safetensors.torch import load, save

    from ssse_ext.budget import check_memory

    from .comm import run_local

    sizes = [row[0] for row in comm.ints([local.nbytes], what)]

    def fits():
        check_memory(what, comm.size * max(sizes) + 2 * sum(sizes) + local.nbytes,
                     detail="every rank's share of the inverse, sent as bytes")
        if local.device.type != "cpu":
            check_memory(what, sum(sizes), local.device, detail="the whole inverse")

    def state():
        tensors, meta = local.to_state(check=False)
        tensors = {k: t for k, t in tensors.items() if not k.startswith("probe.")}
        return save({k: t.detach().cpu().contiguous() for k, t in tensors.items()}), \
            json.dumps({k: v for k, v in meta.items() if k != "probe"})

    comm.agree(run_local(fits)[1], what)
    (data, meta), error = run_local(state)
    comm.agree(error, what)
    lengths = [row[0] for row in comm.ints([len(data)], what)]
    metas = [json.loads(text) for text in comm.texts(meta, what, whole=True)]
    buf = torch.zeros(max(max(lengths), 1), dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    del data
    rows = comm.all_gather(buf, what, kind="inverse").cpu()
    pieces: dict[str, list] = {}
    for r in range(comm.size):
        share = ssse_ext.BlockInverseFisher.from_state(
            load(rows[r, :lengths[r]].numpy().tobytes()), metas[r])
        _take(pieces, share, 0, share.layout.num_blocks, sharding.bounds[r])
    del rows
    whole = _assembled(pieces, sharding.layout, local.config, local.dtype, local.num_samples)
    return whole if local.device.type == "cpu" else whole.to(device=local.device)
