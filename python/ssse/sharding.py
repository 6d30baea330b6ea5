r"""Block sharding: which rank owns which blocks of an inverse, a rank's share of a sharded
inverse (:class:`ShardedInverseFisher`), and its files (one safetensors file per rank and an
index).

Rank :math:`r` of :math:`P` owns the consecutive blocks ``sharding.blocks(r)`` of the layout,
chosen so that the ranks' costs :math:`\sum_b s_b^2` (the Gram's flops per row, and the memory)
are balanced (:class:`~ssse.partition.Sharding`). The library's functions make and use sharded
inverses when they are given a :class:`ssse.comm.Comm` of more than one process.

A shard file keeps dense blocks packed, which any number of ranks can load (each reads the
blocks it owns: re-sharding). Blocks in other stores (the Kronecker-factored ones of
``curvature="kfac"`` or ``"ekfac"``, the float64 ones of ``representation="requests"``) are
kept by their store's state (:meth:`ssse_ext.BlockInverseFisher.to_state`); such a save loads
on any number of ranks too (:mod:`ssse.resharding`), except blocks in a store that cannot give
its blocks apart (the low-rank and Gram stores), which load on as many ranks as wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import types
from pathlib import Path
from typing import Any

import torch

import ssse_ext
from ssse_ext.validation import check_device, check_dtype

from .comm import Comm, digest, run_local
from .io import atomic_path, write_json
from . import resharding
from .partition import Sharding

__all__ = ["INDEX_FORMAT", "SHARD_FORMAT", "ShardedInverseFisher", "Sharding", "check_sharded",
           "is_index", "load_sharded", "local_inverse", "save_sharded"]

INDEX_FORMAT = "ssse-inverse-fisher-index"
SHARD_FORMAT = "ssse-inverse-fisher-shard"
#: 2: the shards keep the states of their stores (blocks in stores other than the dense one)
FORMAT_VERSION = 2


def local_attribute(name: str, doc: str) -> property:
    """A read-only property that reads ``name`` from the local shard."""
    return property(lambda self: getattr(self.local, name), doc=doc)


class EngineMethod:
    """A method of :class:`ShardedInverseFisher` that is the function ``name`` of
    :mod:`ssse.sharded_erase` (which builds on this module), the inverse its first argument:
    ``inv.name(...)`` calls ``ssse.sharded_erase.name(inv, ...)``, whose signature and
    docstring it has."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, inv, owner=None):
        from . import sharded_erase

        fn = getattr(sharded_erase, self.name)
        return fn if inv is None else types.MethodType(fn, inv)


