"""The ``ssse`` command: ``demo``, ``train``, ``fisher``, ``erase``, ``ledger``, ``sweep``,
``experiment``, ``bench`` and ``info``. Run ``ssse SUBCOMMAND --help``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

import ssse
import ssse_ext
import ssse.distributed
from ssse import metrics

from ssse_ext import validation

from .experiments.common import EPS_GRID

__all__ = ["main"]

EXPERIMENTS = ("illustration", "multiattribute", "multinomial", "nonconvex")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_GRID_TEXT = ":".join(f"{v:g}" for v in EPS_GRID)
#: Most points of an ε grid (each point is an erasure and an evaluation of the model).
MAX_GRID_POINTS = 1000
# Options whose value may start with a minus sign that argparse would take for an option
# ("--eps -1:1:3", "--epsilon -1e-3"): rewritten as "--eps=-1:1:3" so that their own check
# reports the value.
_SIGNED_OPTIONS = ("--eps", "--epsilon", "--damping", "--fraction", "--weight-decay", "--seed")


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


class _Ranges(list):
    """Inclusive ``(lo, hi)`` ranges. They are expanded only after :meth:`outside` has checked
    them against the size they index: ``0-99999999999`` must be refused, not built."""

    def outside(self, n: int) -> list[int]:
        """The ends that fall outside ``[0, n)``."""
        return [v for a, b in self for v in (a, b) if not 0 <= v < n]

    def expand(self) -> list[int]:
        """The integers of the ranges, sorted, each once."""
        out, upto = [], None
        for a, b in sorted(self):
            start = a if upto is None else max(a, upto + 1)
            out.extend(range(start, b + 1))
            upto = b if upto is None else max(upto, b)
        return out

    def in_order(self) -> list[int]:
        """The integers of the ranges as written (the order of classes decides which of their
        samples a seed draws)."""
        return [i for a, b in self for i in range(a, b + 1)]


def _int_list(text: str) -> _Ranges:
    """``"3"``, ``"1,4,7"`` or ranges ``"0-9,12"``."""
    out = _Ranges()
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
                out.append((a, b))
            else:
                out.append((int(part), int(part)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers or ranges like 0-9,12, got "
                                             f"{text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


#: Seeds reach torch, numpy and scikit-learn; the last takes [0, 2**32).
MAX_SEED = 2**32 - 1


def _check_seed(value, name: str) -> int:
    value = validation.check_int(value, name)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, {MAX_SEED}], got {value}")
    return value


_seed = _checked(int, _check_seed, f"an integer in [0, {MAX_SEED}]")


def _threads(text: str) -> int:
    value = _positive_int(text)
    cpus = os.cpu_count() or 1
    if value > cpus:  # more threads than CPUs only contend, and thousands exhaust the process
        raise argparse.ArgumentTypeError(f"expected at most {cpus} (os.cpu_count(), the CPUs "
                                         f"of this machine), got {value}")
    return value


def _request_id(text: str) -> str:
    if not text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"expected a non-empty, printable id, got {text!r}")
    return text


def _eps_range(text: str) -> tuple[float, float, int]:
    """``LO:HI:NUM`` (log-spaced)."""
    try:
        lo, hi, num = text.split(":")
        lo, hi, num = float(lo), float(hi), int(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI:NUM, got {text!r}") from None
    if not (0 < lo <= hi < float("inf")) or num < 1:
        raise argparse.ArgumentTypeError(f"expected 0 < LO <= HI (finite) and NUM >= 1, got "
                                         f"{text!r}")
    if num > MAX_GRID_POINTS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_GRID_POINTS} grid points (NUM),"
                                         f" got {num}")
    return lo, hi, num


# ---- parser -------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, *, func, out_default: str | None = "ssse-out",
            dtype_default: str | None = None, out_help: str | None = None,
            output: tuple[str, str] | None = None) -> None:
    """The options every command shares, and the command's function; ``output`` = (what,
    default file name) adds ``--output FILE``."""
    p.set_defaults(func=func)
    if output is not None:
        p.add_argument("--output", default=None, metavar="FILE",
                       help=f"{output[0]} file (default: DIR/{output[1]})")
    g = p.add_argument_group("common options")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default=dtype_default,
                   help="compute dtype (default: float64 for convex models, float32 for the CNN)")
    g.add_argument("--seed", type=_seed, default=0, help="seed of data splits, removal sets "
                   f"and training, 0..{MAX_SEED} (default: 0)")
    g.add_argument("--out", default=out_default, metavar="DIR",
                   help=f"output directory (default: {out_help or out_default})")
    g.add_argument("--quiet", action="store_true", help="no progress bars, print only results")
    g.add_argument("--threads", type=_threads, default=None,
                   help="torch CPU threads, at most the machine's CPUs (default: torch's "
                   "choice)")


def _data_args(p: argparse.ArgumentParser, *, default: str | None = "digits") -> None:
    from .data import DATASETS

    p.add_argument("--data", choices=DATASETS, default=default,
                   help=f"data set (default: {default or 'the one recorded in the model file'})")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="directory with the data files (Fashion-MNIST idx files, yeast.csv)")
    p.add_argument("--train-limit", type=_positive_int, default=None, metavar="N",
                   help="use a random subset of N training samples (at most the training "
                   "set's size)")


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


#: Each command's one-line help and its description.
_COMMANDS = {
    "demo": ("train, erase part of a class, retrain, compare (< 1 min)",
             "End to end on a small data set: train an L2 logistic regression, fit the inverse "
             "Fisher, erase part of a class with SSSE, retrain from scratch without it, sweep ε "
             "and print a verdict table."),
    "train": ("train a model on a data set and save it",
              "Train the experiments' model for a data set (linear for digits/yeast, or --model "
              "resnet) and save it as a safetensors file."),
    "fisher": ("fit and save the inverse Fisher of a model",
               "Fit the block inverse of the damped empirical Fisher (or of the Gauss-Newton "
               "matrix, or a Monte-Carlo true Fisher) of a model on its training set and save "
               "it (safetensors)."),
    "erase": ("serve a deletion request: model + inverse + indices",
              "Erase training samples (SSSE, paper eq. 8, or without ε the leave-k-out Newton "
              "step with a Gauss-Newton inverse) and save the new model."),
    "ledger": ("check a deletion ledger and the files it serves, or recover an interrupted "
               "request",
               "check: verify a ledger's chain and that the model and inverse it serves are the "
               "ones its last request left. recover: complete or roll back a request that a "
               "crash interrupted (the next ssse erase --ledger does it too)."),
    "sweep": ("ε grid against a retrained reference: metrics + plots",
              "Sweep ε of the SSSE update for one removal, compare every model with the "
              "original and a model retrained without the samples, and write sweep.json, "
              "sweep.md and PNG plots."),
    "experiment": ("run one of the paper's experiments",
                   "Run an experiment of the paper and write results.json, results.md and PNG "
                   "plots to --out."),
    "bench": ("the kernel benchmark (ssse bench --help), or with --model the real-model "
              "benchmark (ssse bench --model --help)", None),
    "info": ("build information and devices",
             "Print how the kernels were built, the devices torch sees and which data sets are "
             "available offline."),
}


def _parser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    help_, description = _COMMANDS[name]
    return sub.add_parser(name, help=help_, description=description, **kwargs)


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
    p = _parser(sub, "demo")
    _data_args(p)
    p.add_argument("--remove-class", type=int, default=3, metavar="C",
                   help="class to erase part of (default: 3)")
    p.add_argument("--fraction", type=_fraction, default=0.5,
                   help="fraction of the class to erase (default: 0.5)")
    p.add_argument("--damping", type=_positive_float, default=None,
                   help="Fisher damping λ (default: per data set)")
    p.add_argument("--eps", type=_eps_range, default=None, metavar="LO:HI:NUM",
                   help=f"ε grid (default: {_GRID_TEXT})")
    _common(p, out_default=None, out_help="nothing is written", func=_cmd_demo)


def _add_train(sub) -> None:
    p = _parser(sub, "train")
    _data_args(p)
    p.add_argument("--model", choices=["linear", "resnet"], default="linear")
    p.add_argument("--weight-decay", type=_nonneg_float, default=None,
                   help="L2 coefficient (default: per data set)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="SGD epochs (resnet)")
    _common(p, output=("model", "model.safetensors"), func=_cmd_train)


def _add_fisher(sub) -> None:
    p = _parser(sub, "fisher")
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
                   help=f"largest block (default: {ssse_ext.DEFAULT_BLOCK_SIZE})")
    p.add_argument("--layout", choices=["per_parameter", "fixed", "rows"],
                   default="per_parameter", help="block layout; rows = one block per output "
                   "row of a linear model (default: per_parameter)")
    p.add_argument("--minibatch", type=_positive_int, default=1,
                   help="mean gradients of mini-batches of this size (default: 1)")
    p.add_argument("--representation", choices=["dense", "dual", "auto"], default="auto",
                   help="how blocks are stored: dense inverses, the exact low-rank form (the "
                   "rows and a factor: smaller for blocks larger than the training set), or "
                   "per block whichever is smaller (default: auto; dense with --checkpoint and under "
                   "torchrun)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="make the fit resumable: save its state to FILE every --every samples; "
                   "run the same command again after a crash to resume (FILE is removed once "
                   "the inverse is saved)")
    p.add_argument("--every", type=_positive_int, default=None, metavar="N",
                   help="samples between checkpoints, a multiple of --minibatch (default: "
                   "every 5 minutes); resume with the same N and --threads")
    _distributed_args(p, fit=True)
    _common(p, output=("inverse-Fisher", "inverse_fisher.safetensors; under torchrun the "
                       "index of one file per rank, DIR/inverse_fisher.index.json"),
            func=_cmd_fisher)


def _add_erase(sub) -> None:
    p = _parser(sub, "erase")
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
    g = p.add_argument_group("serving requests (a ledger)")
    g.add_argument("--ledger", default=None, metavar="FILE",
                   help="serve the request in place: --model and --fisher are replaced by the "
                   "erased model and the downdated inverse, and the request is appended to "
                   "this JSON-lines ledger; a crash at any point is settled by the next run")
    g.add_argument("--request-id", type=_request_id, default=None, metavar="ID",
                   help="the request's id in the ledger (default: a random one); an id "
                   "already in the ledger is refused")
    _distributed_args(p, fit=False)
    _common(p, output=("erased model", "erased.safetensors"), func=_cmd_erase)


def _add_ledger(sub) -> None:
    p = _parser(sub, "ledger")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    for name, help_, files in (
            ("check", "verify the ledger (and the files it serves): exit 0 when intact, 2 when "
             "not", "optional"),
            ("recover", "settle a request interrupted by a crash: complete it if the ledger "
             "records it, roll it back otherwise", "required")):
        a = actions.add_parser(name, help=help_, description=help_)
        a.add_argument("--ledger", required=True, metavar="FILE", help="the JSON-lines ledger")
        a.add_argument("--model", required=files == "required", default=None, metavar="FILE",
                       help=f"the model it serves ({files})")
        a.add_argument("--fisher", required=files == "required", default=None, metavar="FILE",
                       help=f"the inverse-Fisher file it serves ({files})")
        a.set_defaults(func=_cmd_ledger)


def _add_sweep(sub) -> None:
    p = _parser(sub, "sweep")
    p.add_argument("--model", required=True, metavar="FILE")
    p.add_argument("--fisher", required=True, metavar="FILE")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="model retrained without the samples (default: retrain now)")
    _data_args(p, default=None)
    _removal_args(p)
    p.add_argument("--eps", type=_eps_range, default=EPS_GRID, metavar="LO:HI:NUM",
                   help=f"ε grid (default: {_GRID_TEXT})")
    _common(p, func=_cmd_sweep)


def _add_experiment(sub) -> None:
    p = _parser(sub, "experiment")
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    p.add_argument("--data", default=None, help="data set (multinomial: digits or "
                   "fashion-mnist; nonconvex: fashion-mnist or digits)")
    p.add_argument("--data-dir", default=None, metavar="DIR")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="removals per setting for mean ± std")
    g = p.add_argument_group("nonconvex only")
    g.add_argument("--model", choices=["resnet", "resnet20"], default=None,
                   help="the small ResNet (default) or paper §5.3's ResNet-20")
    g.add_argument("--layout", choices=["per_parameter", "fixed"], default=None,
                   help="block layout of the inverse Fishers (default: per_parameter)")
    g.add_argument("--block-size", type=_positive_int, default=None, metavar="B",
                   help="largest block (default: 256; the paper's ResNet-20: 70000)")
    g.add_argument("--representation", choices=["dense", "dual", "auto"], default=None,
                   help="dense blocks (default), the exact low-rank form, or the smaller per "
                   "block")
    g.add_argument("--methods", type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
                   default=None, metavar="LIST", help="comma-separated subset of the methods")
    g.add_argument("--grid-points", type=_positive_int, default=None, metavar="K",
                   help="points of every method's grid")
    g.add_argument("--minibatch", type=_positive_int, default=None,
                   help="the mini-batch Fisher's batch (only 10, the paper's, is supported)")
    _common(p, out_default=None, out_help="results/NAME", func=_cmd_experiment)


def _add_bench(sub) -> None:
    p = _parser(sub, "bench", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)


def _add_info(sub) -> None:
    p = _parser(sub, "info")
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
    for add in (_add_demo, _add_train, _add_fisher, _add_erase, _add_ledger, _add_sweep,
                _add_experiment, _add_bench, _add_info):
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


def _check_folder(folder: Path, what: str) -> None:
    """Refuses, before any work, a destination folder that is a file or that cannot be created
    or written (tried, so that a read-only file system counts even for root)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what}: {folder} is a file, not a folder")
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{what}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UsageError(f"{what}: cannot write in {probe} ({exc.strerror or exc})") from None


