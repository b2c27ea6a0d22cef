"""A short report of a training run: a markdown page with each task's metrics beside its
chance level, learning curves and a heat map of which experts each task routes to. Written to
a folder and logged to the run in MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.tracking import client
from mm.config import Config
from mm.metrics import bracket_scores, higher_is_better, parse_tree
from tune.plots import eval_curves, learning_curves, routing_heatmap


def chance_levels(
    config: Config, checkpoint_tasks: list[dict[str, Any]], dev_references: dict[str, list]
) -> dict:
    """What a model that learned nothing scores on each task's primary metric: uniform guessing
    for classes, an empty output for BLEU and WER (BLEU 0, WER 1), a flat tree over the words
    for parsing."""
    classes = {t["name"]: t["num_classes"] for t in checkpoint_tasks}
    levels = {}
    for task in config.tasks:
        metric = task.metrics[0]
        if metric == "accuracy":
            levels[task.name] = 1 / max(classes.get(task.name) or 1, 1)
        elif metric == "bleu":
            levels[task.name] = 0.0
        elif metric == "wer":
            levels[task.name] = 1.0
        elif metric == "bracket_f1":
            references = [r if isinstance(r, str) else r[0] for r in dev_references.get(task.name, [])]
            flat = [f"(S {' '.join(['XX'] * _leaves(r))} )" for r in references]
            levels[task.name] = bracket_scores(flat, references)["bracket_f1"]
    return levels


def _beats(value: float, chance: float, metric: str) -> bool:
    return value != chance and (value > chance) == higher_is_better(metric)


def _leaves(tree: str) -> int:
    def count(node) -> int:
        return 1 if isinstance(node, str) else sum(count(child) for child in node.children)

    return sum(count(node) for node in parse_tree(tree))


def metric_history(tracking_uri: str, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    mlflow = client(tracking_uri)
    return {key: [(m.step, m.value) for m in mlflow.get_metric_history(run_id, key)] for key in keys}


def write_report(
    folder: Path,
    config: Config,
    tracking_uri: str,
    run_id: str,
    dev: dict[str, dict[str, float]],
    test: dict[str, dict[str, float]],
    chance: dict[str, float],
    timings: dict[str, float],
    registered: dict[str, Any] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    primary = {task.name: task.metrics[0] for task in config.tasks}
    keys = [f"train/{t}/loss" for t in primary] + [f"eval/{t}/{m}" for t, m in primary.items()]
    history = metric_history(tracking_uri, run_id, keys)
    learning_curves(history, list(primary)).savefig(folder / "learning_curves.png", dpi=110)
    eval_curves(history, primary).savefig(folder / "dev_metrics.png", dpi=110)
    routing_file = client(tracking_uri).download_artifacts(run_id, "routing.json", str(folder))
    routing_heatmap(json.loads(Path(routing_file).read_text())).savefig(
        folder / "expert_routing.png", dpi=110
    )

    lines = [
        f"# {config.name}: joint training report",
        "",
        f"MLflow run `{run_id}` at `{tracking_uri}`; {config.train.steps} steps, {config.cluster.workers} "
        f"Ray Train workers, {config.model.moe.num_experts} experts (k={config.model.moe.k}).",
        "",
        "| task | metric | dev | test | chance | better than chance (dev and test) |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for task, metric in primary.items():
        d, t, c = dev.get(task, {}).get(metric), test.get(task, {}).get(metric), chance.get(task)
        if None in (d, t, c):
            better = "-"
        else:
            better = "yes" if _beats(d, c, metric) and _beats(t, c, metric) else "no"
        lines.append(f"| {task} | {metric} | {_fmt(d)} | {_fmt(t)} | {_fmt(c)} | {better} |")
    lines += [
        "",
        "Time per phase: "
        + ", ".join(f"{phase} {seconds / 60:.1f} min" for phase, seconds in timings.items())
        + ".",
    ]
    if registered:
        lines += [
            "",
            f"Registered `{registered['name']}` v{registered['version']} as `{registered['alias']}`.",
        ]
    lines += [
        "",
        "## Learning curves",
        "![learning curves](learning_curves.png)",
        "",
        "![dev metrics](dev_metrics.png)",
        "",
        "## Which experts each task routes to",
        "Share of each task's tokens sent to each expert over training, per MoE layer.",
        "",
        "![expert routing](expert_routing.png)",
        "",
    ]
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    client(tracking_uri).log_artifacts(run_id, str(folder), "report")
    return report


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