class ShardedInverseFisher:
    r"""This rank's share of a block-sharded inverse Fisher: the blocks ``sharding.blocks(rank)``
    as :attr:`local`, a :class:`ssse_ext.BlockInverseFisher` over their columns
    (``sharding.columns(rank)``; its segments are those blocks' packed storage), plus the whole
    layout and the partition.

    Made by :func:`ssse.fit_inverse_fisher`, :func:`load_sharded` or :meth:`from_full`;
    :meth:`gather` assembles the whole inverse (tests, small models).
    """

    def __init__(self, local: ssse_ext.BlockInverseFisher, sharding: Sharding, rank: int,
                 comm: Comm | None = None):
        if not isinstance(local, ssse_ext.BlockInverseFisher):
            raise TypeError(f"local must be a ssse_ext.BlockInverseFisher, got "
                            f"{type(local).__name__}")
        if not isinstance(sharding, Sharding):
            raise TypeError(f"sharding must be a Sharding, got {type(sharding).__name__}")
        rank = sharding._rank(rank)
        expected = sharding.sub_layout(rank)
        if local.layout.sizes != expected.sizes:
            raise ValueError(f"local holds blocks of sizes {list(local.layout.sizes)[:8]}..., "
                             f"rank {rank} owns blocks {sharding.blocks(rank)} of sizes "
                             f"{list(expected.sizes)[:8]}...")
        self.local, self.sharding, self.rank = local, sharding, rank
        # the ranks that hold the other blocks: the default of the collectives on this inverse
        self.comm = comm or Comm()
        self.fit_stats: dict = {}

    layout = property(lambda self: self.sharding.layout, doc="The whole layout.")
    dim = property(lambda self: self.layout.dim, doc="The parameters covered, d.")
    world_size = property(lambda self: self.sharding.world_size, doc="The ranks, P.")
    block_range = property(lambda self: self.sharding.blocks(self.rank), doc="``(first, "
                           "last)``: the blocks ``first .. last - 1`` of the layout held here.")
    columns = property(lambda self: self.sharding.columns(self.rank),
                       doc="The parameters of the blocks held here.")
    nbytes = property(lambda self: self.local.nbytes, doc="Bytes held here.")

    @property
    def config(self) -> ssse_ext.FisherConfig:
        return ssse_ext.FisherConfig(self.damping, self.normalizer, self.layout, self.curvature)

    # the local shard's (the same on every rank)
    damping = local_attribute("damping", "the damping λ")
    normalizer = local_attribute("normalizer", "the normaliser N")
    curvature = local_attribute("curvature", "the curvature stored")
    num_samples = local_attribute("num_samples", "the samples the inverse holds")
    dtype = local_attribute("dtype", "the blocks' dtype")
    device = local_attribute("device", "the blocks' device")

    def fingerprint(self) -> bytes:
        """A digest of what every rank's share must agree on."""
        return digest(self.damping, self.normalizer, self.curvature, self.num_samples,
                       str(self.dtype), list(self.sharding.bounds), list(self.layout.sizes))

    @classmethod
    def from_full(cls, inv: ssse_ext.BlockInverseFisher, *, comm: Comm | None = None,
                  sharding: Sharding | None = None) -> "ShardedInverseFisher":
        """This rank's blocks of a whole inverse (a copy), as dense blocks, or each in its own
        store when the inverse has blocks in a store whose changes read the rows' side
        payload (the Kronecker-factored ones: :func:`ssse.resharding.share_of`); ``sharding``
        default balanced over the ranks of ``comm`` (default: one process)."""
        if not isinstance(inv, ssse_ext.BlockInverseFisher):
            raise TypeError(f"inv must be a ssse_ext.BlockInverseFisher, got {type(inv).__name__}")
        comm = comm or Comm()
        rank, size = comm.rank, comm.size
        sharding = Sharding.balanced(inv.layout, size) if sharding is None else sharding
        if not isinstance(sharding, Sharding):
            raise TypeError(f"sharding must be a Sharding, got {type(sharding).__name__}")
        if sharding.layout != inv.layout or sharding.world_size != size:
            raise ValueError(f"sharding must partition the inverse's layout ({inv.layout!r}) "
                             f"over the group's {size} ranks, got {sharding!r}")
        side = sorted({store.name for store in inv.stores if store.takes_side})
        if side and size == 1:  # the whole inverse is the one rank's share, in any store
            return cls(inv.clone(), sharding, rank, comm)
        if side:  # each block stays in its store: the changes need the side payload's store
            fixed = sorted({st.name for st in inv.stores if not resharding.movable(st.name)})
            if fixed:  # decided from the whole inverse: the same on every rank
                raise ValueError(f"inv keeps blocks in the {', '.join(side)} store, whose "
                                 f"changes read the rows' side payload, and in the "
                                 f"{', '.join(fixed)} store, whose blocks cannot be shared: "
                                 f"fit with comm= instead")
            return cls(resharding.share_of(inv, sharding, rank), sharding, rank, comm)
        first, last = sharding.blocks(rank)
        sizes, offsets = inv.layout.sizes, inv.layout.offsets
        packed = torch.empty(inv.layout.numel_of(first, last), dtype=inv.dtype, device=inv.device)
        for b in range(first, last):  # block by block through its store: any representation
            lo = offsets[b] - offsets[first]
            packed[lo:lo + sizes[b] ** 2] = inv.dense_block(b).reshape(-1)
        return cls(local_inverse(packed, sharding, rank, inv.damping, inv.normalizer,
                                 inv.curvature, inv.num_samples), sharding, rank, comm)

    def gather(self, *, comm: Comm | None = None) -> ssse_ext.BlockInverseFisher:
        """The whole inverse, on every rank (collective over ``comm``, default the ranks that
        made this inverse): memory of the whole inverse. Blocks in other stores than the dense
        one (the Kronecker-factored, the float64 ones) stay in their stores, sent as every
        rank's state (:func:`ssse.resharding.gathered`); the low-rank and Gram stores are
        refused in one line."""
        comm = comm or self.comm
        check_sharded(self, comm)
        own = own_stores(self.local)
        if own and comm.size == 1:  # the one rank holds the whole inverse
            whole = self.local.clone()
            whole.config = self.config
            return whole
        kept = sorted({n for t in comm.texts(",".join(own), "gather of the inverse (the stores)")
                       for n in t.split(",") if n})
        fixed = [n for n in kept if not resharding.movable(n)]
        if fixed:  # the same on every rank
            raise ValueError(f"gather of the inverse: the {', '.join(fixed)} blocks cannot move "
                             f"to another partition (use matvec, or save_sharded and "
                             f"load_sharded on as many ranks)")
        if kept:  # each block in its own store, from every rank's state
            whole = resharding.gathered(self.local, self.sharding, comm, "gather of the inverse")
            whole.config = self.config
            return whole
        numels = [self.sharding.numel(r) for r in range(comm.size)]
        buf = torch.zeros(max(max(numels), 1), dtype=self.dtype, device=comm.device)
        packed = self.local.packed
        buf[:packed.numel()] = packed.to(comm.device)
        rows = comm.all_gather(buf, "gather of the inverse", kind="inverse").to(self.device)
        segments = [rows[r, :numels[r]].clone() for r in range(comm.size) if numels[r]]
        if not segments:
            segments = [torch.zeros(0, dtype=self.dtype, device=self.device)]
        return ssse_ext.BlockInverseFisher(segments, self.config, self.num_samples)

    # ---- an inverse's operations, collective over comm (ssse.sharded_erase): the same vectors
    # on every rank, each rank's share of the rows, the whole result on every rank ------------
    matvec = EngineMethod("matvec")
    apply_update = EngineMethod("apply_update")
    without = EngineMethod("without")
    solve_changed = EngineMethod("solve_changed")
    update = EngineMethod("update")
    downdate = EngineMethod("downdate")
    clone = EngineMethod("clone")
    to = EngineMethod("to")

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    block_ids = property(lambda self: tuple(range(*self.block_range)),
                         doc="The blocks of the layout held here.")

    def dense_block(self, i: int) -> torch.Tensor:
        """A copy of block ``i`` of the layout, one of :attr:`block_ids` (not collective)."""
        b = i + self.layout.num_blocks if isinstance(i, int) and i < 0 else i
        if isinstance(b, bool) or b not in self.block_ids:
            raise IndexError(f"block {i} is not one of this rank's blocks {list(self.block_ids)}")
        return self.local.dense_block(b - self.block_range[0])

    def __repr__(self) -> str:
        first, last = self.block_range
        return (f"ShardedInverseFisher(rank={self.rank} of {self.world_size}, blocks {first}.."
                f"{last - 1} of {self.layout.num_blocks}, dim={self.dim}, "
                f"damping={self.damping:g}, normalizer={self.normalizer:g}, "
                f"dtype={self.dtype}, device={self.device})")


