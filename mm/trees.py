"""Bracketed trees: the one tokenizer and parser for every form of them the project reads.

- Penn Treebank trees, a tag over every word, perhaps inside an unlabelled wrapper:
  ``( (S (NP (DT a) (NN b)) ) )`` or ``(TOP (S (NP (DT a) (NN b))))``;
- their linearisation (Vinyals et al. 2015, "Grammar as a Foreign Language"), every tag with
  its word written :data:`TAG`, closing brackets labelled or not: ``(S (NP XX XX )NP )S``,
  ``(S (NP XX XX ) )``, and a model's attempts at it, which may be malformed;
- link-grammar's constituents, bare words under phrase labels: ``(S (NP the dog.n) barks.v)``.

A bracket and the label it touches are one token (``(NP``, ``)NP``). A bare ``(`` opens an
unlabelled node; the label of a closing bracket is not checked here (``mm.metrics.well_formed``
does that), so a tree and its linearisation parse to the same brackets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TAG = "XX"  # every part-of-speech tag of a linearised tree; also the tag of a word we cannot tag


class TreeError(ValueError):
    reason = "malformed_tree"  # the rejection reason the PTB reader records


@dataclass
class Tree:
    label: str
    children: list[Tree | str] = field(default_factory=list)

    @property
    def is_preterminal(self) -> bool:
        """A tag over one word: ``(DT The)``."""
        return len(self.children) == 1 and isinstance(self.children[0], str)


def tokens(text: str) -> list[str]:
    """``(S (NP XX XX )NP)`` -> ``['(S', '(NP', 'XX', 'XX', ')NP', ')']``."""
    return text.replace("(", " (").replace(")", " )").split()


def parse(text: str, strict: bool = False) -> list[Tree | str]:
    """The top-level nodes of bracketed text (and any words outside every bracket).

    Strict, unbalanced brackets raise :class:`TreeError`, as a corpus's tree should. Otherwise
    they are tolerated, since a model's output may be malformed: a closing bracket with nothing
    open is skipped and the nodes left open end with the text.
    """
    top = Tree("")
    stack = [top]
    for token in tokens(text):
        if token.startswith("("):
            node = Tree(token[1:])
            stack[-1].children.append(node)
            stack.append(node)
        elif token.startswith(")"):
            if len(stack) > 1:
                stack.pop()
            elif strict:
                raise TreeError("a closing bracket with no tree open")
        else:
            stack[-1].children.append(token)
    if strict and len(stack) > 1:
        raise TreeError("brackets left open")
    return top.children


def parse_tree(text: str) -> Tree:
    """Exactly one balanced tree, else :class:`TreeError`. Its outermost node may be an
    unlabelled wrapper (label ``""``); words outside it are ignored."""
    trees = [node for node in parse(text, strict=True) if isinstance(node, Tree)]
    if len(trees) != 1:
        raise TreeError(f"expected one tree, found {len(trees)}")
    return trees[0]
