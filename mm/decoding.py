"""Greedy and beam search over a step function.

`step(tokens [N], state) -> log-probabilities [N, vocab]` advances every hypothesis by one
token; the model keeps what it needs of the past in `state` (a `DecodeState`), which beam
search re-orders as hypotheses are re-ranked.

Both searches take an optional `Constraint`, which forbids tokens before each choice: parse
trees decode through `TreeConstraint`, so every output is a well-formed tree with one leaf per
input word.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
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


# How many numbers a decoded position of all hypotheses together (rows x d_model) may hold for
# its steps to run on one thread. Chosen on the starter's model (README "Results"): beam 8 for
# one source (8 rows at d_model 96) decodes 22 % faster on one thread than on two, 16 to 128
# rows decode as fast on either, and 256 rows 26 % faster on two.
ONE_THREAD_UP_TO = 1024


@contextlib.contextmanager
def small_steps_on_one_thread(numbers: int) -> Iterator[None]:
    """Run the decoding steps of a small batch on one thread: a step of a few hypotheses is
    some 300 kernels on [rows, d_model] tensors, and layer norm, attention and the small
    matmuls still split such work between threads, whose start and join then cost more than
    the work (with two threads here, a [8, 1, 64] layer norm takes 4-5 µs instead of 3, a
    one-query attention to the source 17-26 µs instead of 12). Larger batches keep the
    process's threads.

    Only in the main thread: torch's thread count is partly the process's and partly each
    thread's, so overlapping decodings in a server's threads could each restore the other's
    1. Decodings in other threads keep the count they have."""
    threads = torch.get_num_threads()
    small = numbers <= ONE_THREAD_UP_TO and threads > 1
    if not small or threading.current_thread() is not threading.main_thread():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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

    `first` holds the start tokens of `beam` hypotheses per row (row b's at b*beam .. b*beam+beam-1);
    `step` advances all of them, and `state.reorder` only ever moves a hypothesis within its row.
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
    log-probabilities only fall, and the normalisation is largest at max_len. A row with no
    live hypothesis left is done too, however few it finished: a constraint that allows only
    EOS (a parse of an input with no words, as input-blind evaluation gives) ends its row at
    the first step, and kept every row of its batch decoding to max_len."""
    best_alive = alive_scores.max(dim=1).values / length_penalty(max_len, alpha)
    for row, bound in zip(finished, best_alive.tolist()):
        if bound == float("-inf"):
            continue
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


