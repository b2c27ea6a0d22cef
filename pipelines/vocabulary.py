"""The one SentencePiece vocabulary of every text of every task.

Trained on a sample of the training text of all configured tasks: translation sources and
targets, captions, transcripts, parse inputs and linearised trees, each transformed exactly as
the readers transform it before tokenising. Every task contributes an equal share of
`data.vocab_sample` sentences (a reservoir sample, seeded), so a huge corpus does not crowd
the others out of the vocabulary. Command tokens are user-defined symbols: ids 3, 4, ...

    <shards>/vocab.model   the SentencePiece model
    <shards>/vocab.json    its sha256 and the fingerprint of what it was trained on

An unchanged fingerprint loads the model instead of training it again.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mm.config import Config, TaskConfig
from mm.shards import VOCAB
from mm.vocab import Vocabulary, train_vocabulary
from pipelines.fingerprint import PIPELINE_VERSION, SourceFingerprints, digest
from pipelines.readers import reader_for
from pipelines.rows import uses_vocabulary

VOCAB_JSON = "vocab.json"
SAMPLE_SEED = 0  # the vocabulary must not change with the training seed


def text_tasks(config: Config) -> list[TaskConfig]:
    """The tasks whose text the vocabulary is trained on."""
    return [task for task in config.tasks if task.corpus is not None and uses_vocabulary(task.kind)]


def sample_splits(task: TaskConfig) -> list[str]:
    """Training text only (dev and test stay unseen), unless a corpus has no train split."""
    assert task.corpus is not None
    return ["train"] if "train" in task.corpus.splits else list(task.corpus.splits)


def vocabulary_fingerprint(config: Config, fingerprints: SourceFingerprints) -> str:
    sources = []
    for task in text_tasks(config):
        assert task.corpus is not None
        reader = reader_for(task.corpus.layout)
        corpus = task.corpus.model_dump(mode="json")
        sources.append([task.name, reader.layout, reader.version, corpus, fingerprints(task.corpus.path)])
    data = config.data
    settings = [PIPELINE_VERSION, data.vocab_size, data.vocab_sample, config.command_tokens]
    return digest({"settings": settings, "sources": sources})


def ensure_vocabulary(
    config: Config, fingerprints: SourceFingerprints, force: bool, log: Callable[[str], None]
) -> Vocabulary:
    """The shared vocabulary: loaded when up to date, trained and written otherwise."""
    root = Path(config.data.shards)
    fingerprint = vocabulary_fingerprint(config, fingerprints)
    current = _load_if_current(root, fingerprint)
    if current is not None and not force:
        log(f"vocabulary: up to date ({current.size} pieces, sha256 {current.sha256[:12]})")
        return current
    sentences = sample_sentences(config, log)
    vocab = train_vocabulary(sentences, config.data.vocab_size, config.command_tokens)
    root.mkdir(parents=True, exist_ok=True)
    vocab.save(root / VOCAB)
    _write_json(
        root / VOCAB_JSON,
        {
            "sha256": vocab.sha256,
            "fingerprint": fingerprint,
            "pieces": vocab.size,
            "sentences": len(sentences),
            "command_tokens": config.command_tokens,
        },
    )
    log(f"vocabulary: trained {vocab.size} pieces on {len(sentences)} sentences -> {root / VOCAB}")
    return vocab


def sample_sentences(config: Config, log: Callable[[str], None]) -> list[str]:
    tasks = text_tasks(config)
    share = max(1, config.data.vocab_sample // max(1, len(tasks)))
    sentences: list[str] = []
    for task in tasks:
        assert task.corpus is not None
        reader = reader_for(task.corpus.layout)
        texts = (text for split in sample_splits(task) for text in reader.texts(task.corpus, split))
        sample = reservoir(texts, share, random.Random(f"{SAMPLE_SEED}:{task.name}"))
        log(f"vocabulary: {len(sample)} sentences from {task.name}")
        sentences.extend(sample)
    # With no text at all the vocabulary still needs its command tokens (and some input).
    return sentences or list(config.command_tokens)


def reservoir(items: Iterable[str], size: int, rng: random.Random) -> list[str]:
    """A uniform sample of `size` items in one pass (Vitter's algorithm R), in source order."""
    chosen: list[tuple[int, str]] = []
    for seen, item in enumerate(items):
        if seen < size:
            chosen.append((seen, item))
        else:
            slot = rng.randrange(seen + 1)
            if slot < size:
                chosen[slot] = (seen, item)
    return [item for _, item in sorted(chosen)]


def _load_if_current(root: Path, fingerprint: str) -> Vocabulary | None:
    try:
        recorded = json.loads((root / VOCAB_JSON).read_text())
        vocab = Vocabulary.load(root / VOCAB)
    except (OSError, ValueError):
        return None
    if recorded.get("fingerprint") != fingerprint or recorded.get("sha256") != vocab.sha256:
        return None
    return vocab


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)
