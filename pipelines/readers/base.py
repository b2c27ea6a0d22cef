"""What a corpus reader is, and the file helpers several readers share.

A reader knows one raw layout. On the driver it checks that a split's files are there and
enumerates the split's *items* cheaply (paths, raw lines, tree text: no decoding); in the Ray
workers it turns one item into shard rows (`rows`). It also hands the vocabulary trainer the
text it will tokenise (`texts`), transformed exactly as `rows` transforms it.
"""

from __future__ import annotations

import gzip
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from mm.config import CorpusConfig
from pipelines.rows import PROBLEM, WHERE, Row, RowContext


class SourceError(ValueError):
    """A corpus (or one of its splits) that cannot be read at all; raised before any work."""


# Items of one split, column by column. Every reader fills `where` (file and line or record,
# for the log) and `problem` (a rejection reason the driver already knows, or "") next to its
# own columns; the driver adds `index`.
Items = dict[str, list[Any]]


class Reader(ABC):
    layout: ClassVar[str]
    modalities: ClassVar[tuple[str, str]]  # (input, output) of the examples it makes
    # Bumped when a reader's output changes for the same input: re-prepares that layout.
    version: ClassVar[int] = 1
    # Items per Ray Data block, at most: enough work per task that scheduling is cheap next to
    # it, few enough MB of output per block. Image readers size it by the image size.
    rows_per_block: ClassVar[int] = 1024

    @abstractmethod
    def check(self, corpus: CorpusConfig, split: str) -> None:
        """Raise `SourceError` when the split's files are missing. Cheap: runs before any work."""

    @abstractmethod
    def items(self, corpus: CorpusConfig, split: str) -> Items:
        """Enumerate the split on the driver."""

    @abstractmethod
    def rows(self, item: dict[str, Any], context: RowContext) -> list[Row]:
        """One item -> its shard rows (raises `BadRow`/`Filtered`). Runs in a Ray worker."""

    def block_rows(self, context: RowContext) -> int:
        return self.rows_per_block

    def texts(self, corpus: CorpusConfig, split: str) -> Iterator[str]:
        """The text this reader will tokenise, for training the shared vocabulary."""
        return iter(())

    def class_names(self, corpus: CorpusConfig) -> list[str] | None:
        return None

    def features(self, context: RowContext) -> dict[str, Any]:
        """The settings that shaped the rows, recorded in the manifest."""
        return {"max_input_length": context.max_input_length, "max_target_length": context.max_target_length}


def image_block_rows(context: RowContext, rows_per_item: int = 1) -> int:
    """Items per block for about 16 MB of decoded images: 4096 items of 32 x 32 (the most),
    111 of 224 x 224."""
    item_bytes = context.image_size * context.image_size * 3 * rows_per_item
    return max(16, min(4096, 16 * 2**20 // item_bytes))


def new_items(*columns: str) -> Items:
    return {name: [] for name in (*columns, WHERE, PROBLEM)}


def add_item(items: Items, where: str, problem: str = "", **values: Any) -> None:
    for name, value in values.items():
        items[name].append(value)
    items[WHERE].append(where)
    items[PROBLEM].append(problem)


def split_prefix(corpus: CorpusConfig, split: str) -> str:
    return corpus.splits[split]


# ------------------------------------------------------------------------------------------- files


def with_gzip(path: Path) -> Path | None:
    """`path` or `path.gz`, whichever exists."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def require_file(path: Path, what: str) -> Path:
    found = with_gzip(path)
    if found is None:
        raise SourceError(f"{what}: {path} (or {path.name}.gz) is missing")
    return found


def read_lines(path: Path) -> list[bytes]:
    """The lines of a plain or gzipped text file, as bytes (decoded per row, so one bad line is
    one bad row), without line endings."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the file's final newline
    return [line.rstrip(b"\r") for line in lines]


def decodable(lines: Iterable[bytes]) -> Iterator[str]:
    """The lines that are UTF-8, decoded and stripped (for the vocabulary sample)."""
    for line in lines:
        try:
            yield line.decode("utf-8").strip()
        except UnicodeDecodeError:
            continue
