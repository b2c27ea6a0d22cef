"""Greedy and beam search over a step function.

`step(tokens [N], state) -> log-probabilities [N, vocab]` advances every hypothesis by one
token; the model keeps what it needs of the past in `state` (a `DecodeState`), which beam
search re-orders as hypotheses are re-ranked.

Both searches take an optional `Constraint`, which forbids tokens before each choice: parse
trees decode through `TreeConstraint`, so every output is a well-formed tree with one leaf per
input word.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from mm.layers import DecodeState
from mm.trees import TAG

Step = Callable[[Tensor, DecodeState], Tensor]
# Whether every process is done, given whether this one is. Expert-parallel ranks must take the
# same number of steps (each step's MoE layers exchange tokens), so they stop together.
AllDone = Callable[[bool], bool]


def _alone(done: bool) -> bool:
    return done


class Constraint(Protocol):
    """What may come next, per hypothesis. `start` sets up one state per input row (repeated
    `copies` times for beam search); `allow` masks the log-probabilities of step `t` (0-based)
    of `max_len`; `advance` records the tokens taken, by the hypotheses `rows` when given."""

    def start(self, inputs: Tensor, copies: int = 1) -> Constraint: ...

    def allow(self, log_probs: Tensor, t: int, max_len: int) -> Tensor: ...

    def advance(self, tokens: Tensor, rows: Tensor | None = None) -> None: ...


def greedy_search(
    step: Step,
    state: DecodeState,
    first: Tensor,
    max_len: int,
    eos: int,
    all_done: AllDone = _alone,
    constraint: Constraint | None = None,
) -> list[list[int]]:
    """Take the most likely (allowed) token until every row has produced EOS or max_len tokens."""
    tokens, done = first, torch.zeros_like(first, dtype=torch.bool)
    outputs: list[Tensor] = []
    for t in range(max_len):
        log_probs = step(tokens, state)
        if constraint is not None:
            log_probs = constraint.allow(log_probs, t, max_len)
        tokens = log_probs.argmax(-1)
        if constraint is not None:
            constraint.advance(tokens)
        outputs.append(tokens)
        done |= tokens == eos
        if all_done(bool(done.all())):
            break
    return [_until_eos(row, eos) for row in torch.stack(outputs, 1).tolist()]


def beam_search(
    step: Step,
    state: DecodeState,
    first: Tensor,
    max_len: int,
    eos: int,
    beam: int,
    alpha: float = 0.6,
    all_done: AllDone = _alone,
    constraint: Constraint | None = None,
) -> list[list[int]]:
    """Beam search with GNMT length normalisation ((5 + length) / 6) ** alpha.

    `state` must already hold `beam` copies of every row (row b's copies at b*beam .. b*beam+beam-1)
    and `first` the matching start tokens.
    """
    batch = len(first) // beam
    scores = torch.full((batch, beam), float("-inf"), device=first.device)
    scores[:, 0] = 0.0  # all copies start equal: keep one so the first step is not repeated
    sequences = first.new_zeros(batch * beam, 0)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    tokens = first
    for length in range(1, max_len + 1):
        log_probs = step(tokens, state)  # [batch * beam, V]
        if constraint is not None:
            log_probs = constraint.allow(log_probs, length - 1, max_len)
        vocab = log_probs.shape[-1]
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beam * vocab)
        top_scores, top_index = candidates.topk(2 * beam, dim=1)
        origin, token = top_index // vocab, top_index % vocab
        _collect_finished(finished, top_scores, origin, token, sequences, eos, beam, length, alpha)
        alive_scores = top_scores.masked_fill(token == eos, float("-inf"))
        scores, pick = alive_scores.topk(beam, dim=1)
        rows = (origin.gather(1, pick) + torch.arange(batch, device=first.device)[:, None] * beam).view(-1)
        # Fewer live candidates than the beam (a constraint that leaves few tokens, or EOS taken
        # by many) fills it with -inf ones whose token is arbitrary: such a dead hypothesis
        # takes EOS instead, so that no constraint is advanced by a token it forbade.
        tokens = token.gather(1, pick).view(-1).masked_fill(scores.view(-1) == float("-inf"), eos)
        sequences = torch.cat([sequences[rows], tokens[:, None]], dim=1)
        state.reorder(rows)
        if constraint is not None:
            constraint.advance(tokens, rows)
        if all_done(_search_is_over(finished, scores, beam, max_len, alpha)):
            break
    return [_best(finished[b], scores[b], sequences.view(batch, beam, -1)[b], eos) for b in range(batch)]


def length_penalty(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha


def _collect_finished(finished, top_scores, origin, token, sequences, eos, beam, length, alpha) -> None:
    for b, k in (token == eos).nonzero().tolist():
        score = float(top_scores[b, k])
        if score == float("-inf"):
            continue
        prefix = sequences[b * beam + int(origin[b, k])].tolist()
        finished[b].append((score / length_penalty(length, alpha), prefix))


def _search_is_over(finished, alive_scores: Tensor, beam: int, max_len: int, alpha: float) -> bool:
    """Done when no alive hypothesis can still beat the worst of `beam` finished ones per row:
    log-probabilities only fall, and the normalisation is largest at max_len."""
    best_alive = alive_scores.max(dim=1).values / length_penalty(max_len, alpha)
    for row, bound in zip(finished, best_alive.tolist()):
        if len(row) < beam or sorted(s for s, _ in row)[-beam] < bound:
            return False
    return True


def _best(
    finished: list[tuple[float, list[int]]], alive_scores: Tensor, alive: Tensor, eos: int
) -> list[int]:
    if finished:
        return max(finished, key=lambda item: item[0])[1]
    return _until_eos(alive[int(alive_scores.argmax())].tolist(), eos)


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


# ------------------------------------------------------------------------------ parse trees


@dataclass
class _Tree:
    """One hypothesis's tree so far."""

    words: int  # leaves it must have: one per input word
    leaves: int = 0
    open: list[int] = field(default_factory=list)  # labels of the open brackets, innermost last
    filled: list[bool] = field(default_factory=list)  # whether each open bracket has a child yet
    started: bool = False
    ended: bool = False  # EOS taken


class TreeConstraint:
    """Vinyals-style trees (`(S (NP XX XX )NP XX )S`) that are well formed, as one tree whose
    closing brackets match their labels and have a child, with exactly one XX per input word.

    Works on a vocabulary whose tree symbols are whole pieces ("▁(NP", "▁)NP", "▁XX"; see
    `pipelines.vocabulary`); other pieces are never chosen. The length budget is kept: an
    opening bracket or a leaf is only allowed while the rest of the tree still fits in max_len.
    """

    OPEN, CLOSE = re.compile(r"^▁\((\S+)$"), re.compile(r"^▁\)(\S+)$")

    def __init__(self, pieces: list[str], eos: int, leaf: str = f"▁{TAG}"):
        labels: dict[str, int] = {}
        self.open_label = torch.full((len(pieces),), -1)
        self.close_label = torch.full((len(pieces),), -1)
        for i, piece in enumerate(pieces):
            for table, pattern in ((self.open_label, self.OPEN), (self.close_label, self.CLOSE)):
                found = pattern.match(piece)
                if found:
                    table[i] = labels.setdefault(found.group(1), len(labels))
        self.is_leaf = torch.tensor([p == leaf for p in pieces])
        self.is_eos = torch.zeros(len(pieces), dtype=torch.bool)
        self.is_eos[eos] = True
        self.word_start = torch.tensor([p.startswith("▁") for p in pieces])
        self.trees: list[_Tree] = []

    @classmethod
    def usable(cls, pieces: list[str]) -> bool:
        """Whether the vocabulary has the whole-piece tree symbols this needs."""
        return f"▁{TAG}" in pieces and any(cls.OPEN.match(p) for p in pieces)

    def start(self, inputs: Tensor, copies: int = 1) -> TreeConstraint:
        """One tree per row of `inputs` (token ids, 0 = padding), each repeated `copies` times
        (beam search): the words are the input's word-initial pieces."""
        words = self.word_start[inputs.cpu()].logical_and(inputs.cpu() > 0).sum(1).tolist()
        self.trees = [_Tree(w) for w in words for _ in range(copies)]
        return self

    def allow(self, log_probs: Tensor, t: int, max_len: int) -> Tensor:
        left = max_len - t - 1  # tokens that may follow this one
        allowed = torch.stack([self._allowed(tree, left) for tree in self.trees]).to(log_probs.device)
        return log_probs.masked_fill(~allowed, float("-inf"))

    def _allowed(self, tree: _Tree, left: int) -> Tensor:
        if tree.ended or (tree.started and not tree.open) or tree.words == 0:
            return self.is_eos
        need_after_leaf = tree.words - tree.leaves - 1 + len(tree.open) + 1  # leaves, closes, EOS
        need_after_open = tree.words - tree.leaves + len(tree.open) + 2
        allowed = self.open_label >= 0 if tree.leaves < tree.words and need_after_open <= left else None
        if allowed is None:
            allowed = torch.zeros_like(self.is_eos)
        if tree.open:
            if tree.leaves < tree.words and need_after_leaf <= left:
                allowed = allowed | self.is_leaf
            closes_root = len(tree.open) == 1
            if tree.filled[-1] and (not closes_root or tree.leaves == tree.words):
                allowed = allowed | (self.close_label == tree.open[-1])
            if not allowed.any():  # out of budget: the shortest way to a finished tree
                allowed = self.is_leaf if tree.leaves < tree.words else self.close_label == tree.open[-1]
        return allowed

    def advance(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        if rows is not None:
            self.trees = [_copy(self.trees[r]) for r in rows.tolist()]
        for tree, token in zip(self.trees, tokens.tolist()):
            self._take(tree, token)

    def _take(self, tree: _Tree, token: int) -> None:
        if tree.ended:
            return
        if self.is_eos[token]:
            tree.ended = True
        elif self.open_label[token] >= 0:
            if tree.filled:
                tree.filled[-1] = True
            tree.open.append(int(self.open_label[token]))
            tree.filled.append(False)
            tree.started = True
        elif self.is_leaf[token]:
            tree.leaves += 1
            tree.filled[-1] = True
        elif self.close_label[token] >= 0:
            tree.open.pop()
            tree.filled.pop()


def _copy(tree: _Tree) -> _Tree:
    return _Tree(tree.words, tree.leaves, list(tree.open), list(tree.filled), tree.started, tree.ended)
