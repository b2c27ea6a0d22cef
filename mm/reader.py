"""The shard format's plain reader: parquet parts into batches, in any process (no Ray).

Training streams each task's rows epoch after epoch (`TaskStream`: over a Ray Data shard on a
worker, `cluster.data.ray_stream`, or over the parquet files themselves, `parquet_stream`);
evaluation and prediction read a spread-out slice of a split (`read_rows`) and cut it into
batches (`evaluation_batches`). Batches hold `batch_size` examples, or with
`train.batch_by: tokens` as many examples as fit `batch_size` tokens (padded length x rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mm.batch import Batch
from mm.config import Config
from mm.shards import COLUMNS, Manifest, ShardError, collate, load_manifest, part_files
from mm.tasks import TaskSpec
from mm.vocab import Vocabulary

Rows = dict[str, np.ndarray]
EVAL_SPLIT = "dev"  # what training evaluates on, and so what model selection sees


def load_manifests(config: Config) -> dict[str, Manifest]:
    """Every configured task's manifest; a task without shards is an error naming it."""
    return {task.name: load_manifest(config.data.shards, task.name) for task in config.tasks}


def train_rows(manifests: Mapping[str, Manifest]) -> dict[str, int]:
    """Each task's training rows: what temperature mixing weighs the tasks by."""
    return {name: manifest.rows("train") for name, manifest in manifests.items()}


def check_shards(config: Config, vocab: Vocabulary, manifests: Mapping[str, Manifest]) -> None:
    """Shards must exist for the training split and the evaluation split, and be made with
    this vocabulary. Training evaluates on `dev`: a task without one would score zeros."""
    for task in config.tasks:
        manifest = manifests[task.name]
        if manifest.rows("train") == 0 or not part_files(config.data.shards, task.name, "train"):
            raise ShardError(
                f"task {task.name!r} has no training shards under {config.data.shards}/{task.name}"
            )
        if manifest.rows(EVAL_SPLIT) == 0 or not part_files(config.data.shards, task.name, EVAL_SPLIT):
            raise ShardError(
                f"task {task.name!r} has no {EVAL_SPLIT!r} split to evaluate on (its splits: "
                f"{', '.join(sorted(manifest.splits)) or 'none'}); name its held-out split "
                f"{EVAL_SPLIT!r} in corpus.splits, e.g. splits: {{train: ..., {EVAL_SPLIT}: val}}"
            )
        require_vocabulary(
            manifest, vocab.sha256, f"{config.data.shards}/vocab.model", "run `mm prepare` again"
        )
        check_rows_per_worker(config, task.name, manifest.rows("train"))


def drops_partial_batches(by_tokens: bool, window: int) -> bool:
    """Whether a training stream drops an epoch's last, partial batch: only batches of a fixed
    number of rows read in stream order do (a sorted window keeps them whole, token batches vary)."""
    return not by_tokens and window == 1


def check_rows_per_worker(config: Config, task: str, rows: int) -> None:
    """Each worker reads an equal share of a task's rows; a share smaller than what one batch
    needs gives that worker nothing to train on, on every try."""
    workers = config.cluster.workers
    batch_size = config.task(task).batch_size
    full = drops_partial_batches(config.train.batch_by == "tokens", config.train.sort_window)
    needed = batch_size if full else 1
    share = rows // workers  # an equal split: the remainder is left out
    if share < needed:
        why = f" (tasks.{task}.batch_size={batch_size}, whose last, partial batch is dropped)" if full else ""
        raise ShardError(
            f"task {task!r}: its {rows} training rows give each of {workers} workers {share}, "
            f"fewer than the {needed} of one batch{why}; lower the batch size or cluster.workers"
        )


def require_vocabulary(manifest: Manifest, sha256: str, whose: str, remedy: str) -> None:
    """Token ids mean nothing under another vocabulary: a model fed them trains or scores on
    noise (text scores near 0 that read as a result), so a mismatch is an error."""
    if manifest.vocab_sha256 != sha256:
        raise ShardError(
            f"task {manifest.task!r}: shards were made with vocabulary {manifest.vocab_sha256[:12]}, "
            f"not {sha256[:12]} ({whose}); {remedy}"
        )


