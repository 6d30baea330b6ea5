"""The ``ssse`` command's arguments: types that check a value with the library's own
validation, the options commands share, and one parser per command."""

from __future__ import annotations

import argparse
import os
import re

import ssse
import ssse_ext
from ssse.erasure import FISHER_VARIANTS
from ssse.experiments.common import EPS_GRID
from ssse.experiments.tasks import MODELS
from ssse.files import COMPUTE_DTYPES as DTYPES
from ssse.files import check_factory_spec
from ssse_ext import validation
from ssse_ext.fisher import REPRESENTATIONS

from .commands import demo, erase, experiment, fisher, info, ledger, sweep, train

__all__ = ["EXPERIMENTS", "MAX_GRID_POINTS", "MAX_SEED", "Parser", "Ranges", "build_parser",
           "int_list", "rejoin_signed"]

EXPERIMENTS = ("illustration", "multiattribute", "multinomial", "nonconvex", "forgetting")
GRID_TEXT = ":".join(f"{v:g}" for v in EPS_GRID)
#: Most points of an ε grid (each point is an erasure and an evaluation of the model).
MAX_GRID_POINTS = 1000
# Options whose value may start with a minus sign that argparse would take for an option
# ("--eps -1:1:3", "--epsilon -1e-3"): rewritten as "--eps=-1:1:3" so that their own check
# reports the value.
SIGNED_OPTIONS = ("--eps", "--epsilon", "--damping", "--fraction", "--weight-decay", "--seed")


class Parser(argparse.ArgumentParser):
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


positive_float = _checked(float, validation.check_positive_float, "a number > 0")
nonneg_float = _checked(float, validation.check_nonneg_float, "a number >= 0")
positive_int = _checked(int, validation.check_positive_int, "an integer > 0")
nonneg_int = _checked(int, validation.check_nonneg_int, "an integer >= 0")


def fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


class Ranges(list):
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


def int_list(text: str) -> Ranges:
    """``"3"``, ``"1,4,7"`` or ranges ``"0-9,12"``."""
    out = Ranges()
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


def check_seed(value, name: str) -> int:
    value = validation.check_int(value, name)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, {MAX_SEED}], got {value}")
    return value


seed = _checked(int, check_seed, f"an integer in [0, {MAX_SEED}]")


