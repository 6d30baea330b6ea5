"""``ssse erase``: erase training samples from a model. With ``--ledger`` the request is served
in place (:func:`ssse.service.serve_request`); otherwise the erased model is written to a new
file, and under torchrun every rank computes the gradients of its share of the samples."""

from __future__ import annotations

import sys
import time

import ssse
import ssse.sharding
import ssse_ext
from ssse.files import check_fitted_on, fitted_at
from ssse.service import (check_health, check_origin, erased_header, newton_refusal,
                          serve_request)

from ..common import (BUILT_IN_NAMES, FACTORY_OPTIONS, NAMES, UsageError, data_overrides,
                      distributed, dtype, load_fisher, load_model, out_path, task_from_meta)
from ..removal import choose_removal, removal

__all__ = ["run", "serve"]


def run(args) -> int:
    from ssse.io import save_model

    if args.retrain_above is not None and not args.verify:
        raise UsageError("--retrain-above needs --verify")
    if args.ledger:
        return serve(args)
    for option, given in (("--request-id", args.request_id is not None),
                          ("--verify", args.verify),
                          ("--retrain-above", args.retrain_above is not None)):
        if given:
            raise UsageError(f"{option} needs --ledger")
    model, meta = load_model(args)
    inv, fmeta = load_fisher(args, model)
    task = task_from_meta(args, model, meta)
    check_fitted_on(fmeta, task.n, NAMES)
    origin = check_origin(model, meta, fitted_at(args.fisher), names=NAMES)
    if isinstance(inv, ssse_ext.BlockInverseFisher):
        check_health(inv.health(warn=False), names=NAMES)
    before = [int(i) for i in meta.get("erased", [])]
    removed = removal(args, task.ds, before)
    t0 = time.perf_counter()
    state, how = _erase(args, model, inv, fmeta, task, removed, before)
    seconds = time.perf_counter() - t0
    if isinstance(inv, ssse.sharding.ShardedInverseFisher) and inv.rank != 0:
        return 0  # every rank holds the same parameters: rank 0 writes them
    model.load_state_dict(state)
    path = save_model(out_path(args, "erased.safetensors"), model, spec=meta.get("spec"),
                      **erased_header(meta, set(before) | set(removed.tolist()),
                                      epsilon=args.epsilon, variant=args.variant,
                                      origin=origin, n_train=task.n))
    print(f"erased {removed.numel()} of {task.n - len(before)} samples with {how} in "
          f"{seconds:.3f} s")
    print(path)
    return 0


def _erase(args, model, inv, fmeta, task, removed, before) -> tuple[dict, str]:
    """The erased parameters (SSSE, or the Newton step without ε) and how they were found;
    with a sharded inverse, every rank takes the gradients of its share of ``removed``."""
    comm = inv.comm if isinstance(inv, ssse.sharding.ShardedInverseFisher) else None
    if comm is not None:
        mine = removed[list(comm.share(removed.numel()))]
        data = task.data(mine) if mine.numel() else []
        if args.refine_steps:
            raise UsageError("--refine-steps: the sharded Newton erasure takes the Newton step "
                             "only")
    else:
        data = task.data(removed)
    if args.epsilon is not None:
        # samples erased by earlier requests are no longer part of D: n counts what remains
        state = ssse.ssse_update(model, task.loss_fn, data, inv_fisher=inv,
                                 epsilon=args.epsilon, n_total=task.n - len(before),
                                 weight_decay=task.weight_decay, fisher=args.variant,
                                 minibatch=int(fmeta.get("minibatch", 1)), comm=comm,
                                 params=args.params)
        return state, f"ε={args.epsilon:g} ({args.variant} Fisher)"
    refusal = newton_refusal(inv.curvature, NAMES)
    if refusal:
        raise UsageError(refusal)
    if before:
        raise UsageError("the Newton erasure needs the inverse of the data left; this model "
                         "already had samples erased with an inverse of the whole training "
                         "set: erase them in one request, or refit the inverse")
    state = ssse.newton_erase(model, task.loss_fn, data, inv_fisher=inv, n_total=task.n,
                              weight_decay=task.weight_decay, likelihood=task.likelihood,
                              refine_steps=args.refine_steps, comm=comm, params=args.params)
    return state, f"the leave-k-out Newton step ({args.refine_steps} refinement steps)"


def serve(args) -> int:
    """``ssse erase --ledger``: one request served in place."""
    if distributed(args):
        raise UsageError("--ledger: requests are served by one process; run it without "
                         "torchrun")
    given = [option for attr, option in FACTORY_OPTIONS.items() if getattr(args, attr)]
    if given:
        raise UsageError(f"{given[0]}: requests served with --ledger rebuild the model and its "
                         "training set from the model file's built-in architecture and data "
                         "set; run it without --ledger")
    served = serve_request(
        args.model, args.fisher, args.ledger, lambda ds: choose_removal(args, ds),
        epsilon=args.epsilon, request_id=args.request_id, variant=args.variant,
        refine_steps=args.refine_steps, data=data_overrides(args), device=args.device,
        dtype=dtype(args), names=BUILT_IN_NAMES, verify=args.verify,
        retrain_above=args.retrain_above,
        on_recover=lambda line: print(f"ssse erase: {line}", file=sys.stderr))
    how = (f"ε={args.epsilon:g} ({args.variant} Fisher)" if args.epsilon is not None else
           f"the leave-k-out Newton step ({args.refine_steps} refinement steps)")
    health = served.health
    print(f"erased {len(served.ids)} of {served.n_before} samples with {how} in "
          f"{served.seconds:.3f} s; request {served.request_id} recorded in {args.ledger}"
          + (f" (health {health['residual']:.1e})" if health else ""))
    cert = served.entry.get("certificate")
    if cert is not None:
        print(f"certificate: gradient residual {cert['residual']:.3e} on the "
              f"{cert['n_retained']} samples kept"
              + ("; retrain recommended" if cert["retrain_recommended"] else ""))
    print(args.model)
    return 0
