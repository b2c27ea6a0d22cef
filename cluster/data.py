"""Shards into Ray Datasets for training: the driver opens one per task (`train_datasets`), Ray
Train splits each across the workers (`ray.train.get_dataset_shard(task)`), and a worker turns
its share into an endless stream of batches (`ray_stream`, a `mm.reader.TaskStream`).
"""

from __future__ import annotations

from typing import Any

from mm.config import Config
from mm.reader import TaskStream, chunk_rows, drops_partial_batches
from mm.shards import part_files
from mm.tasks import TaskSpec
from mm.train import derived_seed

IN_MEMORY_GROWTH = 3  # decoded Arrow blocks vs compressed parquet, roughly
STORE_SHARE = 0.3  # of the object store the training sets may hold when read up front


def train_datasets(config: Config) -> dict[str, Any]:
    """One Ray Dataset per task over its training parts (the driver's side).

    When every task's shards fit easily in the object store they are read once, up front
    (`materialize`): otherwise each task's split coordinator re-reads its shards every epoch,
    and six of them reading at once take the CPU the training workers need (on 2 cores the
    steps ran at half speed). Larger corpora stream from the shards (`data.read` forces one).
    """
    import ray
    import ray.data

    # Ray 2.60's new parquet path (ListFiles -> ReadFiles) takes 6-10 s to a worker's first
    # batch on 2 cores; the established one 2-3 s, and every task pays it at its first step.
    context = ray.data.DataContext.get_current()
    context.use_datasource_v2 = False
    context.enable_progress_bars = False  # one bar per task per epoch would flood the log
    files = {task.name: part_files(config.data.shards, task.name, "train") for task in config.tasks}
    on_disk = sum(path.stat().st_size for paths in files.values() for path in paths)
    store = ray.cluster_resources().get("object_store_memory", 0)
    materialize = reads_up_front(config.data.read, on_disk, store)
    datasets = {}
    for task, paths in files.items():
        dataset = ray.data.read_parquet([str(p) for p in paths])
        datasets[task] = dataset.materialize() if materialize else dataset
    return datasets


def reads_up_front(read: str, on_disk: int, store: float) -> bool:
    """Whether training reads its shards into the object store once (else streams them)."""
    if read != "auto":
        return read == "materialize"
    return IN_MEMORY_GROWTH * on_disk < STORE_SHARE * store


def ray_stream(
    spec: TaskSpec,
    shard,
    batch_size: int,
    by_tokens: bool,
    max_input: int | None,
    seed: int,
    window: int = 1,
) -> TaskStream:
    """A worker's stream over its Ray Train dataset shard, shuffled locally with a seed of its
    own per epoch (`seed` differs per rank): the same order whenever the epoch is re-read."""
    fetch = chunk_rows(batch_size, by_tokens, window)

    def epochs(epoch: int):
        return shard.iter_batches(
            batch_size=fetch,
            batch_format="numpy",
            drop_last=drops_partial_batches(by_tokens, window),
            local_shuffle_buffer_size=max(4 * fetch, 256),
            local_shuffle_seed=derived_seed(seed, epoch),
            prefetch_batches=0,  # a background thread would compete with the step for the GIL
        )

    return TaskStream(spec, epochs, batch_size, by_tokens, max_input, window)
