"""The one subword vocabulary every text of every task shares (SentencePiece).

Ids: 0 padding, 1 end of sentence, 2 unknown, then one reserved id per command token, in the
order `Config.command_tokens` gives them, then the learned pieces.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from mm.batch import EOS, FIRST_COMMAND_ID, PAD, UNK


class VocabularyError(ValueError):
    pass


class Vocabulary:
    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()) != (PAD, EOS, UNK):
            raise VocabularyError("not a multimodel vocabulary: ids 0, 1, 2 must be pad, eos, unk")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise VocabularyError(f"{path}: no vocabulary file (run `mm prepare` first)")
        return cls(path.read_bytes())

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader never sees half a vocabulary."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(self.proto)
        tmp.replace(path)

    @property
    def size(self) -> int:
        return self.sp.get_piece_size()

    @cached_property
    def pieces(self) -> list[str]:
        """Every id's piece, in id order (read once: every evaluation of a text task asks)."""
        return [self.sp.id_to_piece(i) for i in range(self.size)]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()

    def command_id(self, token: str) -> int:
        token_id = self.sp.piece_to_id(token)
        if token_id == UNK or token_id < FIRST_COMMAND_ID:
            raise VocabularyError(f"command token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str, eos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [*ids, EOS] if eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        return self.sp.decode([i for i in ids if i >= FIRST_COMMAND_ID or i == UNK])


def train_vocabulary(
    sentences: Iterable[str], size: int, command_tokens: list[str], symbols: Iterable[str] = ()
) -> Vocabulary:
    """Train on `sentences` (a sample of every task's text). The command tokens are
    user-defined symbols, so they get ids 3, 4, ... and are never split; so are `symbols`
    (whole pieces such as "▁(NP"), after them."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=PAD,
        eos_id=EOS,
        unk_id=UNK,
        bos_id=-1,
        user_defined_symbols=[*command_tokens, *symbols],
        hard_vocab_limit=False,  # a small corpus may not support `size` pieces
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    return Vocabulary(model.getvalue())
