"""COCO captions for image captioning.

    <path>/annotations/captions_<prefix>.json   {"images": [{"id", "file_name"}, ...],
                                                 "annotations": [{"image_id", "caption"}, ...]}
    <path>/<prefix>/<file_name>                 the images (COCO's own `<prefix>2014/` and
                                                `<prefix>2017/` folder names are found too)

The train split has one row per caption (an image is decoded once for all of its captions);
dev and test have one row per image, the first caption as target and all of them as
`references`, as captioning metrics are computed against every reference.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm.config import CorpusConfig
from pipelines.media import load_image
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

    def captioned_images(self, corpus: CorpusConfig, split: str) -> list[tuple[Any, str, list[str]]]:
        """(image id, file name, captions) of every image the json lists."""
        path = self.annotations_file(corpus, split)
        try:
            coco = json.loads(path.read_bytes())
            captions: dict[Any, list[str]] = defaultdict(list)
            for annotation in coco["annotations"]:
                captions[annotation["image_id"]].append(normalise_caption(annotation["caption"]))
            return [(image["id"], image["file_name"], captions[image["id"]]) for image in coco["images"]]
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # UTF-8 errors are ValueErrors
            raise SourceError(f"{path}: not a COCO captions file ({type(err).__name__}: {err})") from None

    def items(self, corpus: CorpusConfig, split: str) -> Items:
        folder = self.image_folder(corpus, split)
        json_name = self.annotations_file(corpus, split).name
        items = new_items("id", "path", "captions")
        for image_id, file_name, captions in self.captioned_images(corpus, split):
            where = f"{json_name}: image {image_id} ({file_name})"
            add_item(items, where, id=str(image_id), path=str(folder / file_name), captions=captions)
        return items

    def rows(self, item: dict[str, Any], context: RowContext) -> list[Row]:
        captions = [caption for caption in item["captions"] if caption]
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
        for _, _, captions in self.captioned_images(corpus, split):
            yield from (caption for caption in captions if caption)

    def features(self, context: RowContext) -> dict[str, Any]:
        return {**super().features(context), "image_size": context.image_size, "channels": 3}
