"""Plots of one training run for its report: learning curves, dev curves, and which experts
each task routes to, as matplotlib figures."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402


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
