"""Speech for speech recognition: LibriSpeech folders and a generic manifest.

    librispeech      <path>/<prefix>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
                     <path>/<prefix>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
                     (one "<utterance id> TRANSCRIPT" per line)
    speech_manifest  <path>/<prefix>.csv with a header naming `path` and `text`, or
                     <path>/<prefix>.jsonl with {"path": ..., "text": ...} per line;
                     relative paths are resolved against <path>

Audio becomes log-mel frames (`mm.media.load_log_mel`); the transcript is lower-cased
(LibriSpeech writes upper case) with single spaces, then tokenised. An utterance whose transcript
is empty is rejected (`empty_transcript`): speech with nothing to recognise is a broken record.
"""

from __future__ import annotations

import csv
import io
import json
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mm.config import CorpusConfig
from mm.media import load_log_mel
from pipelines.readers.base import Items, Reader, SourceError, add_item, new_items, read_lines, split_prefix
from pipelines.rows import BadRow, Row, RowContext, decode_text

# (id, audio path, transcript bytes, where, problem)
Utterance = tuple[str, str, bytes, str, str]


def normalise_transcript(text: str) -> str:
    return " ".join(text.lower().split())


class SpeechReader(Reader):
    modalities = ("audio", "text")
    rows_per_block = 64

    @abstractmethod
    def utterances(self, corpus: CorpusConfig, split: str) -> Iterator[Utterance]:
        """(id, audio path, transcript bytes, where, problem) of every utterance of the split."""

    def items(self, corpus: CorpusConfig, split: str) -> Items:
        items = new_items("id", "path", "text")
        for id_, path, text, where, problem in self.utterances(corpus, split):
            add_item(items, where, problem, id=id_, path=path, text=text)
        return items

    def rows(self, item: dict[str, Any], context: RowContext) -> list[Row]:
        transcript = normalise_transcript(decode_text(item["text"], "transcript"))
        if not transcript:
            raise BadRow("empty_transcript", "the transcript is empty")
        features = load_log_mel(item["path"], context.audio)
        return [Row(item["id"], features, context.vocab.encode(transcript), transcript)]

    def texts(self, corpus: CorpusConfig, split: str) -> Iterator[str]:
        for _, _, text, _, problem in self.utterances(corpus, split):
            try:
                transcript = normalise_transcript(text.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            if transcript and not problem:
                yield transcript

    def features(self, context: RowContext) -> dict[str, Any]:
        audio = context.audio
        return {
            **super().features(context),
            "sample_rate": audio.sample_rate,
            "mel_bins": audio.mel_bins,
            "window_ms": audio.window_ms,
            "hop_ms": audio.hop_ms,
        }


class LibriSpeechReader(SpeechReader):
    layout = "librispeech"

    def split_dir(self, corpus: CorpusConfig, split: str) -> Path:
        folder = corpus.path / split_prefix(corpus, split)
        if not folder.is_dir():
            raise SourceError(f"split {split!r}: folder {folder} is missing")
        return folder

    def check(self, corpus: CorpusConfig, split: str) -> None:
        self.split_dir(corpus, split)

    def utterances(self, corpus: CorpusConfig, split: str) -> Iterator[Utterance]:
        root = self.split_dir(corpus, split)
        for transcripts in sorted(root.rglob("*.trans.txt")):
            where_file = transcripts.relative_to(corpus.path)
            for n, line in enumerate(read_lines(transcripts), start=1):
                if not line.strip():
                    continue
                utterance, _, text = line.strip().partition(b" ")
                name = utterance.decode("ascii", errors="replace")
                problem = "" if text and utterance.isascii() else "malformed_line"
                audio = transcripts.parent / f"{name}.flac"
                yield name, str(audio), text, f"{where_file}:{n}", problem


class SpeechManifestReader(SpeechReader):
    layout = "speech_manifest"

    def manifest(self, corpus: CorpusConfig, split: str) -> Path:
        prefix = split_prefix(corpus, split)
        for suffix in (".csv", ".jsonl"):
            path = corpus.path / f"{prefix}{suffix}"
            if path.is_file():
                return path
        raise SourceError(f"split {split!r}: neither {prefix}.csv nor {prefix}.jsonl in {corpus.path}")

    def check(self, corpus: CorpusConfig, split: str) -> None:
        path = self.manifest(corpus, split)
        if path.suffix == ".csv":
            with path.open(encoding="utf-8", errors="replace", newline="") as file:
                _require_columns(path, next(csv.reader(file), []))

    def utterances(self, corpus: CorpusConfig, split: str) -> Iterator[Utterance]:
        path = self.manifest(corpus, split)
        records = self.csv_records(path) if path.suffix == ".csv" else self.jsonl_records(path)
        for n, audio, text, problem in records:
            resolved = str(corpus.path / audio) if audio else ""
            yield audio or f"{path.name}:{n}", resolved, text, f"{path.name}:{n}", problem

    @staticmethod
    def csv_records(path: Path) -> Iterator[tuple[int, str, bytes, str]]:
        # surrogateescape keeps undecodable bytes; a record holding some is one not_utf8 row.
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        _require_columns(path, reader.fieldnames or [])
        for record in reader:
            audio, transcript = record.get("path") or "", record.get("text")
            raw = (transcript or "").encode("utf-8", errors="surrogateescape")
            if transcript is None or not audio:
                yield reader.line_num, "", raw, "malformed_line"
            elif _has_surrogates(audio):
                yield reader.line_num, "", raw, "not_utf8"
            else:
                yield reader.line_num, audio, raw, ""

    @staticmethod
    def jsonl_records(path: Path) -> Iterator[tuple[int, str, bytes, str]]:
        for n, line in enumerate(read_lines(path), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                yield n, "", b"", "not_utf8"
                continue
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                yield n, "", b"", "malformed_line"
                continue
            yield n, record["path"], str(record.get("text") or "").encode("utf-8"), ""


def _require_columns(path: Path, header: Sequence[str]) -> None:
    if not {"path", "text"} <= set(header):
        raise SourceError(
            f"{path}: the header must name the columns `path` and `text`, it has {list(header)}"
        )


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
