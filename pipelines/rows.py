"""From source items to shard rows: the part every reader shares.

A reader enumerates its *items* on the driver (cheap: paths, raw lines, tree text) and turns one
item into shard rows in a worker (`Reader.rows`: decode, resize, tokenise, features). Everything
around that per-item function lives here, once:

* `BadRow` / `Filtered`: how a reader says an item is unusable (counted as *rejected*) or left out
  by policy (counted as *filtered*), with a stable reason name for the manifest.
* `RowContext`: what a worker needs besides the item (split, feature settings, the vocabulary).
* `convert_batch`: the loop Ray Data's `map_batches` runs over a batch of items. It catches the
  drops, applies the length limits every text task shares, and returns one Arrow table in the
  shard schema plus bookkeeping columns (`outcome`, `reason`, `where`, `detail`) that the shard
  sink counts and strips.

The benchmark's plain single-process loop calls the very same `convert_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mm.media import AudioSettings, MediaError
from mm.shards import COLUMNS, array_to_bytes
from mm.tasks import kind_of
from mm.vocab import Vocabulary

if TYPE_CHECKING:
    from pipelines.readers import Reader

# Bookkeeping columns next to the shard columns; the sink counts them and writes only COLUMNS.
INDEX, OUTCOME, REASON, WHERE, DETAIL = "index", "outcome", "reason", "where", "detail"
PROBLEM = "problem"  # items column: a reason the driver already knows the item is bad, or ""
KEPT, REJECTED, FILTERED = "ok", "rejected", "filtered"


class Dropped(Exception):
    """An item that yields no row. `reason` is a stable snake_case name (a manifest key)."""

    outcome = ""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class BadRow(Dropped):
    """The source item is broken (undecodable image, non-UTF-8 text, ...): counted as rejected,
    and too many of them fail the job."""

    outcome = REJECTED


class Filtered(Dropped):
    """The item is fine but left out by policy (too long, empty): counted, never an error."""

    outcome = FILTERED


@dataclass
class Row:
    """One shard row before it becomes Arrow. `inputs` is token ids (text) or an array (image:
    uint8 H x W x C, audio: float16 frames x bins); `targets` token ids or a class id."""

    id: str
    inputs: list[int] | np.ndarray
    targets: list[int] | int
    reference: str
    references: list[str] | None = None


@dataclass(frozen=True)
class RowContext:
    """Everything a worker needs to turn an item into rows; pickled into each Ray task."""

    task: str
    kind: str
    split: str
    image_size: int = 28
    audio: AudioSettings = field(default_factory=AudioSettings)
    max_input_length: int = 256
    max_target_length: int = 128
    vocab_proto: bytes | None = field(default=None, repr=False)

    @property
    def vocab(self) -> Vocabulary:
        if self.vocab_proto is None:
            raise RuntimeError(f"task {self.task!r} tokenises text but was given no vocabulary")
        return _cached_vocabulary(self.vocab_proto)

    @property
    def is_train(self) -> bool:
        return self.split == "train"


_VOCABULARIES: dict[bytes, Vocabulary] = {}


def _cached_vocabulary(proto: bytes) -> Vocabulary:
    # A Ray worker process runs many batches; load the SentencePiece model once per process.
    if proto not in _VOCABULARIES:
        _VOCABULARIES[proto] = Vocabulary(proto)
    return _VOCABULARIES[proto]


def uses_vocabulary(kind: str) -> bool:
    """Whether a task's shards hold token ids (a text input or a text output)."""
    task_kind = kind_of(kind)
    return task_kind.input_modality == "text" or task_kind.output_modality == "text"


def shard_schema(kind: str) -> pa.Schema:
    """The Arrow schema of a task's shards (see `mm.shards`)."""
    task_kind = kind_of(kind)
    token_ids = pa.list_(pa.int32())
    return pa.schema(
        [
            ("id", pa.string()),
            ("inputs", token_ids if task_kind.input_modality == "text" else pa.binary()),
            ("input_shape", pa.list_(pa.int32())),
            ("targets", pa.int64() if task_kind.output_modality == "class" else token_ids),
            ("reference", pa.string()),
            ("references", pa.list_(pa.string())),
        ]
    )


def batch_schema(kind: str) -> pa.Schema:
    """The shard schema plus the bookkeeping columns `convert_batch` adds."""
    schema = shard_schema(kind)
    for name, type_ in ((INDEX, pa.int64()), (OUTCOME, pa.string()), (REASON, pa.string())):
        schema = schema.append(pa.field(name, type_))
    return schema.append(pa.field(WHERE, pa.string())).append(pa.field(DETAIL, pa.string()))