def _same_file(a, b) -> bool:
    """Whether two paths name one file: equal once resolved (symbolic links followed, also for
    files not created yet), or one inode (hard links)."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
        return os.path.samefile(a, b)
    except (OSError, RuntimeError):  # a missing file, a symbolic link loop
        return False


#: Files a command writes into --out, besides its --output.
_OUT_FILES = {"sweep": re.compile(r"sweep(\.json|\.md|_.+\.png)")}


def _served_in_place(args) -> bool:
    return args.command == "ledger" or args.command == "erase" and bool(args.ledger)


def _check_overwrites(args) -> None:
    """Refuses a destination that is also an input, or another destination, of the same
    command: writing it would destroy what the command reads (a trained model replaced by its
    inverse), or what it writes elsewhere (an inverse removed with the checkpoint)."""
    cmd = args.command
    inputs = [(f"--{o.replace('_', '-')}", getattr(args, o, None))
              for o in ("model", "fisher", "reference", "indices_file")]
    inputs = [(opt, path) for opt, path in inputs if path]
    if _served_in_place(args):
        outputs = [("--ledger", args.ledger)] + [(o, p) for o, p in inputs
                                                 if o in ("--model", "--fisher")]
        inputs = [(o, p) for o, p in inputs if o not in ("--model", "--fisher")]
    elif cmd in ("train", "fisher", "erase"):
        name = {"train": "model.safetensors", "erase": "erased.safetensors",
                "fisher": "inverse_fisher.index.json" if _distributed(args) else
                "inverse_fisher.safetensors"}[cmd]
        outputs = [("--output" if args.output else "--out", _out_path(args, name))]
        if getattr(args, "checkpoint", None):
            outputs.append(("--checkpoint", args.checkpoint))
    elif cmd in _OUT_FILES and getattr(args, "out", None):
        for opt, path in inputs:
            if _OUT_FILES[cmd].fullmatch(Path(path).name) and \
                    _same_file(Path(path).parent, args.out):
                raise UsageError(f"{opt}: {path} is in --out {args.out}, where this command "
                                 "writes a file of that name: move it, or give another --out")
        return
    else:
        return
    for i, (opt, path) in enumerate(outputs):
        for other, other_path in outputs[:i] + inputs:
            if _same_file(path, other_path):
                same = "" if str(path) == str(other_path) else f" ({other_path})"
                raise UsageError(f"{opt}: {path} is also {other}{same}: the command would write "
                                 f"over it; give another file")


def _check_destinations(args) -> None:
    """Every file or folder the command will write, checked before the work."""
    cmd = args.command
    _check_overwrites(args)
    if _served_in_place(args):
        if getattr(args, "output", None):
            raise UsageError("--output: with --ledger the request replaces --model and --fisher "
                             "in place")
        for opt in ("model", "fisher", "ledger"):
            if getattr(args, opt) is None:
                continue
            path = Path(getattr(args, opt))
            if path.is_dir():
                raise UsageError(f"--{opt}: {path} is a folder, expected a file")
            _check_folder(path.parent, f"--{opt}")
        return
    if getattr(args, "checkpoint", None):
        path = Path(args.checkpoint)
        if path.is_dir():
            raise UsageError(f"--checkpoint: {path} is a folder, expected a file")
        _check_folder(path.parent, "--checkpoint")
    if getattr(args, "output", None):
        path = Path(args.output)
        if path.is_dir():
            raise UsageError(f"--output: {path} is a folder, expected a file")
        _check_folder(path.parent, "--output")
    elif cmd in ("train", "fisher", "erase", "sweep") or \
            (cmd in ("experiment", "demo") and getattr(args, "out", None)):
        _check_folder(Path(args.out or f"results/{args.name}"), "--out")
    elif cmd == "experiment":
        _check_folder(Path(f"results/{args.name}"), "--out")


@contextlib.contextmanager
def _no_interrupt():
    """Defers Ctrl-C (SIGINT) until the block is done: a set of files is swapped in, or a
    ledger request committed, whole or not at all."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _staged(out: Path):
    """Yields a temporary folder next to ``out`` for a command's outputs; on success every
    file written there is moved into ``out`` at once (Ctrl-C deferred meanwhile), so an
    interrupted command leaves ``out`` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.ssse-stage-", dir=out.parent))
    try:
        yield stage
        with _no_interrupt():
            out.mkdir(parents=True, exist_ok=True)
            for src in sorted(p for p in stage.rglob("*") if p.is_file()):
                dst = out / src.relative_to(stage)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _load_model_file(args):
    from .io import FileFormatError, load_model

    path = _check_file(args.model, "--model")
    try:
        model, meta = load_model(path, device=args.device,
                                 dtype=_DTYPES[args.dtype] if args.dtype else None)
    except FileFormatError as exc:
        raise UsageError(str(exc)) from None
    dtypes = {p.dtype for p in model.parameters()}
    if not dtypes <= set(_DTYPES.values()):
        held = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise UsageError(f"--model: {path} holds {held} parameters; the computations run in "
                         f"float32 or float64: give --dtype")
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
            bad = args.indices.outside(n)
            idx = [] if bad else args.indices.expand()
        else:
            idx = _read_indices(_check_file(args.indices_file, "--indices-file"))
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
    bad = args.remove_class.outside(task.ds.num_classes)
    if bad:
        raise UsageError(f"--remove-class {bad[0]}: classes are 0..{task.ds.num_classes - 1}")
    return class_removal(y, args.remove_class.in_order(), args.fraction, seed=args.seed)


def _read_indices(path: Path) -> list[int]:
    """A JSON list of integers, or integers separated by whitespace or commas: nothing else
    (no 1.9, no true)."""
    text = path.read_text()
    bad = None
    if text.lstrip().startswith("["):
        try:
            idx = json.loads(text)
        except ValueError:
            idx = None
        if not isinstance(idx, list):
            raise UsageError(f"--indices-file: {path} is not a JSON list of integers")
        bad = next((i for i in idx if type(i) is not int), None)  # bool is not an index
        if bad is None:
            return idx
    else:
        tokens = text.replace(",", " ").split()
        bad = next((t for t in tokens if not re.fullmatch(r"[+-]?\d+", t)), None)
        if bad is None:
            return [int(t) for t in tokens]
    raise UsageError(f"--indices-file: {path} must hold integers only, got {bad!r}")


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
    if args.every is not None and args.checkpoint is None:
        raise UsageError("--every needs --checkpoint")
    if args.minibatch > task.n:
        raise UsageError(f"--minibatch {args.minibatch}: the training set has {task.n} samples")
    if args.every is not None and args.every % args.minibatch:
        raise UsageError(f"--every {args.every}: a checkpoint cannot split a mini-batch; give a "
                         f"multiple of --minibatch {args.minibatch}")
    if _distributed(args):
        if args.checkpoint:
            raise UsageError("--checkpoint: the sharded fit under torchrun is not resumable; "
                             "run it without --checkpoint")
        if args.representation == "dual":
            raise UsageError("--representation dual: the sharded fit under torchrun stores "
                             "dense blocks; run it without torchrun, or with dense or auto")
        return _fisher_distributed(args, model, task, damping)
    resumed = ""
    if args.checkpoint and Path(args.checkpoint).exists():
        from .io import FileFormatError, load_checkpoint
        try:
            cursor = load_checkpoint(args.checkpoint)[1].get("cursor")
            resumed = f" (resumed from {args.checkpoint} at sample {cursor})"
        except FileFormatError:
            pass  # the fit refuses it with the reason
    t0 = time.perf_counter()
    try:
        inv = ssse.fit_inverse_fisher(model, task.loss_fn, task.data(), damping=damping,
                                      block_size=args.block_size, layout=args.layout,
                                      weight_decay=task.weight_decay, minibatch=args.minibatch,
                                      curvature=args.curvature, likelihood=task.likelihood,
                                      mc_samples=args.mc_samples, seed=args.seed,
                                      progress=not args.quiet, checkpoint=args.checkpoint,
                                      every=args.every, representation=args.representation)
    except ValueError as exc:
        if "layout" not in str(exc):
            raise
        raise UsageError(f"--layout {args.layout}: {exc}") from None
    seconds = time.perf_counter() - t0
    health = inv.health(warn=False)
    theta_star = torch.cat([p.detach().reshape(-1) for p in model.parameters()
                            if p.requires_grad])
    path = save_inverse_fisher(_out_path(args, "inverse_fisher.safetensors"), inv,
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
          f"{health.residual:.1e} "
          f"(threshold {health.tolerance:.1e})")
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

    if args.ledger:
        if _distributed(args):
            raise UsageError("--ledger: requests are served by one process; run it without "
                             "torchrun")
        return _serve(args)
    if args.request_id is not None:
        raise UsageError("--request-id needs --ledger")
    model, meta = _load_model_file(args)
    inv, fmeta = _load_fisher(args, model)
    task = _task_from_meta(args, model, meta)
    _check_fisher_matches(fmeta, task)
    origin = _check_origin(model, meta, _theta_star(args.fisher))
    if isinstance(inv, ssse_ext.BlockInverseFisher):
        _check_health(inv.health(warn=False))
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
                      **{**{k: v for k, v in meta.items() if k not in _NOT_COPIED},
                         "erased": erased, "epsilon": args.epsilon, "variant": args.variant,
                         **({"origin": origin} if origin else {})})
    print(f"erased {removed.numel()} of {task.n - len(before)} samples with {how} in "
          f"{seconds:.3f} s")
    print(path)
    return 0


#: Model-file header fields that a new erased model does not inherit from its input.
_NOT_COPIED = ("spec", "dtype", "fingerprint", "ledger_request", "ledger_entry")


def _theta_star(path):
    """The parameters an inverse-Fisher file was fitted at (``None``: not recorded, as in the
    index of a sharded fit)."""
    from .io import FileFormatError, load_extra_tensors

    if ssse.distributed.is_index(path):
        return None
    try:
        return load_extra_tensors(path).get("theta_star")
    except FileFormatError as exc:
        raise UsageError(str(exc)) from None


def _check_origin(model, meta: dict, star, first: dict | None = None) -> str | None:
    """Refuses an inverse fitted at other parameters than the ones ``model`` descends from;
    returns their fingerprint, which the erased model records as its ``origin`` (``None``: the
    inverse does not record them, and nothing can be checked).

    The invariant: an inverse is the curvature at the parameters θ* it was fitted at (its
    ``theta_star``), and every request served with it takes its gradients there, so it belongs
    to the models that descend from θ*: θ* itself (no request served yet), or a model moved
    from θ* by requests, each of which records θ*'s fingerprint in the model's header. A model
    erased before that header field existed descends from θ* when ``first`` (its ledger's
    first line) started from θ*."""
    from .io import fingerprint

    if star is None:
        return meta.get("origin")
    star = star.detach().to("cpu")
    origin = fingerprint({"theta_star": star})
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    ok = meta.get("origin") == origin
    if not ok and star.numel() == sum(p.numel() for _, p in params):
        flat = torch.cat([p.detach().reshape(-1) for _, p in params]).to("cpu", star.dtype)
        ok = torch.equal(flat, star)
        if not ok and first is not None and meta.get("origin") is None:
            state, at = dict(model.state_dict()), 0
            for name, p in params:
                state[name] = star[at:at + p.numel()].view_as(p).to(p.dtype)
                at += p.numel()
            ok = fingerprint(state) == first.get("model_before")
    if not ok:
        raise UsageError("--fisher was fitted at other parameters than the ones --model "
                         "descends from (its recorded theta_star): it is the inverse of another "
                         "model, or of this one before it was trained again; fit one for this "
                         "model with ssse fisher; nothing was changed")
    return origin


def _check_health(health, when: str = "", *, outcome: str = "; nothing was changed") -> None:
    """Refuses an inverse whose health probe fails (a ``Health`` or its ``as_dict()``): a
    request computed with it would be recorded as done while the model barely moves, or moves
    the wrong way."""
    if health is None:
        return
    if not isinstance(health, dict):
        health = health.as_dict()
    residual, tolerance = health["residual"], health["tolerance"]
    if residual <= tolerance:
        return
    raise UsageError(f"--fisher: the inverse fails its health probe{when}: residual "
                     f"{residual:.1e} > threshold {tolerance:.1e} (block {health.get('block')}), "
                     "so it is not the inverse of its Fisher (damaged, or too ill-conditioned); "
                     f"refit it with ssse fisher{outcome}")


@contextlib.contextmanager
def _served_files(args, ledger):
    """Holds the locks of the ledger, the model and the inverse, in that order, for one
    request or recovery; yields the model's and the inverse's paths (symbolic links resolved,
    so that every path to a file takes the same lock) or ``None`` for those not given. One
    ledger per model: a second ledger serving the same files is refused while the first
    holds them, and by the files' headers afterwards."""
    from .ledger import lock_file

    with contextlib.ExitStack() as stack:
        stack.enter_context(ledger.lock())
        paths = []
        for opt, what in (("model", "the model"), ("fisher", "the inverse")):
            given = getattr(args, opt)
            paths.append(None if given is None else stack.enter_context(
                lock_file(_check_file(given, f"--{opt}"), what)))
        yield tuple(paths)


