"""A short report of a training run: a markdown page with each task's metrics beside its
chance level and its input-blind score, decoded examples, learning curves and a heat map of
which experts each task routes to; and `summary.json`, the same figures for machines. Written
to a folder and logged to the run in MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.tracking import client
from mm.config import Config
from mm.metrics import LEARNED_MARGIN, bracket_scores, interval, leaf_count, learned, routing_entropy
from mm.trees import TAG
from mmcli.plots import eval_curves, learning_curves, routing_heatmap


def chance_levels(
    config: Config, checkpoint_tasks: list[dict[str, Any]], dev_references: dict[str, list]
) -> dict:
    """What a model that learned nothing scores on each task's primary metric: uniform guessing
    for classes, an empty output for BLEU and WER (BLEU 0, WER 1), a flat tree over the words
    for parsing."""
    classes = {t["name"]: t["num_classes"] for t in checkpoint_tasks}
    levels = {}
    for task in config.tasks:
        metric = config.primary_metric(task.name)
        if metric == "accuracy":
            levels[task.name] = 1 / max(classes.get(task.name) or 1, 1)
        elif metric == "bleu":
            levels[task.name] = 0.0
        elif metric == "wer":
            levels[task.name] = 1.0
        elif metric == "bracket_f1":
            references = [r if isinstance(r, str) else r[0] for r in dev_references.get(task.name, [])]
            flat = [f"(S {' '.join([TAG] * leaf_count(r))} )" for r in references]
            levels[task.name] = bracket_scores(flat, references)["bracket_f1"]
    return levels


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
    blind: dict[str, dict[str, float]] | None = None,
    examples: dict[str, list[dict[str, str]]] | None = None,
    training: dict[str, float] | None = None,
) -> Path:
    """`blind`: the test scores with every input blanked; `examples`: decoded dev examples per
    text task; `training`: the run's seconds, steps, train_gflops and mfu."""
    folder.mkdir(parents=True, exist_ok=True)
    blind, examples, training = blind or {}, examples or {}, training or {}
    primary = config.primary_metrics()
    keys = [f"train/{t}/loss" for t in primary] + [f"eval/{t}/{m}" for t, m in primary.items()]
    history = metric_history(tracking_uri, run_id, keys)
    learning_curves(history, list(primary)).savefig(folder / "learning_curves.png", dpi=110)
    eval_curves(history, primary).savefig(folder / "dev_metrics.png", dpi=110)
    routing_file = client(tracking_uri).download_artifacts(run_id, "routing.json", str(folder))
    routing = json.loads(Path(routing_file).read_text())
    routing_heatmap(routing).savefig(folder / "expert_routing.png", dpi=110)
    entropy = {task: [routing_entropy(layer) for layer in layers] for task, layers in routing.items()}

    lines = [
        f"# {config.name}: joint training report",
        "",
        f"MLflow run `{run_id}` at `{tracking_uri}`; {config.train.steps} steps, {config.cluster.workers} "
        f"Ray Train workers, {config.model.moe.num_experts} experts (k={config.model.moe.k}).",
        "",
        f"Input-blind: the same model on the test split with every input blanked (a black image, "
        f"silence, an empty sentence). Interval: the test score's 95 % bootstrap interval over "
        f"the test examples; scores whose intervals overlap are not told apart. Learned: the test "
        f"score and the worse end of its interval beat chance and input-blind by "
        f"{LEARNED_MARGIN:.0%} of the metric's range.",
        "",
        "| task | metric | dev | test | test, 95 % interval | chance | input-blind | learned |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    summary_tasks = {}
    for task, metric in primary.items():
        d, t, c = dev.get(task, {}).get(metric), test.get(task, {}).get(metric), chance.get(task)
        b = blind.get(task, {}).get(metric)
        bounds = interval(test.get(task, {}), metric)
        is_learned = None if None in (t, c, b) else learned(metric, t, c, b, bounds=bounds)
        verdict = {None: "-", True: "yes", False: "no"}[is_learned]
        shown = "-" if bounds is None else f"{_fmt(bounds[0])} – {_fmt(bounds[1])}"
        lines.append(
            f"| {task} | {metric} | {_fmt(d)} | {_fmt(t)} | {shown} | {_fmt(c)} | {_fmt(b)} | {verdict} |"
        )
        summary_tasks[task] = {
            "metric": metric,
            "dev": d,
            "test": t,
            "test_interval": None if bounds is None else list(bounds),
            "chance": c,
            "input_blind": b,
            "learned": is_learned,
        }
    shapes = {t: test[t]["well_formed"] for t in primary if "well_formed" in test.get(t, {})}
    if shapes:
        lines += [
            "",
            "Parse trees that are well formed and have one leaf per input word (test): "
            + ", ".join(f"{task} {share:.1f} %" for task, share in shapes.items())
            + ".",
        ]
    if training:
        lines += [
            "",
            f"Training: {training.get('steps')} steps in {training.get('seconds', 0):.0f} s, "
            f"{training.get('train_gflops', 0):.1f} GFLOP/s over all workers "
            f"(MFU {training.get('mfu', 0):.1%} of the measured matmul peak).",
        ]
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
    for task, rows in examples.items():
        lines += [
            "",
            f"### {task}: decoded dev examples",
            "",
            "| input | output | reference |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {_cell(r['input'])} | {_cell(r['output'])} | {_cell(r['reference'])} |" for r in rows]
    lines += [
        "",
        "## Learning curves",
        "![learning curves](learning_curves.png)",
        "",
        "![dev metrics](dev_metrics.png)",
        "",
        "## Which experts each task routes to",
        "Share of each task's tokens sent to each expert over training, per MoE layer.",
        "Routing entropy: of a task's shares over the experts, ÷ log(experts); 1 is an even",
        "spread, 0 one expert for every token.",
        "",
        "![expert routing](expert_routing.png)",
        "",
        *_entropy_table(entropy),
        "",
    ]
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    summary = {
        "run_id": run_id,
        "tasks": summary_tasks,
        "training": training,
        "timings": timings,
        "routing_entropy": entropy,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    client(tracking_uri).log_artifacts(run_id, str(folder), "report")
    return report


def _entropy_table(entropy: dict[str, list[float]]) -> list[str]:
    layers = max((len(hs) for hs in entropy.values()), default=0)
    header = " | ".join(f"routing entropy, MoE layer {i + 1}" for i in range(layers))
    rows = [
        f"| {task} | " + " | ".join(f"{h:.2f}" for h in hs) + " |" for task, hs in sorted(entropy.items())
    ]
    return [f"| task | {header} |", "| --- |" + " ---: |" * layers, *rows]


def _cell(text: str) -> str:
    """Text for a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ") or " "


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
