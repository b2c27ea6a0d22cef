"""English-German translation as WMT parallel text, from Ding's full-sentence examples."""

from __future__ import annotations

from pathlib import Path

from pipelines.starter.common import Size, seeded, shuffled, take_splits, write_parallel
from pipelines.starter.ding import ding_sentence_pairs


def build_wmt_en_de(dst: Path, size: Size, seed: int) -> dict[str, int]:
    pairs = [(en, de) for en, de in ding_sentence_pairs() if len(en.split()) <= size.en_de_words]
    splits = take_splits(shuffled(pairs, seeded(seed, "wmt_en_de")), size.en_de, "wmt_en_de")
    return write_parallel(dst, splits, "en", "de")