def _verified_ledger(ledger, files: dict, *, outcome: str = "; nothing was changed"):
    """The ledger's verified state, after checking that every ``files[what] = (path, header,
    fingerprint)`` is what its last request left (:func:`ssse.ledger.check_served`)."""
    from .ledger import LedgerError, check_served

    try:
        state = ledger.verify()
        for what, (path, meta, fp) in files.items():
            check_served(state, what, path, meta, fp)
    except LedgerError as exc:
        raise UsageError(f"{exc}{outcome}") from None
    return state


def _serve(args) -> int:
    """``ssse erase --ledger``: one request served in place, by the crash rule of
    :mod:`ssse.ledger` (recovery of an interrupted request first), under the locks of the
    ledger and of the files it serves."""
    import warnings

    from .io import fingerprint, save_inverse_fisher, save_model
    from .ledger import Ledger, commit, entry_digest, recover

    ledger = Ledger(args.ledger)
    with _served_files(args, ledger) as (model_path, fisher_path):
        for line in recover(ledger, {"model": model_path, "inverse": fisher_path}):
            print(f"ssse erase: {line}", file=sys.stderr)
        model, meta = _load_model_file(args)
        inv, fmeta = _load_fisher(args, model)
        model_fp, inverse_fp = fingerprint(model.state_dict()), fingerprint(inv.to_state()[0])
        state = _verified_ledger(ledger, {"model": (model_path, meta, model_fp),
                                          "inverse": (fisher_path, fmeta, inverse_fp)})
        task = _task_from_meta(args, model, meta)
        _check_fisher_matches(fmeta, task)
        before = [int(i) for i in meta.get("erased", [])]
        if before and "n_remaining" not in fmeta:
            raise UsageError("--model already had samples erased without a ledger, and --fisher "
                             "is the inverse of the whole training set: start a ledger from the "
                             "trained model and its inverse")
        request_id = args.request_id or uuid.uuid4().hex
        try:  # a retried request is told so first, before its samples are found erased
            ledger.check(request_id, [])
            removed = _removal(args, task, before)
            ids = removed.tolist()
            ledger.check(request_id, ids)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.epsilon is None and inv.curvature != "ggn":
            raise UsageError("--epsilon is needed unless --fisher holds the Gauss-Newton matrix "
                             "(ssse fisher --curvature ggn)")
        star = _theta_star(fisher_path)
        if star is None:
            if before:
                raise UsageError("--fisher does not record the parameters it was fitted at "
                                 "(fit it again with ssse fisher)")
            star = torch.cat([p.detach().reshape(-1) for p in model.parameters()
                              if p.requires_grad])
        origin = _check_origin(model, meta, star, state.entries[0] if state.entries else None)
        _check_health(inv.health(warn=False))
        eraser = ssse.Eraser.restore(
            model, task.loss_fn, inv, n=int(fmeta.get("n_remaining", task.n - len(before))),
            theta_star=star, train_ids=range(task.n), erased=before,
            weight_decay=task.weight_decay, minibatch=int(fmeta.get("minibatch", 1)),
            likelihood=task.likelihood, mc_samples=int(fmeta.get("mc_samples", 1)))
        n_before = eraser.n
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # a failed probe is refused below, in one line
            warnings.simplefilter("ignore", ssse_ext.HealthWarning)
            new_state = eraser.erase(task.data(removed), ids=ids, request_id=request_id,
                                     epsilon=args.epsilon, fisher=args.variant,
                                     refine_steps=args.refine_steps)
        seconds = time.perf_counter() - t0
        entry = eraser.last_request
        _check_health(entry["health"], " after this request's downdate")
        model.load_state_dict(new_state)
        entry = ledger.seal({**entry, "model_before": model_fp,
                             "model_after": fingerprint(model.state_dict()),
                             "inverse_before": inverse_fp,
                             "inverse_after": fingerprint(eraser.inv_fisher.to_state()[0])})
        digest = entry_digest(entry)
        model_meta = {**{k: v for k, v in meta.items() if k not in _NOT_COPIED},
                      "erased": sorted(set(before) | set(ids)), "epsilon": args.epsilon,
                      "variant": args.variant, "origin": origin, "ledger_request": request_id,
                      "ledger_entry": digest, "fingerprint": entry["model_after"]}
        fisher_meta = {**{k: v for k, v in fmeta.items()
                          if k not in ("state", "fingerprint", "ledger_request", "ledger_entry")},
                       "n_remaining": eraser.n, "ledger_request": request_id,
                       "ledger_entry": digest, "fingerprint": entry["inverse_after"]}
        with _no_interrupt():
            commit(ledger, entry, {
                "inverse": (fisher_path, lambda p: save_inverse_fisher(
                    p, eraser.inv_fisher, extra={"theta_star": star}, **fisher_meta)),
                "model": (model_path, lambda p: save_model(p, model, spec=meta["spec"],
                                                           **model_meta))})
    how = (f"ε={args.epsilon:g} ({args.variant} Fisher)" if args.epsilon is not None else
           f"the leave-k-out Newton step ({args.refine_steps} refinement steps)")
    health = entry["health"]
    print(f"erased {len(ids)} of {n_before} samples with {how} in {seconds:.3f} s; request "
          f"{request_id} recorded in {args.ledger}"
          + (f" (health {health['residual']:.1e})" if health else ""))
    print(args.model)
    return 0


