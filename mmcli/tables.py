"""Tables the commands print at the end (rich)."""

from __future__ import annotations

from rich.table import Table

from mm.metrics import scores_by_task


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


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
