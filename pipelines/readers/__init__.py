"""Corpus readers, one per raw layout (`CorpusConfig.layout`)."""

from __future__ import annotations

from pipelines.readers.base import Items, Reader, SourceError
from pipelines.readers.coco import CocoReader
from pipelines.readers.imagenet import ImageNetReader
from pipelines.readers.ptb import PtbReader
from pipelines.readers.speech import LibriSpeechReader, SpeechManifestReader
from pipelines.readers.text import TsvReader, WmtReader

READERS: dict[str, Reader] = {
    reader.layout: reader
    for reader in (
        ImageNetReader(),
        WmtReader(),
        TsvReader(),
        CocoReader(),
        LibriSpeechReader(),
        SpeechManifestReader(),
        PtbReader(),
    )
}


def reader_for(layout: str) -> Reader:
    try:
        return READERS[layout]
    except KeyError:
        raise SourceError(f"no reader for layout {layout!r}; known: {', '.join(sorted(READERS))}") from None


__all__ = ["READERS", "Items", "Reader", "SourceError", "reader_for"]