def _cmd_ledger(args) -> int:
    """``ssse ledger check`` and ``ssse ledger recover``."""
    from .io import FileFormatError, fingerprint, load_inverse_fisher, load_model
    from .ledger import Ledger, pending_path, recover

    ledger = Ledger(args.ledger)
    if args.action == "check" and not ledger.path.is_file():
        raise UsageError(f"--ledger: no such file: {args.ledger}")
    with _served_files(args, ledger) as (model_path, fisher_path):
        files = {what: path for what, path in (("model", model_path), ("inverse", fisher_path))
                 if path is not None}
        if args.action == "recover":
            done = recover(ledger, files)
            for line in done:
                print(line)
        else:
            done = None
            try:
                torn = ledger.verify().torn
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            waiting = [str(pending_path(p)) for p in files.values() if pending_path(p).exists()]
            if torn or waiting:
                what = f"pending file {waiting[0]}" if waiting else "a torn last line"
                raise UsageError(f"a request interrupted by a crash awaits recovery ({what}): "
                                 f"run ssse ledger recover --ledger {args.ledger} --model M "
                                 "--fisher F")
        loaded = {}
        try:
            if model_path is not None:
                model, meta = load_model(model_path)
                loaded["model"] = (model_path, meta, fingerprint(model.state_dict()))
            if fisher_path is not None:
                inv, fmeta = load_inverse_fisher(fisher_path)
                loaded["inverse"] = (fisher_path, fmeta, fingerprint(inv.to_state()[0]))
        except FileFormatError as exc:
            raise UsageError(str(exc)) from None
        state = _verified_ledger(ledger, loaded, outcome="")
        if fisher_path is not None:
            health = inv.health(warn=False)
            _check_health(health, outcome="")
    if done == []:
        print("nothing to recover")
    n, last = len(state.entries), state.last
    old = f"; the first {state.unchained} of ledger version 1, unchained" if state.unchained \
        else ""
    print(f"{args.ledger}: {n} request{'s' * (n != 1)}, chain intact{old}" +
          (f"; last {last['request']!r} served {last.get('time')}, {last.get('n_after')} "
           "samples left" if last else ""))
    for what, (path, _, fp) in loaded.items():
        at = f"at request {last['request']!r}" if last else "before any request"
        extra = f"; health {health.residual:.1e} (threshold {health.tolerance:.1e})" \
            if what == "inverse" and health is not None else ""
        print(f"{path}: the {what} {at} ({fp[:19]}...){extra}")
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
            reference, ref_meta = load_model(_check_file(args.reference, "--reference"),
                                             device=args.device,
                                             dtype=next(model.parameters()).dtype)
        except FileFormatError as exc:
            raise UsageError(str(exc)) from None
        # the metrics compare the two models' outputs on the same inputs
        if ref_meta["spec"] != meta["spec"]:
            raise UsageError(f"--reference: {args.reference} is another model ("
                             f"{ref_meta['spec']}) than --model ({meta['spec']})")
        ref_data = ref_meta.get("data", {}).get("name")
        if ref_data is not None and ref_data != task.ds.name:
            raise UsageError(f"--reference: {args.reference} was trained on {ref_data}, "
                             f"--model on {task.ds.name}")
    classes = None if args.remove_class is None else args.remove_class.in_order()
    with _staged(Path(args.out)) as stage:
        report = run_sweep(task, model, inv, removed, out=stage, eps=args.eps,
                           reference=reference, classes=classes,
                           attribute=args.remove_attribute, seed=int(meta.get("seed", args.seed)),
                           minibatch=int(fmeta.get("minibatch", 1)), progress=not args.quiet)
    print(report["table"], end="")
    print(Path(args.out) / "sweep.json")
    return 0


