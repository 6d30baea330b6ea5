"""``ssse sweep``: SSSE over an ε grid for one removal, against the original model and one
retrained without the samples (:func:`ssse.experiments.sweep.run_sweep`)."""

from __future__ import annotations

from pathlib import Path

from ssse.files import check_file, check_fitted_on
from ssse.io import atomic_folder

from ..common import NAMES, UsageError, load_fisher, load_model, task_from_meta
from ..removal import removal

__all__ = ["run"]


def run(args) -> int:
    from ssse.experiments.sweep import run_sweep

    model, meta = load_model(args)
    if meta.get("erased"):
        raise UsageError("--model already had samples erased; sweep compares erasure with "
                         "retraining from the trained model (ssse train)")
    inv, fmeta = load_fisher(args, model)
    task = task_from_meta(args, model, meta)
    check_fitted_on(fmeta, task.n, NAMES)
    removed = removal(args, task.ds)
    reference = _reference(args, model, meta, task) if args.reference else None
    classes = None if args.remove_class is None else args.remove_class.in_order()
    with atomic_folder(args.out) as stage:
        report = run_sweep(task, model, inv, removed, out=stage, eps=args.eps,
                           reference=reference, classes=classes,
                           attribute=args.remove_attribute, seed=int(meta.get("seed", args.seed)),
                           minibatch=int(fmeta.get("minibatch", 1)), progress=not args.quiet)
    print(report["table"], end="")
    print(Path(args.out) / "sweep.json")
    return 0


def _reference(args, model, meta, task):
    """The model of ``--reference``, refused unless the metrics can compare it with
    ``model``: the same architecture, trained on the same data set."""
    from ssse.io import load_model as load_model_file

    reference, ref_meta = load_model_file(check_file(args.reference, "--reference"),
                                          device=args.device,
                                          dtype=next(model.parameters()).dtype)
    if ref_meta["spec"] != meta["spec"]:
        raise UsageError(f"--reference: {args.reference} is another model ("
                         f"{ref_meta['spec']}) than --model ({meta['spec']})")
    ref_data = ref_meta.get("data", {}).get("name")
    if ref_data is not None and ref_data != task.ds.name:
        raise UsageError(f"--reference: {args.reference} was trained on {ref_data}, "
                         f"--model on {task.ds.name}")
    return reference
