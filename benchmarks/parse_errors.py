"""Where a checkpoint's parse trees go wrong: structure or labels, and at which lengths.

Decodes a split of the parsing task as `mm evaluate` does (the task's beam and tree
constraint) and prints one JSON line: labeled bracket F1 (the task's metric), the same without
labels (a span counts when its leaves match, whatever its label), how many of the spans found
unlabeled also carry the right label, the labels most often missed and most often invented,
and labeled F1 by sentence length. Needs the shards the checkpoint was trained on; scores the
newest whole checkpoint under runs/ (the last `make demo`'s) unless given one.

    python -m benchmarks.parse_errors [runs/starter-…/checkpoint_0003200] --split dev
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from benchmarks.common import emit
from cluster.job import latest_checkpoint
from mm.checkpoint import CheckpointError
from mm.metrics import bracket_counts, bracket_scores, labeled_spans, leaf_count
from mm.predict import PredictError, Predictor
from mm.reader import evaluation_batches, read_rows
from mm.shards import ShardError

LENGTHS = ((1, 10), (11, 20), (21, 40))  # words, inclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="default: the newest whole one under runs/")
    parser.add_argument("--task", default="ptb")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or newest_checkpoint(Path("runs"))
    if checkpoint is None:
        parser.error("no checkpoint under runs/ (run `make demo`, or name one)")
    try:
        predictor = Predictor(checkpoint)
        predictor.require_task(args.task)
        if (kind := predictor.config.task(args.task).kind) != "constituency_parsing":
            parser.error(f"task {args.task!r} is {kind}, not constituency_parsing")
        hypotheses, references = decode_split(predictor, args.task, args.split, args.examples)
    except (CheckpointError, PredictError, ShardError) as error:
        parser.error(str(error))
    unlabeled = unlabeled_scores(hypotheses, references)
    labeled_matches = sum(bracket_counts(hyp, ref)[0] for hyp, ref in zip(hypotheses, references))
    missed, invented = label_errors(hypotheses, references)
    emit(
        {
            "benchmark": "parse_errors",
            "checkpoint": str(checkpoint),
            "split": args.split,
            "trees": len(references),
            "bracket_f1": bracket_scores(hypotheses, references)["bracket_f1"],
            "unlabeled_f1": unlabeled["f1"],
            "right_label_of_matched_spans": labeled_matches / max(unlabeled["matched"], 1),
            "missed": dict(missed.most_common(6)),
            "invented": dict(invented.most_common(6)),
            "f1_by_words": f1_by_length(hypotheses, references),
        }
    )


def newest_checkpoint(runs: Path) -> Path | None:
    for run in sorted(runs.glob("*/"), key=lambda folder: folder.stat().st_mtime, reverse=True):
        if found := latest_checkpoint(run):
            return found
    return None


def decode_split(predictor: Predictor, task: str, split: str, examples: int) -> tuple[list[str], list[str]]:
    predictor.require_vocabulary(predictor.config.data.shards, task)
    rows = read_rows(predictor.config.data.shards, task, split, examples)
    batches = evaluation_batches(predictor.specs[task], rows, 0, 1, predictor.config.task(task).batch_size)
    hypotheses, references = [], []
    for batch in batches:
        hypotheses += [predictor.vocab.decode(ids) for ids in predictor.generate(task, batch)]
        references += [r if isinstance(r, str) else r[0] for r in batch.references]
    return hypotheses, references


def unlabeled_spans(tree: str) -> Counter:
    return Counter((start, end) for (_, start, end) in labeled_spans(tree).elements())


def unlabeled_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Bracket F1 with every label the same: a span counts when it covers the right leaves."""
    matched = predicted = gold = 0
    for hyp, ref in zip(hypotheses, references):
        hyp_spans, ref_spans = unlabeled_spans(hyp), unlabeled_spans(ref)
        matched += sum((hyp_spans & ref_spans).values())
        predicted, gold = predicted + sum(hyp_spans.values()), gold + sum(ref_spans.values())
    f1 = 2 * matched / (predicted + gold) if predicted + gold else 0.0
    return {"f1": 100 * f1, "matched": matched}


def label_errors(hypotheses: list[str], references: list[str]) -> tuple[Counter, Counter]:
    """Per label: gold constituents the output lacks, and output constituents gold lacks."""
    missed, invented = Counter(), Counter()
    for hyp, ref in zip(hypotheses, references):
        hyp_spans, ref_spans = labeled_spans(hyp), labeled_spans(ref)
        for (label, _, _), n in (ref_spans - hyp_spans).items():
            missed[label] += n
        for (label, _, _), n in (hyp_spans - ref_spans).items():
            invented[label] += n
    return missed, invented


def f1_by_length(hypotheses: list[str], references: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for low, high in LENGTHS:
        pairs = [(h, r) for h, r in zip(hypotheses, references) if low <= leaf_count(r) <= high]
        if pairs:
            hyps, refs = zip(*pairs)
            out[f"{low}-{high}"] = {"trees": len(pairs), "f1": bracket_scores(hyps, refs)["bracket_f1"]}
    return out


if __name__ == "__main__":
    main()
