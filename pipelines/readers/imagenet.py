"""ImageNet-style class folders for image classification.

    <path>/<prefix>/<class folder>/<file>.{JPEG,jpg,jpeg,png}
    <path>/classes.txt or synsets.txt    optional: one class folder per line, in label order
                                         (ImageNet's LOC_synset_mapping.txt form, a folder
                                         name then its description, is read too)

Without a class list the labels are the sorted folder names of all configured splits, so every
split numbers the classes alike. A folder missing from a class list is a bad row
(`unknown_class`) rather than a new label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mm.config import CorpusConfig
from mm.media import IMAGE_SUFFIXES, load_image
from pipelines.readers.base import (
    Items,
    Reader,
    SourceError,
    add_item,
    image_block_rows,
    new_items,
    split_prefix,
)
from pipelines.rows import Row, RowContext

CLASS_LISTS = ("classes.txt", "synsets.txt")


class ImageNetReader(Reader):
    layout = "imagenet"
    modalities = ("image", "class")

    def split_dir(self, corpus: CorpusConfig, split: str) -> Path:
        return corpus.path / split_prefix(corpus, split)

    def check(self, corpus: CorpusConfig, split: str) -> None:
        folder = self.split_dir(corpus, split)
        if not folder.is_dir():
            raise SourceError(f"split {split!r}: folder {folder} is missing")

    def block_rows(self, context: RowContext) -> int:
        return image_block_rows(context)

    def class_names(self, corpus: CorpusConfig) -> list[str]:
        for name in CLASS_LISTS:
            path = corpus.path / name
            if path.is_file():
                lines = path.read_text(encoding="utf-8").splitlines()
                return [line.split()[0] for line in lines if line.strip()]
        folders = {
            child.name
            for split in corpus.splits
            if self.split_dir(corpus, split).is_dir()
            for child in self.split_dir(corpus, split).iterdir()
            if child.is_dir()
        }
        return sorted(folders)

    def items(self, corpus: CorpusConfig, split: str) -> Items:
        labels = {name: index for index, name in enumerate(self.class_names(corpus))}
        root = self.split_dir(corpus, split)
        items = new_items("id", "path", "label", "class_name")
        for folder in sorted(child for child in root.iterdir() if child.is_dir()):
            label = labels.get(folder.name, -1)
            problem = "" if label >= 0 else "unknown_class"
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    relative = f"{folder.name}/{file.name}"
                    add_item(
                        items,
                        f"{root.name}/{relative}",
                        problem,
                        id=f"{folder.name}/{file.stem}",
                        path=str(file),
                        label=label,
                        class_name=folder.name,
                    )
        return items

    def rows(self, item: dict[str, Any], context: RowContext) -> list[Row]:
        image = load_image(item["path"], context.image_size)
        return [Row(item["id"], image, item["label"], item["class_name"])]

    def features(self, context: RowContext) -> dict[str, Any]:
        return {"image_size": context.image_size, "channels": 3}
