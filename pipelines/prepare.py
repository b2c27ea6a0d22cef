"""`mm prepare CONFIG`: every configured corpus into shards, with Ray Data.

    1. check every task's corpus (and, for the shared vocabulary, every text task's) before any
       work: a missing or empty path, or a missing split file, fails here, naming task and path;
    2. the shared vocabulary (`pipelines.vocabulary`), trained again only when its sources change;
    3. per task: skip it when its fingerprint (corpus files, settings, vocabulary, reader
       version, the rejection limit) matches the published manifest; otherwise run each split through Ray Data
       (`pipelines.sink.run_split`) into a staging folder, fail when a split rejects more than
       `data.max_rejected_fraction` of its items, and publish atomically (`pipelines.publish`).

Ray: `mm prepare` connects through `cluster.session.connect` once the corpora are checked; a
caller of `prepare` passes it the same way, or has Ray running. Workers read the corpus and
write the shards by path, so on a multi-node cluster both must be on a shared file system.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from mm.config import Config, TaskConfig
from mm.media import AudioSettings
from mm.shards import Manifest, ShardError, SplitStats, load_manifest, part_files, write_manifest
from mm.tasks import kind_of
from mm.vocab import Vocabulary
from pipelines.fingerprint import PIPELINE_VERSION, SourceFingerprints, digest
from pipelines.publish import Staging, TaskBusy, clean_up_staging, task_lock
from pipelines.readers import Reader, SourceError, reader_for
from pipelines.rows import INDEX, RowContext, uses_vocabulary
from pipelines.sink import Part, WriteReport, run_split
from pipelines.vocabulary import ensure_vocabulary, sample_splits, text_tasks

logger = logging.getLogger(__name__)
Log = Callable[[str], None]

EXAMPLES_LOGGED = 5  # rejected rows logged per split, with their file and line
FILTERED_WARNING = 0.05  # a split losing more than this share of its rows to filters is worth a word
LENGTH_REASONS = ("input_too_long", "target_too_long")  # filtered by the limits (`rows.length_violation`)


class PrepareError(RuntimeError):
    """Preparation cannot go on; the message says which task, split or path, and why."""


@dataclass
class TaskOutcome:
    manifest: Manifest
    prepared: bool  # False: it was up to date


# ------------------------------------------------------------------------------------- entry points


def prepare(
    config: Config,
    tasks: Sequence[str] | None = None,
    force: bool = False,
    log: Log | None = None,
    connect: Callable[[], None] | None = None,
) -> dict[str, Manifest]:
    """Prepare the shards of `tasks` (default: all) and the shared vocabulary; returns each
    task's manifest. `force` redoes work that is up to date. `log` gets the progress lines
    (default: this module's logger). `connect` starts or joins Ray once the corpora are checked
    (`mm prepare` passes `cluster.session.connect`); without it, Ray must be running."""
    outcomes = prepare_tasks(config, tasks, force, log, connect)
    return {outcome.manifest.task: outcome.manifest for outcome in outcomes}


def prepare_tasks(
    config: Config,
    tasks: Sequence[str] | None = None,
    force: bool = False,
    log: Log | None = None,
    connect: Callable[[], None] | None = None,
) -> list[TaskOutcome]:
    log = log or logger.info
    selected = select_tasks(config, tasks)
    check_corpora(config, selected)  # before Ray starts: a wrong path fails in a second
    start_ray(connect)
    fingerprints = SourceFingerprints()
    try:
        vocab = ensure_vocabulary(config, fingerprints, force, log)
    except SourceError as err:
        raise PrepareError(f"the shared vocabulary: {err}") from None
    follow_vocabulary(config, vocab, log)
    outcomes = [prepare_task(config, task, vocab, fingerprints, force, log) for task in selected]
    warn_of_stale_tasks(config, selected, vocab, log)
    return outcomes


def start_ray(connect: Callable[[], None] | None) -> None:
    """Ray Data would otherwise start Ray itself, the default way: joining the cluster of the
    last `ray start` on this machine, and hanging if that one is gone."""
    import ray

    if connect is not None:
        connect()
    elif not ray.is_initialized():
        raise RuntimeError("prepare needs Ray: pass connect=cluster.session.connect, or call ray.init first")


def follow_vocabulary(config: Config, vocab: Vocabulary, log: Log) -> None:
    """Shards without token ids (image classification) go with any vocabulary, so a new one is
    only written into their manifests: a task added to the config does not re-prepare ImageNet."""
    root = Path(config.data.shards)
    for task in config.tasks:
        manifest = None if uses_vocabulary(task.kind) else published_manifest(root, task.name)
        if manifest is None or manifest.vocab_sha256 == vocab.sha256:
            continue
        try:
            with task_lock(root, task.name):
                write_manifest(root, manifest.model_copy(update={"vocab_sha256": vocab.sha256}))
        except TaskBusy:
            continue  # being prepared right now, with this vocabulary
        log(f"{task.name}: manifest now names vocabulary {vocab.sha256[:12]} (its shards hold no token ids)")


def warn_of_stale_tasks(config: Config, selected: Sequence[TaskConfig], vocab: Vocabulary, log: Log) -> None:
    """Tasks left out of this run whose shards hold token ids of another vocabulary."""
    prepared = {task.name for task in selected}
    for task in config.tasks:
        manifest = None if task.name in prepared else published_manifest(config.data.shards, task.name)
        if manifest is not None and manifest.vocab_sha256 != vocab.sha256:
            log(f"{task.name}: its shards use another vocabulary; prepare it again (--tasks {task.name})")


def select_tasks(config: Config, names: Sequence[str] | None) -> list[TaskConfig]:
    try:
        return list(config.tasks) if not names else [config.task(name) for name in names]
    except KeyError as err:
        raise PrepareError(err.args[0]) from None


# ------------------------------------------------------------------------------------------- checks


def check_corpora(config: Config, selected: Sequence[TaskConfig]) -> None:
    """Every problem with every corpus at once, before any work starts."""
    problems = []
    for task in selected:
        if task.corpus is None:
            problems.append(f"task {task.name!r}: no corpus configured (tasks.{task.name}.corpus)")
    selected_names = {task.name for task in selected}
    vocabulary_sources = [t for t in text_tasks(config) if t.name not in selected_names]
    for task in [t for t in selected if t.corpus is not None] + vocabulary_sources:
        problem = corpus_problem(task, all_splits=task.name in selected_names)
        if problem:
            needed = "" if task.name in selected_names else " (its text trains the shared vocabulary)"
            problems.append(f"task {task.name!r}{needed}: {problem}")
    if problems:
        raise PrepareError("cannot prepare:\n  " + "\n  ".join(problems))


def corpus_problem(task: TaskConfig, all_splits: bool) -> str | None:
    assert task.corpus is not None
    path = task.corpus.path
    if not path.exists():
        return f"corpus path {path} does not exist"
    if not path.is_dir() or not any(path.iterdir()):
        return f"corpus path {path} is {'empty' if path.is_dir() else 'not a folder'}"
    try:
        reader = reader_for(task.corpus.layout)
        kind = kind_of(task.kind)
        if (kind.input_modality, kind.output_modality) != reader.modalities:
            return (
                f"layout {reader.layout} reads {' -> '.join(reader.modalities)} examples, "
                f"kind {task.kind} needs {kind.input_modality} -> {kind.output_modality}"
            )
        for split in task.corpus.splits if all_splits else sample_splits(task):
            reader.check(task.corpus, split)
    except SourceError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------------------- one task


def prepare_task(
    config: Config,
    task: TaskConfig,
    vocab: Vocabulary,
    fingerprints: SourceFingerprints,
    force: bool,
    log: Log,
) -> TaskOutcome:
    root = Path(config.data.shards)
    try:
        with task_lock(root, task.name):
            return prepare_task_under_lock(config, task, vocab, fingerprints, force, log)
    except TaskBusy as err:
        raise PrepareError(str(err)) from None
    except SourceError as err:  # a corpus file that passed the checks but cannot be read
        raise PrepareError(f"task {task.name!r}: {err}") from None


def prepare_task_under_lock(
    config: Config,
    task: TaskConfig,
    vocab: Vocabulary,
    fingerprints: SourceFingerprints,
    force: bool,
    log: Log,
) -> TaskOutcome:
    assert task.corpus is not None
    root = Path(config.data.shards)
    reader = reader_for(task.corpus.layout)
    clean_up_staging(root, task.name)
    fingerprint = task_fingerprint(config, task, reader, vocab, fingerprints)
    current = published_manifest(root, task.name)
    if not force and current is not None and current.source_fingerprint == fingerprint:
        log(f"{task.name}: up to date ({sum(s.rows for s in current.splits.values())} rows)")
        return TaskOutcome(current, prepared=False)

    staging = Staging(root, task.name)
    try:
        splits, parts = {}, {}
        for split in task.corpus.splits:
            splits[split], parts[split] = prepare_split(config, task, reader, vocab, split, staging, log)
        manifest = build_manifest(config, task, reader, vocab, splits, fingerprint)
        check_classes(task, manifest, log)
        staging.publish(parts, manifest)
    finally:
        staging.discard()
    log(f"{task.name}: published {sum(s.rows for s in splits.values())} rows in {root / task.name}")
    return TaskOutcome(manifest, prepared=True)


def prepare_split(
    config: Config,
    task: TaskConfig,
    reader: Reader,
    vocab: Vocabulary,
    split: str,
    staging: Staging,
    log: Log,
) -> tuple[SplitStats, list[Part]]:
    assert task.corpus is not None
    started = time.perf_counter()
    items = items_table(
        reader.items(task.corpus, split), shuffle_seed=config.seed if split == "train" else None
    )
    context = row_context(config, task, split, vocab)
    report = run_split(items, reader, context, staging.incoming(split), config.data.shard_rows)
    stats = SplitStats(
        rows=sum(part.rows for part in report.parts),
        rejected=report.counts("rejected"),
        filtered=report.counts("filtered"),
        bytes=sum(part.bytes for part in report.parts),
        parts=len(report.parts),
        seconds=round(time.perf_counter() - started, 3),
    )
    where = f"{task.name}/{split}"
    log_dropped(where, items.num_rows, stats, report, log)
    check_rejections(task.name, split, items.num_rows, stats, report, config.data.max_rejected_fraction)
    log(f"{where}: {stats.rows} rows from {items.num_rows} items in {stats.seconds:.1f} s")
    return stats, report.parts


def items_table(items: dict[str, list], shuffle_seed: int | None = None) -> pa.Table:
    """The items as a table, numbered in the order they will be written. Training items are
    shuffled first (deterministically): corpora come sorted — by class, by speaker — and a
    training stream only shuffles within a small buffer, so sorted shards would give batches
    of one class."""
    table = pa.table(items)
    if shuffle_seed is not None:
        table = table.take(np.random.default_rng(shuffle_seed).permutation(table.num_rows))
    return table.append_column(INDEX, pa.array(range(table.num_rows), pa.int64()))


def row_context(config: Config, task: TaskConfig, split: str, vocab: Vocabulary) -> RowContext:
    assert task.corpus is not None
    data = config.data
    return RowContext(
        task=task.name,
        kind=task.kind,
        split=split,
        image_size=task.corpus.image_size or data.image_size,
        audio=AudioSettings(data.sample_rate, data.mel_bins, data.window_ms, data.hop_ms),
        max_input_length=task.max_input_length,
        max_target_length=task.max_target_length,
        vocab_proto=vocab.proto if uses_vocabulary(task.kind) else None,
    )


def task_fingerprint(
    config: Config, task: TaskConfig, reader: Reader, vocab: Vocabulary, fingerprints: SourceFingerprints
) -> str:
    """Everything the task's shards depend on. The vocabulary counts only for tasks that store
    token ids: a new vocabulary (say, a task was added) leaves image classification alone. The
    rejection limit counts too: shards published under a looser limit may not pass a stricter
    one, so a changed limit checks the corpus again."""
    assert task.corpus is not None
    context = row_context(config, task, "train", vocab)
    return digest(
        {
            "pipeline": PIPELINE_VERSION,
            "reader": [reader.layout, reader.version],
            "kind": task.kind,
            "corpus": task.corpus.model_dump(mode="json"),
            "features": reader.features(context),
            "shard_rows": config.data.shard_rows,
            "max_rejected_fraction": config.data.max_rejected_fraction,
            "vocab": vocab.sha256 if uses_vocabulary(task.kind) else None,
            "files": fingerprints(task.corpus.path),
        }
    )


def check_classes(task: TaskConfig, manifest: Manifest, log: Log) -> None:
    configured, found = task.num_classes, manifest.num_classes
    if configured and found and configured != found:
        log(f"{task.name}: the config says num_classes={configured}, the corpus has {found} classes")


def published_manifest(root: Path, task: str) -> Manifest | None:
    """The published manifest, if its part files are all there."""
    try:
        manifest = load_manifest(root, task)
    except (ShardError, ValueError):
        return None
    complete = all(len(part_files(root, task, split)) == s.parts for split, s in manifest.splits.items())
    return manifest if complete else None


def build_manifest(
    config: Config,
    task: TaskConfig,
    reader: Reader,
    vocab: Vocabulary,
    splits: dict[str, SplitStats],
    fingerprint: str,
) -> Manifest:
    assert task.corpus is not None
    class_names = reader.class_names(task.corpus)
    return Manifest(
        task=task.name,
        kind=task.kind,
        layout=task.corpus.layout,
        splits=splits,
        features={
            **reader.features(row_context(config, task, "train", vocab)),
            "reader_version": reader.version,
        },
        num_classes=len(class_names) if class_names else None,
        class_names=class_names,
        vocab_sha256=vocab.sha256,
        source_fingerprint=fingerprint,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


# ---------------------------------------------------------------------------------- bad rows


def log_dropped(where: str, items: int, stats: SplitStats, report: WriteReport, log: Log) -> None:
    for _, reason, place, detail in report.examples[:EXAMPLES_LOGGED]:
        log(f"{where}: rejected ({reason}) {place}" + (f": {detail}" if detail else ""))
    rejected = sum(stats.rejected.values())
    if rejected > EXAMPLES_LOGGED:
        log(f"{where}: ... {rejected - EXAMPLES_LOGGED} more rejected ({_reasons(stats.rejected)})")
    filtered = sum(stats.filtered.values())
    if items and filtered / items > FILTERED_WARNING:
        too_long = any(reason in LENGTH_REASONS for reason in stats.filtered)
        hint = "; raise the task's max_input_length / max_target_length to keep them" if too_long else ""
        log(f"{where}: {filtered} of {items} rows filtered out ({_reasons(stats.filtered)}){hint}")


def check_rejections(
    task: str, split: str, items: int, stats: SplitStats, report: WriteReport, limit: float
) -> None:
    rejected = sum(stats.rejected.values())
    fraction = rejected / items if items else 0.0
    if fraction <= limit:
        return
    first = "; ".join(f"{place} ({reason})" for _, reason, place, _ in report.examples[:3])
    raise PrepareError(
        f"task {task!r}, split {split!r}: {rejected} of {items} items rejected ({fraction:.1%}), "
        f"over data.max_rejected_fraction = {limit:.1%}. Top reasons: {_reasons(stats.rejected)}. "
        f"First: {first}. Nothing was published; the shards of {task!r} already there are unchanged."
    )


def _reasons(counts: dict[str, int]) -> str:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{reason} {n}" for reason, n in ranked)
