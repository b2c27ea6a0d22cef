"""Parallel text for translation: WMT's line-aligned file pairs and two-column TSV.

    wmt   <path>/<prefix>.<source_lang> and <path>/<prefix>.<target_lang>, plain or .gz,
          line n of one file translating line n of the other
    tsv   <path>/<prefix>.tsv (or .tsv.gz): source TAB target per line; further columns
          (attribution and the like) are ignored

Lines are carried as bytes and decoded in the workers, so a line that is not UTF-8 is one
rejected row; the driver only looks which of the two WMT files holds the bad bytes, so that the
rejection names that file and line. When the two WMT files differ in length the lines past the shorter one are
unmatched and rejected.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Any

from mm.config import CorpusConfig
from pipelines.readers.base import (
    Items,
    Reader,
    SourceError,
    add_item,
    decodable,
    new_items,
    read_lines,
    require_file,
    split_prefix,
)
from pipelines.rows import Row, RowContext, decode_text, require_text

# (id, source bytes, target bytes, where, problem)
Pair = tuple[str, bytes, bytes, str, str]


class ParallelText(Reader):
    modalities = ("text", "text")
    rows_per_block = 4096

    @abstractmethod
    def pairs(self, corpus: CorpusConfig, split: str) -> Iterator[Pair]:
        """(id, source, target, where, problem) of every line pair of the split."""

    def items(self, corpus: CorpusConfig, split: str) -> Items:
        items = new_items("id", "source", "target")
        for id_, source, target, where, problem in self.pairs(corpus, split):
            add_item(items, where, problem, id=id_, source=source, target=target)
        return items

    def rows(self, item: dict[str, Any], context: RowContext) -> list[Row]:
        source = require_text(decode_text(item["source"], "source"))
        target = require_text(decode_text(item["target"], "target"))
        vocab = context.vocab
        return [Row(item["id"], vocab.encode(source), vocab.encode(target), target)]

    def texts(self, corpus: CorpusConfig, split: str) -> Iterator[str]:
        for _, source, target, _, problem in self.pairs(corpus, split):
            if not problem:
                yield from decodable((source, target))


class WmtReader(ParallelText):
    layout = "wmt"

    def files(self, corpus: CorpusConfig, split: str) -> tuple[Path, Path]:
        if not corpus.source_lang or not corpus.target_lang:
            raise SourceError(f"layout wmt needs corpus.source_lang and corpus.target_lang ({corpus.path})")
        prefix = split_prefix(corpus, split)
        source = require_file(corpus.path / f"{prefix}.{corpus.source_lang}", f"split {split!r}")
        target = require_file(corpus.path / f"{prefix}.{corpus.target_lang}", f"split {split!r}")
        return source, target

    def check(self, corpus: CorpusConfig, split: str) -> None:
        self.files(corpus, split)

    def pairs(self, corpus: CorpusConfig, split: str) -> Iterator[Pair]:
        source_path, target_path = self.files(corpus, split)
        prefix = split_prefix(corpus, split)
        sources, targets = read_lines(source_path), read_lines(target_path)
        for n, (source, target) in enumerate(zip_longest(sources, targets), start=1):
            if source is None or target is None:
                longer = source_path if target is None else target_path
                yield f"{prefix}:{n}", source or b"", target or b"", f"{longer.name}:{n}", "unmatched_line"
            else:
                named = target_path if _utf8(source) and not _utf8(target) else source_path
                yield f"{prefix}:{n}", source, target, f"{named.name}:{n}", ""


def _utf8(line: bytes) -> bool:
    if line.isascii():  # most lines, and much faster than decoding
        return True
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class TsvReader(ParallelText):
    layout = "tsv"

    def file(self, corpus: CorpusConfig, split: str) -> Path:
        return require_file(corpus.path / f"{split_prefix(corpus, split)}.tsv", f"split {split!r}")

    def check(self, corpus: CorpusConfig, split: str) -> None:
        self.file(corpus, split)

    def pairs(self, corpus: CorpusConfig, split: str) -> Iterator[Pair]:
        path = self.file(corpus, split)
        prefix = split_prefix(corpus, split)
        for n, line in enumerate(read_lines(path), start=1):
            fields = line.split(b"\t")
            where = f"{path.name}:{n}"
            if len(fields) < 2:
                yield f"{prefix}:{n}", line, b"", where, "malformed_line"
            else:
                yield f"{prefix}:{n}", fields[0], fields[1], where, ""