def seed_list(text: str) -> list[int]:
    """Comma-separated distinct seeds, e.g. ``0,1,2``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}")
    out = [seed(p) for p in parts]
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return out


def threads(text: str) -> int:
    value = positive_int(text)
    cpus = os.cpu_count() or 1
    if value > cpus:  # more threads than CPUs only contend, and thousands exhaust the process
        raise argparse.ArgumentTypeError(f"expected at most {cpus} (os.cpu_count(), the CPUs "
                                         f"of this machine), got {value}")
    return value


factory = _checked(str, check_factory_spec, "package.module:function")


def param_pattern(text: str) -> str:
    if not text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"expected a parameter name or glob pattern, got "
                                         f"{text!r}")
    return text


def request_id(text: str) -> str:
    if not text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"expected a non-empty, printable id, got {text!r}")
    return text


def eps_range(text: str) -> tuple[float, float, int]:
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
    g.add_argument("--dtype", choices=sorted(DTYPES), default=dtype_default,
                   help="compute dtype (default: float64 for convex models, float32 for the CNN)")
    g.add_argument("--seed", type=seed, default=0, help="seed of data splits, removal sets "
                   f"and training, 0..{MAX_SEED} (default: 0)")
    g.add_argument("--out", default=out_default, metavar="DIR",
                   help=f"output directory (default: {out_help or out_default})")
    g.add_argument("--quiet", action="store_true", help="no progress bars, print only results")
    g.add_argument("--threads", type=threads, default=None,
                   help="torch CPU threads, at most the machine's CPUs (default: torch's "
                   "choice)")


def _data_args(p: argparse.ArgumentParser, *, default: str | None = "digits") -> None:
    from ssse.data import DATASETS

    p.add_argument("--data", choices=DATASETS, default=default,
                   help=f"data set (default: {default or 'the one recorded in the model file'})")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="directory with the data files (Fashion-MNIST idx files, yeast.csv)")
    p.add_argument("--train-limit", type=positive_int, default=None, metavar="N",
                   help="use a random subset of N training samples (at most the training "
                   "set's size)")


def _factory_args(p: argparse.ArgumentParser, *, erase: bool) -> None:
    g = p.add_argument_group("a model of your own (MODULE:FUNCTION imported from the current "
                             "directory or PYTHONPATH; docs/cli.md)")
    g.add_argument("--model-factory", type=factory, default=None, metavar="MODULE:FUNCTION",
                   help="builds the model: called with the spec the model file records (its "
                   "JSON object; None for a plain safetensors state dict), returns the "
                   "torch.nn.Module whose tensors the file holds (default: the built-in "
                   "architectures)")
    g.add_argument("--data-factory", type=factory, default=None, metavar="MODULE:FUNCTION",
                   help="gives the training set: called with the data object the model file "
                   "records (--data-dir replaces its data_dir; None when there is none), "
                   "returns one batch or a list of batches ((inputs, targets) pairs or "
                   "mappings with 'labels') (default: the built-in data sets)")
    g.add_argument("--params", type=param_pattern, action="append", default=None,
                   metavar="PATTERN", help="only the parameters whose names match (a name or "
                   "a glob such as '*lora_*'; repeat it for several) " +
                   ("(default: those --fisher was fitted on)" if erase else
                    "(default: every parameter); the inverse records them"))


def _removal_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("samples to erase (one of)")
    g.add_argument("--indices", type=int_list, default=None, metavar="LIST",
                   help="training-set indices, e.g. 0-9,42")
    g.add_argument("--indices-file", default=None, metavar="FILE",
                   help="a JSON list or whitespace/comma-separated integers")
    g.add_argument("--remove-class", type=int_list, default=None, metavar="C",
                   help="erase a fraction of the samples of these classes")
    g.add_argument("--remove-attribute", type=int, default=None, metavar="A",
                   help="erase a fraction of the samples carrying attribute A (multi-label)")
    g.add_argument("--fraction", type=fraction, default=0.5,
                   help="fraction of the class/attribute to erase (default: 0.5)")


#: Each command's one-line help and its description.
COMMANDS = {
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
    help_, description = COMMANDS[name]
    return sub.add_parser(name, help=help_, description=description, **kwargs)


def _distributed_args(p: argparse.ArgumentParser, *, fit: bool) -> None:
    from ssse import comm

    g = p.add_argument_group("under torchrun (torchrun --nproc-per-node=K -m ssse ...): every "
                             "rank holds its share of the blocks and of the samples")
    if fit:
        g.add_argument("--exchange", choices=list(comm.EXCHANGES), default="auto",
                       help="reduce_scatter: every rank accumulates all blocks for its rows "
                       "(fewest bytes); all_to_all: gradient slices go to the blocks' owners "
                       "(1/K of the memory); auto: reduce_scatter when it fits and sends "
                       "fewer bytes (default: auto)")
    g.add_argument("--timeout", type=positive_float, default=comm.DEFAULT_TIMEOUT,
                   metavar="SECONDS", help="how long a rank waits for the others before it "
                   f"gives up (default: {comm.DEFAULT_TIMEOUT:g})")


def _add_demo(sub) -> None:
    p = _parser(sub, "demo")
    _data_args(p)
    p.add_argument("--remove-class", type=int, default=3, metavar="C",
                   help="class to erase part of (default: 3)")
    p.add_argument("--fraction", type=fraction, default=0.5,
                   help="fraction of the class to erase (default: 0.5)")
    p.add_argument("--damping", type=positive_float, default=None,
                   help="Fisher damping λ (default: per data set)")
    p.add_argument("--eps", type=eps_range, default=None, metavar="LO:HI:NUM",
                   help=f"ε grid (default: {GRID_TEXT})")
    _common(p, out_default=None, out_help="nothing is written", func=demo.run)


def _add_train(sub) -> None:
    p = _parser(sub, "train")
    _data_args(p)
    p.add_argument("--model", choices=list(MODELS), default="linear",
                   help="linear (the convex model), the small ResNet or paper §5.3's ResNet-20 "
                   "(default: linear)")
    p.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help="L2 coefficient (default: per data set)")
    p.add_argument("--epochs", type=positive_int, default=None, help="SGD epochs (resnet)")
    _common(p, output=("model", "model.safetensors"), func=train.run)


def _add_fisher(sub) -> None:
    p = _parser(sub, "fisher")
    p.add_argument("--model", required=True, metavar="FILE", help="model file (ssse train)")
    _data_args(p, default=None)
    p.add_argument("--damping", type=positive_float, default=None,
                   help="λ (default: 1e-3 for the empirical Fisher, whose rows hold the "
                   "weight decay; the model's weight decay for every other curvature, which "
                   "makes the stored matrix the training objective's curvature)")
    p.add_argument("--curvature", choices=list(ssse.curvature.CURVATURES), default="empirical",
                   help="empirical (the paper's), ggn (Gauss-Newton: erase without ε), mc "
                   "(sampled labels), kfac / ekfac (Kronecker-factored blocks for the linear "
                   "and convolution weights; *_compact: their bases in the inverse's dtype), "
                   "kfac_ggn / ekfac_ggn (the same of the Gauss-Newton matrix: erase without "
                   "ε) (default: empirical)")
    p.add_argument("--mc-samples", type=positive_int, default=1,
                   help="label draws per sample for --curvature mc (default: 1)")
    p.add_argument("--block-size", type=positive_int, default=None, metavar="B",
                   help=f"largest block (default: {ssse_ext.DEFAULT_BLOCK_SIZE})")
    p.add_argument("--layout", choices=list(ssse.LAYOUTS),
                   default="per_parameter", help="block layout; rows = one block per output "
                   "row of a linear model (default: per_parameter)")
    p.add_argument("--minibatch", type=positive_int, default=1,
                   help="mean gradients of mini-batches of this size (default: 1)")
    p.add_argument("--representation", choices=list(REPRESENTATIONS), default="auto",
                   help="how blocks are stored: dense inverses, the exact low-rank form (the "
                   "rows and a factor: smaller for blocks larger than the training set), or "
                   "per block whichever is smaller (default: auto; dense with --checkpoint and under "
                   "torchrun)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="make the fit resumable: save its state to FILE every --every samples; "
                   "run the same command again after a crash to resume (FILE is removed once "
                   "the inverse is saved)")
    p.add_argument("--every", type=positive_int, default=None, metavar="N",
                   help="samples between checkpoints, a multiple of --minibatch (default: "
                   "every 5 minutes); resume with the same N and --threads")
    _factory_args(p, erase=False)
    _distributed_args(p, fit=True)
    _common(p, output=("inverse-Fisher", "inverse_fisher.safetensors; under torchrun the "
                       "index of one file per rank, DIR/inverse_fisher.index.json"),
            func=fisher.run)


def _add_erase(sub) -> None:
    p = _parser(sub, "erase")
    p.add_argument("--model", required=True, metavar="FILE")
    p.add_argument("--fisher", required=True, metavar="FILE", help="inverse-Fisher file")
    _data_args(p, default=None)
    _removal_args(p)
    p.add_argument("--epsilon", type=positive_float, default=None,
                   help="ε of eq. 8; omit it with a Gauss-Newton inverse (ssse fisher "
                   "--curvature ggn, kfac_ggn or ekfac_ggn) for the leave-k-out Newton step, "
                   "nothing to tune")
    p.add_argument("--refine-steps", type=nonneg_int, default=0,
                   help="refinement steps of the Newton erasure (default: 0)")
    p.add_argument("--variant", choices=list(FISHER_VARIANTS), default="full",
                   help="Fisher of D (paper) or of D∖S (default: full)")
    g = p.add_argument_group("serving requests (a ledger)")
    g.add_argument("--ledger", default=None, metavar="FILE",
                   help="serve the request in place: --model and --fisher are replaced by the "
                   "erased model and the downdated inverse, and the request is appended to "
                   "this JSON-lines ledger; a crash at any point is settled by the next run")
    g.add_argument("--request-id", type=request_id, default=None, metavar="ID",
                   help="the request's id in the ledger (default: a random one); an id "
                   "already in the ledger is refused")
    g.add_argument("--verify", action="store_true",
                   help="record the request's certificate in the ledger: the gradient "
                   "residual of the retained objective at the erased model (one pass over the "
                   "samples kept)")
    g.add_argument("--retrain-above", type=positive_float, default=None, metavar="R",
                   help="with --verify: say \"retrain recommended\" once the residual exceeds R")
    _factory_args(p, erase=True)
    _distributed_args(p, fit=False)
    _common(p, output=("erased model", "erased.safetensors"), func=erase.run)


def _add_ledger(sub) -> None:
    p = _parser(sub, "ledger")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
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
        a.set_defaults(func=ledger.run)


def _add_sweep(sub) -> None:
    p = _parser(sub, "sweep")
    p.add_argument("--model", required=True, metavar="FILE")
    p.add_argument("--fisher", required=True, metavar="FILE")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="model retrained without the samples (default: retrain now)")
    _data_args(p, default=None)
    _removal_args(p)
    p.add_argument("--eps", type=eps_range, default=EPS_GRID, metavar="LO:HI:NUM",
                   help=f"ε grid (default: {GRID_TEXT})")
    _common(p, func=sweep.run)


def _add_experiment(sub) -> None:
    p = _parser(sub, "experiment")
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    p.add_argument("--data", default=None, help="data set (multinomial: digits or "
                   "fashion-mnist; nonconvex: fashion-mnist or digits)")
    p.add_argument("--data-dir", default=None, metavar="DIR")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="removals per setting for mean ± std")
    p.add_argument("--seeds", type=seed_list, default=None, metavar="LIST",
                   help="run once per seed (comma-separated, e.g. 0,1,2) and write each seed's "
                   "results with their mean ± sd in one results file (in place of --seed)")
    g = p.add_argument_group("nonconvex only")
    # the nonconvex experiment's models are the CNNs
    g.add_argument("--model", choices=[m for m in MODELS if m != "linear"], default=None,
                   help="the small ResNet (default) or paper §5.3's ResNet-20")
    # rows (one block per output row) is the layout of linear models only
    g.add_argument("--layout", choices=[name for name in ssse.LAYOUTS if name != "rows"],
                   default=None,
                   help="block layout of the inverse Fishers (default: per_parameter)")
    g.add_argument("--block-size", type=positive_int, default=None, metavar="B",
                   help="largest block (default: 256; the paper's ResNet-20: 70000)")
    g.add_argument("--representation", choices=list(REPRESENTATIONS), default=None,
                   help="dense blocks (default), the exact low-rank form, or the smaller per "
                   "block")
    g.add_argument("--methods", type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
                   default=None, metavar="LIST", help="comma-separated subset of the methods "
                   "(forgetting: 'SSSE EK-FAC' adds the EK-FAC rows to its own)")
    g.add_argument("--grid-points", type=positive_int, default=None, metavar="K",
                   help="points of every method's grid")
    g.add_argument("--minibatch", type=positive_int, default=None,
                   help="the mini-batch Fisher's batch (only 10, the paper's, is supported)")
    _common(p, out_default=None, out_help="results/NAME, or results/NAME_DATA with --data",
            func=experiment.run)


def _add_bench(sub) -> None:
    p = _parser(sub, "bench", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)


def _add_info(sub) -> None:
    p = _parser(sub, "info")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=info.run)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ssse", description="Single-Step Sample Erasure: erase training "
                     "samples from a trained model in one closed-form step.")
    try:
        from importlib.metadata import version
        v = version("ssse")
    except Exception:  # pragma: no cover
        v = "unknown"
    parser.add_argument("--version", action="version", version=f"ssse {v}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for add in (_add_demo, _add_train, _add_fisher, _add_erase, _add_ledger, _add_sweep,
                _add_experiment, _add_bench, _add_info):
        add(sub)
    return parser



def rejoin_signed(argv: list[str]) -> list[str]:
    """``--eps -1:1:3`` as ``--eps=-1:1:3`` (see SIGNED_OPTIONS)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in SIGNED_OPTIONS and i + 1 < len(argv) and \
                re.match(r"-\.?\d", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out