def _cmd_demo(args) -> int:
    from .experiments.demo import run_demo

    with contextlib.ExitStack() as stack:
        where = stack.enter_context(_staged(Path(args.out))) if args.out else None
        out = run_demo(data=args.data, data_dir=args.data_dir, train_limit=args.train_limit,
                       remove_class=args.remove_class, fraction=args.fraction,
                       damping=args.damping, eps=args.eps, seed=args.seed, device=args.device,
                       dtype=_dtype(args, torch.float64), out=where, progress=not args.quiet)
    text = out["text"] if where is None else out["text"].replace(str(where), str(args.out))
    print(text, end="")
    return 0


def _cmd_experiment(args) -> int:
    import importlib

    module = importlib.import_module(f".experiments.{args.name}", __package__)
    out = Path(args.out or f"results/{args.name}")
    kwargs = {"quick": args.quick, "seed": args.seed, "device": args.device,
              "progress": not args.quiet, "data": args.data, "data_dir": args.data_dir,
              "repeats": args.repeats}
    if args.dtype:
        kwargs["dtype"] = _DTYPES[args.dtype]
    extra = {k: getattr(args, k) for k in ("model", "layout", "block_size", "representation",
                                           "methods", "grid_points")
             if getattr(args, k) is not None}
    if args.minibatch not in (None, module.MINIBATCH if hasattr(module, "MINIBATCH") else None):
        raise UsageError(f"--minibatch: the non-convex experiment's mini-batch Fisher uses "
                         f"batches of 10, got {args.minibatch}")
    if extra and args.name != "nonconvex":
        raise UsageError(f"--{next(iter(extra)).replace('_', '-')} applies to the nonconvex "
                         "experiment only")
    with _staged(out) as stage:
        summary = module.run(out=stage, **kwargs, **extra)
    print(summary.rstrip("\n"))
    print(out / "results.json")
    return 0


