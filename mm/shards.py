"""The shard contract between `pipelines/` (which writes) and training (which reads).

    <root>/vocab.model                           the shared SentencePiece model
    <root>/<task>/manifest.json                  `Manifest` below
    <root>/<task>/<split>/part-00000.parquet     rows, columns:

    id            string
    inputs        text: list<int32> token ids ending in EOS
                  image: binary, uint8 H x W x C;  audio: binary, float16 frames x bins
    input_shape   list<int32>: [H, W, C] or [frames, bins]; empty for text
    targets       text: list<int32> ending in EOS;  class: int64
    reference     string: the raw target text (the class name for class tasks)
    references    list<string>: every reference of the example (COCO keeps all captions of an
                  image together in its dev/test rows); [reference] elsewhere

A part file appears only complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mm.batch import Batch, pad_sequences
from mm.tasks import TaskSpec

SCHEMA_VERSION = 1
COLUMNS = ("id", "inputs", "input_shape", "targets", "reference", "references")
MANIFEST = "manifest.json"
VOCAB = "vocab.model"


class ShardError(ValueError):
    pass


class SplitStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: int = 0
    rejected: dict[str, int] = Field(default_factory=dict)  # bad rows, by reason
    filtered: dict[str, int] = Field(default_factory=dict)  # dropped by policy (too long, ...)
    bytes: int = 0
    parts: int = 0
    seconds: float = 0.0


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    task: str
    kind: str
    layout: str
    splits: dict[str, SplitStats]
    features: dict[str, Any] = Field(default_factory=dict)  # image size, mel settings, max lengths
    num_classes: int | None = None
    class_names: list[str] | None = None
    vocab_sha256: str
    source_fingerprint: str
    created: str = ""

    def rows(self, split: str) -> int:
        return self.splits[split].rows if split in self.splits else 0


def task_dir(root: str | Path, task: str) -> Path:
    return Path(root) / task


def load_manifest(root: str | Path, task: str) -> Manifest:
    path = task_dir(root, task) / MANIFEST
    if not path.is_file():
        raise ShardError(f"task {task!r} has no shards: {path} is missing (run `mm prepare`)")
    data = json.loads(path.read_text())
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: shard schema {data.get('schema_version')}, this version reads {SCHEMA_VERSION}"
        )
    return Manifest.model_validate(data)


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    path = task_dir(root, manifest.task) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2))
    tmp.replace(path)


def part_files(root: str | Path, task: str, split: str) -> list[Path]:
    return sorted((task_dir(root, task) / split).glob("part-*.parquet"))


# ------------------------------------------------------------------------------------- row format


def array_to_bytes(array: np.ndarray) -> tuple[bytes, list[int]]:
    """Image (uint8) or audio features (float16) as the `inputs` bytes and `input_shape`."""
    return np.ascontiguousarray(array).tobytes(), list(array.shape)


def bytes_to_array(data: bytes, shape: Sequence[int], dtype) -> np.ndarray:
    return np.frombuffer(data, dtype=dtype).reshape(tuple(int(s) for s in shape))


def collate(task: TaskSpec, rows: Mapping[str, Sequence[Any]], max_input: int | None = None) -> Batch:
    """A `Batch` from a batch of shard rows (columns as lists or numpy arrays)."""
    modality = task.input_modality
    if modality == "text":
        inputs = pad_sequences([_truncate(list(x), max_input) for x in rows["inputs"]])
        lengths = None
    else:
        dtype = np.uint8 if modality == "image" else np.float16
        arrays = [bytes_to_array(x, s, dtype) for x, s in zip(rows["inputs"], rows["input_shape"])]
        if modality == "audio" and max_input:
            arrays = [a[:max_input] for a in arrays]
        inputs, lengths = _stack_padded(arrays)
        lengths = lengths if modality == "audio" else None
    if task.output_modality == "class":
        # a copy: Arrow's zero-copy labels are read-only, which torch warns of in every worker
        targets = torch.tensor(np.asarray(rows["targets"], dtype=np.int64))
    else:
        targets = pad_sequences([list(t) for t in rows["targets"]])
    references = (
        [list(r) for r in rows["references"]] if "references" in rows else list(rows.get("reference", []))
    )
    return Batch(task.name, inputs, targets, lengths, [str(i) for i in rows["id"]], references)


def _truncate(ids: list[int], limit: int | None) -> list[int]:
    if limit is None or len(ids) <= limit:
        return ids
    return [*ids[: limit - 1], ids[-1]]  # keep the closing EOS


def _stack_padded(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(a) for a in arrays])
    out = np.zeros((len(arrays), int(lengths.max()), *arrays[0].shape[1:]), dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.from_numpy(out), lengths
