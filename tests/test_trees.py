"""The one bracket-tree parser (mm.trees) on each form it reads: PTB, linearised, link-grammar."""

import pytest

from mm.trees import TAG, Tree, TreeError, parse, parse_tree, tokens

PTB = "(TOP (S (NP (DT a) (NN b)) (VP (VBZ c)) (. .)))"
LINEARISED = f"(TOP (S (NP {TAG} {TAG} )NP (VP {TAG} )VP {TAG} )S )TOP"


def brackets(node: Tree | str) -> object:
    """The bracket structure, every tag with its word written TAG, as linearisation does (a
    node over one TAG is a one-word constituent of a linearised tree, not a tag)."""
    if isinstance(node, str):
        return node
    if node.is_preterminal and node.children[0] != TAG:
        return TAG
    return (node.label, [brackets(child) for child in node.children])


def test_tokens_keep_a_bracket_with_the_label_it_touches():
    assert tokens(f"(S (NP {TAG} )NP)") == ["(S", "(NP", TAG, ")NP", ")"]
    assert tokens("( (S a))") == ["(", "(S", "a", ")", ")"]


def test_a_ptb_tree_and_its_linearisation_have_the_same_brackets():
    ptb, linearised = parse_tree(PTB), parse_tree(LINEARISED)
    assert brackets(ptb) == brackets(linearised)
    unlabelled_closers = f"(TOP (S (NP {TAG} {TAG} ) (VP {TAG} ) {TAG} ) )"
    assert parse(unlabelled_closers) == [linearised]


def test_link_grammar_constituents_keep_their_bare_words():
    assert parse_tree("(S (NP the dog.n) barks.v)") == Tree("S", [Tree("NP", ["the", "dog.n"]), "barks.v"])


def test_an_unlabelled_wrapper_is_a_node_without_a_label():
    assert parse_tree("( (S (NN a)) )") == Tree("", [Tree("S", [Tree("NN", ["a"])])])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(S a))", "no tree open"),
        ("(S (NP a)", "left open"),
        ("(A a) (B b)", "found 2"),
        ("just words", "found 0"),
    ],
)
def test_parse_tree_rejects_malformed_trees(text, message):
    with pytest.raises(TreeError, match=message):
        parse_tree(text)


def test_tolerant_parse_keeps_what_a_malformed_output_has():
    assert parse(f"(S (NP {TAG} {TAG} (VP {TAG}") == [Tree("S", [Tree("NP", [TAG, TAG, Tree("VP", [TAG])])])]
    assert parse(f")) {TAG} (S {TAG} )S )") == [TAG, Tree("S", [TAG])]
    assert parse("") == []
    with pytest.raises(TreeError):
        parse(")", strict=True)