def local_inverse(segments, sharding: Sharding, rank: int, damping: float, normalizer: float,
                   curvature: str, num_samples: int) -> ssse_ext.BlockInverseFisher:
    config = ssse_ext.FisherConfig(damping, normalizer, sharding.sub_layout(rank), curvature)
    return ssse_ext.BlockInverseFisher(segments, config, num_samples)


def own_stores(local: ssse_ext.BlockInverseFisher) -> list[str]:
    """The stores of a rank's blocks other than the dense one: the files keep them by their
    state (:meth:`ssse_ext.BlockInverseFisher.to_state`), re-sharded by
    :mod:`ssse.resharding`."""
    return sorted(set(local.representation) - {"dense"})


def check_sharded(inv, comm: Comm) -> None:
    """Refuses anything but this rank's share of an inverse sharded over ``comm``."""
    if not isinstance(inv, ShardedInverseFisher):
        raise TypeError(f"inv_fisher must be a ShardedInverseFisher, got {type(inv).__name__}")
    if inv.world_size != comm.size or inv.rank != comm.rank:
        raise ValueError(f"inv_fisher is rank {inv.rank}'s share of {inv.world_size}, this is "
                         f"rank {comm.rank} of {comm.size}: load it again on these ranks "
                         "(load_sharded re-shards)")


# ---- files: one safetensors file per rank and an index ------------------------------------------

