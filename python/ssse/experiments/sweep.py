"""``ssse sweep``: one removal, retrained without it, SSSE over an ε grid, every model compared
with the original and the retrained one on the paper's four splits."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import ssse_ext
from ssse import plots
from ssse.io import write_json, write_text

from .common import EPS_GRID, eps_grid, markdown_table
from .methods import select, ssse_curve
from .removal import SPLITS, make_removal, score_name
from .tasks import Task

__all__ = ["run_sweep"]


def run_sweep(task: Task, model: nn.Module, inv: ssse_ext.BlockInverseFisher,
              removed: torch.Tensor, *, out: Path, eps=EPS_GRID,
              reference: nn.Module | None = None, classes=None, attribute=None, seed: int = 0,
              minibatch: int = 1, progress: bool = True) -> dict:
    """Writes ``sweep.json``, ``sweep.md`` (the table) and two PNGs to ``out``; returns the
    report, its ``"table"`` included."""
    grid = eps_grid(*eps)
    rem = make_removal(task, model, removed, classes=classes, attribute=attribute, seed=seed,
                       reference=reference)
    crit = score_name(task)
    sw = ssse_curve(rem, inv, grid, minibatch=minibatch, progress=progress)
    best = grid[select(grid, sw["rows"], crit)]
    base = {"original": rem.evaluate(rem.original), "retrained": rem.evaluate(rem.retrained)}
    report = {"k": rem.k, "n": task.n, "removed": rem.removed.tolist(), "criterion": crit,
              "best_eps": best, "eps": grid, "ssse": sw["rows"], **base,
              "erase_seconds": sw["erase_seconds"], "retrain_seconds": rem.retrain_seconds}
    out = Path(out)
    report["plots"] = [p.name for p in _plots(out, report)]
    write_json(out / "sweep.json", report)
    report["table"] = _table(report)
    write_text(out / "sweep.md", report["table"])
    return report


def _table(report: dict) -> str:
    crit = report["criterion"]
    header = ["model", "ε", crit, "param dist"] + [f"acc {s}" for s in SPLITS]

    def line(name, e, r):
        return [name, e, r[crit], r["param_distance"]] + [r["accuracy"][s] for s in SPLITS]

    rows = [line("original", "-", report["original"]),
            line("retrained", "-", report["retrained"])]
    rows += [line("SSSE" + (" (best)" if e == report["best_eps"] else ""), e, r)
             for e, r in zip(report["eps"], report["ssse"])]
    return markdown_table(header, rows)


def _plots(out: Path, report: dict) -> list[Path]:
    crit, grid, rows = report["criterion"], report["eps"], report["ssse"]
    eps_png = plots.eps_curves(out / f"sweep_{crit}.png", grid, {"SSSE": [r[crit] for r in rows]},
                               ylabel="δ on S (lower: closer to retrained)" if crit == "delta"
                               else "γ on S (higher: closer to retrained)",
                               hline=0.5, vline=report["best_eps"],
                               title=f"k={report['k']} of n={report['n']}")
    acc_png = plots.eps_panels(out / "sweep_accuracy.png", grid, {
        s: {"SSSE": [r["accuracy"][s] for r in rows],
            "original": [report["original"]["accuracy"][s]] * len(grid),
            "retrained": [report["retrained"]["accuracy"][s]] * len(grid)} for s in SPLITS},
        ylabel="accuracy", vline=report["best_eps"])
    return [eps_png, acc_png]
