"""Plots of a sweep, as matplotlib figures for MLflow (`log_figure`)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from mm.config import Config  # noqa: E402
from tune.space import MIX  # noqa: E402


def objective_plot(trials) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(trials) + 2), 3.2))
    names = [t.name.split("_")[-1] if "_" in t.name else t.name for t in trials]
    values = [t.objective if t.objective is not None else 0.0 for t in trials]
    colours = ["tab:red" if t.error else "tab:blue" for t in trials]
    ax.bar(range(len(trials)), values, color=colours)
    ax.set_xticks(range(len(trials)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("objective (mean normalised dev metric)")
    ax.set_title("objective per trial (red: failed)")
    fig.tight_layout()
    return fig


def metric_vs_ratio_plot(trials, config: Config) -> plt.Figure:
    """For each task: its primary dev metric against its share of the mixing weights."""
    tasks = config.tasks
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        metric = config.primary_metric(task.name)
        points = [
            (_share(t.params, task.name, config), t.metrics.get(f"eval/{task.name}/{metric}"))
            for t in trials
            if not t.error
        ]
        points = [(x, y) for x, y in points if y is not None]
        ax.scatter([x for x, _ in points], [y for _, y in points])
        ax.set_xlabel(f"mixing share of {task.name}")
        ax.set_ylabel(metric)
        ax.set_title(task.name, fontsize=9)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _share(params: dict, task: str, config: Config) -> float:
    weights = {t.name: float(params.get(f"{MIX}{t.name}", t.mix_weight or 1.0)) for t in config.tasks}
    return weights[task] / sum(weights.values())