def _shard_name(index: Path, token: str, rank: int, size: int) -> str:
    stem = next((index.name[:-len(suffix)] for suffix in (".index.json", ".json")
                 if index.name.endswith(suffix)), index.name)
    return f"{stem}.{token}.rank{rank:05d}-of-{size:05d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state_meta(inv: ShardedInverseFisher) -> dict:
    return {"damping": inv.damping, "normalizer": inv.normalizer,
            "num_samples": inv.num_samples, "layout": inv.layout.to_dict(),
            "dtype": str(inv.dtype).removeprefix("torch."), "curvature": inv.curvature}


def save_sharded(path: str | os.PathLike, inv: ShardedInverseFisher, *,
                 comm: Comm | None = None, **meta: Any) -> Path:
    """Saves a sharded inverse (collective over ``comm``, default the ranks that made ``inv``):
    every rank writes its blocks to a safetensors file next to ``path``, then rank 0 writes the
    index ``path`` (JSON: the layout, the owners of the blocks, and each shard's file, blocks,
    size and SHA-256), with free-form ``meta``.

    Shard names carry a token of this save, and the index is written last (atomically), so an
    existing index at ``path`` and its shards stay valid until the new ones are complete; on
    any error on any rank the new shards are removed and every rank raises. The shards of the
    index replaced are removed afterwards.

    Returns:
        ``path``.
    """
    comm = comm or getattr(inv, "comm", None) or Comm()
    path = Path(path)
    _, error = run_local(lambda: check_sharded(inv, comm))
    comm.agree(error, "save_sharded (arguments)")
    comm.same(inv.fingerprint(), "save_sharded: the ranks' inverses")
    word = torch.tensor([secrets.randbits(62) if comm.rank == 0 else 0], dtype=torch.int64)
    token = f"{int(comm.broadcast(word, 0, 'save_sharded (token)')[0]):016x}"[-12:]
    shard = path.parent / _shard_name(path, token, comm.rank, comm.size)
    first, last = inv.block_range
    stores = sorted({n for t in comm.texts(",".join(own_stores(inv.local)),
                                           "save_sharded (the stores)") for n in t.split(",")
                     if n})
    seg_bounds = [first, last] if stores else _segment_bounds(inv)

    def write():
        from safetensors.torch import save_file

        shard_meta = {"rank": comm.rank, "world_size": comm.size, "first": first, "last": last,
                      "segments": seg_bounds, "token": token, "state": _state_meta(inv)}
        if stores:  # every store by its state
            tensors, shard_meta["local_state"] = inv.local.to_state()
            tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        else:
            tensors = {f"packed.{j}": t.detach().cpu().contiguous()
                       for j, t in enumerate(t for t in inv.local.segments if t.numel())}
        header = {"format": SHARD_FORMAT, "format_version": str(FORMAT_VERSION),
                  "ssse": json.dumps(shard_meta)}
        with atomic_path(shard) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return [shard.stat().st_size, _sha256(shard)]

    def discard():
        if shard.exists():
            shard.unlink()

    written, error = run_local(write)
    if error is not None:
        discard()
    try:
        comm.agree(error, "save_sharded (writing the shards)")
        sizes = [r[0] for r in comm.ints([0 if written is None else written[0]],
                                         "save_sharded (sizes)")]
        digests = comm.texts("" if written is None else written[1],
                             "save_sharded (fingerprints)")
        old, error = run_local(lambda: _write_index(path, inv, comm, token, sizes, digests,
                                                    meta, stores) if comm.rank == 0 else None)
        comm.agree(error, "save_sharded (writing the index)")
    except BaseException:
        discard()
        raise
    if comm.rank == 0 and isinstance(old, dict) and old.get("format") == INDEX_FORMAT:
        keep = {_shard_name(path, token, r, comm.size) for r in range(comm.size)}
        for entry in old.get("shards", []):
            name = entry.get("file") if isinstance(entry, dict) else None
            if isinstance(name, str) and name not in keep and "/" not in name:
                try:
                    (path.parent / name).unlink()
                except OSError:
                    pass
    return path


def _segment_bounds(inv: ShardedInverseFisher) -> list[int]:
    """The first block of each non-empty segment of this rank's storage, and the end."""
    first, _ = inv.block_range
    bounds, b = [first], first
    for t in inv.local.segments:
        numel = 0
        while numel < t.numel():
            numel += inv.layout.sizes[b] ** 2
            b += 1
        if t.numel():
            bounds.append(b)
    return bounds


