"""Penn Treebank bracketed trees for constituency parsing.

    <path>/<prefix>.mrg            many trees, each on one line or spread over several
    <path>/<prefix>/**/*.{mrg,txt}  or a folder of such files (the WSJ section layout)

Trees are found on the driver by bracket depth (`pipelines.trees.split_trees`), so an
unbalanced tree is one rejected row and the trees after it survive; cleaning and linearising
happen in the workers. Input: the words; target and reference: the linearised tree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm.config import CorpusConfig
from pipelines.readers.base import Items, Reader, SourceError, add_item, new_items, split_prefix
from pipelines.rows import BadRow, Row, RowContext, decode_text
from pipelines.trees import TreeError, parse_example, split_trees

TREE_SUFFIXES = (".mrg", ".txt")


class PtbReader(Reader):
    layout = "ptb"
    modalities = ("text", "text")
    rows_per_block = 2048

    def files(self, corpus: CorpusConfig, split: str) -> list[Path]:
        prefix = split_prefix(corpus, split)
        single = corpus.path / f"{prefix}.mrg"
        if single.is_file():
            return [single]
        folder = corpus.path / prefix
        found = sorted(p for p in folder.rglob("*") if p.suffix in TREE_SUFFIXES) if folder.is_dir() else []
        if not found:
            raise SourceError(f"split {split!r}: neither {single} nor .mrg/.txt files under {folder}")
        return found

    def check(self, corpus: CorpusConfig, split: str) -> None:
        self.files(corpus, split)

    def trees(self, corpus: CorpusConfig, split: str) -> Iterator[tuple[str, bytes, str, str]]:
        """(id, tree text, where, problem) of every tree of the split."""
        for path in self.files(corpus, split):
            name = str(path.relative_to(corpus.path))
            for number, tree in enumerate(split_trees(path.read_bytes()), start=1):
                yield f"{name}#{number}", tree.text, f"{name}:{tree.line}", tree.problem

    def items(self, corpus: CorpusConfig, split: str) -> Items:
        items = new_items("id", "tree")
        for id_, text, where, problem in self.trees(corpus, split):
            add_item(items, where, problem, id=id_, tree=text)
        return items

    def rows(self, item: dict[str, Any], context: RowContext) -> list[Row]:
        sentence, target = example(decode_text(item["tree"], "tree"))
        vocab = context.vocab
        return [Row(item["id"], vocab.encode(sentence), vocab.encode(target), target)]

    def texts(self, corpus: CorpusConfig, split: str) -> Iterator[str]:
        for _, text, _, problem in self.trees(corpus, split):
            if problem:
                continue
            try:
                yield from example(decode_text(text, "tree"))
            except BadRow:
                continue


def example(tree_text: str) -> tuple[str, str]:
    try:
        return parse_example(tree_text)
    except TreeError as err:
        raise BadRow(err.reason, str(err)) from None
