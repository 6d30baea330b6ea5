"""The ``ssse`` command: ``demo``, ``train``, ``fisher``, ``erase``, ``sweep``, ``experiment``,
``bench`` and ``info``. Run ``ssse SUBCOMMAND --help``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import ssse
import ssse.distributed
from ssse import metrics

from ssse_ext import validation

from .experiments.common import EPS_GRID

__all__ = ["main"]

EXPERIMENTS = ("illustration", "multiattribute", "multinomial", "nonconvex")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_GRID_TEXT = ":".join(f"{v:g}" for v in EPS_GRID)


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2, one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- argument types: text -> value, checked by the library's own validation ----------------

def _checked(convert, check, what: str):
    def parse(text: str):
        try:
            return check(convert(text), "value")
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    parse.__name__ = what  # argparse names the type in its messages
    return parse


_positive_float = _checked(float, validation.check_positive_float, "a number > 0")
_nonneg_float = _checked(float, validation.check_nonneg_float, "a number >= 0")
_positive_int = _checked(int, validation.check_positive_int, "an integer > 0")
_nonneg_int = _checked(int, validation.check_nonneg_int, "an integer >= 0")


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    """``"3"``, ``"1,4,7"`` or ranges ``"0-9,12"``."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if part[0] != "-" else ("-" + part[1:].split("-")[0],
                                                                  part[1:].split("-", 1)[1])
                a, b = int(a), int(b)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers or ranges like 0-9,12, got "
                                             f"{text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def _eps_range(text: str) -> tuple[float, float, int]:
    """``LO:HI:NUM`` (log-spaced)."""
    try:
        lo, hi, num = text.split(":")
        lo, hi, num = float(lo), float(hi), int(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI:NUM, got {text!r}") from None
    if not (0 < lo <= hi) or num < 1:
        raise argparse.ArgumentTypeError(f"expected 0 < LO <= HI and NUM >= 1, got {text!r}")
    return lo, hi, num


# ---- parser -------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, *, out_default: str | None = "ssse-out",
            dtype_default: str | None = None, out_help: str | None = None) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default=dtype_default,
                   help="compute dtype (default: float64 for convex models, float32 for the CNN)")
    g.add_argument("--seed", type=int, default=0, help="seed of data splits, removal sets and "
                   "training (default: 0)")
    g.add_argument("--out", default=out_default, metavar="DIR",
                   help=f"output directory (default: {out_help or out_default})")
    g.add_argument("--quiet", action="store_true", help="no progress bars, print only results")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")


def _data_args(p: argparse.ArgumentParser, *, default: str | None = "digits") -> None:
    from .data import DATASETS

    p.add_argument("--data", choices=DATASETS, default=default,
                   help=f"data set (default: {default or 'the one recorded in the model file'})")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="directory with the data files (Fashion-MNIST idx files, yeast.csv)")
    p.add_argument("--train-limit", type=_positive_int, default=None, metavar="N",
                   help="use a random subset of N training samples")


def _removal_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("samples to erase (one of)")
    g.add_argument("--indices", type=_int_list, default=None, metavar="LIST",
                   help="training-set indices, e.g. 0-9,42")
    g.add_argument("--indices-file", default=None, metavar="FILE",
                   help="a JSON list or whitespace/comma-separated integers")
    g.add_argument("--remove-class", type=_int_list, default=None, metavar="C",
                   help="erase a fraction of the samples of these classes")
    g.add_argument("--remove-attribute", type=int, default=None, metavar="A",
                   help="erase a fraction of the samples carrying attribute A (multi-label)")
    g.add_argument("--fraction", type=_fraction, default=0.5,
                   help="fraction of the class/attribute to erase (default: 0.5)")


