"""The figure layouts of the case-by-case benchmarks: a grid of log-log panels, one per case, and one
error-against-error scatter around the diagonal."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["diagonal_scatter", "panel_figure", "pyplot", "write_outputs"]


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` (logged) if matplotlib
    is not installed: the benchmarks then write their tables without a figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no figure written")
        return None
    return plt


def write_outputs(
    out: str | Path,
    stem: str,
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    plot: Callable[[Path], bool],
) -> tuple[Path, Path | None]:
    """``OUT/stem.csv`` (``header``, then ``rows``) and ``OUT/stem.png`` drawn by ``plot(path)``; returns
    their paths, the PNG's ``None`` where ``plot`` drew nothing (matplotlib missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return csv_path, png_path if plot(png_path) else None


def panel_figure(
    path: str | Path,
    titles: Sequence[str],
    draw: Callable[[Any, str, Sequence[Any]], None],
    *,
    cols: int,
    panel_size: tuple[float, float],
    suptitle: str,
    ylabel: str,
    xticks: Sequence[int],
    xlabel: str | None = None,
) -> bool:
    """Draw ``draw(ax, title, colors)`` in one panel per title and save the PNG at ``path``.

    Every panel gets its title, the integer ``xticks``, a light grid and ``xlabel``; the first gets
    ``ylabel`` and the legend. Returns ``False`` (and logs) if matplotlib is not installed.
    """
    plt = pyplot()
    if plt is None:
        return False
    k = len(titles)
    cols = min(k, cols)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, title in zip(axes.flat, titles, strict=False):
        draw(ax, title, colors)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(list(xticks), [str(v) for v in xticks])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        if xlabel is not None:
            ax.set_xlabel(xlabel)
    for ax in axes.flat[k:]:
        ax.axis("off")
    axes.flat[0].set_ylabel(ylabel)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def diagonal_scatter(
    path: str | Path,
    series: Iterable[tuple[str, Sequence[float], Sequence[float], dict[str, Any]]],
    limits: tuple[float, float],
    xlabel: str,
    ylabel: str,
    title: str,
    *,
    figsize: tuple[float, float] = (5.5, 5.0),
    legend_size: int = 8,
    unit_lines: bool = False,
) -> bool:
    """One error against another, one point per case: ``series`` of ``(label, xs, ys, scatter options)``
    on log-log axes over ``limits`` with the diagonal dashed (below it the ``y`` side is better);
    ``unit_lines``: dotted lines at 1 too. ``False`` (logged) if matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=figsize)
    for label, xs, ys, options in series:
        ax.scatter(xs, ys, label=label, **options)
    lo, hi = limits
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    if unit_lines:
        ax.axhline(1, color="grey", ls=":", lw=0.8)
        ax.axvline(1, color="grey", ls=":", lw=0.8)
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
