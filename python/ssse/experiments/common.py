"""What every experiment shares: a task (data, model, loss, training recipe), timing, the ε
sweep of SSSE against a retrained reference, and the results files."""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

import ssse_ext
from ssse import training
from ssse.baselines import retrain
from ssse.data import Dataset
from ssse.io import write_json, write_text

from .models import build_model, loss_function

__all__ = [
    "Task",
    "eps_grid",
    "machine",
    "markdown_table",
    "set_threads",
    "state_of",
    "sweep_states",
    "timed",
    "with_state",
    "write_results",
]


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def machine() -> dict:
    """Where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "ssse": ssse_ext.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def timed(fn: Callable, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def eps_grid(lo: float, hi: float, num: int) -> list[float]:
    """``num`` log-spaced values from ``lo`` to ``hi``."""
    if num == 1:
        return [float(lo)]
    a, b = math.log10(lo), math.log10(hi)
    return [float(10 ** (a + (b - a) * i / (num - 1))) for i in range(num)]


@dataclass
class Task:
    """A data set with the model, loss, L2 coefficient and training recipe used on it.

    ``recipe`` is plain JSON (it travels in model files): ``{"optimizer": "lbfgs", "max_iter"}``
    for the convex models, ``{"optimizer": "sgd", "epochs", "lr", "batch_size", "momentum"}``
    for the CNN.
    """

    ds: Dataset
    spec: dict
    loss: str
    weight_decay: float
    recipe: dict
    dtype: torch.dtype = torch.float64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_info: dict = field(default_factory=dict)

    @property
    def loss_fn(self):
        return loss_function(self.loss)

    @property
    def n(self) -> int:
        return self.ds.n_train

    def data(self, idx: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training samples ``idx`` (all by default) as one ``(x, y)`` batch in a list."""
        x, y = self.ds.train()
        if idx is not None:
            x, y = x[idx], y[idx]
        # A one-batch iterable rather than a bare pair: the library then never re-slices it.
        return [(x.to(self.device, self.dtype), y.to(self.device))]

    def retained(self, removed: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        keep = torch.ones(self.n, dtype=torch.bool)
        keep[removed] = False
        return self.data(torch.nonzero(keep).flatten())

    def new_model(self) -> nn.Module:
        return build_model(self.spec).to(device=self.device, dtype=self.dtype)

    def make_recipe(self, progress: bool = False):
        """The training recipe; ``progress`` shows a bar over the SGD steps (L-BFGS has none)."""
        r = dict(self.recipe)
        kind = r.pop("optimizer")
        if kind == "sgd":
            r["progress"] = progress
        factory = {"lbfgs": training.lbfgs_recipe, "sgd": training.sgd_recipe}[kind]
        return factory(self.new_model, self.loss_fn, weight_decay=self.weight_decay,
                       device=self.device, dtype=self.dtype, **r)

    def train(self, data, *, seed: int, progress: bool = False) -> nn.Module:
        """A model trained from scratch on ``data`` with this task's recipe (eval mode)."""
        return retrain(self.make_recipe(progress), data, seed=seed).eval()

    def metadata(self, **extra) -> dict:
        """What a model file needs to rebuild, retrain and erase from this model."""
        return {"loss": self.loss, "weight_decay": self.weight_decay, "recipe": self.recipe,
                "data": self.data_info, "n_train": self.n, **extra}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def with_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding ``state``."""
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out.eval()


def sweep_states(model: nn.Module, unit_state: dict[str, torch.Tensor],
                 eps: Sequence[float]) -> list[dict[str, torch.Tensor]]:
    r"""The SSSE models of a whole ε grid from the update at ε = 1.

    Eq. 8 is linear in ε, :math:`\hat\theta_\varepsilon = \theta^* + \varepsilon
    (\hat\theta_1 - \theta^*)`, so one :func:`ssse.ssse_update` serves the grid.
    """
    star = model.state_dict()
    out = []
    for e in eps:
        out.append({k: (star[k] + e * (unit_state[k] - star[k])) if star[k].is_floating_point()
                    else star[k].clone() for k in star})
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
                return f"{v:.2e}"
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out: Path, name: str, config: dict, results: dict, tables: str,
                  plots: Sequence[Path]) -> Path:
    """``results.json`` (schema: experiment, config, machine, results, plots) and
    ``results.md`` in ``out``."""
    out = Path(out)
    payload = {"experiment": name, "schema_version": 1, "config": config, "machine": machine(),
               "results": results, "plots": [Path(p).name for p in plots]}
    write_json(out / "results.json", payload)
    md = f"# {name}\n\n" + tables + "\n" + "".join(f"![{Path(p).stem}]({Path(p).name})\n"
                                                  for p in plots)
    write_text(out / "results.md", md)
    json.dumps(payload, default=str)  # fail here rather than later if something is not JSON
    return out / "results.json"
