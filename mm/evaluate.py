"""Score a model on a task's examples with the task's metrics.

Class tasks: top-1 and top-5 accuracy. Text tasks: log-perplexity and per-token accuracy under
teacher forcing, then the task's own metric (BLEU, WER, bracket F1 / exact match) on decoded
outputs, against the raw reference text when the batch carries it.

`blind=True` scores the same model with every input blanked (a black image, silence, an empty
source sentence): what it reaches from the targets' statistics alone, the floor a model that
uses its input must clear.

With several ranks each scores its own examples (every rank the same number of batches: the
MoE layers exchange tokens at every forward); sums and decoded outputs are combined over the
ranks, so every rank returns the corpus-level scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch

from mm import metrics as M
from mm.batch import EOS, LOG_MEL_FLOOR, Batch
from mm.config import TaskConfig
from mm.decoding import Constraint, TreeConstraint
from mm.model import MultiModel
from mm.parallel import Parallel, SingleProcess
from mm.vocab import Vocabulary

DECODED_METRICS = {"bleu", "wer", "bracket_f1", "exact_match", "well_formed"}

Detokenize = Callable[[list[int]], str]


def default_detokenize(ids: list[int]) -> str:
    return " ".join(str(i) for i in ids)


@torch.no_grad()
def evaluate_task(
    model: MultiModel,
    task: str,
    batches: Iterable[Batch],
    metric_names: list[str],
    detokenize: Detokenize = default_detokenize,
    max_len: int = 64,
    beam: int = 1,
    parallel: Parallel | None = None,
    constraint: Constraint | None = None,
    blind: bool = False,
    intervals: bool = False,
) -> dict[str, float]:
    """`intervals`: also each corpus-level metric's 95 % bootstrap interval over the examples,
    as `<metric>_low` and `<metric>_high` (`mm.metrics.bootstrap_interval`)."""
    parallel = parallel or SingleProcess()
    if blind:
        batches = [blank_inputs(b, model.tasks[task].input_modality) for b in batches]
    was_training = model.training
    model.eval()
    try:
        if model.tasks[task].output_modality == "class":
            scores = _score_classes(model, task, batches, metric_names, parallel, intervals)
        else:
            scores = _score_text(
                model, task, batches, metric_names, detokenize, max_len, beam, parallel, constraint, intervals
            )
        # the task's metrics in its order, each followed by its interval when there is one
        wanted = [f"{m}{end}" for m in metric_names for end in ("", "_low", "_high")]
        return {name: scores[name] for name in wanted if name in scores}
    finally:
        model.train(was_training)


def decoding_constraint(task: TaskConfig, pieces: list[str]) -> Constraint | None:
    """The constraint a task's outputs decode under: parse trees are kept well formed, with one
    leaf per input word, when the vocabulary has whole tree pieces and the task asks for it."""
    if task.kind == "constituency_parsing" and task.constrained_decoding and TreeConstraint.usable(pieces):
        return TreeConstraint(pieces, EOS)
    return None


def score_task(
    model: MultiModel,
    task: TaskConfig,
    batches: Iterable[Batch],
    vocab: Vocabulary,
    beam: int | None = None,
    parallel: Parallel | None = None,
    blind: bool = False,
    intervals: bool = False,
) -> dict[str, float]:
    """`evaluate_task` as the task's config asks: its metrics, its longest output, its beam
    (unless `beam` is given), its decoding constraint, decoded to text with the vocabulary."""
    return evaluate_task(
        model,
        task.name,
        batches,
        task.metrics,
        vocab.decode,
        task.max_target_length,
        beam or task.beam,
        parallel,
        decoding_constraint(task, vocab.pieces),
        blind,
        intervals,
    )


def blank_inputs(batch: Batch, modality: str) -> Batch:
    """The batch with its inputs blanked and its targets kept: black images, silent audio of the
    same length, text reduced to its end-of-sentence token."""
    if modality == "image":
        return replace(batch, inputs=batch.inputs.new_zeros(batch.inputs.shape))
    if modality == "audio":
        silence = math.log(LOG_MEL_FLOOR)  # what silence gives after log(mel + floor)
        return replace(batch, inputs=batch.inputs.new_full(batch.inputs.shape, silence))
    empty = batch.inputs.new_zeros(len(batch), 1).fill_(EOS)
    return replace(batch, inputs=empty)


def _score_classes(
    model: MultiModel, task: str, batches: Iterable[Batch], metric_names, parallel, intervals: bool
) -> dict[str, float]:
    top1 = top5 = examples = 0.0
    predicted: list[int] = []
    targets: list[int] = []
    for batch in batches:
        top = model.classify(batch, topk=5)[1]
        top1 += M.accuracy(top, batch.targets) * len(batch)
        top5 += M.top_k_accuracy(top, batch.targets, 5) * len(batch)
        examples += len(batch)
        predicted += top[:, 0].tolist()
        targets += batch.targets.tolist()
    top1, top5, examples = parallel.sum([top1, top5, examples])
    _require_examples(task, examples)
    scores = {"accuracy": top1 / examples, "top5": top5 / examples}
    if intervals and "accuracy" in metric_names:
        predicted = [p for part in parallel.gather(predicted) for p in part]
        targets = [t for part in parallel.gather(targets) for t in part]
        scores.update(_interval("accuracy", predicted, targets))
    return scores


class NothingToScore(ValueError):
    """No example reached the metrics: a zero here would read as a result."""


def _require_examples(task: str, count: float) -> None:
    if count == 0:
        raise NothingToScore(f"task {task!r}: no examples to score (an empty or missing split?)")


def _score_text(
    model, task, batches, metric_names, detokenize, max_len, beam, parallel, constraint, intervals
) -> dict[str, float]:
    nll = correct = tokens = 0.0
    hypotheses: list[str] = []
    references: list = []
    decode = bool(DECODED_METRICS & set(metric_names))
    for batch in batches:
        batch_nll, batch_correct, batch_tokens = M.teacher_forced_counts(model(batch).logits, batch.targets)
        nll, correct, tokens = nll + batch_nll, correct + batch_correct, tokens + batch_tokens
        if decode:
            outputs = model.generate(
                batch, max_len=max_len, beam=beam, all_done=parallel.all_done, constraint=constraint
            )
            hypotheses += [detokenize(ids) for ids in outputs]
            references += batch.references or [detokenize(_strip(row)) for row in batch.targets.tolist()]
    nll, correct, tokens = parallel.sum([nll, correct, tokens])
    _require_examples(task, tokens)
    scores = {"log_ppl": nll / tokens, "token_accuracy": correct / tokens}
    if decode:
        hypotheses = [h for part in parallel.gather(hypotheses) for h in part]
        references = [r for part in parallel.gather(references) for r in part]
        scores.update(_decoded_scores(hypotheses, references, metric_names, intervals))
    return scores


def _decoded_scores(
    hypotheses: list[str], references: list, metric_names: list[str], intervals: bool = False
) -> dict[str, float]:
    scores: dict[str, float] = {}
    first = [r if isinstance(r, str) else r[0] for r in references]  # COCO rows carry several
    if "bleu" in metric_names:
        scores["bleu"] = M.bleu(hypotheses, references)
    if "wer" in metric_names:
        scores["wer"] = M.wer(hypotheses, first)
    if {"bracket_f1", "exact_match", "well_formed"} & set(metric_names):
        scores.update(M.bracket_scores(hypotheses, first))
    if intervals:
        for metric in {"bleu", "wer", "bracket_f1"} & set(metric_names):
            scores.update(_interval(metric, hypotheses, references if metric == "bleu" else first))
    return scores


def _interval(metric: str, hypotheses: list, references: list) -> dict[str, float]:
    low, high = M.bootstrap_interval(metric, M.example_counts(metric, hypotheses, references))
    return {f"{metric}_low": low, f"{metric}_high": high}


def _strip(row: list[int]) -> list[int]:
    """Target ids up to (not including) EOS; padding dropped."""
    ids = [t for t in row if t != 0]
    return ids[: ids.index(EOS)] if EOS in ids else ids