def _distributed_args(p: argparse.ArgumentParser, *, fit: bool) -> None:
    from ssse import distributed

    g = p.add_argument_group("under torchrun (torchrun --nproc-per-node=K -m ssse ...): every "
                             "rank holds its share of the blocks and of the samples")
    if fit:
        g.add_argument("--exchange", choices=list(distributed.EXCHANGES), default="auto",
                       help="reduce_scatter: every rank accumulates all blocks for its rows "
                       "(fewest bytes); all_to_all: gradient slices go to the blocks' owners "
                       "(1/K of the memory); auto: reduce_scatter when it fits and sends "
                       "fewer bytes (default: auto)")
    g.add_argument("--timeout", type=_positive_float, default=distributed.DEFAULT_TIMEOUT,
                   metavar="SECONDS", help="how long a rank waits for the others before it "
                   f"gives up (default: {distributed.DEFAULT_TIMEOUT:g})")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train, erase part of a class, retrain, compare (< 1 min)",
                       description="End to end on a small data set: train an L2 logistic "
                       "regression, fit the inverse Fisher, erase part of a class with SSSE, "
                       "retrain from scratch without it, sweep ε and print a verdict table.")
    _data_args(p)
    p.add_argument("--remove-class", type=int, default=3, metavar="C",
                   help="class to erase part of (default: 3)")
    p.add_argument("--fraction", type=_fraction, default=0.5,
                   help="fraction of the class to erase (default: 0.5)")
    p.add_argument("--damping", type=_positive_float, default=None,
                   help="Fisher damping λ (default: per data set)")
    p.add_argument("--eps", type=_eps_range, default=None, metavar="LO:HI:NUM",
                   help=f"ε grid (default: {_GRID_TEXT})")
    _common(p, out_default=None, out_help="nothing is written")
    p.set_defaults(func=_cmd_demo)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a data set and save it",
                       description="Train the experiments' model for a data set (linear for "
                       "digits/yeast, or --model resnet) and save it as a safetensors file.")
    _data_args(p)
    p.add_argument("--model", choices=["linear", "resnet"], default="linear")
    p.add_argument("--weight-decay", type=_nonneg_float, default=None,
                   help="L2 coefficient (default: per data set)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="SGD epochs (resnet)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="model file (default: DIR/model.safetensors)")
    _common(p)
    p.set_defaults(func=_cmd_train)


def _add_fisher(sub) -> None:
    p = sub.add_parser("fisher", help="fit and save the inverse Fisher of a model",
                       description="Fit the block inverse of the damped empirical Fisher (or "
                       "of the Gauss-Newton matrix, or a Monte-Carlo true Fisher) of a model on "
                       "its training set and save it (safetensors).")
    p.add_argument("--model", required=True, metavar="FILE", help="model file (ssse train)")
    _data_args(p, default=None)
    p.add_argument("--damping", type=_positive_float, default=None,
                   help="λ (default: 1e-3 for the empirical Fisher; the model's weight decay "
                   "for ggn and mc, which makes the stored matrix the training objective's "
                   "curvature)")
    p.add_argument("--curvature", choices=list(ssse.curvature.CURVATURES), default="empirical",
                   help="empirical (the paper's), ggn (Gauss-Newton: erase without ε) or mc "
                   "(sampled labels) (default: empirical)")
    p.add_argument("--mc-samples", type=_positive_int, default=1,
                   help="label draws per sample for --curvature mc (default: 1)")
    p.add_argument("--block-size", type=_positive_int, default=None, metavar="B",
                   help="largest block (default: 1024)")
    p.add_argument("--layout", choices=["per_parameter", "fixed", "rows"],
                   default="per_parameter", help="block layout; rows = one block per output "
                   "row of a linear model (default: per_parameter)")
    p.add_argument("--minibatch", type=_positive_int, default=1,
                   help="mean gradients of mini-batches of this size (default: 1)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="inverse-Fisher file (default: DIR/inverse_fisher.safetensors; under "
                   "torchrun the index of one file per rank, DIR/inverse_fisher.index.json)")
    _distributed_args(p, fit=True)
    _common(p)
    p.set_defaults(func=_cmd_fisher)


def _add_erase(sub) -> None:
    p = sub.add_parser("erase", help="serve a deletion request: model + inverse + indices",
                       description="Apply the SSSE update (paper eq. 8) to erase training "
                       "samples and save the new model.")
    p.add_argument("--model", required=True, metavar="FILE")
    p.add_argument("--fisher", required=True, metavar="FILE", help="inverse-Fisher file")
    _data_args(p, default=None)
    _removal_args(p)
    p.add_argument("--epsilon", type=_positive_float, default=None,
                   help="ε of eq. 8; omit it with a Gauss-Newton inverse (ssse fisher "
                   "--curvature ggn) for the leave-k-out Newton step, nothing to tune")
    p.add_argument("--refine-steps", type=_nonneg_int, default=0,
                   help="refinement steps of the Newton erasure (default: 0)")
    p.add_argument("--variant", choices=["full", "leave_k_out"], default="full",
                   help="Fisher of D (paper) or of D∖S (default: full)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="erased model file (default: DIR/erased.safetensors)")
    _distributed_args(p, fit=False)
    _common(p)
    p.set_defaults(func=_cmd_erase)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="ε grid against a retrained reference: metrics + plots",
                       description="Sweep ε of the SSSE update for one removal, compare every "
                       "model with the original and a model retrained without the samples, "
                       "and write sweep.json and PNG plots.")
    p.add_argument("--model", required=True, metavar="FILE")
    p.add_argument("--fisher", required=True, metavar="FILE")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="model retrained without the samples (default: retrain now)")
    _data_args(p, default=None)
    _removal_args(p)
    p.add_argument("--eps", type=_eps_range, default=EPS_GRID, metavar="LO:HI:NUM",
                   help=f"ε grid (default: {_GRID_TEXT})")
    _common(p)
    p.set_defaults(func=_cmd_sweep)


