r"""The fit of :func:`ssse.fit_inverse_fisher` over several processes (``comm.size > 1``):
every rank computes the rows of its share of the data and holds only its blocks
(:mod:`ssse.sharding`).

The fit has two exchanges (``comm.exchange``), with the same result to rounding:

- ``"reduce_scatter"`` (a): every rank accumulates the float64 Gram matrices of *all* blocks for
  its own rows, then each owner receives the sum of its blocks (one in-place reduce per group
  of accumulators, i.e. a reduce-scatter without a second copy of them). Memory
  :math:`8\,\mathrm{numel}` bytes per rank (:math:`d\,B` entries); bytes sent per rank
  :math:`8\,\mathrm{numel}\,(P-1)/P`, independent of the number of rows.
- ``"all_to_all"`` (b): every chunk of rows is cut into the owners' column slices and
  exchanged (``all_to_all``), so each owner accumulates its blocks over all rows. Memory
  :math:`8\,\mathrm{numel}/P` per rank; bytes sent per rank :math:`n\,d\,e\,(P-1)/P^2` for
  :math:`n` rows in all, of :math:`e`-byte elements.
- ``"auto"`` (default): (a) when every rank can hold the accumulators of all blocks and (a)
  sends fewer bytes (:math:`8\,\mathrm{numel}\,P < n\,d\,e`: for blocks of :math:`B`, more
  than :math:`8BP/e` rows), else (b). When the accumulators do not fit, (b) is the only choice
  and its memory falls as :math:`1/P`; when they fit, (a) sends less for any real training set
  (CIFAR-10 on a ResNet-18 with :math:`B = 256` and 8 GPUs: 150 GB against 2 TB in all).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

import ssse_ext
from ssse_ext.blocks import Pinned, choose_stores
from ssse_ext.budget import available_memory
from ssse_ext.build import StoreBuild
from ssse_ext.side import SideSum, strip_side

from .batches import check_data, check_loss, check_module, is_batch, task_of
from .budget import CHUNK_SHARE_OF_INVERSE, MEMORY_SHARE, MIN_CHUNK_BYTES
from .comm import Comm, digest, run_local
from .curvature import get_curvature
from .model import FlatModel, data_size
from .rows import check_autocast, likelihood_of_data, row_stream
from .settings import check_fit_settings
from .sharded_side import owned_side, split_rows
from .sharding import ShardedInverseFisher, Sharding, local_inverse

__all__ = ["agreed_likelihood", "choose_exchange",
           "fit_samples", "fit_sharded", "refuse"]


def refuse(options: dict, offered: dict, where: str) -> None:
    """Refuses, in one line, an option of the local path that has no sharded counterpart:
    ``offered`` maps an option to ``(its accepted values, why others are not offered)``."""
    for name, (accepted, why) in offered.items():
        if options.get(name) not in accepted:
            raise ValueError(f"{name}={options.get(name)!r} is not offered by {where} over "
                             f"several processes: {why}")


#: What the sharded fit refuses (one line each).
FIT_REFUSED = {
    "representation": (("auto", "dense"), 'each rank builds dense blocks (pass "dense")'),
    "checkpoint": ((None,), "the Gram accumulators are spread over the ranks; fit again"),
    "every": ((None,), "it goes with checkpoint, which is not offered"),
}


def agreed_likelihood(comm: Comm, fm: FlatModel, loss_fn, data, curv, likelihood, what: str):
    """The likelihood of ``curv`` resolved once on this rank's data (``None`` where the
    curvature needs none or the rank has no data), and its ``spec`` agreed on by every rank
    that resolved one; returns ``(likelihood, data)`` (``data`` still whole)."""
    lik, error = None, None
    if curv.needs_likelihood and data_size(data, fm.task) != 0:
        try:
            lik, data = likelihood_of_data(fm, loss_fn, data, likelihood)
        except Exception as exc:  # agreed on below; a rank whose batches are all empty has none
            if not (isinstance(exc, ValueError) and "is empty" in str(exc)):
                error = exc
    comm.agree(error, f"{what} (the likelihood)")
    specs = {s for s in comm.texts("" if lik is None else lik.spec, f"{what} (the likelihood)")
             if s}
    if len(specs) > 1:
        raise ValueError(f"{what}: the ranks' data give different likelihoods: "
                         f"{', '.join(sorted(specs))}")
    return lik, data


def _prepare(a: dict) -> dict:
    """This rank's checks of the fit's arguments (the local fit's, less those refused)."""
    check_module(a["model"])
    check_data(a["data"], "data", task_of(check_loss(a["loss_fn"])))
    fm = FlatModel(a["model"], params=a.get("params"), loss_fn=a["loss_fn"])
    args = dict(check_fit_settings(a, fm), fm=fm)
    args["representation"] = args["curv"].representation_for(fm, args["layout"],
                                                             a["representation"])
    return args


def fit_sharded(comm: Comm, a: dict) -> ShardedInverseFisher:
    """:func:`ssse.fit_inverse_fisher` with the arguments ``a`` (its own, by name) over the
    ranks of ``comm`` (collective): this rank's :class:`~ssse.sharding.ShardedInverseFisher`,
    whose ``fit_stats`` hold the exchange used, the bytes this rank sent and the bytes of its
    accumulators. The ``"mc"`` draws of rank ``r`` use seed ``seed + r``; with ``minibatch > 1``
    the groups are formed within each rank's share."""
    refuse(a, FIT_REFUSED, "fit_inverse_fisher")
    args, error = run_local(lambda: _prepare(a))
    comm.agree(error, "fit_inverse_fisher (arguments)")
    fm, lay, dt, dev, curv = (args[k] for k in ("fm", "layout", "dtype", "device", "curv"))
    lik, data = agreed_likelihood(comm, fm, a["loss_fn"], a["data"], curv, args["likelihood"],
                                  "fit_inverse_fisher")
    comm.same(digest(fm.flat(), {k: args[k] for k in ("damping", "weight_decay", "minibatch",
                                                      "curvature", "mc_samples")},
                     comm.exchange, str(dt), list(lay.sizes)),
              "fit_inverse_fisher: the model's parameters or the arguments")
    if isinstance(args["representation"], Pinned):  # blocks in a store of the curvature's own
        names = choose_stores(lay.sizes, None, dt, representation=args["representation"])
        sharding = Sharding.by_store_bytes(lay, comm.size, names, dt)
        return _fit_stores(comm, sharding, a, args, lik, data)
    sharding = Sharding.balanced(lay, comm.size)
    choice, acc_bytes, budget = _plan(comm, sharding, data, args)
    before = dict(comm.sent)
    info: dict = {}
    # a curvature whose rows carry a side payload but pins no block here: dense blocks only
    stream = strip_side(_stream(args, a, comm, data, lik, info, budget), lambda side: None)
    fit = _fit_all_to_all if choice == "all_to_all" else _fit_reduce_scatter
    acc, total, per_sample = fit(comm, sharding, stream, info, dt, dev)
    if total == 0:
        raise ValueError("data is empty on every rank: the Fisher needs at least one sample")
    # as the local fit: N = n times the curvature's weight of a sample
    normalizer = total / (per_sample // curv.normalizer_weight(mc_samples=args["mc_samples"]))

    def invert():
        result = acc.finish(args["damping"], normalizer, curvature=curv.name)
        segments = list(result.segments) if isinstance(result, ssse_ext.BlockInverseFisher) \
            else [t for t in result if t.numel()]
        return local_inverse(segments or [torch.zeros(0, dtype=dt, device=dev)], sharding,
                             comm.rank, args["damping"], normalizer, curv.name, total)

    local, error = run_local(invert)
    comm.agree(error, "fit_inverse_fisher (the inverse of the blocks)")
    inv = ShardedInverseFisher(local, sharding, comm.rank, comm)
    inv.fit_stats = {"exchange": choice, "rows": total,
                     "bytes_sent": comm.sent_since(before, "rows", "grams"),
                     "control_bytes": comm.sent_since(before, "control"),
                     "accumulator_bytes": acc_bytes, "inverse_bytes": local.nbytes}
    return inv


def _stream(args: dict, a: dict, comm: Comm, data, lik, info: dict, budget: int | None):
    curv = args["curv"]
    return row_stream(args["fm"], a["loss_fn"], data, "data", weight_decay=args["weight_decay"],
                      chunk_size=args["chunk_size"], minibatch=args["minibatch"],
                      dtype=args["dtype"], max_memory=budget, curvature=curv.name,
                      likelihood=lik, mc_samples=args["mc_samples"],
                      seed=args["seed"] + (comm.rank if curv.random else 0), info=info,
                      autocast=check_autocast(a.get("autocast"), args["dtype"]))


def _sub_representation(rep: Pinned, sharding: Sharding, rank: int):
    """``rep`` for the blocks of ``rank``, numbered from its first."""
    first, last = sharding.blocks(rank)
    pinned = {b - first: name for b, name in rep.blocks.items() if first <= b < last}
    return Pinned(pinned, rep.rest) if pinned else rep.rest


def _fit_stores(comm: Comm, sharding: Sharding, a: dict, args: dict, lik,
                data) -> ShardedInverseFisher:
    r"""The fit of a curvature that keeps some blocks in a store of its own (the
    Kronecker-factored ones), by the ``"all_to_all"`` exchange: each owner feeds the column
    slices of its blocks of every rank's rows to the builders of its stores
    (:class:`ssse_ext.build.StoreBuild`), the rows' side payloads are summed onto the owners
    of their blocks (:func:`ssse.sharded_side.owned_side`), and a store that needs the rows
    twice (EK-FAC's eigenvalues, in bases known only from the summed factors) gets them in a
    second pass in which every rank takes part."""
    if comm.exchange == "reduce_scatter":
        raise ValueError(f"exchange='reduce_scatter' is not offered for curvature="
                         f"{args['curv'].name!r}: its blocks are built by their owners from "
                         "the rows' column slices (pass exchange='all_to_all' or 'auto')")
    dt, dev, fm = args["dtype"], args["device"], args["fm"]
    again = is_batch(data, fm.task) or not isinstance(data, Iterator)
    reread = all(r[0] for r in comm.ints([int(again)], "fit_inverse_fisher (re-readable data)"))

    def plan():
        return StoreBuild.planned(
            sharding.sub_layout(comm.rank),
            _sub_representation(args["representation"], sharding, comm.rank), dtype=dt,
            device=dev, damping=args["damping"], probe_vectors=args["probe_vectors"],
            max_memory=args["max_memory"], reread=reread)

    build, error = run_local(plan)
    comm.agree(error, "fit_inverse_fisher (the stores of the blocks)")
    budget = args["max_memory"]
    if args["chunk_size"] is None and budget is None:  # the rows get what the build leaves
        held = build.peak if dev == fm.device else 0
        budget = max(MIN_CHUNK_BYTES, int(MEMORY_SHARE * (available_memory(fm.device) - held)))
    before, info, sides = dict(comm.sent), {}, SideSum()
    total, per_sample = _exchange_pass(comm, sharding, _stream(args, a, comm, data, lik, info,
                                                               budget),
                                       info, dt, dev, _Gather([build], STORE_GATHER), sides)
    if total == 0:
        raise ValueError("data is empty on every rank: the Fisher needs at least one sample")
    side = owned_side(comm, sharding, sides.total, "fit_inverse_fisher", device=dev)
    more, error = run_local(lambda: (build.add_side(side) if side else None,
                                     build.another_pass())[1])
    if any(r[0] for r in comm.status([int(bool(more))], error,
                                     "fit_inverse_fisher (the side payload)")):
        _exchange_pass(comm, sharding, _stream(args, a, comm, data, lik, {}, budget),
                       info, dt, dev, _Gather([build], STORE_GATHER))
    curv = args["curv"]
    normalizer = total / (per_sample // curv.normalizer_weight(mc_samples=args["mc_samples"]))
    local, error = run_local(lambda: build.finish(normalizer, curvature=curv.name,
                                                  num_samples=total))
    comm.agree(error, "fit_inverse_fisher (the inverse of the blocks)")
    inv = ShardedInverseFisher(local, sharding, comm.rank, comm)
    inv.fit_stats = {"exchange": "all_to_all", "rows": total,
                     "bytes_sent": comm.sent_since(before, "rows", "side"),
                     "control_bytes": comm.sent_since(before, "control"),
                     "accumulator_bytes": None, "inverse_bytes": local.nbytes}
    return inv


def _plan(comm: Comm, sharding: Sharding, data, args: dict) -> tuple[str, int, int | None]:
    """The exchange (the same on every rank), the accumulators' bytes and the chunks' budget."""
    lay, dt, dev, fm = args["layout"], args["dtype"], args["device"], args["fm"]
    elem = torch.finfo(dt).bits // 8
    own = sharding.numel(comm.rank)
    n_local = data_size(data, fm.task)
    fits = 8 * lay.numel + own * elem <= MEMORY_SHARE * available_memory(dev)
    rows = comm.ints([int(fits), -1 if n_local is None else n_local],
                     "fit_inverse_fisher (exchange)")
    choice = choose_exchange(comm.exchange, comm.size, all(r[0] for r in rows),
                             None if any(r[1] < 0 for r in rows) else sum(r[1] for r in rows),
                             lay.numel, lay.dim, elem)
    acc_bytes = 8 * (lay.numel if choice == "reduce_scatter" else own)
    budget = args["max_memory"]
    if args["chunk_size"] is None and budget is None:
        fixed = acc_bytes + own * elem if dev == fm.device else 0
        free = int(MEMORY_SHARE * (available_memory(fm.device) - fixed))
        budget = max(1, min(free, max(int(CHUNK_SHARE_OF_INVERSE * own * elem),
                                      MIN_CHUNK_BYTES)))
    return choice, acc_bytes, budget


#: Rows gathered per call of the stores' builders in a fit over several processes.
STORE_GATHER = 256


def _chunks_with_status(stream, sides: SideSum | None = None):
    """``next(stream)`` as ``(chunk or None, error or None)``, the chunk's side payload (if
    any) stripped and added to ``sides``."""
    try:
        chunk, side = split_rows(next(stream, None))
        if side is not None and sides is not None:
            sides.add(side)
        return chunk, None
    except Exception as exc:  # agreed on with the other ranks before it is raised
        return None, exc


class _Gather:
    """Feeds accumulators chunks of at least ``acc.gather_rows`` rows (a kernel call on few
    rows is inefficient), concatenating smaller ones."""

    def __init__(self, accs: list, rows: int):
        self.accs, self.rows, self.held, self.count = accs, max(1, rows), [], 0

    def add(self, chunk: torch.Tensor) -> None:
        if chunk.shape[0] == 0:
            return
        self.held.append(chunk)
        self.count += chunk.shape[0]
        if self.count >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.held:
            return
        rows = self.held[0] if len(self.held) == 1 else torch.cat(self.held)
        self.held, self.count = [], 0
        for acc in self.accs:
            acc.add(rows)


def _fit_all_to_all(comm: Comm, sharding: Sharding, stream, info: dict, dt, dev):
    """Design (b): every chunk's column slices go to their owners, which accumulate their
    blocks over all rows. Returns (the accumulator, rows of all ranks, rows per sample)."""
    def allocate():
        acc = ssse_ext.GramAccumulator(sharding.sub_layout(comm.rank), dt, dev)
        return acc, _Gather([acc], acc.gather_rows)

    made, error = run_local(allocate)
    comm.agree(error, "fit_inverse_fisher (the accumulators)")
    acc, feed = made
    total, per_sample = _exchange_pass(comm, sharding, stream, info, dt, dev, feed)
    return acc, total, per_sample


def _exchange_pass(comm: Comm, sharding: Sharding, stream, info: dict, dt, dev, feed,
                   sides: SideSum | None = None) -> tuple[int, int]:
    """One pass of the rows of ``stream`` (all ranks'), each chunk's column slices to their
    owners, which ``feed`` them; the rows' side payloads go to ``sides`` (this rank's own).
    Returns (rows of all ranks, rows per sample).

    Every round starts with the ranks' status (rows of their next chunk, or done, or failed),
    so a rank whose gradients, accumulation or memory failed stops every rank at the next
    round."""
    width = sharding.width(comm.rank)
    done, total, per_sample, error = False, 0, 0, None
    while True:
        chunk = None
        if not done and error is None:
            chunk, error = _chunks_with_status(stream, sides)
            done = chunk is None and error is None
        m = 0 if chunk is None else chunk.shape[0]
        rows = comm.status([int(done), m, info.get("rows_per_sample", 0)], error,
                           "fit_inverse_fisher (the gradients of a chunk)")
        per_sample = max(per_sample, max(r[2] for r in rows))
        if all(r[0] for r in rows):
            break
        counts = [r[1] for r in rows]
        if sum(counts) == 0:
            continue
        if chunk is None:
            chunk = torch.zeros(0, sharding.layout.dim, dtype=dt)
        part = comm.all_to_all_rows(chunk, sharding, counts,
                                    "fit_inverse_fisher (exchange of gradient slices)")
        if width:  # a new receive buffer every round: safe to hold
            _, error = run_local(lambda: feed.add(part.to(dev)))
        total += sum(counts)
    _, error = run_local(feed.flush)
    comm.agree(error, "fit_inverse_fisher (the accumulation)")
    return total, per_sample


def choose_exchange(requested: str, size: int, all_fit: bool, rows: int | None, numel: int,
                     dim: int, elem: int) -> str:
    """The exchange ``"auto"`` stands for: ``"reduce_scatter"`` when every rank can hold the
    accumulators of all blocks and it sends fewer bytes than ``"all_to_all"`` would for
    ``rows`` rows in all (per rank: ``8 numel (P-1)/P`` against ``rows dim elem (P-1)/P^2``;
    unknown ``rows``: assumed many), else ``"all_to_all"``."""
    if requested != "auto":
        return requested
    fewer = rows is None or 8 * numel * size < rows * dim * elem
    return "reduce_scatter" if size > 1 and all_fit and fewer else "all_to_all"


def _fit_reduce_scatter(comm: Comm, sharding: Sharding, stream, info: dict, dt, dev):
    """Design (a): every rank accumulates all blocks for its rows; each owner then receives the
    sum of its blocks, one in-place reduce per group of accumulators."""
    rows_here = 0

    def accumulate():
        nonlocal rows_here
        accs = [ssse_ext.GramAccumulator(sharding.layout, dt, dev, first=f, last=l)
                for f, l in (sharding.blocks(r) for r in range(comm.size))]
        feed = _Gather(accs, accs[comm.rank].gather_rows)
        for chunk in stream:
            feed.add(chunk.to(dev))
            rows_here += chunk.shape[0]
        feed.flush()
        return accs

    accs, error = run_local(accumulate)
    rows = comm.status([rows_here, info.get("rows_per_sample", 0)], error,
                       "fit_inverse_fisher (the gradients)")
    total = sum(r[0] for r in rows)
    per_sample = max(r[1] for r in rows)
    for r, acc in enumerate(accs):
        for gram in acc.grams:
            comm.reduce_(gram, r, "fit_inverse_fisher (reduce of the Gram matrices)", "grams")
        if r != comm.rank:
            accs[r] = None  # freed as soon as its owner has it
    return accs[comm.rank], total, per_sample


def fit_samples(comm: Comm, eraser, inv: ShardedInverseFisher, train_data) -> int:
    """The training samples of all ranks an Eraser's sharded fit saw (``n``)."""
    if eraser.minibatch == 1:
        return round(inv.normalizer / get_curvature(eraser.curvature).normalizer_weight(
            mc_samples=eraser.mc_samples))
    sizes = comm.ints([data_size(train_data, eraser._fm.task)
                        if is_batch(train_data, eraser._fm.task) else -1],
                      "Eraser.fit (samples)")
    if any(s[0] < 0 for s in sizes):
        raise ValueError("n_total must be given with minibatch > 1 and an iterable "
                         "train_data (the fit counts mini-batches, not samples)")
    return sum(s[0] for s in sizes)
