"""Constrained parse decoding, the tree pieces it needs, and input-blind evaluation."""

import pytest
import torch

from mm.batch import EOS, Batch, pad_sequences
from mm.decoding import TreeConstraint, beam_search, greedy_search
from mm.evaluate import blank_inputs
from mm.layers import DecodeState
from mm.metrics import bracket_scores, leaf_count, well_formed
from mm.vocab import train_vocabulary
from pipelines.vocabulary import tree_symbols

TREES = [
    "(S (NP XX XX )NP (VP XX (PP XX (NP XX XX )NP )PP )VP XX )S",
    "(S (NP XX )NP (VP XX (NP XX XX )NP )VP )S",
    "(FRAG (ADJP XX XX )ADJP XX )FRAG",
]
SENTENCES = ["the cat sat on the mat .", "it saw a dog", "very nice ."]


@pytest.fixture(scope="module")
def vocab():
    text = (TREES + SENTENCES + ["der Hund läuft", "le chat noir"]) * 30
    return train_vocabulary(text, 80, ["<2ptb>"], tree_symbols(TREES + SENTENCES))


def test_tree_symbols_are_collected_from_trees_only_and_become_whole_pieces(vocab):
    symbols = tree_symbols(TREES + SENTENCES)
    assert symbols[0] == "▁XX"  # most frequent first
    assert {"▁(S", "▁)S", "▁(NP", "▁)NP", "▁(FRAG"} <= set(symbols)
    assert not any("cat" in s or s == "▁." for s in symbols)  # the input sentences add nothing
    ids = vocab.encode(TREES[0])
    assert len(ids) == len(TREES[0].split()) + 1  # one piece per symbol, then EOS
    assert vocab.decode(ids) == TREES[0]


def random_step(vocab_size: int, seed: int):
    """A step function that ignores the past: seeded random log-probabilities, biased towards
    EOS so that an unconstrained search would stop at once."""
    generator = torch.Generator().manual_seed(seed)

    def step(tokens, state):
        logits = torch.randn(len(tokens), vocab_size, generator=generator) * 3
        logits[:, EOS] += 4
        return logits.log_softmax(-1)

    return step


@pytest.mark.parametrize("beam", [1, 3, 8, 16])
def test_constrained_decoding_always_gives_a_well_formed_tree_with_one_leaf_per_word(vocab, beam):
    sentences = SENTENCES + ["a", "one two three four five six seven eight nine ten eleven twelve"]
    inputs = pad_sequences([vocab.encode(s) for s in sentences])
    words = [len(s.split()) for s in sentences]
    for seed in range(5):
        constraint = TreeConstraint(vocab.pieces, EOS).start(inputs, beam)
        first = torch.full((len(sentences) * beam,), 3)
        step = random_step(vocab.size, seed)
        if beam == 1:
            out = greedy_search(step, DecodeState(), first, 40, EOS, constraint=constraint)
        else:
            out = beam_search(step, DecodeState(), first, 40, EOS, beam, constraint=constraint)
        trees = [vocab.decode(ids) for ids in out]
        for tree, n in zip(trees, words):
            assert well_formed(tree), tree
            assert leaf_count(tree) == n, (tree, n)


def last_token_step(vocab_size: int, seed: int):
    """Seeded log-probabilities that depend on the last token alone, so that a row decodes
    alike whatever else is in its batch."""
    table = torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3
    table = table.log_softmax(-1)
    calls: list[int] = []  # the hypotheses of each step it was asked for

    def step(tokens, state):
        calls.append(len(tokens))
        return table[tokens]

    step.calls = calls
    return step


def test_beam_search_ends_a_row_whose_hypotheses_are_all_dead(vocab):
    """An input without words can only give EOS: its row ends at the first step, and does not
    keep the rest of its batch decoding to max_len (input-blind parsing did, 96 steps a batch)."""
    beam, max_len = 4, 60

    def search(sentences: list[str]):
        inputs = pad_sequences([vocab.encode(s) if s else [EOS] for s in sentences])
        step = last_token_step(vocab.size, 0)
        constraint = TreeConstraint(vocab.pieces, EOS).start(inputs, beam)
        first = torch.full((len(sentences) * beam,), 3)
        out = beam_search(step, DecodeState(), first, max_len, EOS, beam, constraint=constraint)
        return out, len(step.calls)

    assert search([""]) == ([[]], 1)
    alone, steps_alone = search(["it saw a dog"])
    assert well_formed(vocab.decode(alone[0])) and steps_alone < max_len
    assert search(["it saw a dog", ""]) == ([alone[0], []], steps_alone)


def test_constrained_trees_fit_a_tight_length_budget(vocab):
    inputs = pad_sequences([vocab.encode("one two three four five six")])
    constraint = TreeConstraint(vocab.pieces, EOS).start(inputs)
    out = greedy_search(
        random_step(vocab.size, 0), DecodeState(), torch.tensor([3]), 9, EOS, constraint=constraint
    )
    tree = vocab.decode(out[0])
    assert well_formed(tree) and leaf_count(tree) == 6  # (X + 6 leaves + )X + EOS = 9 tokens


def test_without_the_constraint_the_same_search_gives_no_tree(vocab):
    out = greedy_search(random_step(vocab.size, 0), DecodeState(), torch.full((3,), 3), 40, EOS)
    assert not any(well_formed(vocab.decode(ids)) for ids in out)


def test_a_vocabulary_without_tree_pieces_is_not_usable_for_the_constraint():
    plain = train_vocabulary((TREES + SENTENCES) * 30, 60, ["<2ptb>"])
    assert not TreeConstraint.usable(plain.pieces)


def test_tree_shape_metrics():
    assert well_formed("(S (NP XX )NP XX )S")
    assert not well_formed("(S (NP XX )VP XX )S")  # closer does not match
    assert not well_formed("(S XX )S (S XX )S")  # two trees
    assert not well_formed("(S (NP )NP XX )S")  # empty bracket
    assert not well_formed("(S XX")
    scores = bracket_scores(["(S XX XX )S", "(S XX )S"], ["(S (NP XX )NP XX )S", "(S XX XX )S"])
    assert scores["well_formed"] == 50.0  # the second has one leaf too few


def test_blank_inputs_keep_targets_and_shapes():
    image = Batch("i", torch.full((2, 4, 4, 3), 200, dtype=torch.uint8), torch.tensor([1, 2]))
    blank = blank_inputs(image, "image")
    assert blank.inputs.shape == image.inputs.shape and int(blank.inputs.max()) == 0
    assert torch.equal(blank.targets, image.targets)
    audio = Batch(
        "a", torch.randn(2, 10, 8).half(), torch.ones(2, 3, dtype=torch.long), torch.tensor([10, 6])
    )
    silent = blank_inputs(audio, "audio")
    assert torch.equal(silent.input_lengths, audio.input_lengths)
    assert silent.inputs.float().std() == 0 and float(silent.inputs[0, 0, 0]) < -13
    text = Batch("t", torch.tensor([[5, 6, 7, EOS], [8, EOS, 0, 0]]), torch.ones(2, 3, dtype=torch.long))
    assert blank_inputs(text, "text").inputs.tolist() == [[EOS], [EOS]]
