"""What every starter corpus shares: the sizes, the split arithmetic, seeding and progress bars.

Also :class:`StarterError`, raised whenever the suite cannot be built here, and the WMT
layout, which both translation corpora write.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "dev", "test")


class StarterError(RuntimeError):
    """The starter suite cannot be built here; the message says what to do."""


@dataclass(frozen=True)
class Counts:
    """How many examples go to each split; ``train=None`` takes everything that is left."""

    train: int | None
    dev: int
    test: int


@dataclass(frozen=True)
class Size:
    images: Counts
    en_de: Counts
    en_fr: Counts
    emoji: int | None  # how many distinct emoji; None = every one the font renders
    emoji_variants: Counts  # renderings per emoji in each split
    speech: Counts
    parse: Counts
    en_de_words: int  # longest sentence kept, in words
    en_fr_words: int
    speech_words: int
    parse_words: int
    # Speech: sentences made only of the N most frequent Ding words (None: any), so that the dev
    # and test sentences, though never heard in training, use words it heard; and how many
    # voices speak each training sentence.
    speech_vocabulary: int | None = None
    speech_voices: int = 1


SIZES = {
    # A handful per task, for fast tests of the whole builder.
    "tiny": Size(
        images=Counts(20, 10, 10),
        en_de=Counts(20, 5, 5),
        en_fr=Counts(20, 5, 5),
        emoji=6,
        emoji_variants=Counts(2, 1, 1),
        speech=Counts(8, 2, 2),
        parse=Counts(8, 2, 2),
        en_de_words=12,
        en_fr_words=12,
        speech_words=6,
        parse_words=10,
    ),
    # The demo's default: minutes to build, enough to learn something in a few thousand steps.
    "small": Size(
        images=Counts(6000, 500, 500),
        en_de=Counts(8000, 500, 500),
        en_fr=Counts(7000, 500, 500),
        emoji=400,
        emoji_variants=Counts(5, 1, 1),
        speech=Counts(1200, 100, 100),
        parse=Counts(3000, 200, 200),
        en_de_words=12,
        en_fr_words=12,
        speech_words=6,
        parse_words=10,
        speech_vocabulary=800,
        speech_voices=2,
    ),
    "full": Size(
        images=Counts(None, 5000, 10000),
        en_de=Counts(None, 1000, 1000),
        en_fr=Counts(None, 500, 500),
        emoji=None,
        emoji_variants=Counts(4, 1, 1),
        speech=Counts(None, 300, 300),
        parse=Counts(None, 500, 500),
        en_de_words=40,
        en_fr_words=40,
        speech_words=8,
        parse_words=15,
    ),
}


def take_splits(items: Sequence, counts: Counts, what: str) -> dict[str, list]:
    """Dev and test first (fixed sizes), then train from what is left."""
    needed = counts.dev + counts.test + 1
    if len(items) < needed:
        raise StarterError(f"{what}: only {len(items)} examples available, need at least {needed}")
    dev_end = counts.dev
    test_end = dev_end + counts.test
    train_end = None if counts.train is None else test_end + counts.train
    return {
        "train": list(items[test_end:train_end]),
        "dev": list(items[:dev_end]),
        "test": list(items[dev_end:test_end]),
    }


def seeded(seed: int, corpus: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across processes.
    return random.Random(f"{seed}:{corpus}")


def shuffled(items: Iterable, rng: random.Random) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


def progress(items, desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, leave=False, mininterval=1.0, disable=None)


def write_parallel(dst: Path, splits: dict[str, list[tuple[str, str]]], src: str, tgt: str) -> dict[str, int]:
    for split, pairs in splits.items():
        for lang, side in ((src, 0), (tgt, 1)):
            lines = [pair[side] for pair in pairs]
            assert not any("\n" in line for line in lines), "a sentence spans two lines"
            (dst / f"{split}.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {split: len(pairs) for split, pairs in splits.items()}
