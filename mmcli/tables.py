"""Tables the commands print at the end (rich)."""

from __future__ import annotations

from rich import box
from rich.table import Table

from mm.metrics import LEARNED_MARGIN, interval, learned, scores_by_task


def task_metric_table(metrics: dict[str, float], title: str, prefix: str = "eval/") -> Table:
    """One row per task, one column per metric, from keys like `eval/<task>/<metric>`."""
    rows = scores_by_task(metrics, prefix)
    columns = sorted({metric for values in rows.values() for metric in values})
    table = Table(title=title)
    table.add_column("task")
    for column in columns:
        table.add_column(column, justify="right")
    for task in sorted(rows):
        table.add_row(task, *(_format(rows[task].get(column)) for column in columns))
    return table


def floors_table(
    primary: dict[str, str],
    scores: dict[str, dict[str, float]],
    blind: dict[str, dict[str, float]],
    chance: dict[str, float],
    title: str,
) -> Table:
    """Each task's primary metric, with its 95 % bootstrap interval when scored with one,
    beside chance and the input-blind score, and whether it (and its interval's worse end)
    clears both by LEARNED_MARGIN."""
    caption = (
        f"learned: the score and its interval's worse end beat chance and input-blind by "
        f"{LEARNED_MARGIN:.0%} of the range"
    )
    table = Table(title=title, caption=caption)
    for column in ("task", "metric", "score", "95 % interval", "chance", "input-blind", "learned"):
        table.add_column(column, justify="left" if column in ("task", "metric", "learned") else "right")
    for task, metric in primary.items():
        value, floor = scores.get(task, {}).get(metric), blind.get(task, {}).get(metric)
        bounds = interval(scores.get(task, {}), metric)
        is_learned = value is not None and learned(metric, value, chance.get(task), floor, bounds=bounds)
        verdict = "-" if value is None else ("yes" if is_learned else "no")
        floors = _format(chance.get(task)), _format(floor)
        table.add_row(task, metric, _format(value), format_interval(bounds), *floors, verdict)
    return table


def format_interval(bounds: tuple[float, float] | None) -> str:
    return "-" if bounds is None else f"{_format(bounds[0])} – {_format(bounds[1])}"


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def shards_table(outcomes) -> Table:
    """`mm prepare`: each task's splits, rows kept, rejected and filtered, and what was done."""
    table = Table(title="shards", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("task", "split", "rows", "rejected", "filtered", "size", "time", ""):
        left = column in ("task", "split", "")
        table.add_column(column, justify="left" if left else "right", no_wrap=column in ("task", ""))
    for outcome in outcomes:
        status = "prepared" if outcome.prepared else "up to date"
        for split, stats in outcome.manifest.splits.items():
            table.add_row(
                outcome.manifest.task,
                split,
                f"{stats.rows:,}",
                f"{sum(stats.rejected.values()):,}",
                f"{sum(stats.filtered.values()):,}",
                _size(stats.bytes),
                f"{stats.seconds:.1f} s",
                status,
            )
    return table


def trials_table(result) -> Table:
    """`mm tune`: each trial's objective, status and parameters."""
    table = Table(title="trials")
    for column in ("trial", "objective", "status", "parameters"):
        table.add_column(column)
    for trial in result.trials:
        status = "failed: " + trial.error if trial.error else ("best" if trial is result.best else "done")
        objective = "-" if trial.objective is None else f"{trial.objective:.4f}"
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
        )
        table.add_row(trial.name, objective, status, params)
    return table


def selftest_table(results: dict[str, tuple[float, float]]) -> Table:
    """`mm selftest`: each task's held-out loss before and after training."""
    table = Table(title="held-out loss per task")
    for column in ("task", "before", "after", "before / after"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, (before, after) in results.items():
        table.add_row(name, f"{before:.3f}", f"{after:.3f}", f"{before / max(after, 1e-9):.1f}x")
    return table


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
