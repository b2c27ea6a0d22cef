"""Task kinds: what a task reads, what it writes, and how it is scored.

The registry is open: a new kind is one `register_kind` call. A configured task (see
`mm.config.TaskConfig`) names its kind; the model picks the modality nets from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

InputModality = Literal["image", "text", "audio"]
OutputModality = Literal["class", "text"]


@dataclass(frozen=True)
class TaskKind:
    name: str
    input_modality: InputModality
    output_modality: OutputModality
    metrics: tuple[str, ...]


KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind) -> TaskKind:
    if kind.name in KINDS and KINDS[kind.name] != kind:
        raise ValueError(f"task kind {kind.name!r} is already registered differently")
    KINDS[kind.name] = kind
    return kind


def kind_of(name: str) -> TaskKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task kind {name!r}; known kinds: {', '.join(sorted(KINDS))}") from None


# Every text task is also scored by log-perplexity and per-token accuracy (the paper's Table 2).
TEXT_METRICS = ("log_ppl", "token_accuracy")

register_kind(TaskKind("image_classification", "image", "class", ("accuracy", "top5")))
register_kind(TaskKind("translation", "text", "text", ("bleu", *TEXT_METRICS)))
register_kind(TaskKind("image_captioning", "image", "text", ("bleu", *TEXT_METRICS)))
register_kind(TaskKind("speech_recognition", "audio", "text", ("wer", *TEXT_METRICS)))
register_kind(
    TaskKind(
        "constituency_parsing", "text", "text", ("bracket_f1", "exact_match", "well_formed", *TEXT_METRICS)
    )
)


@dataclass(frozen=True)
class TaskSpec:
    """What the model needs to know of a task: its modalities, command token and classes."""

    name: str
    kind: str
    command_id: int = 0
    num_classes: int = 0
    loss_weight: float = 1.0

    @property
    def input_modality(self) -> InputModality:
        return kind_of(self.kind).input_modality

    @property
    def output_modality(self) -> OutputModality:
        return kind_of(self.kind).output_modality
