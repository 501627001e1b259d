"""The placement-quality figure of ``benchmarks.summarize``: held-out accuracy against trainable parameters (top
row, one panel per task) and the same means by method (bottom row, where points at matched parameters would sit
almost on one vertical line above). matplotlib is imported only here, when a figure is drawn.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import save_figure
from benchmarks.stats import mean_std
from benchmarks.summary_tables import AUTOMATIC, ORDER, UNMATCHED, method_order, values


def marker_of(method: str) -> str:
    """Stars for automatic placement, squares for the unmatched references, dots for the rest."""
    return "*" if method in AUTOMATIC else ("s" if method in UNMATCHED else "o")


def plot_by_method(ax: Any, methods: dict[str, list[dict]], task: str, colors: dict[str, Any]) -> None:
    """One task's accuracy by method: each seed faint, the mean ± std over seeds, the pretrained model dashed."""
    names = [m for m in method_order(set(methods) - {"base"}) if values(methods[m], "accuracy")]
    for x, method in enumerate(names):
        ys = [100 * y for y in values(methods[method], "accuracy")]
        marker = marker_of(method)
        color = colors.get(method, "#555555")
        ax.scatter([x] * len(ys), ys, color=color, alpha=0.3, s=18, marker=marker)
        my, sy = mean_std(ys)
        ax.errorbar(x, my, yerr=sy or 0, color=color, marker=marker, ms=10 if marker == "*" else 7, capsize=3, ls="none")
    if "base" in methods and values(methods["base"], "accuracy"):
        ax.axhline(100 * statistics.fmean(values(methods["base"], "accuracy")), color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("held-out exact-match accuracy (%)")
    ax.set_title(f"{task}: by method (mean ± std over seeds)")
    ax.grid(True, axis="y", alpha=0.3)


def plot_by_parameters(ax: Any, methods: dict[str, list[dict]], task: str, colors: dict[str, Any]) -> None:
    """One task's accuracy against trainable parameters (log scale): each seed faint, each method's mean ± std."""
    from matplotlib.ticker import FuncFormatter

    if "base" in methods:
        base = values(methods["base"], "accuracy")
        if base:
            ax.axhline(100 * statistics.fmean(base), color="grey", ls="--", lw=1, label="base (no finetuning)")
    for method in method_order(set(methods) - {"base"}):
        rows = methods[method]
        xs, ys = values(rows, "trainable_params"), values(rows, "accuracy")
        if not xs or not ys:
            continue
        marker = marker_of(method)
        color = colors.get(method, "#555555")
        ax.scatter(xs, [100 * y for y in ys], color=color, alpha=0.3, s=18, marker=marker)
        my, sy = mean_std([100 * y for y in ys])
        ax.errorbar(
            statistics.fmean(xs), my, yerr=sy or 0, color=color, marker=marker, ms=10 if marker == "*" else 7,
            capsize=3, ls="none", label=f"{method} (n={len(ys)})",
        )  # fmt: skip
    xs_all = [x for rows in methods.values() for x in values(rows, "trainable_params")]
    ys_all = [100 * y for rows in methods.values() for y in values(rows, "accuracy")]
    ax.set_xscale("log")
    if xs_all:
        ax.set_xlim(min(xs_all) / 1.6, max(xs_all) * 1.6)
    ax.set_ylim(-3, min(103, max([10.0] + ys_all) + 8))
    millions = FuncFormatter(lambda x, _pos: f"{x / 1e6:.2g}M")
    ax.xaxis.set_major_formatter(millions)
    ax.xaxis.set_minor_formatter(millions)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("held-out exact-match accuracy (%)")
    ax.set_title(task)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot(by_task: dict[str, dict[str, list[dict]]], path: Path, title: str) -> None:
    """Draw the figure of ``by_task`` (task -> method -> rows) and save it to ``path`` as PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a task is plotted once it has a finetuned run (the pretrained model alone has no parameter count)
    tasks = sorted(t for t in by_task if any(values(rows, "trainable_params") for rows in by_task[t].values()))
    if not tasks:
        return
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 9.5), squeeze=False)
    palette = list(plt.get_cmap("tab10").colors) + ["#000000", "#8c564b88", "#e7298a"]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(m for m in ORDER if m != "base")}
    for ax, task in zip(axes[1], tasks):
        plot_by_method(ax, by_task[task], task, colors)
    for ax, task in zip(axes[0], tasks):
        plot_by_parameters(ax, by_task[task], task, colors)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