class TreeConstraint:
    """Vinyals-style trees (`(S (NP XX XX )NP XX )S`) that are well formed, as one tree whose
    closing brackets match their labels and have a child, with exactly one XX per input word.

    Works on a vocabulary whose tree symbols are whole pieces ("▁(NP", "▁)NP", "▁XX"; see
    `pipelines.vocabulary`); other pieces are never chosen. The length budget is kept: an
    opening bracket or a leaf is only allowed while the rest of the tree still fits in max_len.

    Every hypothesis's tree so far is a row of tensors (its leaves, its open brackets' labels
    innermost last, whether each has a child yet), so a beam of hundreds of hypotheses is
    masked and advanced by a few whole-batch operations, not a Python loop per hypothesis.
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
        # the only pieces a tree is made of: masks are worked out over these columns alone
        symbol = (self.open_label >= 0) | (self.close_label >= 0) | self.is_leaf | self.is_eos
        self.symbols = symbol.nonzero()[:, 0]
        self.symbol_open = self.open_label[self.symbols] >= 0
        self.symbol_close = self.close_label[self.symbols]
        self.symbol_leaf, self.symbol_eos = self.is_leaf[self.symbols], self.is_eos[self.symbols]
        self.start(torch.zeros(0, 0, dtype=torch.long))

    @classmethod
    def usable(cls, pieces: list[str]) -> bool:
        """Whether the vocabulary has the whole-piece tree symbols this needs."""
        return f"▁{TAG}" in pieces and any(cls.OPEN.match(p) for p in pieces)

    def start(self, inputs: Tensor, copies: int = 1) -> TreeConstraint:
        """One tree per row of `inputs` (token ids, 0 = padding), each repeated `copies` times
        (beam search): the words are the input's word-initial pieces."""
        inputs = inputs.cpu()
        self.words = self.word_start[inputs].logical_and(inputs > 0).sum(1).repeat_interleave(copies)
        n = len(self.words)
        self.leaves = torch.zeros(n, dtype=torch.long)
        self.depth = torch.zeros(n, dtype=torch.long)  # brackets open
        self.labels = torch.zeros(n, 8, dtype=torch.long)  # open brackets' labels, innermost at depth-1
        self.filled = torch.zeros(n, 8, dtype=torch.bool)  # whether each open bracket has a child yet
        self.started = torch.zeros(n, dtype=torch.bool)
        self.ended = torch.zeros(n, dtype=torch.bool)  # EOS taken
        return self

    def allow(self, log_probs: Tensor, t: int, max_len: int) -> Tensor:
        left = max_len - t - 1  # tokens that may follow this one
        to_place = self.words - self.leaves
        inside = self.depth > 0
        top = self._innermost(self.labels, -1)
        # what must follow, counted in tokens: the leaves still to place, a close per open
        # bracket and EOS; an opening bracket adds its own close
        can_open = (to_place > 0) & (to_place + self.depth + 2 <= left)
        can_leaf = inside & (to_place > 0) & (to_place + self.depth <= left)
        closes_root = self.depth == 1
        can_close = inside & self._innermost(self.filled, False) & (~closes_root | (to_place == 0))
        closes = self.symbol_close[None, :] == top[:, None]
        allowed = (
            (can_open[:, None] & self.symbol_open)
            | (can_leaf[:, None] & self.symbol_leaf)
            | (can_close[:, None] & closes)
        )
        # out of budget: the shortest way to a finished tree
        stuck = inside & ~allowed.any(1)
        shortest = torch.where((to_place > 0)[:, None], self.symbol_leaf, closes)
        allowed = torch.where(stuck[:, None], shortest, allowed)
        only_eos = self.ended | (self.started & ~inside) | (self.words == 0)
        allowed = torch.where(only_eos[:, None], self.symbol_eos, allowed)
        symbols = self.symbols.to(log_probs.device)
        masked = torch.full_like(log_probs, float("-inf"))
        masked[:, symbols] = log_probs[:, symbols].masked_fill(~allowed.to(log_probs.device), float("-inf"))
        return masked

    def advance(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        if rows is not None:
            rows = rows.cpu()
            for name in ("words", "leaves", "depth", "labels", "filled", "started", "ended"):
                setattr(self, name, getattr(self, name).index_select(0, rows))
        tokens = tokens.cpu()
        live = ~self.ended
        opens = live & (self.open_label[tokens] >= 0)
        leaf = live & self.is_leaf[tokens]
        closes = live & (self.close_label[tokens] >= 0)
        self.ended = self.ended | (live & self.is_eos[tokens])
        # an opening bracket or a leaf is a child of the innermost open bracket
        child = (opens | leaf) & (self.depth > 0)
        innermost = (self.depth - 1).clamp(min=0)
        self.filled[child, innermost[child]] = True
        if bool(opens.any()):
            self._make_room(int(self.depth.max()) + 1)
            at = self.depth[opens]
            self.labels[opens, at] = self.open_label[tokens[opens]]
            self.filled[opens, at] = False
        self.started = self.started | opens
        self.leaves = self.leaves + leaf.long()
        self.depth = self.depth + opens.long() - closes.long()

    def _innermost(self, stack: Tensor, empty) -> Tensor:
        """Each hypothesis's entry of `stack` for its innermost open bracket (`empty` if none)."""
        innermost = (self.depth - 1).clamp(min=0)[:, None]
        return torch.where(self.depth > 0, stack.gather(1, innermost)[:, 0], empty)

    def _make_room(self, depth: int) -> None:
        if depth > self.labels.shape[1]:
            grow = depth - self.labels.shape[1] + 8
            self.labels = torch.nn.functional.pad(self.labels, (0, grow))
            self.filled = torch.nn.functional.pad(self.filled, (0, grow))
