"""The report of a study (`mm experiment`): markdown tables and a plot in a folder.

For each comparison (an arm against its baseline arm) a table per task: each test metric as
mean ± standard deviation over the seeds for both arms, and the paired difference (other -
baseline, seed by seed) with the share of seeds whose difference has the sign of the mean.
Where both arms train several tasks, a last row compares their aggregate objective (the
sweep's: the mean over tasks of each primary metric, normalised).
Arrows say which direction is better. A table of every run follows, failed runs included.
"""

from __future__ import annotations

from pathlib import Path

from mm.metrics import higher_is_better
from tune.stats import paired_difference, summarize
from tune.studies import Comparison, Study


def write_study_report(
    folder: Path, study: Study, runs, seeds: list[int], preset: str, command: str | None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Study: {study.name}",
        "",
        f"Preset `{preset}`, seeds {', '.join(map(str, seeds))}; test splits."
        + (f" Command: `{command}`" if command else ""),
        "",
    ]
    lines += arms_table(study)
    lines += moe_table(study, runs)
    for comparison in study.comparisons:
        lines += comparison_table(comparison, runs)
    lines += runs_table(study, runs)
    plot = folder / f"{study.name}.png"
    arms_plot(study, runs).savefig(plot, dpi=120)
    lines += ["", f"![{study.name}]({plot.name})", ""]
    report = folder / "README.md"
    report.write_text("\n".join(lines))
    return report


def metric_values(runs, arm: str, task: str, metric: str) -> dict[int, float]:
    """{seed: value} of the arm's successful runs."""
    return {
        r.seed: r.scores[task][metric]
        for r in runs
        if r.arm == arm and not r.error and metric in r.scores.get(task, {})
    }


def comparison_table(comparison: Comparison, runs) -> list[str]:
    base, other = comparison.baseline, comparison.other
    lines = [f"## {other} vs {base}", ""]
    lines += [f"| task | metric | {base} | {other} | {other} − {base} |", "|---|---|---|---|---|"]
    for task in comparison.tasks:
        for metric in task_metrics(runs, task):
            a, b = metric_values(runs, base, task, metric), metric_values(runs, other, task, metric)
            arrow = "↑" if higher_is_better(metric) else "↓"
            lines.append(f"| {task} | {metric} {arrow} | {_summary(a)} | {_summary(b)} | {_paired(a, b)} |")
    if len(comparison.tasks) > 1:  # both arms train the same tasks: their objectives compare
        a, b = objective_values(runs, base), objective_values(runs, other)
        lines.append(f"| all | objective ↑ | {_summary(a)} | {_summary(b)} | {_paired(a, b)} |")
    return [*lines, ""]


def objective_values(runs, arm: str) -> dict[int, float]:
    """{seed: aggregate objective} of the arm's successful runs."""
    return {r.seed: r.objective for r in runs if r.arm == arm and not r.error and r.objective is not None}


def arms_table(study: Study) -> list[str]:
    """What each arm trains and changes, so that found weights and schedules are on record."""
    lines = ["## Arms", "", "| arm | steps | tasks | changes |", "|---|---|---|---|"]
    for arm in study.arms:
        changes = [f"mixing weights {_weights(arm.mix_weights)}"] if arm.mix_weights else []
        for key, value in arm.overrides.items():
            if key == "train.mixing.schedule":
                phases = "; ".join(f"from step {p['start']}: {_weights(p['weights'])}" for p in value)
                changes.append(f"mixing schedule {phases}")
            else:
                changes.append(f"{key}={value}")
        lines.append(f"| {arm.name} | {arm.steps} | {', '.join(arm.tasks)} | {'<br>'.join(changes) or '—'} |")
    return [*lines, ""]


MOE_COLUMNS = {  # RunResult.moe key: column heading
    "dropped_fraction": "dropped fraction ↓",
    "load_cv": "CV of load ↓",
    "step_seconds": "step time (s) ↓",
    "same_modality": "routing overlap, same modality",
    "other_modality": "routing overlap, other modalities",
}


