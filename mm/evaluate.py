"""Score a model on a task's examples with the task's metrics.

Class tasks: top-1 and top-5 accuracy. Text tasks: log-perplexity and per-token accuracy under
teacher forcing, then the task's own metric (BLEU, WER, bracket F1 / exact match) on decoded
outputs, against the raw reference text when the batch carries it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from mm import metrics as M
from mm.batch import EOS, Batch
from mm.model import MultiModel

DECODED_METRICS = {"bleu", "wer", "bracket_f1", "exact_match"}

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
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        if model.tasks[task].output_modality == "class":
            return _score_classes(model, batches, metric_names)
        return _score_text(model, batches, metric_names, detokenize, max_len, beam)
    finally:
        model.train(was_training)


def _score_classes(model: MultiModel, batches: Iterable[Batch], metric_names: list[str]) -> dict[str, float]:
    top, targets = [], []
    for batch in batches:
        top.append(model.classify(batch, topk=5)[1])
        targets.append(batch.targets)
    top_classes, target = torch.cat(top), torch.cat(targets)
    scores = {"accuracy": M.accuracy(top_classes, target), "top5": M.top_k_accuracy(top_classes, target, 5)}
    return {name: scores[name] for name in metric_names if name in scores}


def _score_text(model, batches, metric_names, detokenize, max_len, beam) -> dict[str, float]:
    nll = correct = tokens = 0.0
    hypotheses: list[str] = []
    references: list = []
    decode = bool(DECODED_METRICS & set(metric_names))
    for batch in batches:
        logits = model(batch).logits.float()
        real = batch.targets != 0
        nll += float(
            F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=0, reduction="sum")
        )
        correct += float(((logits.argmax(-1) == batch.targets) & real).sum())
        tokens += float(real.sum())
        if decode:
            hypotheses += [detokenize(ids) for ids in model.generate(batch, max_len=max_len, beam=beam)]
            references += batch.references or [detokenize(_strip(row)) for row in batch.targets.tolist()]
    scores = {"log_ppl": nll / max(tokens, 1), "token_accuracy": correct / max(tokens, 1)}
    if decode:
        scores.update(_decoded_scores(hypotheses, references, metric_names))
    return {name: scores[name] for name in metric_names if name in scores}


def _decoded_scores(hypotheses: list[str], references: list, metric_names: list[str]) -> dict[str, float]:
    scores: dict[str, float] = {}
    if "bleu" in metric_names:
        scores["bleu"] = M.bleu(hypotheses, references)
    if "wer" in metric_names:
        scores["wer"] = M.wer(hypotheses, [r if isinstance(r, str) else r[0] for r in references])
    if {"bracket_f1", "exact_match"} & set(metric_names):
        scores.update(M.bracket_scores(hypotheses, references))
    return scores


def _strip(row: list[int]) -> list[int]:
    """Target ids up to (not including) EOS; padding dropped."""
    ids = [t for t in row if t != 0]
    return ids[: ids.index(EOS)] if EOS in ids else ids
