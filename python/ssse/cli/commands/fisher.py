"""``ssse fisher``: fit the block inverse Fisher of a model on its training set and save it;
under torchrun, every rank fits and writes its share of the blocks."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import ssse

from ..common import (UsageError, choose_parameters, distributed, load_model, out_path,
                      task_from_meta)

__all__ = ["fisher_distributed", "run"]


def run(args) -> int:
    from ssse.io import save_inverse_fisher

    model, meta = load_model(args)
    args.params = choose_parameters(args, model)
    task = task_from_meta(args, model, meta)
    damping = _damping(args, task)
    if distributed(args):
        if args.params is not None:
            raise UsageError("--params: the index of a sharded fit under torchrun does not "
                             "record the parameters; run it without torchrun")
        if args.checkpoint:
            raise UsageError("--checkpoint: the sharded fit under torchrun is not resumable; "
                             "run it without --checkpoint")
        if args.representation == "dual":
            raise UsageError("--representation dual: the sharded fit under torchrun stores "
                             "dense blocks; run it without torchrun, or with dense or auto")
        return fisher_distributed(args, model, task, damping)
    resumed = _resumed(args)
    t0 = time.perf_counter()
    try:
        inv = ssse.fit_inverse_fisher(model, task.loss_fn, task.data(), damping=damping,
                                      block_size=args.block_size, layout=args.layout,
                                      weight_decay=task.weight_decay, minibatch=args.minibatch,
                                      curvature=args.curvature, likelihood=task.likelihood,
                                      mc_samples=args.mc_samples, seed=args.seed,
                                      progress=not args.quiet, checkpoint=args.checkpoint,
                                      every=args.every, representation=args.representation,
                                      params=args.params)
    except ValueError as exc:
        if "layout" not in str(exc):
            raise
        raise UsageError(f"--layout {args.layout}: {exc}") from None
    seconds = time.perf_counter() - t0
    health = inv.health(warn=False)
    theta_star = torch.cat([p.detach().reshape(-1) for p in model.parameters()
                            if p.requires_grad])
    path = save_inverse_fisher(out_path(args, "inverse_fisher.safetensors"), inv,
                               extra={"theta_star": theta_star},
                               model=str(Path(args.model).name), minibatch=args.minibatch,
                               mc_samples=args.mc_samples, n_train=task.n, seconds=seconds)
    if args.checkpoint:
        Path(args.checkpoint).unlink(missing_ok=True)
    dual = inv.representation.count("dual")
    dual = f", {dual} in the low-rank form, {inv.nbytes / 2**20:.1f} MiB" if dual else ""
    print(f"inverse Fisher ({inv.curvature}): d={inv.dim}, {inv.layout.num_blocks} blocks "
          f"(largest {inv.layout.max_block_size}{dual}), λ={inv.damping:g}, "
          f"N={inv.normalizer:g}, {inv.dtype}, fitted in {seconds:.2f} s{resumed}; health "
          f"{health.residual:.1e} (threshold {health.tolerance:.1e})")
    print(path)
    return 0


def _damping(args, task) -> float:
    """λ, after the checks of the options that depend on the training set."""
    # rows with the weight decay in them: the paper's 1e-3; otherwise the regulariser's
    # curvature is the damping's part (ssse.curvature.Curvature.includes_weight_decay)
    own = ssse.curvature.get_curvature(args.curvature).includes_weight_decay
    damping = args.damping or (1e-3 if own else task.weight_decay)
    if not damping > 0:
        raise UsageError(f"--curvature {args.curvature}: the model was trained without weight "
                         "decay; give --damping")
    if args.every is not None and args.checkpoint is None:
        raise UsageError("--every needs --checkpoint")
    if args.minibatch > task.n:
        raise UsageError(f"--minibatch {args.minibatch}: the training set has {task.n} samples")
    if args.every is not None and args.every % args.minibatch:
        raise UsageError(f"--every {args.every}: a checkpoint cannot split a mini-batch; give a "
                         f"multiple of --minibatch {args.minibatch}")
    return damping


def _resumed(args) -> str:
    """What the fit resumes from (empty: a fresh fit)."""
    if not args.checkpoint or not Path(args.checkpoint).exists():
        return ""
    from ssse.io import FileFormatError, load_checkpoint
    try:
        cursor = load_checkpoint(args.checkpoint)[1].get("cursor")
    except FileFormatError:
        return ""  # the fit refuses it with the reason
    return f" (resumed from {args.checkpoint} at sample {cursor})"


def fisher_distributed(args, model, task, damping) -> int:
    """``ssse fisher`` under torchrun: every rank fits its blocks from its share of the
    samples, and writes its file; rank 0 writes the index."""
    from ssse.sharding import ShardedInverseFisher, save_sharded

    comm = args.comm
    mine = torch.arange(task.n)[list(comm.share(task.n))]
    t0 = time.perf_counter()
    try:
        inv = ssse.fit_inverse_fisher(
            model, task.loss_fn, task.data(mine) if mine.numel() else [], damping=damping,
            block_size=args.block_size, layout=args.layout, weight_decay=task.weight_decay,
            minibatch=args.minibatch, curvature=args.curvature, likelihood=task.likelihood,
            mc_samples=args.mc_samples, seed=args.seed, progress=False, comm=comm)
    except ValueError as exc:
        if "layout" not in str(exc):
            raise
        raise UsageError(f"--layout {args.layout}: {exc}") from None
    seconds = time.perf_counter() - t0
    if not isinstance(inv, ShardedInverseFisher):  # one rank fits as one process does
        inv = ShardedInverseFisher.from_full(inv, comm=comm)
        inv.fit_stats = {"exchange": "none", "bytes_sent": 0}
    path = save_sharded(out_path(args, "inverse_fisher.index.json"), inv, comm=comm,
                        model=str(Path(args.model).name), minibatch=args.minibatch,
                        n_train=task.n, seconds=seconds)
    if inv.rank == 0:
        stats = inv.fit_stats
        print(f"inverse Fisher ({inv.curvature}): d={inv.dim}, {inv.layout.num_blocks} blocks "
              f"(largest {inv.layout.max_block_size}) on {inv.world_size} ranks, "
              f"λ={inv.damping:g}, N={inv.normalizer:g}, {inv.dtype}, fitted in "
              f"{seconds:.2f} s ({stats['exchange']}, rank 0 sent {stats['bytes_sent']} bytes)")
        print(path)
    return 0