# ---- entry point --------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _rejoin_signed(argv: list[str]) -> list[str]:
    """``--eps -1:1:3`` as ``--eps=-1:1:3`` (see _SIGNED_OPTIONS)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _SIGNED_OPTIONS and i + 1 < len(argv) and \
                re.match(r"-\.?\d", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


#: OS errors that mean a bad path or permission (exit 2), not a failure of the machine.
_PATH_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
                FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(f"ssse{' ' + command if command else ''}: interrupted (no partial files were "
              "written)", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # forwarded untouched, --help included
        if "--model" in argv[1:]:
            from .experiments import model_bench
            return int(model_bench.main([a for a in argv[1:] if a != "--model"]) or 0)
        from ssse_ext import bench
        return int(bench.main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(_rejoin_signed(argv))
    if ssse.distributed.launched() and not _distributed(args) and \
            os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only fisher and erase are sharded: rank 0 runs the others
    from ssse_ext import NotPositiveDefiniteError

    from .data import DataUnavailableError
    from .distributed import DistributedError
    from .ledger import LedgerBusyError
    try:
        _setup(args)
        _check_destinations(args)
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
    except (FloatingPointError, NotPositiveDefiniteError, LedgerBusyError) as exc:
        print(f"ssse {args.command}: error: {_one_line(exc)}", file=sys.stderr)  # not arguments
        return 1
    except ValueError as exc:  # the library's and the data sets' checks of what was asked
        print(f"ssse {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(f"ssse {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        # a refusal before allocating (it carries the bytes it needed) answers what was
        # asked; an allocation that failed midway is the machine's
        return 2 if hasattr(exc, "needed") else 1
    except OSError as exc:  # a destination that changed under us, a full disk
        where = f": {exc.filename}" if exc.filename else ""
        print(f"ssse {args.command}: error: {exc.strerror or _one_line(exc)}{where}",
              file=sys.stderr)
        return 2 if isinstance(exc, _PATH_ERRORS) else 1
    finally:
        if _distributed(args) and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
