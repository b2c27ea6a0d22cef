"""Ding's example sentences (``trans-de-en``): the English-German pairs that the EN-DE, speech
and parsing corpora are all made from."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

DING_FILE = Path("/usr/share/trans/de-en")
ANNOTATION = re.compile(r"\s*(\{[^}]*\}|\[[^\]]*\]|\([^)]*\))")


def first_alternative(text: str) -> str:
    """Drop Ding's {gender} [domain] (usage) notes and keep the first of '; '-separated variants."""
    text = ANNOTATION.sub("", text).split("; ")[0]
    return " ".join(text.split())


def is_full_sentence(text: str) -> bool:
    return (
        len(text.split()) >= 2
        and text[0].isupper()
        and text[-1] in ".?!"
        and "/" not in text  # "to the full / to the fullest." marks alternatives, not one sentence
    )


@functools.lru_cache(maxsize=2)
def ding_sentence_pairs(path: Path = DING_FILE) -> tuple[tuple[str, str], ...]:
    """(English, German) full-sentence pairs in file order, one per English sentence.

    Lines are ``German :: English``; aligned sub-entries are separated by `` | ``.
    """
    pairs: dict[str, str] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("#") or " :: " not in line:
                continue
            german, english = line.rstrip("\n").split(" :: ", 1)
            german_parts, english_parts = german.split(" | "), english.split(" | ")
            if len(german_parts) != len(english_parts):
                continue
            for de, en in zip(german_parts, english_parts, strict=True):
                en, de = first_alternative(en), first_alternative(de)
                if is_full_sentence(en) and is_full_sentence(de):
                    pairs.setdefault(en, de)
    return tuple(pairs.items())


def ding_english(max_words: int, keep: Callable[[str], bool] = lambda s: True) -> list[str]:
    return [en for en, _ in ding_sentence_pairs() if len(en.split()) <= max_words and keep(en)]
