"""The Ray Data pipeline of one split, and the sink that writes its parquet parts.

    items (driver) ─ from_arrow ─▶ map_batches(convert_batch) ─▶ ShardSink.write ─▶ staging dir
                                   decode, resize, tokenise,     ~shard_rows per part; counts
                                   features; every CPU           the rejected/filtered rows

Ray's own `write_parquet` would write the bookkeeping columns too and count nothing; a
`Datasink` writes only the shard columns and returns, per write task, the parts it wrote and
the dropped rows by reason, so one pass over the data gives both. Parts land in a private
staging directory under random names; `pipelines.publish` numbers them and swaps them in.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from mm.shards import COLUMNS
from pipelines.readers import Reader
from pipelines.rows import DETAIL, INDEX, KEPT, OUTCOME, REASON, REJECTED, WHERE, RowContext, convert_batch

EXAMPLES_KEPT = 5  # rejected rows a write task reports with their place, for the log


@dataclass(frozen=True)
class Part:
    path: str
    rows: int
    bytes: int
    first_index: int  # of its first item: parts are numbered in source order


@dataclass
class WriteReport:
    """What one write task did. `dropped` is keyed by (outcome, reason)."""

    parts: list[Part] = field(default_factory=list)
    dropped: Counter[tuple[str, str]] = field(default_factory=Counter)
    # The first rejected rows, as (item index, reason, where, detail).
    examples: list[tuple[int, str, str, str]] = field(default_factory=list)

    @classmethod
    def combine(cls, reports: Iterable[WriteReport]) -> WriteReport:
        total = cls()
        for report in reports:
            total.parts.extend(report.parts)
            total.dropped.update(report.dropped)
            total.examples.extend(report.examples)
        total.parts.sort(key=lambda part: part.first_index)
        total.examples.sort()
        return total

    def counts(self, outcome: str) -> dict[str, int]:
        return {reason: n for (kind, reason), n in sorted(self.dropped.items()) if kind == outcome}


def write_parts(table: pa.Table, directory: Path, shard_rows: int) -> WriteReport:
    """Write the kept rows of `table` as parts of about `shard_rows` rows, count the rest."""
    outcome = table[OUTCOME]
    kept = table.filter(pc.equal(outcome, KEPT)).sort_by(INDEX)
    dropped = table.filter(pc.not_equal(outcome, KEPT)).select([INDEX, OUTCOME, REASON, WHERE, DETAIL])
    dropped = dropped.sort_by(INDEX).to_pydict()
    report = WriteReport(dropped=Counter(zip(dropped[OUTCOME], dropped[REASON])))
    rejected = [i for i, kind in enumerate(dropped[OUTCOME]) if kind == REJECTED][:EXAMPLES_KEPT]
    report.examples = [tuple(dropped[name][i] for name in (INDEX, REASON, WHERE, DETAIL)) for i in rejected]
    directory.mkdir(parents=True, exist_ok=True)
    for chunk in even_chunks(kept, shard_rows):
        path = directory / f"{uuid.uuid4().hex}.parquet"
        pq.write_table(chunk.select(list(COLUMNS)), path)
        report.parts.append(Part(str(path), chunk.num_rows, path.stat().st_size, chunk[INDEX][0].as_py()))
    return report


def even_chunks(table: pa.Table, most_rows: int) -> list[pa.Table]:
    """Slices of nearly equal size, none over `most_rows` rows."""
    if table.num_rows == 0:
        return []
    count = math.ceil(table.num_rows / most_rows)
    bounds = [round(i * table.num_rows / count) for i in range(count + 1)]
    return [table.slice(start, end - start) for start, end in zip(bounds, bounds[1:])]


class ShardSink(Datasink):
    """A Ray Data sink: each write task gets about `shard_rows` converted rows."""

    def __init__(self, directory: Path, shard_rows: int):
        self.directory, self.shard_rows = directory, shard_rows
        self.report = WriteReport()

    @property
    def min_rows_per_write(self) -> int:
        return self.shard_rows

    def write(self, blocks: Iterable[Block], ctx: Any) -> WriteReport:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        return write_parts(pa.concat_tables(tables), self.directory, self.shard_rows)

    def on_write_complete(self, write_result: WriteResult[WriteReport]) -> None:
        self.report = WriteReport.combine(write_result.write_returns)


def item_blocks(items: pa.Table, rows_per_block: int, cpus: int) -> list[pa.Table]:
    """Slices of the items, at most `rows_per_block` each, in a multiple of `cpus` blocks (at
    least two per CPU) so that no CPU idles at the end; but a tiny split is not cut into crumbs
    that would each start a worker."""
    if items.num_rows == 0:
        return []
    blocks_per_cpu = max(2, math.ceil(items.num_rows / (cpus * rows_per_block)))
    rows = max(rows_per_block // 8, math.ceil(items.num_rows / (blocks_per_cpu * cpus)), 1)
    return [items.slice(start, rows) for start in range(0, items.num_rows, rows)]


def run_split(
    items: pa.Table, reader: Reader, context: RowContext, directory: Path, shard_rows: int
) -> WriteReport:
    """Convert and write one split with Ray Data on the CPUs of the cluster."""
    if items.num_rows == 0:
        return WriteReport()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    dataset = ray.data.from_arrow(item_blocks(items, reader.block_rows(context), cpus)).map_batches(
        convert_batch,
        batch_format="pyarrow",
        fn_kwargs={"reader": reader, "context": context},
    )
    # Ray Data reserves half of the cluster's CPUs for the operators' own shares; with two
    # operators on a few CPUs that leaves the map with about one (measured: 2.5x slower on 2).
    dataset.context.op_resource_reservation_enabled = False
    sink = ShardSink(directory, shard_rows)
    # Writing is light next to decoding: a fraction of a CPU keeps the writer from being fused
    # into the map tasks, which would then each convert `shard_rows` items alone, one by one.
    dataset.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    return sink.report