def _add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="run one of the paper's experiments",
                       description="Run an experiment of the paper and write results.json, "
                       "results.md and PNG plots to --out.")
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    p.add_argument("--data", default=None, help="data set (multinomial: digits or "
                   "fashion-mnist; nonconvex: fashion-mnist or digits)")
    p.add_argument("--data-dir", default=None, metavar="DIR")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="removals per setting for mean ± std")
    _common(p, out_default=None, out_help="results/NAME")
    p.set_defaults(func=_cmd_experiment)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="the kernel benchmark (ssse bench --help), or with --model "
                       "the real-model benchmark (ssse bench --model --help)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="build information and devices",
                       description="Print how the kernels were built, the devices torch sees "
                       "and which data sets are available offline.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ssse", description="Single-Step Sample Erasure: erase training "
                     "samples from a trained model in one closed-form step.")
    try:
        from importlib.metadata import version
        v = version("ssse")
    except Exception:  # pragma: no cover
        v = "unknown"
    parser.add_argument("--version", action="version", version=f"ssse {v}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_demo, _add_train, _add_fisher, _add_erase, _add_sweep, _add_experiment,
                _add_bench, _add_info):
        add(sub)
    return parser


# ---- helpers ------------------------------------------------------------------------------

def _setup(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "device", None):
        try:
            dev = validation.check_device(args.device, "--device")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        args.device = dev
    if _distributed(args):
        # torchrun: one process per device (NCCL between GPUs, gloo on CPUs)
        ssse.distributed.init(device=args.device, timeout=args.timeout)
        if args.device.type == "cuda":
            args.device = torch.device("cuda", torch.cuda.current_device())


def _distributed(args) -> bool:
    """Whether this command runs sharded: ``fisher`` and ``erase`` under torchrun."""
    return args.command in ("fisher", "erase") and ssse.distributed.launched()


def _dtype(args, default: torch.dtype) -> torch.dtype:
    return _DTYPES[args.dtype] if getattr(args, "dtype", None) else default


def _say(args, *lines) -> None:
    if not getattr(args, "quiet", False):
        for line in lines:
            print(line, file=sys.stderr)


def _check_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what}: no such file: {path}")
    return p


def _load_model_file(args):
    from .io import FileFormatError, load_model

    path = _check_file(args.model, "--model")
    try:
        model, meta = load_model(path, device=args.device,
                                 dtype=_DTYPES[args.dtype] if args.dtype else None)
    except FileFormatError as exc:
        raise UsageError(str(exc)) from None
    return model.eval(), meta


