"""Generated, learnable examples of every task kind, for the in-process demo, tests and
benchmarks. No corpus needed: each kind has a small rule a model can pick up in minutes.

    image_classification  a bright patch in one of 10 grid cells; the cell is the class
    image_captioning      a coloured patch; the caption is the colour's three-word name
    translation           reverse the sentence and map each word to its "German" twin
    speech_recognition    each word is a burst of frames with its own mel profile
    constituency_parsing  bracket the words as (S (NP w1 w2) (VP w3 ...))
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm.batch import EOS, FIRST_COMMAND_ID, Batch, pad_sequences
from mm.tasks import TaskSpec

VOCAB_SIZE = 64
KINDS = [
    "image_classification",
    "image_captioning",
    "translation",
    "speech_recognition",
    "constituency_parsing",
]
WORDS = range(12, 28)  # source words; translation maps w -> w + 16
OPEN, CLOSE, S, NP, VP = 44, 45, 46, 47, 48
CAPTION_WORDS = range(50, 64)
BINS, FRAMES_PER_WORD = 80, 8


def synthetic_tasks() -> list[TaskSpec]:
    """One task per kind, command ids 3.. in order, 10 classes for classification."""
    return [
        TaskSpec(name=kind, kind=kind, command_id=FIRST_COMMAND_ID + i, num_classes=10 if i == 0 else 0)
        for i, kind in enumerate(KINDS)
    ]


class SyntheticData:
    def __init__(self, seed: int = 0):
        self.rng = torch.Generator().manual_seed(seed)
        # fixed per-word mel profiles and per-colour captions
        self.word_profiles = torch.rand(len(WORDS), BINS, generator=self.rng) * 4 - 2
        self.captions = torch.randint(CAPTION_WORDS.start, CAPTION_WORDS.stop, (8, 3), generator=self.rng)

    def batch(self, task: TaskSpec, size: int) -> Batch:
        make = getattr(self, task.kind)
        return make(task.name, size)

    def _words(self, size: int, low: int, high: int) -> list[list[int]]:
        lengths = torch.randint(low, high + 1, (size,), generator=self.rng).tolist()
        return [torch.randint(WORDS.start, WORDS.stop, (n,), generator=self.rng).tolist() for n in lengths]

    def image_classification(self, name: str, size: int) -> Batch:
        labels = torch.randint(0, 10, (size,), generator=self.rng)
        images = torch.randint(0, 40, (size, 28, 28, 1), generator=self.rng, dtype=torch.uint8)
        for i, label in enumerate(labels.tolist()):
            row, col = divmod(label, 4)
            images[i, 2 + row * 8 : 8 + row * 8, 2 + col * 6 : 7 + col * 6] = 230
        return Batch(name, images, labels)

    def image_captioning(self, name: str, size: int) -> Batch:
        colours = torch.randint(0, 8, (size,), generator=self.rng)
        images = torch.randint(0, 30, (size, 32, 32, 3), generator=self.rng, dtype=torch.uint8)
        for i, colour in enumerate(colours.tolist()):
            rgb = torch.tensor([(colour >> b & 1) * 200 + 40 for b in range(3)], dtype=torch.uint8)
            top, left = torch.randint(0, 16, (2,), generator=self.rng).tolist()
            images[i, top : top + 16, left : left + 16] = rgb
        targets = [self.captions[c].tolist() + [EOS] for c in colours.tolist()]
        return Batch(name, images, pad_sequences(targets))

    def translation(self, name: str, size: int) -> Batch:
        sentences = self._words(size, 3, 7)
        targets = [[w + 16 for w in reversed(s)] + [EOS] for s in sentences]
        return Batch(name, pad_sequences([s + [EOS] for s in sentences]), pad_sequences(targets))

    def speech_recognition(self, name: str, size: int) -> Batch:
        sentences = self._words(size, 2, 4)
        utterances = [self._speak(s) for s in sentences]
        lengths = torch.tensor([len(u) for u in utterances])
        frames = torch.zeros(size, int(lengths.max()), BINS, dtype=torch.float16)
        for i, u in enumerate(utterances):
            frames[i, : len(u)] = u
        return Batch(name, frames, pad_sequences([s + [EOS] for s in sentences]), input_lengths=lengths)

    def _speak(self, words: list[int]) -> Tensor:
        bursts = [self.word_profiles[w - WORDS.start].expand(FRAMES_PER_WORD, BINS) for w in words]
        audio = torch.cat(bursts)
        return (audio + 0.3 * torch.randn(audio.shape, generator=self.rng)).half()

    def constituency_parsing(self, name: str, size: int) -> Batch:
        sentences = self._words(size, 3, 6)
        targets = [[OPEN, S, OPEN, NP, *s[:2], CLOSE, OPEN, VP, *s[2:], CLOSE, CLOSE, EOS] for s in sentences]
        return Batch(name, pad_sequences([s + [EOS] for s in sentences]), pad_sequences(targets))