class TaskStream:
    """Endless batches of one task, one epoch after another. `epochs(n)` gives a fresh
    iterator over the row chunks of epoch n (a Ray DataIterator shard, or parquet files).

    Each chunk is cut into batches (`plan_batches`): of `batch_size` examples, or of as many
    as fit `batch_size` tokens. With `window` > 1 a chunk holds `window` batches' worth of
    rows, sorted by length before it is cut, so that a batch pads little.

    Its position is state (`state_dict`): the epoch, the chunks taken from it, and the rows of
    the last one already given out. A stream loaded with that state re-reads the epoch up to
    the same point, so a resumed run sees the batches the interrupted one would have seen,
    provided each epoch's order depends only on the epoch (fixed shuffle seeds, an
    order-preserving split)."""

    def __init__(
        self,
        spec: TaskSpec,
        epochs,
        batch_size: int,
        by_tokens: bool,
        max_input: int | None = None,
        window: int = 1,
    ):
        self.spec, self.epochs = spec, epochs
        self.batch_size, self.by_tokens, self.max_input = batch_size, by_tokens, max_input
        self.window = window
        self.rows: Iterator[Rows] = iter(())
        self.epoch = -1  # none started yet
        self.chunks = 0  # chunks taken from this epoch
        self.pending: tuple[Rows, list[slice]] | None = None  # the last chunk, and its batches to come
        self.used = 0  # its rows already given out

    def __next__(self) -> Batch:
        if self.pending is None:
            self.pending, self.used = self._plan(self._next_chunk()), 0
        rows, batches = self.pending
        batch = batches.pop(0)
        self.used += batch.stop - batch.start
        if not batches:
            self.pending = None
        return collate(self.spec, _slice(rows, batch.start, batch.stop), self.max_input)

    def _plan(self, chunk: Rows) -> tuple[Rows, list[slice]]:
        # seeded by the position alone: a re-read chunk is cut and ordered the same way
        rng = np.random.default_rng([self.epoch, self.chunks])
        return plan_batches(chunk, self.batch_size, self.by_tokens, self.window, rng)

    def _next_chunk(self) -> Rows:
        for _ in range(2):  # the current epoch, else one fresh epoch
            chunk = next(self.rows, None)
            if chunk is not None and _length(chunk):
                self.chunks += 1
                return chunk
            self._start_epoch(self.epoch + 1)
        raise ShardError(f"task {self.spec.name!r}: its training data yields no rows")

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.chunks = epoch, 0
        self.rows = iter(self.epochs(epoch))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "chunks": self.chunks, "used": self.used if self.pending else 0}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Re-read epoch `state["epoch"]` up to where the saved stream was."""
        self.pending, self.used = None, 0
        if state["epoch"] < 0:
            self.epoch, self.chunks, self.rows = -1, 0, iter(())
            return
        self._start_epoch(state["epoch"])
        for _ in range(state["chunks"]):
            chunk = self._next_chunk()
        if state["used"]:
            self.pending = self._plan(chunk)
            while self.used < state["used"]:
                batch = self.pending[1].pop(0)
                self.used += batch.stop - batch.start

    def start_at_epoch(self, epoch: int) -> None:
        """Begin `epoch` afresh (a resumed run whose worker group changed size: the rows are
        split another way, so no saved position applies)."""
        self.pending, self.used = None, 0
        self._start_epoch(epoch)


def plan_batches(
    chunk: Rows, batch_size: int, by_tokens: bool, window: int, rng: np.random.Generator
) -> tuple[Rows, list[slice]]:
    """A chunk's rows (sorted by length when `window` > 1) and the batches cut from them, in
    the order they are given out.

    Sorting a window of several batches' rows is length bucketing (tensor2tensor batches by
    length too): on the starter's text tasks a random batch of 32 is 39-58 % real tokens, a
    batch cut from 8 batches' rows sorted 70-78 %, and a step's cost follows its padded
    length. The batches are then given out in a random order, not shortest first. Cut by
    examples, a sorted window drops its remainder (as `drop_last` does for unsorted batches)
    unless it makes no full batch at all."""
    if window > 1:
        chunk = _take(chunk, np.argsort(_lengths(chunk), kind="stable"))
    size = _length(chunk)
    if by_tokens:
        bounds, start = [], 0
        while start < size:
            stop = start + rows_within_token_budget(_slice(chunk, start, None), batch_size)
            bounds.append(slice(start, stop))
            start = stop
    else:
        drops_remainder = window > 1 and size >= batch_size
        count = size // batch_size if drops_remainder else math.ceil(size / batch_size)
        bounds = [slice(i * batch_size, min((i + 1) * batch_size, size)) for i in range(count)]
    if window > 1:
        bounds = [bounds[i] for i in rng.permutation(len(bounds))]
    return chunk, bounds


def _lengths(rows: Rows) -> np.ndarray:
    """Each row's input plus target length: frames for audio, tokens for text, 0 for an image
    (all the same size)."""

    def input_length(inputs, shape) -> int:
        if shape is not None and len(shape):
            return int(shape[0]) if len(shape) == 2 else 0
        return len(inputs)

    return np.array(
        [
            input_length(i, s) + _target_length(t)
            for i, s, t in zip(rows["inputs"], rows["input_shape"], rows["targets"])
        ]
    )


def _target_length(target) -> int:
    """Tokens of a text target; a class label counts as one."""
    return len(target) if hasattr(target, "__len__") else 1


def rows_within_token_budget(rows: Rows, budget: int) -> int:
    """How many leading rows fit `budget` tokens once padded to the longest (at least one)."""
    lengths = [max(len(i), _target_length(t)) for i, t in zip(rows["inputs"], rows["targets"])]
    longest = 0
    for n, length in enumerate(lengths, start=1):
        longest = max(longest, length)
        if n * longest > budget:
            return max(n - 1, 1)
    return len(lengths)


def _length(rows: Rows) -> int:
    return len(rows["id"])


def _slice(rows: Rows, start: int, stop: int | None) -> Rows:
    return {key: value[start:stop] for key, value in rows.items()}


def _take(rows: Rows, index: np.ndarray) -> Rows:
    return {key: value[index] for key, value in rows.items()}


def parquet_stream(
    spec: TaskSpec,
    files: list[Path],
    batch_size: int,
    by_tokens: bool,
    max_input: int | None = None,
    window: int = 1,
):
    """The same stream read straight from parquet, in a plain process (no Ray)."""
    fetch = chunk_rows(batch_size, by_tokens, window)

    def epochs(epoch: int):  # in file order, every epoch
        for path in files:
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=fetch, columns=list(COLUMNS)):
                yield {name: _objects(values) for name, values in record_batch.to_pydict().items()}

    return TaskStream(spec, epochs, batch_size, by_tokens, max_input, window)


def chunk_rows(batch_size: int, by_tokens: bool, window: int) -> int:
    """How many rows a stream reads at a time: `window` batches, or for token batches (whose
    row count varies) 256 rows."""
    return 256 if by_tokens else batch_size * window


def read_rows(root: str | Path, task: str, split: str, limit: int) -> Rows:
    """`limit` rows spread evenly over a split (its files keep the corpus order, often sorted
    by class or speaker: the first rows would be a biased sample)."""
    files = part_files(root, task, split)
    sizes = [pq.ParquetFile(path).metadata.num_rows for path in files]
    total = sum(sizes)
    if not total:  # scoring nothing would read as a score of 0 (or a perfect WER)
        folder = Path(root) / task
        held = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        what = "has no rows" if files else "does not exist"
        raise ShardError(
            f"task {task!r}: split {split!r} {what} under {folder} "
            f"(splits there: {', '.join(held) or 'none'})"
        )
    wanted = np.unique(np.linspace(0, total - 1, min(limit, total)).round().astype(int)) if total else []
    taken: dict[str, list] = {name: [] for name in COLUMNS}
    start = 0
    for path, size in zip(files, sizes, strict=True):
        local = [int(i) - start for i in wanted if start <= i < start + size]
        if local:
            for name, values in pq.read_table(path, columns=list(COLUMNS)).take(local).to_pydict().items():
                taken[name].extend(values)
        start += size
    return {name: _objects(values) for name, values in taken.items()}


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def evaluation_batches(spec: TaskSpec, rows: Rows, rank: int, world: int, batch_size: int) -> list[Batch]:
    """This rank's share of an evaluation set, cut so every rank has the same number of
    batches (the MoE layers exchange tokens at every forward pass)."""
    per_rank = _length(rows) // world
    mine = _slice(rows, rank * per_rank, (rank + 1) * per_rank)
    return [
        collate(spec, _slice(mine, start, start + batch_size)) for start in range(0, per_rank, batch_size)
    ]
