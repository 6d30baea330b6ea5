"""What every experiment's report shares: the ε grid, timing, summaries over repeats, the
markdown table and the results files."""

from __future__ import annotations

import math
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import ssse
from ssse.io import write_json, write_text
from ssse_ext.bench import machine

__all__ = [
    "EPS_GRID",
    "QUICK_GRID_POINTS",
    "eps_grid",
    "geomean",
    "markdown_table",
    "mean_std",
    "nearest",
    "source",
    "summary",
    "timed",
    "write_report",
    "write_results",
]

#: The default ε grid ``(lo, hi, num)``, log-spaced: the demo, ``ssse sweep`` and the convex
#: experiments.
EPS_GRID = (0.01, 100.0, 21)
#: Points of every grid in the experiments' ``--quick`` settings.
QUICK_GRID_POINTS = 7


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


def nearest(grid: Sequence[float], value: float) -> int:
    """The index of the grid value nearest to ``value`` on a log scale."""
    return min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / value)))


def mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return (statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)


def summary(values) -> dict:
    """``{"mean", "std"}`` of :func:`mean_std`."""
    m, s = mean_std(values)
    return {"mean": m, "std": s}


def geomean(values) -> float:
    """The geometric mean of positive values."""
    return float(np.exp(np.mean(np.log(values))))


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


def source() -> dict:
    """The version of this source tree and, when it is a git checkout, its commit (with
    ``"+dirty"`` when files differ from it): what produced a results file."""
    root = Path(__file__).resolve().parents[3]
    commit = None
    if not (root / "pyproject.toml").is_file():  # an installed copy: no source tree to ask
        return {"version": ssse.__version__, "commit": None}
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=30)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": ssse.__version__, "commit": commit}


def write_results(out: Path, name: str, config: dict, results: dict, tables: str,
                  plots: Sequence[Path]) -> Path:
    """``results.json`` (schema: experiment, config, source (version and commit), machine,
    results, plots) and ``results.md`` in ``out``."""
    out = Path(out)
    src = source()
    payload = {"experiment": name, "schema_version": 1, "config": config, "source": src,
               "machine": machine(), "results": results,
               "plots": [Path(p).name for p in plots]}
    write_json(out / "results.json", payload)
    md = f"# {name}\n\nssse {src['version']}, commit {src['commit'] or 'unknown'}\n\n" + tables + "\n" + "".join(f"![{Path(p).stem}]({Path(p).name})\n"
                                                  for p in plots)
    write_text(out / "results.md", md)
    return out / "results.json"


def write_report(name: str, result: dict, table: Callable, figures: Callable, out) -> str:
    """An experiment's last stage: its table and figures from ``result`` (``{"config",
    "results", ...}``), written with the results to ``out``; returns the table."""
    out = Path(out)
    text = table(result)
    write_results(out, name, result["config"], result["results"], text, figures(result, out))
    return text
