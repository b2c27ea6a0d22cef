"""COCO captions for image captioning.

    <path>/annotations/captions_<prefix>.json   {"images": [{"id", "file_name"}, ...],
                                                 "annotations": [{"image_id", "caption"}, ...]}
    <path>/<prefix>/<file_name>                 the images (COCO's own `<prefix>2014/` and
                                                `<prefix>2017/` folder names are found too)

The train split has one row per caption (an image is decoded once for all of its captions);
dev and test have one row per image, the first caption as target and all of them as
`references`, as captioning metrics are computed against every reference.

An annotation whose caption is empty (or only whitespace) is one rejected item
(`empty_caption`, named by its annotation id); the image keeps its other captions. An image
without any caption is filtered (`no_caption`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm.config import CorpusConfig
from mm.media import load_image
from pipelines.readers.base import (
    Items,
    Reader,
    SourceError,
    add_item,
    image_block_rows,
    new_items,
    split_prefix,
)
from pipelines.rows import Filtered, Row, RowContext

# Where COCO keeps a split's images, tried in order.
IMAGE_FOLDERS = ("{prefix}", "{prefix}2014", "{prefix}2017")


def normalise_caption(caption: str) -> str:
    """COCO captions carry stray spaces and newlines: one space between words."""
    return " ".join(caption.split())


class CocoReader(Reader):
    layout = "coco"
    modalities = ("image", "text")

    def block_rows(self, context: RowContext) -> int:
        # A train item (an image) becomes about five rows, one per caption.
        return image_block_rows(context, rows_per_item=5 if context.is_train else 1)

    def annotations_file(self, corpus: CorpusConfig, split: str) -> Path:
        path = corpus.path / "annotations" / f"captions_{split_prefix(corpus, split)}.json"
        if not path.is_file():
            raise SourceError(f"split {split!r}: {path} is missing")
        return path

    def image_folder(self, corpus: CorpusConfig, split: str) -> Path:
        prefix = split_prefix(corpus, split)
        candidates = [corpus.path / pattern.format(prefix=prefix) for pattern in IMAGE_FOLDERS]
        for folder in candidates:
            if folder.is_dir():
                return folder
        raise SourceError(f"split {split!r}: no image folder, looked for {', '.join(map(str, candidates))}")

    def check(self, corpus: CorpusConfig, split: str) -> None:
        self.annotations_file(corpus, split)
        self.image_folder(corpus, split)

    def captioned_images(
        self, corpus: CorpusConfig, split: str
    ) -> list[tuple[Any, str, list[str], list[Any]]]:
        """(image id, file name, captions, ids of its annotations with an empty caption) of
        every image the json lists."""
        path = self.annotations_file(corpus, split)
        try:
            coco = json.loads(path.read_bytes())
            captions: dict[Any, list[str]] = defaultdict(list)
            empty: dict[Any, list[Any]] = defaultdict(list)
            for annotation in coco["annotations"]:
                caption = normalise_caption(annotation["caption"])
                if caption:
                    captions[annotation["image_id"]].append(caption)
                else:
                    empty[annotation["image_id"]].append(annotation.get("id", "?"))
            return [
                (image["id"], image["file_name"], captions[image["id"]], empty[image["id"]])
                for image in coco["images"]
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # UTF-8 errors are ValueErrors
            raise SourceError(f"{path}: not a COCO captions file ({type(err).__name__}: {err})") from None

    def items(self, corpus: CorpusConfig, split: str) -> Items:
        folder = self.image_folder(corpus, split)
        json_name = self.annotations_file(corpus, split).name
        items = new_items("id", "path", "captions")
        for image_id, file_name, captions, empty in self.captioned_images(corpus, split):
            where = f"{json_name}: image {image_id} ({file_name})"
            path = str(folder / file_name)
            for annotation_id in empty:
                place = f"{json_name}: annotation {annotation_id} of image {image_id} ({file_name})"
                add_item(items, place, "empty_caption", id=str(image_id), path=path, captions=[])
            if captions or not empty:  # an image whose captions are all empty is counted above
                add_item(items, where, id=str(image_id), path=path, captions=captions)
        return items

    def rows(self, item: dict[str, Any], context: RowContext) -> list[Row]:
        captions = item["captions"]  # empty ones are items of their own (`items`), rejected
        if not captions:
            raise Filtered("no_caption")
        image = load_image(item["path"], context.image_size)
        vocab = context.vocab
        if context.is_train:
            return [
                Row(f"{item['id']}-{n}", image, vocab.encode(caption), caption)
                for n, caption in enumerate(captions)
            ]
        return [Row(item["id"], image, vocab.encode(captions[0]), captions[0], captions)]

    def texts(self, corpus: CorpusConfig, split: str) -> Iterator[str]:
        for _, _, captions, _ in self.captioned_images(corpus, split):
            yield from captions

    def features(self, context: RowContext) -> dict[str, Any]:
        return {**super().features(context), "image_size": context.image_size, "channels": 3}
