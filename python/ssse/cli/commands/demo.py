"""``ssse demo``: train, erase part of a class, retrain, compare
(:func:`ssse.experiments.demo.run_demo`)."""

from __future__ import annotations

import contextlib

import torch

from ssse.io import atomic_folder

from ..common import dtype

__all__ = ["run"]


def run(args) -> int:
    from ssse.experiments.demo import run_demo

    with contextlib.ExitStack() as stack:
        where = stack.enter_context(atomic_folder(args.out)) if args.out else None
        out = run_demo(data=args.data, data_dir=args.data_dir, train_limit=args.train_limit,
                       remove_class=args.remove_class, fraction=args.fraction,
                       damping=args.damping, eps=args.eps, seed=args.seed, device=args.device,
                       dtype=dtype(args, torch.float64), out=where, progress=not args.quiet)
    # the demo names the files it wrote where they were staged; they are now in --out
    text = out["text"] if where is None else out["text"].replace(str(where), str(args.out))
    print(text, end="")
    return 0
