"""The one SentencePiece vocabulary of every text of every task.

Trained on a sample of the training text of all configured tasks: translation sources and
targets, captions, transcripts, parse inputs and linearised trees, each transformed exactly as
the readers transform it before tokenising. Every task contributes an equal share of
`data.vocab_sample` sentences (a reservoir sample, seeded), so a huge corpus does not crowd
the others out of the vocabulary. Command tokens are user-defined symbols: ids 3, 4, ...

The symbols of linearised parse trees (`(NP`, `)NP`, `XX`, with the word-initial marker) are
user-defined symbols too, so a tree symbol is one piece, not two: a 7-word tree is about 17
targets instead of 34, and constrained decoding (`mm.decoding.TreeConstraint`) can tell an
opening bracket, a closing one and a leaf from their piece alone.

    <shards>/vocab.model   the SentencePiece model
    <shards>/vocab.json    its sha256 and the fingerprint of what it was trained on

An unchanged fingerprint loads the model instead of training it again.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mm.config import Config, TaskConfig
from mm.shards import VOCAB
from mm.trees import TAG
from mm.vocab import Vocabulary, train_vocabulary
from pipelines.fingerprint import PIPELINE_VERSION, SourceFingerprints, digest
from pipelines.readers import reader_for
from pipelines.rows import uses_vocabulary

VOCAB_JSON = "vocab.json"
SAMPLE_SEED = 0  # the vocabulary must not change with the training seed
TREE_PIECES = "tree-pieces-1"  # in the fingerprint: how tree symbols become pieces
_TREE_SYMBOL = re.compile(rf"^(?:[()][^\s()]+|{TAG})$")
WORD_START = "\u2581"  # SentencePiece's marker of a piece that begins a word


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
    settings = [PIPELINE_VERSION, data.vocab_size, data.vocab_sample, config.command_tokens, TREE_PIECES]
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
    sentences, trees = sample_sentences(config, log)
    symbols = tree_symbols(trees)
    vocab = train_vocabulary(sentences, config.data.vocab_size, config.command_tokens, symbols)
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
            "tree_symbols": symbols,
        },
    )
    log(f"vocabulary: trained {vocab.size} pieces on {len(sentences)} sentences -> {root / VOCAB}")
    return vocab


def sample_sentences(config: Config, log: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """Every text task's share of the sample, and the parsing tasks' part of it."""
    tasks = text_tasks(config)
    share = max(1, config.data.vocab_sample // max(1, len(tasks)))
    sentences: list[str] = []
    trees: list[str] = []
    for task in tasks:
        assert task.corpus is not None
        reader = reader_for(task.corpus.layout)
        texts = (text for split in sample_splits(task) for text in reader.texts(task.corpus, split))
        sample = reservoir(texts, share, random.Random(f"{SAMPLE_SEED}:{task.name}"))
        log(f"vocabulary: {len(sample)} sentences from {task.name}")
        sentences.extend(sample)
        if task.kind == "constituency_parsing":
            trees.extend(sample)
    # With no text at all the vocabulary still needs its command tokens (and some input).
    return sentences or list(config.command_tokens), trees


def tree_symbols(texts: list[str]) -> list[str]:
    """The word-initial pieces of the tree symbols in the linearised trees among `texts` (a
    parsing task's sample also holds its input sentences: a text counts as a tree when every
    token of it is a tree symbol), most frequent first."""
    counts: dict[str, int] = {}
    for text in texts:
        tokens = text.split()
        if tokens and all(_TREE_SYMBOL.match(t) for t in tokens):
            for token in tokens:
                counts[token] = counts.get(token, 0) + 1
    return [WORD_START + t for t in sorted(counts, key=lambda t: (-counts[t], t))]


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
