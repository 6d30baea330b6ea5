"""What every experiment's report shares: the ε grid, timing, summaries over repeats, the
markdown table and the results files."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import ssse
from ssse.io import json_default, write_json, write_text
from ssse_ext.bench import machine

__all__ = [
    "EPS_GRID",
    "QUICK_GRID_POINTS",
    "aggregate_numbers",
    "check_seeds",
    "compute_seeds",
    "seed_file",
    "eps_grid",
    "geomean",
    "markdown_table",
    "mean_std",
    "nearest",
    "report",
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


_SOURCE: dict | None = None


def source() -> dict:
    """The version of this source tree and, when it is a git checkout, its commit (with
    ``"+dirty"`` when files differ from it): what produced a results file. Read once per
    process, at the first call (an experiment asks before it computes): the code a process
    runs is what it imported then, whatever the checkout becomes while it runs."""
    global _SOURCE
    if _SOURCE is None:
        _SOURCE = _read_source()
    return dict(_SOURCE)


def _read_source() -> dict:
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
    seeds = "per_seed" in results  # each seed records its own source (write_report)
    payload = {"experiment": name, "schema_version": 2 if seeds else 1, "config": config,
               "source": src, "machine": machine(), "results": results,
               "plots": [Path(p).name for p in plots]}
    write_json(out / "results.json", payload)
    made = "this report written by" if seeds else "made by"
    md = (f"# {name}\n\n{made} ssse {src['version']}, commit {src['commit'] or 'unknown'}\n\n"
          + tables + "\n" + "".join(f"![{Path(p).stem}]({Path(p).name})\n" for p in plots))
    write_text(out / "results.md", md)
    return out / "results.json"


def write_report(name: str, result: dict, table: Callable, figures: Callable, out, *,
                 seeds_table: Callable | None = None) -> str:
    """An experiment's last stage: its table and figures from ``result`` (``{"config",
    "results", ...}``), written with the results to ``out``; returns the table. A result of
    several seeds (:func:`compute_seeds`) gets ``seeds_table``'s table over the seeds (when
    given), then each seed's own tables; its figures are those of its first seed."""
    out = Path(out)
    res = result["results"]
    if "per_seed" not in res:
        text = table(result)
        write_results(out, name, result["config"], res, text, figures(result, out))
        return text
    runs = res["per_seed"]
    text = (f"Seeds {res['seeds']} (each seed draws the data split, the removal sets and the "
            f"training); mean ± sd over seeds use the population sd (ddof = 0). The code each "
            f"seed ran: {_seed_sources(runs)}.\n\n")
    if seeds_table is not None:
        text += seeds_table(result) + "\n"
    text += "".join(f"## Seed {r['seed']}\n\n" + table(r) + "\n" for r in runs)
    text += f"\nFigures: seed {runs[0]['seed']}.\n"
    write_results(out, name, result["config"], res, text,
                  figures(result.get("first") or runs[0], out))
    return text


def _seed_sources(runs: list) -> str:
    """``seed 0: commit abc1234, ...`` from the seeds' recorded sources."""
    def one(src) -> str:
        if not isinstance(src, dict):
            return "not recorded"
        commit = src.get("commit")
        sha, plus, rest = commit.partition("+") if commit else ("unknown", "", "")
        short = sha[:7] + plus + rest  # keeps "+dirty"
        return f"ssse {src.get('version')}, commit {short}"
    return "; ".join(f"seed {r['seed']}: {one(r.get('source'))}" for r in runs)


def check_seeds(seeds) -> list[int]:
    """``seeds`` as a list of distinct integers ≥ 0 (at least one)."""
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise TypeError(f"seeds must be a sequence of integers, got {type(seeds).__name__}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed, got an empty sequence")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"seeds must be integers >= 0, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    return [int(s) for s in seeds]


#: Keys whose values are labels, not measurements: never averaged over seeds.
_LABELS = frozenset({"removed", "seed", "classes", "class", "attribute", "proxy_class",
                     "degenerate_excluded", "degenerate_skipped"})