def _write_index(path: Path, inv: ShardedInverseFisher, comm: Comm, token: str,
                 sizes: list[int], digests: list[str], meta: dict,
                 stores: list[str]) -> dict | None:
    """Writes the index of a save (rank 0); returns the index it replaced, if readable."""
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
    shards = [{"rank": r, "file": _shard_name(path, token, r, comm.size),
               "first": inv.sharding.bounds[r], "last": inv.sharding.bounds[r + 1],
               "bytes": sizes[r], "sha256": digests[r]} for r in range(comm.size)]
    index = {"format": INDEX_FORMAT, "format_version": 2 if stores else 1,
             "state": _state_meta(inv), "world_size": comm.size,
             "owners": list(inv.sharding.bounds), "shards": shards, "meta": meta}
    if stores:
        index["stores"] = stores
    write_json(path, index)
    return old


class _Index:
    """A validated index file."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"no such inverse-Fisher index: {path}")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not an ssse inverse-Fisher index ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path} is not an ssse inverse-Fisher index (format="
                             f"{data.get('format') if isinstance(data, dict) else None!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"{path} has format version {version!r}; this ssse reads up to "
                             f"{FORMAT_VERSION}")
        try:
            state = data["state"]
            self.layout = ssse_ext.BlockLayout.from_dict(state["layout"])
            self.config = ssse_ext.FisherConfig(float(state["damping"]),
                                                float(state["normalizer"]), self.layout,
                                                str(state.get("curvature", "empirical")))
            self.num_samples = int(state["num_samples"])
            self.dtype = {"float32": torch.float32, "float64": torch.float64}[state["dtype"]]
            self.sharding = Sharding(self.layout, tuple(data["owners"]))
            shards = data["shards"]
            if len(shards) != self.sharding.world_size:
                raise ValueError(f"{len(shards)} shards for {self.sharding.world_size} ranks")
            for r, entry in enumerate(shards):
                if (entry["rank"], entry["first"], entry["last"]) != \
                        (r, *self.sharding.blocks(r)) or "/" in entry["file"] or \
                        "\\" in entry["file"]:
                    raise ValueError(f"shard entry {r} does not match the owners")
            self.shards = shards
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid inverse-Fisher index: {exc}") from None
        self.path, self.meta = path, dict(data.get("meta", {}))
        self.stores = [str(n) for n in data.get("stores", [])]

    def shard_path(self, rank: int) -> Path:
        return self.path.parent / self.shards[rank]["file"]


def _shard_meta(index: _Index, r: int, header: dict, path: Path) -> dict:
    """The metadata of rank ``r``'s shard, checked against the index."""
    entry = index.shards[r]
    try:
        meta = json.loads(header["ssse"])
        bounds = [int(b) for b in meta["segments"]]
        ok = header.get("format") == SHARD_FORMAT and meta["rank"] == r and \
            (meta["first"], meta["last"]) == (entry["first"], entry["last"]) and \
            bounds[0] == entry["first"] and bounds[-1] == entry["last"] and \
            (not index.stores or isinstance(meta.get("local_state"), dict))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"the shard of rank {r} ({path}) is not the shard {index.path} lists")
    return meta


def _verified(index: _Index, r: int, verify: bool) -> Path:
    path = index.shard_path(r)
    if verify and _sha256(path) != index.shards[r]["sha256"]:
        raise ValueError(f"the shard of rank {r} ({path}) does not match its fingerprint "
                         f"in {index.path}: it was changed or belongs to another save")
    return path


def _read_state(index: _Index, r: int, verify: bool) -> ssse_ext.BlockInverseFisher:
    """Rank ``r``'s blocks from its shard, every store from its state."""
    from safetensors import safe_open

    path = _verified(index, r, verify)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = _shard_meta(index, r, f.metadata() or {}, path)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        return ssse_ext.BlockInverseFisher.from_state(tensors, meta["local_state"])
    except ValueError as exc:
        raise ValueError(f"the shard of rank {r} ({path}): {exc}") from None


