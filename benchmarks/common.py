"""Shared by the benchmark scripts: timing, the one JSON line each prints, and a config's
training batches read without Ray."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mm.config import Config
    from mm.reader import TaskStream
    from mm.shards import Manifest
    from mm.tasks import TaskSpec
    from mm.vocab import Vocabulary


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn) for _ in range(repeats))


def compare(
    candidate: Callable[[], object], baseline: Callable[[], object], repeats: int = 7, warmup: int = 2
):
    """Median seconds of each, runs interleaved so that drift in the machine's load (another
    process, frequency scaling) falls on both alike."""
    for _ in range(warmup):
        candidate(), baseline()
    pairs = [(seconds(candidate), seconds(baseline)) for _ in range(repeats)]
    return statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def shard_tasks(config: Config) -> tuple[Vocabulary, dict[str, Manifest], list[TaskSpec]]:
    """The config's prepared shards as a model is built from them: the vocabulary, each task's
    manifest and the task specs."""
    from mm.build import task_specs
    from mm.reader import load_manifests
    from mm.shards import VOCAB
    from mm.vocab import Vocabulary

    vocab = Vocabulary.load(f"{config.data.shards}/{VOCAB}")
    manifests = load_manifests(config)
    return vocab, manifests, task_specs(config, vocab, manifests)


def train_streams(config: Config, specs: list[TaskSpec]) -> dict[str, TaskStream]:
    """Each task's training batches straight from its shards (no Ray), batched and truncated as
    the config says: what the Ray Train workers get, for loops in one process."""
    from mm.reader import parquet_stream
    from mm.shards import part_files

    return {
        s.name: parquet_stream(
            s,
            part_files(config.data.shards, s.name, "train"),
            config.task(s.name).batch_size,
            config.train.batch_by == "tokens",
            config.task(s.name).max_input_length,
            config.train.sort_window,
        )
        for s in specs
    }
