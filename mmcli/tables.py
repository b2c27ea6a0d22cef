"""Tables the commands print at the end (rich)."""

from __future__ import annotations

from rich.table import Table

from mm.metrics import LEARNED_MARGIN, learned, scores_by_task


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
    """Each task's primary metric beside chance and the input-blind score, and whether it
    clears both by LEARNED_MARGIN."""
    table = Table(
        title=title, caption=f"learned: beats chance and input-blind by {LEARNED_MARGIN:.0%} of the range"
    )
    for column in ("task", "metric", "score", "chance", "input-blind", "learned"):
        table.add_column(column, justify="left" if column in ("task", "metric", "learned") else "right")
    for task, metric in primary.items():
        value, floor = scores.get(task, {}).get(metric), blind.get(task, {}).get(metric)
        verdict = (
            "-" if value is None else ("yes" if learned(metric, value, chance.get(task), floor) else "no")
        )
        table.add_row(task, metric, _format(value), _format(chance.get(task)), _format(floor), verdict)
    return table


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