def _read_blocks(index: _Index, first: int, last: int, verify: bool) -> list[torch.Tensor]:
    """Blocks ``first .. last - 1`` from the shards that hold them, as segments."""
    from safetensors import safe_open

    offsets, pieces = index.layout.offsets, []
    for r, entry in enumerate(index.shards):
        lo, hi = max(first, entry["first"]), min(last, entry["last"])
        if lo >= hi:
            continue
        path = _verified(index, r, verify)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            bounds = [int(b) for b in _shard_meta(index, r, f.metadata() or {}, path)["segments"]]
            for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
                s0, s1 = max(a, lo), min(b, hi)
                if s0 >= s1:
                    continue
                t = f.get_slice(f"packed.{j}")
                piece = t[offsets[s0] - offsets[a]:offsets[s1 - 1] - offsets[a]
                          + index.layout.sizes[s1 - 1] ** 2]
                if not bool(torch.isfinite(piece).all()):
                    raise ValueError(f"the shard of rank {r} ({path}) holds NaN or Inf")
                pieces.append(piece)
    return pieces


def load_sharded(path: str | os.PathLike, *, comm: Comm | None = None, device=None,
                 dtype: torch.dtype | None = None,
                 verify: bool = True) -> tuple[ShardedInverseFisher, dict]:
    """Loads an inverse saved by :func:`save_sharded` onto the ranks of ``comm`` (collective):
    the saved partition when the world size is the same, else a balanced one (re-sharding);
    each rank reads only the shards that hold its blocks (and, to re-shard a save that keeps
    its stores' states, every shard's header: :mod:`ssse.resharding`). One process (the
    default ``comm``) gets every block (:meth:`ShardedInverseFisher.gather` then gives the
    whole inverse).

    Args:
        path: the index file.
        device, dtype: of the result (default: CPU, the saved dtype).
        verify: check every shard read against its SHA-256 in the index.

    Returns:
        ``(this rank's ShardedInverseFisher, the index's meta)``.

    Raises:
        FileNotFoundError: a shard file is missing (on every rank, naming the rank whose shard
            it is).
        ValueError: a file is not what the index says.
    """
    comm = comm or Comm()
    path = Path(path)
    device = check_device(device)
    dtype = check_dtype(dtype)
    index, error = run_local(lambda: _Index(path))
    comm.agree(error, "load_sharded (the index)")
    saved = index.sharding
    if saved.world_size == comm.size:
        sharding = saved
    elif index.stores:  # balanced by the blocks' bytes in their stores
        sharding, error = run_local(lambda: Sharding.by_store_bytes(
            index.layout, comm.size, resharding.store_names(index), index.dtype))
        comm.agree(error, "load_sharded (the shards' stores)")
    else:
        sharding = Sharding.balanced(index.layout, comm.size)
    first, last = sharding.blocks(comm.rank)
    needed = [r for r in range(saved.world_size)
              if max(first, saved.bounds[r]) < min(last, saved.bounds[r + 1])]
    missing = [r for r in needed if not index.shard_path(r).is_file()]
    rows = comm.ints([missing[0] if missing else -1], "load_sharded (shard files)")
    lost = sorted({row[0] for row in rows if row[0] >= 0})
    if lost:
        r = lost[0]
        raise FileNotFoundError(f"the shard of rank {r} of the saved inverse is missing: "
                                f"{index.shard_path(r)} (listed in {path})"
                                + (f"; also missing: the shards of ranks "
                                   f"{', '.join(map(str, lost[1:]))}" if lost[1:] else ""))

    def read():
        if index.stores:
            local = _read_state(index, comm.rank, verify) if sharding is saved else \
                resharding.regrouped_local(index, sharding, comm.rank,
                                           lambda r: _read_state(index, r, verify))
            if device is not None or dtype is not None:
                local = local.to(device=device, dtype=dtype)
            return ShardedInverseFisher(local, sharding, comm.rank, comm)
        pieces = _read_blocks(index, first, last, verify)
        pieces = [p.to(device=device, dtype=dtype or index.dtype) for p in pieces]
        if not pieces:
            pieces = [torch.zeros(0, dtype=dtype or index.dtype, device=device)]
        local = local_inverse(pieces, sharding, comm.rank, index.config.damping,
                               index.config.normalizer, index.config.curvature,
                               index.num_samples)
        return ShardedInverseFisher(local, sharding, comm.rank, comm)

    inv, error = run_local(read)
    comm.agree(error, "load_sharded (reading the shards)")
    return inv, index.meta


def is_index(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an index written by :func:`save_sharded` (not a
    single-file inverse)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        return head.lstrip().startswith(b"{") and INDEX_FORMAT.encode() in head
    except OSError:
        return False
