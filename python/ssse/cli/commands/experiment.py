"""``ssse experiment NAME``: one of the paper's experiments (``ssse.experiments.NAME.run``),
its results written to ``--out`` whole or not at all; with ``--seeds``, each seed's result
also lands in ``--out/seeds`` as soon as it is done, and a later run with the same options
reads the seeds found there instead of computing them again."""

from __future__ import annotations

import importlib
from pathlib import Path

from ssse.io import atomic_folder

from ..common import UsageError, dtype

__all__ = ["run"]

#: Options of the nonconvex experiment only (and ``methods`` of the forgetting test).
NONCONVEX_OPTIONS = ("model", "layout", "block_size", "representation", "methods",
                     "grid_points")
OWN_OPTIONS = {"nonconvex": NONCONVEX_OPTIONS, "forgetting": ("methods",)}


def run(args) -> int:
    module = importlib.import_module(f"ssse.experiments.{args.name}")
    # another data set than the experiment's own gets its own folder, not the default one's
    out = Path(args.out or (f"results/{args.name}" if args.data is None else
                            f"results/{args.name}_{args.data}"))
    kwargs = {"quick": args.quick, "seed": args.seed, "device": args.device,
              "progress": not args.quiet, "data": args.data, "data_dir": args.data_dir,
              "repeats": args.repeats}
    if args.seeds is not None:
        if args.seed != 0:
            raise UsageError("give --seed or --seeds, not both")
        del kwargs["seed"]
        # each seed's result lands in --out as soon as it is done: a run that stops keeps it
        kwargs["seeds"], kwargs["seed_dir"] = args.seeds, out / "seeds"
    if args.dtype:
        kwargs["dtype"] = dtype(args)
    extra = {k: getattr(args, k) for k in NONCONVEX_OPTIONS if getattr(args, k) is not None}
    if args.minibatch not in (None, getattr(module, "MINIBATCH", None)):
        raise UsageError(f"--minibatch: the non-convex experiment's mini-batch Fisher uses "
                         f"batches of 10, got {args.minibatch}")
    foreign = [k for k in extra if k not in OWN_OPTIONS.get(args.name, ())]
    if foreign:
        raise UsageError(f"--{foreign[0].replace('_', '-')} applies to the nonconvex "
                         "experiment only" + (" (and --methods to forgetting)"
                                              if foreign[0] == "methods" else ""))
    with atomic_folder(out) as stage:
        summary = module.run(out=stage, **kwargs, **extra)
    print(summary.rstrip("\n"))
    print(out / "results.json")
    return 0
