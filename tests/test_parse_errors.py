"""benchmarks/parse_errors.py: structure and label errors of parse trees, counted by hand."""

import pytest

from benchmarks.parse_errors import f1_by_length, label_errors, unlabeled_scores
from mm.metrics import bracket_counts

GOLD = "(S (NP XX XX )NP (VP XX (NP XX )NP )VP )S"  # spans S 0-4, NP 0-2, VP 2-4, NP 3-4
RIGHT_SPANS_ONE_WRONG_LABEL = "(S (NP XX XX )NP (VP XX (ADJP XX )ADJP )VP )S"
ONE_WRONG_SPAN = "(S (NP XX XX XX )NP (VP XX )VP )S"  # S 0-4, NP 0-3, VP 3-4


def test_a_wrong_label_costs_the_labeled_score_only_and_is_counted_as_missed_and_invented():
    hyps, refs = [RIGHT_SPANS_ONE_WRONG_LABEL], [GOLD]
    assert unlabeled_scores(hyps, refs) == {"f1": 100.0, "matched": 4}
    assert bracket_counts(hyps[0], refs[0]) == (3, 4, 4)  # labeled: one of the four is wrong
    missed, invented = label_errors(hyps, refs)
    assert missed == {"NP": 1} and invented == {"ADJP": 1}


def test_a_misplaced_bracket_costs_both_scores():
    hyps, refs = [ONE_WRONG_SPAN], [GOLD]
    unlabeled = unlabeled_scores(hyps, refs)  # 3 spans against 4: S 0-4 and 3-4 match
    assert unlabeled["matched"] == 2 and unlabeled["f1"] == pytest.approx(100 * 2 * 2 / 7)
    missed, invented = label_errors(hyps, refs)
    assert missed == {"NP": 2, "VP": 1} and invented == {"NP": 1, "VP": 1}


def test_scores_by_length_keep_each_tree_in_its_bucket():
    long_gold = "(S " + "XX " * 12 + ")S"
    by_length = f1_by_length([GOLD, long_gold], [GOLD, long_gold])
    assert by_length == {"1-10": {"trees": 1, "f1": 100.0}, "11-20": {"trees": 1, "f1": 100.0}}