def _task_from_meta(args, model, meta):
    from .experiments.tasks import task_from_metadata

    data = dict(meta.get("data", {}))
    if getattr(args, "data", None):
        data["name"] = args.data
    if getattr(args, "data_dir", None):
        data["data_dir"] = args.data_dir
    if getattr(args, "train_limit", None):
        data["train_limit"] = args.train_limit
    task = task_from_metadata(meta, data, dtype=next(model.parameters()).dtype,
                              device=args.device)
    trained_on = meta.get("n_train")
    if trained_on is not None and int(trained_on) != task.n:
        raise UsageError(f"the model was trained on {trained_on} samples, but --data/"
                         f"--train-limit give {task.n}: indices would point at other samples")
    x = task.ds.x_train[:1].to(args.device)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError:
        raise UsageError(f"the model ({meta['spec']}) does not take the inputs of data set "
                         f"{task.ds.name!r} (shape {tuple(x.shape[1:])})") from None
    return task


def _check_fisher_matches(fmeta: dict, task) -> None:
    fitted_on = fmeta.get("n_train")
    if fitted_on is not None and int(fitted_on) != task.n:
        raise UsageError(f"--fisher was fitted on {fitted_on} samples, the training set has "
                         f"{task.n}")


def _removal(args, task, erased=()) -> torch.Tensor:
    removed = _choose_removal(args, task)
    again = sorted(set(removed.tolist()) & set(erased))
    if again:
        raise UsageError(f"{len(again)} of these samples were already erased from this model "
                         f"(e.g. {again[:5]}); choose others (or another --seed)")
    if removed.numel() + len(erased) >= task.n:
        raise UsageError("cannot erase the whole training set")
    return removed


def _choose_removal(args, task) -> torch.Tensor:
    from .data import attribute_removal, class_removal

    chosen = [a for a in ("indices", "indices_file", "remove_class", "remove_attribute")
              if getattr(args, a) is not None]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --indices, --indices-file, --remove-class, "
                         "--remove-attribute")
    n = task.n
    if args.indices is not None or args.indices_file is not None:
        if args.indices is not None:
            idx = args.indices
        else:
            text = _check_file(args.indices_file, "--indices-file").read_text()
            try:
                idx = json.loads(text) if text.lstrip().startswith("[") else \
                    [int(t) for t in text.replace(",", " ").split()]
                idx = [int(i) for i in idx]
            except ValueError:
                raise UsageError(f"--indices-file: {args.indices_file} does not hold a list "
                                 "of integers") from None
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise UsageError(f"indices out of range [0, {n}): {bad[:5]}")
        if len(set(idx)) >= n:
            raise UsageError("cannot erase the whole training set")
        return torch.tensor(sorted(set(idx)), dtype=torch.int64)
    y = task.ds.y_train
    if args.remove_attribute is not None:
        if task.ds.task != "multilabel" or not 0 <= args.remove_attribute < y.shape[1]:
            raise UsageError(f"--remove-attribute {args.remove_attribute}: the data set has no "
                             "such attribute")
        return attribute_removal(y, args.remove_attribute, args.fraction, seed=args.seed)
    if task.ds.task == "multilabel":
        raise UsageError("--remove-class needs a multiclass data set; use --remove-attribute")
    for c in args.remove_class:
        if not 0 <= c < task.ds.num_classes:
            raise UsageError(f"--remove-class {c}: classes are 0..{task.ds.num_classes - 1}")
    return class_removal(y, args.remove_class, args.fraction, seed=args.seed)


def _out_path(args, name: str) -> Path:
    if getattr(args, "output", None):
        return Path(args.output)
    return Path(args.out) / name


# ---- commands -----------------------------------------------------------------------------