def moe_table(study: Study, runs) -> list[str]:
    """Per arm, mean ± std over seeds of how its MoE layers were used (`moe_health`), and
    whether tasks of one input modality share experts more than tasks of different ones."""
    lines = ["## MoE layers", "", "| arm | " + " | ".join(MOE_COLUMNS.values()) + " |"]
    lines.append("|---" * (len(MOE_COLUMNS) + 1) + "|")
    shared = []
    for arm in study.arms:
        done = [r for r in runs if r.arm == arm.name and not r.error and r.moe]
        if not done:
            continue
        cells = []
        for key in MOE_COLUMNS:
            values = [r.moe[key] for r in done if r.moe.get(key) is not None]
            cells.append(str(summarize(values)) if values else "—")
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
        same, other = (
            summarize([r.moe[k] for r in done if r.moe.get(k) is not None])
            for k in ("same_modality", "other_modality")
        )
        if same.n and other.n:
            verdict = "share experts more" if same.mean > other.mean else "do not share experts more"
            shared.append(f"{arm.name}: tasks of one modality {verdict} than tasks of different ones")
    if len(lines) == 3:
        return []  # no run reported its MoE layers (every run failed)
    notes = "Routing overlap: the intersection of two tasks' shares of each layer's experts (1: same spread)."
    return [*lines, "", notes, *(f"- {line}" for line in shared), ""]


def _weights(weights: dict[str, float]) -> str:
    """Weights as shares of their sum, e.g. `a 0.75, b 0.25`."""
    total = sum(weights.values())
    return ", ".join(f"{task} {weight / total:.2f}" for task, weight in weights.items())


def runs_table(study: Study, runs) -> list[str]:
    lines = ["## Every run", "", "| arm | seed | steps | tasks | objective | result |", "|---" * 6 + "|"]
    for run in sorted(runs, key=lambda r: (r.arm, r.seed)):
        arm = study.arm(run.arm)
        if run.error:
            result = "failed: " + run.error.strip().splitlines()[-1].replace("|", "/")[:160]
        else:
            result = "; ".join(
                f"{task} " + ", ".join(f"{m} {v:.3g}" for m, v in metrics.items())
                for task, metrics in sorted(run.scores.items())
            )
        objective = "—" if run.objective is None else f"{run.objective:.3f}"
        tasks = ", ".join(arm.tasks)
        lines.append(f"| {run.arm} | {run.seed} | {arm.steps} | {tasks} | {objective} | {result} |")
    return lines


def task_metrics(runs, task: str) -> list[str]:
    """The metrics the runs scored on a task, in the order the task lists them."""
    for run in runs:
        if task in run.scores:
            return list(run.scores[task])
    return []


def arms_plot(study: Study, runs):
    """Each task's primary metric per arm: the mean over seeds, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for arm in study.arms for t in arm.tasks})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        metrics = task_metrics(runs, task)
        arms = [a.name for a in study.arms if task in a.tasks]
        if not metrics:
            ax.set_title(f"{task}: no finished run")
            continue
        metric = metrics[0]  # the primary one: runs score a task's metrics in its config's order
        for x, arm in enumerate(arms):
            values = list(metric_values(runs, arm, task, metric).values())
            if values:
                ax.bar(x, summarize(values).mean, color="tab:blue", alpha=0.6)
                ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=7)
        better = "higher" if higher_is_better(metric) else "lower"
        ax.set_title(f"{task}: {metric} ({better} is better)", fontsize=9)
    fig.tight_layout()
    return fig


def _paired(a: dict[int, float], b: dict[int, float]) -> str:
    """b - a over the seeds both have ({seed: value} each)."""
    shared = sorted(set(a) & set(b))
    return str(paired_difference([a[s] for s in shared], [b[s] for s in shared])) if shared else "—"


def _summary(values: dict[int, float]) -> str:
    return str(summarize(list(values.values()))) if values else "—"