def decode_text(raw: bytes | str, what: str = "text") -> str:
    """Strict UTF-8, surrounding whitespace removed; non-UTF-8 bytes are a bad row."""
    if isinstance(raw, str):
        return raw.strip()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise BadRow("not_utf8", f"{what}: byte {err.start} is not UTF-8") from None


def require_text(text: str) -> str:
    """Empty text (a blank line of parallel text) is filtered, not an error. (An empty
    transcript is a broken utterance: the speech readers reject it.)"""
    if not text:
        raise Filtered("empty_text")
    return text


# -------------------------------------------------------------------------------------- conversion


class _Columns:
    """Accumulates output rows column by column (kept rows and dropped ones alike)."""

    def __init__(self, kind: str):
        self.schema = batch_schema(kind)
        self.columns: dict[str, list[Any]] = {name: [] for name in self.schema.names}
        task_kind = kind_of(kind)
        self.empty_inputs: Any = [] if task_kind.input_modality == "text" else b""
        self.empty_targets: Any = 0 if task_kind.output_modality == "class" else []

    def keep(self, row: Row, index: int, where: str) -> None:
        if isinstance(row.inputs, np.ndarray):
            inputs, shape = array_to_bytes(row.inputs)
        else:
            inputs, shape = row.inputs, []
        references = row.references if row.references is not None else [row.reference]
        self._append(row.id, inputs, shape, row.targets, row.reference, references, index)
        self._bookkeeping(KEPT, "", where, "")

    def drop(self, outcome: str, reason: str, index: int, where: str, detail: str) -> None:
        self._append("", self.empty_inputs, [], self.empty_targets, "", [], index)
        self._bookkeeping(outcome, reason, where, detail)

    def _append(self, id_, inputs, shape, targets, reference, references, index) -> None:
        values = (id_, inputs, shape, targets, reference, references, index)
        for name, value in zip((*COLUMNS, INDEX), values):
            self.columns[name].append(value)

    def _bookkeeping(self, outcome: str, reason: str, where: str, detail: str) -> None:
        for name, value in ((OUTCOME, outcome), (REASON, reason), (WHERE, where), (DETAIL, detail)):
            self.columns[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=self.schema)


class ReaderFailed(RuntimeError):
    """A reader raised on an item for a reason other than the item being bad; the message names
    the task, split and item, since Ray Data's own wrapper does not."""


def convert_batch(items: pa.Table, reader: Reader, context: RowContext) -> pa.Table:
    """Items -> rows, every item accounted for: kept, rejected or filtered. Runs in the workers.
    Rejections count items (one broken image is one bad item, whatever its captions); the length
    filter counts rows."""
    out = _Columns(context.kind)
    for item in items.to_pylist():
        index, where = item[INDEX], item[WHERE]
        try:
            if item[PROBLEM]:
                raise BadRow(item[PROBLEM], item.get(DETAIL) or "")
            rows = reader.rows(item, context)
        except Dropped as dropped:
            out.drop(dropped.outcome, dropped.reason, index, where, dropped.detail)
            continue
        except MediaError as bad:  # a file the item names is missing or broken
            out.drop(REJECTED, bad.reason, index, where, bad.detail)
            continue
        except Exception as err:  # not a bad row but a broken reader or install: stop, saying where
            place = f"task {context.task!r} ({context.split}) at {where}"
            raise ReaderFailed(f"{place}: {type(err).__name__}: {err}") from err
        for row in rows:
            too_long = length_violation(row, context)
            if too_long:
                reason, detail = too_long
                out.drop(FILTERED, reason, index, where, detail)
            else:
                out.keep(row, index, where)
    return out.table()


def length_violation(row: Row, context: RowContext) -> tuple[str, str] | None:
    """(reason, detail) when a row is over the task's limits: token ids (EOS included) or audio
    frames against `max_input_length`, token ids against `max_target_length`."""
    inputs_length = _length(row.inputs)
    if inputs_length is not None and inputs_length > context.max_input_length:
        return "input_too_long", f"{inputs_length} > max_input_length {context.max_input_length}"
    if isinstance(row.targets, list) and len(row.targets) > context.max_target_length:
        return "target_too_long", f"{len(row.targets)} > max_target_length {context.max_target_length}"
    return None


def _length(inputs: Sequence[int] | np.ndarray) -> int | None:
    if isinstance(inputs, np.ndarray):
        # Audio frames count against the input limit; an image has no length.
        return len(inputs) if inputs.ndim == 2 else None
    return len(inputs)