def _cmd_info(args) -> int:
    import platform

    import ssse_ext

    from .data import DataUnavailableError, FASHION_MNIST_DIR, yeast_file

    info = {"ssse": ssse_ext.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "build": ssse_ext.build_info(),
            "cuda_available": torch.cuda.is_available(),
            "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                                  for i in range(torch.cuda.device_count())]}
    data = {"digits": "bundled with scikit-learn"}
    fm = [p for p in FASHION_MNIST_DIR.glob("*-ubyte*")] if FASHION_MNIST_DIR.is_dir() else []
    data["fashion-mnist"] = (str(FASHION_MNIST_DIR) if len(fm) >= 4 else
                             "not installed (apt-get install dataset-fashion-mnist, "
                             "or --data-dir)")
    try:
        data["yeast"] = str(yeast_file(None))
    except DataUnavailableError:
        data["yeast"] = "not found (pip install river, or --data-dir with yeast.csv)"
    info["data"] = data
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = 20
    for key in ("ssse", "torch", "python", "threads", "cuda_available"):
        print(f"{key:<{width}} {info[key]}")
    for key, value in info["build"].items():
        if key != "version":
            print(f"{key:<{width}} {value}")
    print(f"{'devices':<{width}} {', '.join(info['devices'])}")
    for key, value in data.items():
        print(f"{'data ' + key:<{width}} {value}")
    return 0


def _cmd_train(args) -> int:
    from .experiments.tasks import make_task
    from .io import save_model

    task = make_task(args.data, model=args.model, data_dir=args.data_dir, seed=args.seed,
                     train_limit=args.train_limit, device=args.device,
                     dtype=_DTYPES[args.dtype] if args.dtype else None,
                     weight_decay=args.weight_decay, epochs=args.epochs)
    t0 = time.perf_counter()
    model = task.train(task.data(), seed=args.seed, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    path = save_model(_out_path(args, "model.safetensors"), model, spec=task.spec,
                      **task.metadata(seed=args.seed, train_seconds=seconds))

    def accuracy(data):
        return metrics.accuracy(metrics.predict(model, data), data[1])

    print(f"trained {task.spec['arch']} on {task.ds.name} (n={task.n}) in {seconds:.2f} s: "
          f"train accuracy {accuracy(task.ds.train()):.4f}, "
          f"test accuracy {accuracy(task.ds.test()):.4f}")
    print(path)
    return 0


def _cmd_fisher(args) -> int:
    from .io import save_inverse_fisher

    model, meta = _load_model_file(args)
    task = _task_from_meta(args, model, meta)
    damping = args.damping or (1e-3 if args.curvature == "empirical" else task.weight_decay)
    if not damping > 0:
        raise UsageError(f"--curvature {args.curvature}: the model was trained without weight "
                         "decay; give --damping")
    if _distributed(args):
        return _fisher_distributed(args, model, task, damping)
    t0 = time.perf_counter()
    try:
        inv = ssse.fit_inverse_fisher(model, task.loss_fn, task.data(), damping=damping,
                                      block_size=args.block_size, layout=args.layout,
                                      weight_decay=task.weight_decay, minibatch=args.minibatch,
                                      curvature=args.curvature, likelihood=task.likelihood,
                                      mc_samples=args.mc_samples, seed=args.seed,
                                      progress=not args.quiet)
    except ValueError as exc:
        if "layout" not in str(exc):
            raise
        raise UsageError(f"--layout {args.layout}: {exc}") from None
    seconds = time.perf_counter() - t0
    path = save_inverse_fisher(_out_path(args, "inverse_fisher.safetensors"), inv,
                               model=str(Path(args.model).name), minibatch=args.minibatch,
                               n_train=task.n, seconds=seconds)
    print(f"inverse Fisher ({inv.curvature}): d={inv.dim}, {inv.layout.num_blocks} blocks "
          f"(largest {inv.layout.max_block_size}), λ={inv.damping:g}, N={inv.normalizer:g}, "
          f"{inv.dtype}, fitted in {seconds:.2f} s")
    print(path)
    return 0


def _fisher_distributed(args, model, task, damping) -> int:
    """``ssse fisher`` under torchrun: every rank fits its blocks from its share of the
    samples, and writes its file; rank 0 writes the index."""
    from ssse import distributed

    mine = torch.arange(task.n)[list(distributed.share(task.n))]
    t0 = time.perf_counter()
    try:
        inv = distributed.fit_inverse_fisher(
            model, task.loss_fn, task.data(mine) if mine.numel() else [], damping=damping,
            block_size=args.block_size, layout=args.layout, weight_decay=task.weight_decay,
            minibatch=args.minibatch, curvature=args.curvature, likelihood=task.likelihood,
            mc_samples=args.mc_samples, seed=args.seed, exchange=args.exchange)
    except ValueError as exc:
        if "layout" not in str(exc):
            raise
        raise UsageError(f"--layout {args.layout}: {exc}") from None
    seconds = time.perf_counter() - t0
    path = distributed.save_inverse_fisher(
        _out_path(args, "inverse_fisher.index.json"), inv, model=str(Path(args.model).name),
        minibatch=args.minibatch, n_train=task.n, seconds=seconds)
    if inv.rank == 0:
        stats = inv.fit_stats
        print(f"inverse Fisher ({inv.curvature}): d={inv.dim}, {inv.layout.num_blocks} blocks "
              f"(largest {inv.layout.max_block_size}) on {inv.world_size} ranks, "
              f"λ={inv.damping:g}, N={inv.normalizer:g}, {inv.dtype}, fitted in "
              f"{seconds:.2f} s ({stats['exchange']}, rank 0 sent {stats['bytes_sent']} bytes)")
        print(path)
    return 0


def _load_fisher(args, model):
    from .io import FileFormatError, load_inverse_fisher

    path = _check_file(args.fisher, "--fisher")
    dtype = next(model.parameters()).dtype
    if ssse.distributed.is_index(path) or _distributed(args):
        return _load_sharded_fisher(args, path, model, dtype)
    try:
        inv, meta = load_inverse_fisher(path, device=args.device, dtype=dtype)
    except FileFormatError as exc:
        raise UsageError(str(exc)) from None
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if inv.dim != d:
        raise UsageError(f"--fisher has dim {inv.dim}, the model has {d} parameters")
    return inv, meta


def _load_sharded_fisher(args, path, model, dtype):
    """Under torchrun: this rank's blocks (of an index, re-sharded to this world size, or of a
    single file). Otherwise: the whole inverse of an index."""
    from ssse import distributed

    from .io import FileFormatError, load_inverse_fisher

    if distributed.is_index(path):
        try:
            inv, meta = distributed.load_inverse_fisher(path, device=args.device, dtype=dtype)
        except ValueError as exc:
            raise UsageError(f"--fisher: {exc}") from None
        if not _distributed(args):
            inv = inv.gather()
    else:
        try:
            full, meta = load_inverse_fisher(path, device=args.device, dtype=dtype)
        except FileFormatError as exc:
            raise UsageError(str(exc)) from None
        inv = distributed.ShardedInverseFisher.from_full(full)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if inv.dim != d:
        raise UsageError(f"--fisher has dim {inv.dim}, the model has {d} parameters")
    return inv, meta


def _cmd_erase(args) -> int:
    from .io import save_model

    model, meta = _load_model_file(args)
    inv, fmeta = _load_fisher(args, model)
    task = _task_from_meta(args, model, meta)
    _check_fisher_matches(fmeta, task)
    before = [int(i) for i in meta.get("erased", [])]
    removed = _removal(args, task, before)
    # samples erased by earlier requests are no longer part of D: n counts what remains
    sharded = isinstance(inv, ssse.distributed.ShardedInverseFisher)
    if sharded:  # every rank computes the gradients of its share of the samples
        mine = removed[list(ssse.distributed.share(removed.numel()))]
        api, data = ssse.distributed, (task.data(mine) if mine.numel() else [])
        if args.refine_steps:
            raise UsageError("--refine-steps: the sharded Newton erasure takes the Newton step "
                             "only")
    else:
        api, data = ssse, task.data(removed)
    t0 = time.perf_counter()
    if args.epsilon is None:
        if inv.curvature != "ggn":
            raise UsageError("--epsilon is needed unless --fisher holds the Gauss-Newton matrix "
                             "(ssse fisher --curvature ggn)")
        if before:
            raise UsageError("the Newton erasure needs the inverse of the data left; this model "
                             "already had samples erased with an inverse of the whole training "
                             "set: erase them in one request, or refit the inverse")
        refine = {} if sharded else {"refine_steps": args.refine_steps}
        state = api.newton_erase(model, task.loss_fn, data, inv_fisher=inv,
                                 n_total=task.n, weight_decay=task.weight_decay,
                                 likelihood=task.likelihood, **refine)
        how = f"the leave-k-out Newton step ({args.refine_steps} refinement steps)"
    else:
        state = api.ssse_update(model, task.loss_fn, data, inv_fisher=inv,
                                epsilon=args.epsilon, n_total=task.n - len(before),
                                weight_decay=task.weight_decay, fisher=args.variant,
                                minibatch=int(fmeta.get("minibatch", 1)))
        how = f"ε={args.epsilon:g} ({args.variant} Fisher)"
    seconds = time.perf_counter() - t0
    if sharded and inv.rank != 0:
        return 0  # every rank holds the same parameters: rank 0 writes them
    model.load_state_dict(state)
    erased = sorted(set(before) | set(removed.tolist()))
    path = save_model(_out_path(args, "erased.safetensors"), model, spec=meta["spec"],
                      **{**{k: v for k, v in meta.items() if k not in ("spec", "dtype")},
                         "erased": erased, "epsilon": args.epsilon, "variant": args.variant})
    print(f"erased {removed.numel()} of {task.n - len(before)} samples with {how} in "
          f"{seconds:.3f} s")
    print(path)
    return 0


def _cmd_sweep(args) -> int:
    from .experiments.sweep import run_sweep

    model, meta = _load_model_file(args)
    if meta.get("erased"):
        raise UsageError("--model already had samples erased; sweep compares erasure with "
                         "retraining from the trained model (ssse train)")
    inv, fmeta = _load_fisher(args, model)
    task = _task_from_meta(args, model, meta)
    _check_fisher_matches(fmeta, task)
    removed = _removal(args, task)
    reference = None
    if args.reference:
        from .io import FileFormatError, load_model
        try:
            reference, _ = load_model(_check_file(args.reference, "--reference"),
                                      device=args.device, dtype=next(model.parameters()).dtype)
        except FileFormatError as exc:
            raise UsageError(str(exc)) from None
    classes = args.remove_class
    report = run_sweep(task, model, inv, removed, out=Path(args.out), eps=args.eps,
                       reference=reference, classes=classes, attribute=args.remove_attribute,
                       seed=int(meta.get("seed", args.seed)), minibatch=int(fmeta.get("minibatch", 1)),
                       progress=not args.quiet)
    print(report["table"], end="")
    print(Path(args.out) / "sweep.json")
    return 0


def _cmd_demo(args) -> int:
    from .experiments.demo import run_demo

    out = run_demo(data=args.data, data_dir=args.data_dir, train_limit=args.train_limit,
                   remove_class=args.remove_class, fraction=args.fraction, damping=args.damping,
                   eps=args.eps, seed=args.seed, device=args.device,
                   dtype=_dtype(args, torch.float64), out=args.out, progress=not args.quiet)
    print(out["text"], end="")
    return 0


def _cmd_experiment(args) -> int:
    import importlib

    module = importlib.import_module(f".experiments.{args.name}", __package__)
    out = Path(args.out or f"results/{args.name}")
    kwargs = {"quick": args.quick, "seed": args.seed, "out": out, "device": args.device,
              "progress": not args.quiet, "data": args.data, "data_dir": args.data_dir,
              "repeats": args.repeats}
    if args.dtype:
        kwargs["dtype"] = _DTYPES[args.dtype]
    summary = module.run(**kwargs)
    print(summary.rstrip("\n"))
    print(out / "results.json")
    return 0


# ---- entry point --------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # forwarded untouched, --help included
        if "--model" in argv[1:]:
            from .experiments import model_bench
            return int(model_bench.main([a for a in argv[1:] if a != "--model"]) or 0)
        from ssse_ext import bench
        return int(bench.main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if ssse.distributed.launched() and not _distributed(args) and \
            os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only fisher and erase are sharded: rank 0 runs the others
    from ssse_ext import NotPositiveDefiniteError

    from .data import DataUnavailableError
    from .distributed import DistributedError
    try:
        _setup(args)
        return args.func(args)
    except DistributedError as exc:  # another rank failed or was lost: this one stops too
        print(f"ssse {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"ssse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DataUnavailableError as exc:
        print(f"ssse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FloatingPointError, NotPositiveDefiniteError) as exc:  # numerics, not arguments
        print(f"ssse {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except ValueError as exc:  # the library's and the data sets' checks of what was asked
        print(f"ssse {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ssse {args.command}: interrupted (no partial files were written)",
              file=sys.stderr)
        return 130
    finally:
        if _distributed(args) and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
