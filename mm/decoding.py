"""Greedy and beam search over a step function.

`step(tokens [N], state) -> log-probabilities [N, vocab]` advances every hypothesis by one
token; the model keeps what it needs of the past in `state` (a `DecodeState`), which beam
search re-orders as hypotheses are re-ranked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mm.layers import DecodeState

Step = Callable[[Tensor, DecodeState], Tensor]
# Whether every process is done, given whether this one is. Expert-parallel ranks must take the
# same number of steps (each step's MoE layers exchange tokens), so they stop together.
AllDone = Callable[[bool], bool]


def _alone(done: bool) -> bool:
    return done


def greedy_search(
    step: Step, state: DecodeState, first: Tensor, max_len: int, eos: int, all_done: AllDone = _alone
) -> list[list[int]]:
    """Take the most likely token until every row has produced EOS or max_len tokens."""
    tokens, done = first, torch.zeros_like(first, dtype=torch.bool)
    outputs: list[Tensor] = []
    for _ in range(max_len):
        tokens = step(tokens, state).argmax(-1)
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
        vocab = log_probs.shape[-1]
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beam * vocab)
        top_scores, top_index = candidates.topk(2 * beam, dim=1)
        origin, token = top_index // vocab, top_index % vocab
        _collect_finished(finished, top_scores, origin, token, sequences, eos, beam, length, alpha)
        alive_scores = top_scores.masked_fill(token == eos, float("-inf"))
        scores, pick = alive_scores.topk(beam, dim=1)
        rows = (origin.gather(1, pick) + torch.arange(batch, device=first.device)[:, None] * beam).view(-1)
        tokens = token.gather(1, pick).view(-1)
        sequences = torch.cat([sequences[rows], tokens[:, None]], dim=1)
        state.reorder(rows)
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
