"""Metrics against values computed by hand."""

import math

import pytest
import torch

from mm import metrics as M


def test_top1_and_top5_accuracy():
    ranked = torch.tensor([[3, 1, 2, 0, 4, 5], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    targets = torch.tensor([3, 4, 0])
    assert M.accuracy(ranked, targets) == pytest.approx(1 / 3)
    assert M.top_k_accuracy(ranked, targets, 5) == pytest.approx(2 / 3)  # 0 is 6th in the last row


def test_bleu_of_a_perfect_and_of_a_partial_match():
    assert M.bleu(["the cat sat on the mat ."], ["the cat sat on the mat ."]) == pytest.approx(100.0)
    # hypothesis 6 words, reference 7: n-gram precisions 5/6, 2/5, 1/4, 1/6; brevity penalty e^(1-7/6)
    by_hand = math.exp(1 - 7 / 6) * (5 / 6 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25 * 100
    assert M.bleu(["the cat is on the mat"], ["there is a cat on the mat"]) == pytest.approx(
        by_hand, abs=0.01
    )


def test_bleu_takes_several_references_per_example():
    one = M.bleu(["a brown dog runs home"], [["a cat sleeps on the mat"]])
    several = M.bleu(["a brown dog runs home"], [["a cat sleeps on the mat", "a brown dog runs home"]])
    assert several == pytest.approx(100.0) and one < 50


def test_word_error_rate():
    # one substitution in 3 words, one deletion in 2 words: 2 errors / 5 reference words
    assert M.wer(["the cat sit", "hello"], ["the cat sat", "hello world"]) == pytest.approx(2 / 5)
    assert M.wer([""], ["two words"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="nothing to score"):  # not a perfect 0.0
        M.wer(["anything"], ["  "])


def test_bracket_f1_on_hand_written_trees():
    gold = "(S (NP XX XX )NP (VP XX (NP XX XX )NP )VP XX )S"  # S, NP(0,2), VP(2,5), NP(3,5)
    guess = "(S (NP XX XX )NP (VP XX XX XX )VP XX )S"  # S, NP(0,2), VP(2,5): 3 of 3 right
    scores = M.bracket_scores([guess], [gold])
    precision, recall = 3 / 3, 3 / 4
    assert scores["bracket_f1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    assert scores["exact_match"] == 0.0
    assert M.bracket_scores([gold], [gold]) == {
        "bracket_f1": 100.0,
        "exact_match": 100.0,
        "well_formed": 100.0,
    }


def test_bracket_f1_ignores_preterminals_and_tolerates_malformed_output():
    ptb = "(ROOT (S (NP (DT The) (NN dog)) (VP (VBZ barks)) (. .)))"
    assert set(M.labeled_spans(ptb)) == {("ROOT", 0, 4), ("S", 0, 4), ("NP", 0, 2), ("VP", 2, 3)}
    unbalanced = "(S (NP XX XX (VP XX"
    assert M.bracket_scores([unbalanced], ["(S (NP XX XX ) (VP XX ) )"])["bracket_f1"] < 100
    assert M.bracket_scores([")) ((", ""], ["(S XX )", "(S XX )"])["bracket_f1"] == 0.0


def _corpora(examples: int, seed: int = 0):
    """Noisy outputs of every metric's kind: labels, sentences, parse trees."""
    import random

    rng = random.Random(seed)
    words = "the a cat dog sat ran on under mat home".split()

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 7)))

    def noisy(text):
        return " ".join(w if rng.random() < 0.7 else rng.choice(words) for w in text.split())

    refs = [sentence() for _ in range(examples)]
    gold = ["(S (NP XX XX )NP (VP XX (NP XX XX )NP )VP XX )S", "(S (NP XX )NP (VP XX XX )VP XX )S"]
    guess = ["(S (NP XX XX )NP (VP XX XX XX )VP XX )S", "(S (NP XX )NP (VP XX (NP XX )NP )VP XX )S"]
    trees = [rng.randrange(2) for _ in range(examples)]
    labels = [rng.randrange(4) for _ in range(examples)]
    return {
        "accuracy": ([x if rng.random() < 0.6 else (x + 1) % 4 for x in labels], labels),
        "wer": ([noisy(r) for r in refs], refs),
        "bleu": ([noisy(r) for r in refs], [[r, noisy(r)] if i % 2 else r for i, r in enumerate(refs)]),
        "bracket_f1": ([rng.choice([guess, gold])[t] for t in trees], [gold[t] for t in trees]),
    }


def _corpus_score(metric, hypotheses, references):
    if metric == "accuracy":
        return sum(h == r for h, r in zip(hypotheses, references)) / len(references)
    if metric == "bracket_f1":
        return M.bracket_scores(hypotheses, references)["bracket_f1"]
    return {"bleu": M.bleu, "wer": M.wer}[metric](hypotheses, references)


@pytest.mark.parametrize("metric", ["accuracy", "wer", "bleu", "bracket_f1"])
def test_bootstrap_interval_brackets_the_corpus_score_and_narrows_with_more_examples(metric):
    hypotheses, references = _corpora(100)[metric]
    counts = M.example_counts(metric, hypotheses, references)
    assert len(counts) == 100
    # the per-example counts add up to exactly the corpus-level score
    whole = M.score_from_counts(metric, counts.sum(0, keepdims=True))[0]
    assert whole == pytest.approx(_corpus_score(metric, hypotheses, references), abs=1e-9)
    low, high = M.bootstrap_interval(metric, counts)
    assert low < whole < high
    assert (low, high) == M.bootstrap_interval(metric, counts)  # seeded
    # four times the examples, drawn alike: about half as wide (1/sqrt(4))
    more_hyps, more_refs = _corpora(400, seed=1)[metric]
    more_low, more_high = M.bootstrap_interval(metric, M.example_counts(metric, more_hyps, more_refs))
    assert 0.3 < (more_high - more_low) / (high - low) < 0.75


def test_bootstrap_interval_of_a_perfect_output_is_a_point_and_of_nothing_an_error():
    refs = ["the cat sat on the mat", "a dog ran home"]  # each has 4-grams: BLEU 100 in any resample
    assert M.bootstrap_interval("wer", M.example_counts("wer", refs, refs)) == (0.0, 0.0)
    low, high = M.bootstrap_interval("bleu", M.example_counts("bleu", refs, refs))
    assert low == pytest.approx(100.0) and high == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no examples"):
        M.bootstrap_interval("wer", M.example_counts("wer", ["x"], ["  "]))
    with pytest.raises(ValueError, match="no per-example counts"):
        M.example_counts("log_ppl", [], [])


def test_learned_needs_the_margin_over_every_floor_and_the_interval_too():
    # the margin is 2 % of the range: 2 BLEU points, 0.02 WER
    assert M.learned("bleu", 2.5, 0.0, 0.0) and not M.learned("bleu", 1.5, 0.0, 0.0)
    assert M.learned("bleu", 30.0, 0.0, None)  # a floor not measured does not count
    assert not M.learned("bleu", 30.0, 0.0, 29.0)  # beaten by the input-blind score's margin
    # lower is better for WER: the interval's worse end is its high one
    assert M.learned("wer", 0.90, 1.0, 0.99, bounds=(0.86, 0.93))
    assert not M.learned("wer", 0.90, 1.0, 0.99, bounds=(0.80, 0.98))
    # an EN-DE-like score: above both floors, but its low end is within the margin of them
    assert M.learned("bleu", 3.0, 0.0, 0.0) and not M.learned("bleu", 3.0, 0.0, 0.0, bounds=(1.2, 4.9))
    assert M.learned("accuracy", 0.885, 0.1, 0.1, bounds=(0.84, 0.93))


def test_token_accuracy_and_log_perplexity_skip_padding():
    logits = torch.log(torch.tensor([[0.7, 0.1, 0.2], [0.1, 0.1, 0.8]]))  # the real positions only
    targets = torch.tensor([[2, 2, 0]])  # the last position is padding
    assert M.token_accuracy(logits, targets) == pytest.approx(0.5)
    assert M.log_perplexity(logits, targets) == pytest.approx(-(math.log(0.2) + math.log(0.8)) / 2, rel=1e-5)


def test_routing_entropy_is_one_for_an_even_spread_and_zero_for_one_expert():
    from mm.metrics import routing_entropy

    assert routing_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert routing_entropy([0, 12, 0, 0]) == 0.0
    assert 0 < routing_entropy([9, 1, 0, 0]) < routing_entropy([5, 5, 0, 0]) == pytest.approx(0.5)
    assert routing_entropy([0, 0]) == 0.0  # nothing routed: no spread to speak of


def test_routing_counts_add_up_per_task_and_layer():
    routing: dict = {}
    M.count_routing(routing, "a", [[1, 0, 2], [3, 0, 0]])
    M.count_routing(routing, "b", [[0, 5, 0]])  # image classification: the encoder's layer only
    M.count_routing(routing, "a", [[1, 1, 1], [0, 0, 3]])
    assert routing == {"a": [[2, 1, 3], [3, 0, 3]], "b": [[0, 5, 0]]}


def test_load_cv_is_zero_for_an_even_load_over_all_tasks_and_grows_with_skew():
    # each task alone is skewed, but together the experts take the same load
    assert M.load_cv({"a": [[4, 0]], "b": [[0, 4]]}) == 0.0
    assert M.load_cv({"a": [[3, 1], [2, 2]]}) == pytest.approx((0.5 + 0.0) / 2)  # std 1 / mean 2; even
    assert M.load_cv({"a": [[8, 0, 0, 0]]}) > M.load_cv({"a": [[4, 4, 0, 0]]}) > 0
    assert M.load_cv({}) == 0.0


def test_routing_overlap_and_which_modality_shares_experts():
    assert M.routing_overlap([2, 2, 0, 0], [1, 1, 0, 0]) == pytest.approx(1.0)  # same shares
    assert M.routing_overlap([3, 0], [0, 5]) == 0.0
    assert M.routing_overlap([3, 1], [1, 3]) == pytest.approx(0.5)
    routing = {  # two image tasks on experts 0-1, the text task on experts 2-3
        "mnist": [[5, 5, 0, 0]],
        "coco": [[4, 6, 0, 0]],
        "wmt": [[0, 0, 5, 5]],
    }
    modality = {"mnist": "image", "coco": "image", "wmt": "text"}
    sharing = M.expert_sharing(routing, modality)
    assert sharing["same_modality"] == pytest.approx(0.9)  # min(.5,.4) + min(.5,.6)
    assert sharing["other_modality"] == 0.0
    assert M.expert_sharing({"wmt": [[1, 1]]}, {"wmt": "text"}) == {
        "same_modality": None,
        "other_modality": None,
    }
