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
        metric = task.metrics[0]
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


def learning_curves(history: dict[str, list[tuple[int, float]]], tasks: list[str]) -> plt.Figure:
    """Each task's training loss (smoothed) against the step, one line per task."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for task in tasks:
        points = history.get(f"train/{task}/loss", [])
        if not points:
            continue
        steps = [s for s, _ in points]
        ax.plot(steps, _smooth([v for _, v in points]), label=task)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("learning curves")
    fig.tight_layout()
    return fig


def eval_curves(history: dict[str, list[tuple[int, float]]], primary: dict[str, str]) -> plt.Figure:
    """Each task's primary dev metric at every evaluation."""
    cols = min(3, len(primary))
    rows = math.ceil(len(primary) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (task, metric) in zip(axes.flat, primary.items(), strict=False):
        points = history.get(f"eval/{task}/{metric}", [])
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o")
        ax.set_title(f"{task}: {metric}", fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(primary) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def routing_heatmap(routing: dict[str, list[list[int]]]) -> plt.Figure:
    """Which experts each task's tokens go to: the share of a task's tokens per expert, one
    panel per MoE layer (encoder, decoder)."""
    import numpy as np

    tasks = sorted(routing)
    layers = max(len(routing[t]) for t in tasks)
    fig, axes = plt.subplots(1, layers, figsize=(4.5 * layers, 0.5 * len(tasks) + 1.8), squeeze=False)
    for layer, ax in enumerate(axes.flat):
        counts = [routing[t][layer] if layer < len(routing[t]) else [] for t in tasks]
        width = max(len(c) for c in counts)
        share = np.array([[c[i] if i < len(c) else 0 for i in range(width)] for c in counts], dtype=float)
        share /= np.maximum(share.sum(1, keepdims=True), 1)
        image = ax.imshow(share, cmap="viridis", vmin=0, aspect="auto")
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_xticks(range(width), [str(i) for i in range(width)], fontsize=8)
        ax.set_xlabel("expert")
        ax.set_title(["encoder MoE", "decoder MoE"][layer] if layer < 2 else f"MoE {layer}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, label="share of the task's tokens")
    fig.tight_layout()
    return fig


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    out, last = [], values[0] if values else 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out
