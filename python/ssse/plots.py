"""Matplotlib figures of the experiments (PNG, headless backend, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_path  # noqa: E402

__all__ = ["decision_boundaries", "eps_curves", "eps_panels"]

_DPI = 90


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=_DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _band(ax, x, values, label, **kw):
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 2:  # repeats x grid: mean +- std
        mean, std = arr.mean(0), arr.std(0)
        line, = ax.plot(x, mean, label=label, **kw)
        if arr.shape[0] > 1:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    else:
        ax.plot(x, arr, label=label, **kw)


def _decorate(ax, xlabel, ylabel, title, logx, hline, vline):
    if logx:
        ax.set_xscale("log")
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls=":")
    if vline is not None:
        ax.axvline(vline, color="black", lw=0.8, ls="--", label="chosen ε")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def eps_curves(path, eps: Sequence[float], series: Mapping[str, Sequence], *, ylabel: str,
               title: str = "", xlabel: str = "ε", logx: bool = True,
               hline: float | None = None, vline: float | None = None,
               constants: Mapping[str, float] | None = None) -> Path:
    """One panel: a curve per series over the ε grid (2-D values: repeats, drawn as mean ± std);
    ``constants`` are methods without ε (influence update, retrained) drawn as flat lines."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, values in series.items():
        _band(ax, eps, values, name, marker="o", ms=3)
    for k, (name, value) in enumerate((constants or {}).items()):
        ax.axhline(value, color=f"C{len(series) + k}", lw=1.2, ls="-.", label=name)
    _decorate(ax, xlabel, ylabel, title, logx, hline, vline)
    ax.legend(fontsize=8)
    return _save(fig, path)


def eps_panels(path, eps: Sequence[float], panels: Mapping[str, Mapping[str, Sequence]], *,
               ylabel: str, title: str = "", xlabel: str = "ε", logx: bool = True,
               vline: float | None = None, ncols: int = 4) -> Path:
    """Several panels sharing the ε axis (e.g. one per split), each with several series."""
    n = len(panels)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.9 * nrows), squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items()):
        for name, values in series.items():
            _band(ax, eps, values, name, marker="o", ms=3)
        _decorate(ax, xlabel, ylabel, panel, logx, None, vline)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def decision_boundaries(path, x: np.ndarray, y: np.ndarray,
                        panels: Sequence[tuple[str, np.ndarray, Mapping[str, tuple]]], *,
                        title: str = "") -> Path:
    """Paper Fig. 1: per panel, the training points (removed ones circled) and each model's
    line ``w·x + b = 0``.

    Args:
        x, y: ``(n, 2)`` points and ``(n,)`` binary labels.
        panels: ``(panel title, removed indices, {model name: (w, b, style)})``.
    """
    x, y = np.asarray(x), np.asarray(y)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.3), squeeze=False)
    lo, hi = x.min(0) - 0.6, x.max(0) + 0.6
    xs = np.linspace(lo[0], hi[0], 50)
    for ax, (name, removed, models) in zip(axes.flat, panels):
        ax.scatter(x[y == 0, 0], x[y == 0, 1], s=14, c="#1f77b4", label="class 0")
        ax.scatter(x[y == 1, 0], x[y == 1, 1], s=14, c="#ff7f0e", label="class 1")
        ax.scatter(x[removed, 0], x[removed, 1], s=110, facecolors="none", edgecolors="red",
                   linewidths=1.5, label="removed")
        for label, (w, b, style) in models.items():
            w = np.asarray(w, dtype=float)
            if abs(w[1]) > 1e-12:
                ax.plot(xs, -(w[0] * xs + b) / w[1], label=label, **style)
            else:
                ax.axvline(-b / w[0], label=label, **style)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