def aggregate_numbers(items: Sequence):
    """Mean and sd over seeds of every number that ``items`` (one result per seed, the same
    structure) hold at the same place: ``{"mean", "std", "n"}`` per number, dicts and lists of
    equal length followed; labels (:data:`_LABELS`), strings and what differs in structure
    are left out (``None``)."""
    first = items[0]
    if isinstance(first, bool) or first is None or isinstance(first, str):
        return None
    if isinstance(first, (int, float)):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            return None
        vals = [float(v) for v in items]
        if not all(math.isfinite(v) for v in vals):
            return None
        return {**summary(vals), "n": len(vals)}
    if isinstance(first, dict):
        if not all(isinstance(v, dict) for v in items):
            return None
        out = {}
        for key in first:
            if key in _LABELS or not all(key in v for v in items):
                continue
            agg = aggregate_numbers([v[key] for v in items])
            if agg is not None:
                out[key] = agg
        return out or None
    if isinstance(first, list):
        if not all(isinstance(v, list) and len(v) == len(first) for v in items):
            return None
        out = [aggregate_numbers(list(col)) for col in zip(*items)]
        return out if any(o is not None for o in out) else None
    return None


def _options(kwargs: dict) -> dict:
    """The options of a run as JSON values (what a seed's file must match to be reused; the
    progress bars do not count)."""
    return json.loads(json.dumps({k: v for k, v in kwargs.items() if k != "progress"},
                                 sort_keys=True, default=str))


def seed_file(seed_dir, seed: int) -> Path:
    """Where a run of several seeds keeps one seed's whole result: ``seed_dir/seed_S.json``."""
    return Path(seed_dir) / f"seed_{int(seed)}.json"


def _stored_seed(path: Path | None, options: dict) -> dict | None:
    """A seed's stored result when its file exists and was made with the same options."""
    if path is None or not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if stored.get("options") == options else None


def compute_seeds(compute: Callable, seeds, *, seed_dir=None, **kwargs) -> dict:
    """``compute(seed=s, **kwargs)`` for each seed: ``{"config", "results"}`` with the first
    seed's config (``"seeds"`` in place of ``"seed"``) and as results ``{"seeds", "per_seed"
    (one ``{"seed", "seconds", "source", "config", "results"}`` per seed, ``seconds`` its wall
    time, ``source`` the code it ran),
    "aggregate"}`` (see :func:`aggregate_numbers`), and as ``first`` the first seed's whole
    result (what its figures need beyond the results file).

    With ``seed_dir``, each seed's whole result is written to :func:`seed_file` as soon as it
    is done, and a seed whose file holds a result of the same options is read, not computed
    again: a run of several seeds that stops keeps what it did, and a later run with the
    same options completes it (or reports the seeds done so far at once). Every result
    goes through JSON, so stored and computed seeds read alike."""
    seeds = check_seeds(seeds)
    if "seed" in kwargs:
        raise ValueError("give seed or seeds, not both")
    options = _options(kwargs)
    runs, first = [], None
    for s in seeds:
        path = None if seed_dir is None else seed_file(seed_dir, s)
        stored = _stored_seed(path, options)
        if stored is None:
            src = source()  # the code the seed runs, before anything can change it
            r, seconds = timed(compute, seed=s, **kwargs)
            stored = json.loads(json.dumps({"options": options, "source": src,
                                            "seconds": seconds, "result": r},
                                           default=json_default))
            if path is not None:
                write_json(path, stored)
            print(f"seed {s}: {seconds:.0f} s", file=sys.stderr, flush=True)
        else:
            print(f"seed {s}: read from {path}", file=sys.stderr, flush=True)
        r = stored["result"]
        first = first or r
        runs.append({"seed": s, "seconds": stored["seconds"], "source": stored.get("source"),
                     "config": r["config"], "results": r["results"]})
    return _combined(runs, first)


def _combined(runs: list, first: dict) -> dict:
    config = {k: v for k, v in runs[0]["config"].items() if k != "seed"}
    seeds = [r["seed"] for r in runs]
    config["seeds"] = seeds
    return {"config": config, "first": first, "results": {
        "seeds": seeds, "per_seed": runs,
        "aggregate": aggregate_numbers([r["results"] for r in runs])}}


def report(name: str, compute: Callable, table: Callable, figures: Callable, out, *,
           seeds=None, seeds_table: Callable | None = None, seed_dir=None, **kwargs) -> str:
    """Runs ``compute`` (once, or once per seed of ``seeds``) and writes its report
    (:func:`write_report`) to ``out``; returns the tables. With ``seeds``, each seed's result
    is kept in ``seed_dir`` (default ``out/seeds``; :func:`compute_seeds`)."""
    source()  # the code this run imported, read before it computes
    if seeds is None:
        result = compute(**kwargs)
    else:
        result = compute_seeds(compute, seeds, seed_dir=Path(out) / "seeds" if seed_dir is None
                               else seed_dir, **kwargs)
    return write_report(name, result, table, figures, out, seeds_table=seeds_table)
