"""Task metrics: top-1/top-5 accuracy, BLEU (sacrebleu), WER (jiwer), labeled bracket F1 and
exact match for parse trees, and per-token accuracy and log-perplexity for every text task.

Higher is better for every metric but `wer` and `log_ppl`; `higher_is_better` says which.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import jiwer
import numpy as np
import sacrebleu
import torch.nn.functional as F
from torch import Tensor

from mm.trees import TAG, Tree, parse, tokens

LOWER_IS_BETTER = {"wer", "log_ppl"}


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


# ------------------------------------------------------------------------------------ classification


def accuracy(top_classes: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy from [N, k] ranked class ids (or [N] predictions)."""
    predicted = top_classes if top_classes.dim() == 1 else top_classes[:, 0]
    return float((predicted == targets).float().mean())


def top_k_accuracy(top_classes: Tensor, targets: Tensor, k: int = 5) -> float:
    return float((top_classes[:, :k] == targets.unsqueeze(1)).any(1).float().mean())


# ------------------------------------------------------------------------------------- text, forced


def teacher_forced_counts(logits: Tensor, targets: Tensor) -> tuple[float, float, float]:
    """(summed negative log-likelihood, tokens ranked first, real tokens) of a batch under
    teacher forcing: the sums a whole split's log-perplexity and token accuracy are made of
    (no label smoothing). `logits` [real tokens, vocab] score the real (non-padding, id 0)
    positions of `targets` [B, U] in row order, as the model's `Output.logits`."""
    real = targets[targets != 0]
    nll = F.cross_entropy(logits.float(), real, reduction="sum")
    correct = (logits.argmax(-1) == real).sum()
    return float(nll), float(correct), float(len(real))


def token_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Share of real target tokens the model ranks first under teacher forcing."""
    _, correct, tokens = teacher_forced_counts(logits, targets)
    return correct / max(tokens, 1)


def log_perplexity(logits: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood per real target token."""
    nll, _, tokens = teacher_forced_counts(logits, targets)
    return nll / max(tokens, 1)


# ------------------------------------------------------------------------------------ text, decoded


def bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (0-100). Each reference may be one string or several (COCO captions)."""
    if not hypotheses:
        return 0.0
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    most = max((len(r) for r in refs), default=1)
    # sacrebleu takes reference *streams*; examples with fewer references repeat their first
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(most)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Word error rate over the corpus (jiwer takes the reference first)."""
    pairs = [(r, h) for r, h in zip(references, hypotheses) if r.strip()]
    if not pairs:  # 0.0 would read as a perfect transcription of nothing
        raise ValueError(f"WER of {len(references)} references, none with a word: nothing to score")
    return float(jiwer.wer([r for r, _ in pairs], [h if h.strip() else "<empty>" for _, h in pairs]))


# ------------------------------------------------------------------------------------------- trees


def labeled_spans(tree: str) -> Counter[tuple[str, int, int]]:
    """(label, first leaf, end leaf) of every constituent; preterminals are left out, as evalb
    does: a tag over one word (`(DT The)`, `(XX The)`). In Vinyals' form the leaves are the XX
    tags themselves, so `(NP XX )NP` is a real one-word constituent."""
    spans: Counter[tuple[str, int, int]] = Counter()

    def walk(node: Tree | str, start: int) -> int:
        if isinstance(node, str):
            return start + 1
        end = start
        for child in node.children:
            end = walk(child, end)
        is_preterminal = node.label == TAG or (node.is_preterminal and node.children[0] != TAG)
        if not is_preterminal and end > start:
            spans[(node.label, start, end)] += 1
        return end

    position = 0
    for node in parse(tree):
        position = walk(node, position)
    return spans


