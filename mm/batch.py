"""A batch of one task, as the model takes it.

inputs   text: token ids [B, S] (0 = padding); image: uint8 [B, H, W, C];
         audio: log-mel frames [B, T, bins] with `input_lengths` [B]
targets  text: token ids [B, U], each row ending in EOS then padding; class: ids [B]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

PAD, EOS, UNK = 0, 1, 2
FIRST_COMMAND_ID = 3  # one reserved id per command token from here on
LOG_MEL_FLOOR = 1e-6  # log-mel features are log(mel + floor): silence is log(floor)


@dataclass
class Batch:
    task: str
    inputs: Tensor
    targets: Tensor
    input_lengths: Tensor | None = None
    ids: list[str] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)  # raw target text(s), for metrics

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device | str) -> Batch:
        lengths = None if self.input_lengths is None else self.input_lengths.to(device)
        return replace(
            self, inputs=self.inputs.to(device), targets=self.targets.to(device), input_lengths=lengths
        )

    def select(self, rows: slice | Tensor) -> Batch:
        """The examples `rows` of this batch (a slice or an index tensor)."""
        index = torch.arange(len(self))[rows] if isinstance(rows, slice) else rows
        picked = index.tolist()
        lengths = None if self.input_lengths is None else self.input_lengths[index]
        return Batch(
            self.task,
            self.inputs[index],
            self.targets[index],
            lengths,
            [self.ids[i] for i in picked] if self.ids else [],
            [self.references[i] for i in picked] if self.references else [],
        )

    def chunks(self, n: int) -> list[Batch]:
        """n nearly equal parts (gradient accumulation, or one part per rank)."""
        bounds = torch.linspace(0, len(self), n + 1).round().long().tolist()
        return [self.select(slice(a, b)) for a, b in zip(bounds, bounds[1:])]


def pad_sequences(rows: list[list[int]], pad: int = PAD, length: int | None = None) -> Tensor:
    """Right-pad token id lists into a [B, max_len] long tensor."""
    width = max([len(r) for r in rows] + [1]) if length is None else length
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[:width]
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out