def well_formed(tree: str) -> bool:
    """One tree whose brackets balance, whose labelled closers match their openers, and whose
    every bracket holds something."""
    open_labels: list[str] = []
    filled: list[bool] = []
    roots = 0
    for token in tokens(tree):
        if token.startswith("(") and len(token) > 1:
            if not open_labels:
                roots += 1
            if filled:
                filled[-1] = True
            open_labels.append(token[1:])
            filled.append(False)
        elif token.startswith(")"):
            if not open_labels or not filled[-1] or token[1:] not in ("", open_labels[-1]):
                return False
            open_labels.pop()
            filled.pop()
        elif not open_labels:
            return False  # a leaf outside the tree
        else:
            filled[-1] = True
    return roots == 1 and not open_labels


def leaf_count(tree: str) -> int:
    return sum(1 for t in tokens(tree) if not t.startswith(("(", ")")))


def bracket_counts(hypothesis: str, reference: str) -> tuple[int, int, int]:
    """(matched, predicted, gold) labelled constituents of one tree: what bracket F1 sums."""
    hyp_spans, ref_spans = labeled_spans(hypothesis), labeled_spans(reference)
    return sum((hyp_spans & ref_spans).values()), sum(hyp_spans.values()), sum(ref_spans.values())


def bracket_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Labeled bracket F1 over the corpus (evalb-style, XX preterminals ignored), the share of
    trees matched exactly, and the share of output trees that are well formed and have as many
    leaves as their reference (the input's word count): all in percent."""
    matched = predicted = gold = exact = shaped = 0
    for hyp, ref in zip(hypotheses, references):
        counts = bracket_counts(hyp, ref)
        matched, predicted, gold = matched + counts[0], predicted + counts[1], gold + counts[2]
        exact += tokens(hyp) == tokens(ref)
        shaped += well_formed(hyp) and leaf_count(hyp) == leaf_count(ref)
    precision = matched / predicted if predicted else 0.0
    recall = matched / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    count = max(len(references), 1)
    return {
        "bracket_f1": 100 * f1,
        "exact_match": 100 * exact / count,
        "well_formed": 100 * shaped / count,
    }


# ------------------------------------------------------------------------------------ uncertainty
# A score over 200 test examples moves by several points when other examples of the same kind
# are drawn. Each corpus-level score comes with a 95 % bootstrap interval over its examples
# (percentile method): the examples are resampled with replacement and the score recomputed
# from per-example counts, whose sums the corpus-level formulas are made of.

RESAMPLES, CONFIDENCE = 1000, 0.95
BLEU_ORDERS = 4


def example_counts(metric: str, hypotheses: Sequence, references: Sequence) -> np.ndarray:
    """[examples, counts]: what each example adds to the corpus-level sums of `metric`.
    accuracy: (correct, 1); wer: (errors, reference words); bracket_f1: (matched, predicted, gold
    constituents); bleu: (hypothesis length, reference length, matches and totals of each n-gram
    order), sacrebleu's own statistics. `hypotheses` are predicted classes for accuracy."""
    if metric == "accuracy":
        return np.array([[float(h == r), 1.0] for h, r in zip(hypotheses, references)]).reshape(-1, 2)
    if metric == "wer":
        return np.array(
            [_word_errors(r, h) for r, h in zip(references, hypotheses) if r.strip()], dtype=float
        ).reshape(-1, 2)
    if metric == "bracket_f1":
        counts = [bracket_counts(h, r) for h, r in zip(hypotheses, references)]
        return np.array(counts, dtype=float).reshape(-1, 3)
    if metric == "bleu":
        scorer = sacrebleu.BLEU()
        rows = []
        for hyp, ref in zip(hypotheses, references):
            refs = [ref] if isinstance(ref, str) else list(ref)
            one = scorer.corpus_score([hyp], [[r] for r in refs])  # one sentence's statistics
            rows.append([one.sys_len, one.ref_len, *one.counts, *one.totals])
        return np.array(rows, dtype=float).reshape(-1, 2 + 2 * BLEU_ORDERS)
    raise ValueError(f"no per-example counts for metric {metric!r}")


def score_from_counts(metric: str, sums: np.ndarray) -> np.ndarray:
    """`metric` from summed `example_counts` [resamples, counts] -> [resamples], on the scale
    of the corpus-level functions above."""
    if metric in ("accuracy", "wer"):  # correct / examples, errors / reference words
        return sums[:, 0] / np.maximum(sums[:, 1], 1)
    if metric == "bracket_f1":  # 2PR / (P + R) = 2 matched / (predicted + gold)
        return 100 * 2 * sums[:, 0] / np.maximum(sums[:, 1] + sums[:, 2], 1)
    if metric == "bleu":
        smoothing = sacrebleu.BLEU().smooth_method  # the corpus score's own
        return np.array(
            [
                sacrebleu.BLEU.compute_bleu(
                    row[2 : 2 + BLEU_ORDERS].astype(int).tolist(),
                    row[2 + BLEU_ORDERS :].astype(int).tolist(),
                    int(row[0]),
                    int(row[1]),
                    smooth_method=smoothing,
                ).score
                for row in sums
            ]
        )
    raise ValueError(f"no score from counts for metric {metric!r}")


def bootstrap_interval(
    metric: str, counts: np.ndarray, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The CONFIDENCE interval of `metric` over `resamples` resamples of the examples whose
    `example_counts` are given (seeded: the same counts give the same interval)."""
    if len(counts) == 0:
        raise ValueError(f"{metric}: no examples to resample")
    rows = np.random.default_rng(seed).integers(0, len(counts), size=(resamples, len(counts)))
    values = score_from_counts(metric, counts[rows].sum(1))
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def interval(scores: dict[str, float], metric: str) -> tuple[float, float] | None:
    """The (low, high) that `evaluate_task(intervals=True)` put beside `metric`, if any."""
    low, high = scores.get(f"{metric}_low"), scores.get(f"{metric}_high")
    return None if low is None or high is None else (low, high)


def is_interval_bound(name: str) -> bool:
    return name.endswith(("_low", "_high"))


def _word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) of one utterance, as `wer`
    counts them."""
    out = jiwer.process_words(reference, hypothesis if hypothesis.strip() else "<empty>")
    return out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits


# ---------------------------------------------------------------------------------- across tasks

# The worst and the best value of each metric, for normalising it to [0, 1]. Chance level for
# accuracy depends on the number of classes; 0 is a safe floor.
METRIC_RANGES = {
    "accuracy": (0.0, 1.0),
    "top5": (0.0, 1.0),
    "bleu": (0.0, 100.0),
    "wer": (1.0, 0.0),
    "bracket_f1": (0.0, 100.0),
    "exact_match": (0.0, 100.0),
    "well_formed": (0.0, 100.0),
    "token_accuracy": (0.0, 1.0),
}


def normalized(metric: str, value: float, reference: float | None = None) -> float:
    """A task's metric on a common scale where larger is better.

    With a reference (e.g. the task's single-task score): value / reference, or
    reference / value for lower-is-better metrics, so 1.0 means "as good as the reference".
    Without: (value - worst) / (best - worst) over the metric's range (WER: 1 - WER).
    """
    if reference is not None:
        if higher_is_better(metric):
            return value / reference if reference else 0.0
        return reference / value if value else 0.0
    worst, best = METRIC_RANGES[metric]
    return (value - worst) / (best - worst)


# ------------------------------------------------------------------------------------- routing
# `routing`: {task: per MoE layer, the tokens each expert took}, as a run's routing.json has it.


def count_routing(routing: dict[str, list[list[int]]], task: str, expert_load: list[list[int]]) -> None:
    """Add one step's tokens per expert (per MoE layer) to `task`'s running counts."""
    counts = routing.setdefault(task, [[0] * len(layer) for layer in expert_load])
    for layer, load in zip(counts, expert_load, strict=False):
        for i, n in enumerate(load):
            layer[i] += n


def routing_entropy(counts: Sequence[int]) -> float:
    """How evenly a task's tokens spread over one layer's experts: the entropy of its shares
    over log(experts), 1 for an even spread, 0 when every token goes to one expert."""
    total = sum(counts)
    if total <= 0 or len(counts) < 2:
        return 0.0
    shares = [c / total for c in counts if c > 0]
    return -sum(p * math.log(p) for p in shares) / math.log(len(counts))


def load_cv(routing: dict[str, list[list[int]]]) -> float:
    """Load balance: the coefficient of variation (std / mean) of the tokens each expert took,
    every task together, averaged over the MoE layers. 0 is a perfectly even load."""
    cvs = []
    for loads in _layer_totals(routing):
        mean = sum(loads) / len(loads)
        if mean > 0:
            cvs.append(math.sqrt(sum((n - mean) ** 2 for n in loads) / len(loads)) / mean)
    return sum(cvs) / len(cvs) if cvs else 0.0


def _layer_totals(routing: dict[str, list[list[int]]]) -> list[list[int]]:
    layers = max((len(per_task) for per_task in routing.values()), default=0)
    totals = []
    for layer in range(layers):
        counts = [per_task[layer] for per_task in routing.values() if layer < len(per_task)]
        totals.append([sum(column) for column in zip(*counts, strict=True)])
    return totals


def routing_overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """How far two tasks use the same experts of one layer: the intersection of their shares,
    1 for the same spread, 0 for disjoint experts."""
    total_a, total_b = sum(a), sum(b)
    if total_a <= 0 or total_b <= 0:
        return 0.0
    return sum(min(x / total_a, y / total_b) for x, y in zip(a, b, strict=True))


def expert_sharing(routing: dict[str, list[list[int]]], modality: dict[str, str]) -> dict[str, float | None]:
    """The mean routing overlap (over layers) of pairs of tasks with the same input modality,
    and of pairs with different ones; None where no such pair was routed. Tasks of a modality
    share experts when the first is the higher."""
    pairs: dict[str, list[float]] = {"same_modality": [], "other_modality": []}
    tasks = sorted(routing)
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            layers = list(zip(routing[a], routing[b], strict=False))
            if not layers:
                continue
            overlap = sum(routing_overlap(x, y) for x, y in layers) / len(layers)
            kind = "same_modality" if modality.get(a) == modality.get(b) else "other_modality"
            pairs[kind].append(overlap)
    return {kind: sum(v) / len(v) if v else None for kind, v in pairs.items()}


# "Learned" means beating both floors, chance and input-blind, by this much of the metric's
# range: 0.02 accuracy, 2 BLEU or bracket-F1 points, 0.02 WER.
LEARNED_MARGIN = 0.02


def learned(
    metric: str, value: float, *floors: float | None, bounds: tuple[float, float] | None = None
) -> bool:
    """Whether `value` clears every floor (chance, input-blind) by LEARNED_MARGIN. Given the
    score's 95 % interval, its worse end must clear them too: a score that beats a floor only
    on a lucky sample of test examples has not shown that it learned."""
    score = min(normalized(metric, v) for v in (value, *(bounds or ())))
    return all(floor is None or score - normalized(metric, floor) >= LEARNED_MARGIN for floor in floors)


def scores_by_task(metrics: dict[str, float], prefix: str = "eval/") -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from flat run metrics named `<prefix><task>/<metric>`."""
    scores: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(prefix) and key.count("/") == prefix.count("/") + 1:
            task, metric = key[len(prefix) :].split("/")
            scores.setdefault(task, {})[metric] = value
    return scores


def aggregate_score(
    scores: dict[str, dict[str, float]],
    primary: dict[str, str],
    references: dict[str, float] | None = None,
) -> float:
    """The mean over tasks of each task's primary metric, normalised (`normalized`). A task
    without a score is left out, never counted as 0; with no task scored there is no aggregate."""
    references = references or {}
    values = [
        normalized(metric, scores[task][metric], references.get(task))
        for task, metric in primary.items()
        if metric in scores.get(task, {})
    ]
    if not values:
        raise ValueError(f"no task of {', '.join(primary) or 'none'} was scored: there is no aggregate")
    return sum(values) / len(values)
