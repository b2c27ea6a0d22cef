"""Penn Treebank trees: finding them in a file, cleaning them, and Vinyals' linearisation.

A treebank file holds many trees, each possibly over several lines:

    ( (S
        (NP-SBJ-1 (DT The) (NN cat) )
        (VP (VBD sat) (-NONE- *T*-1) )
        (. .) ))

Cleaning follows the usual parsing set-up: `-NONE-` traces go, and so does every constituent
left empty by that; function tags and indices go (`NP-SBJ-1` -> `NP`, `NP=2` -> `NP`) while
tags that start with a dash stay whole (`-LRB-`); the outer wrapper without a label, or labelled
ROOT or TOP, is removed when it holds one tree.

The target (Vinyals et al. 2015, "Grammar as a Foreign Language") writes the tree depth-first
with labelled closing brackets and every part-of-speech tag, with its word, replaced by XX:

    (S (NP XX XX )NP (VP XX )VP XX )S

The input is the words, in order, separated by spaces.

The brackets of one tree are read by `mm.trees.parse_tree`, as the metrics and the starter suite
read theirs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from mm.trees import TAG, Tree, TreeError, parse_tree

WRAPPERS = ("", "ROOT", "TOP")
# The treebank's escapes for brackets and braces inside words, undone for the input text.
WORD_ESCAPES = {"-LRB-": "(", "-RRB-": ")", "-LCB-": "{", "-RCB-": "}", "-LSB-": "[", "-RSB-": "]"}
_BRACKET = re.compile(rb"[()]")
# The treebank's ATIS and Brown files open with "*x*" banner lines, "(C)" included: not trees.
_COPYRIGHT_LINE = re.compile(rb"(?m)^\*x\*.*$")


class EmptyTree(TreeError):
    reason = "empty_tree"


# ------------------------------------------------------------------------------ trees in a file


@dataclass(frozen=True)
class TreeText:
    text: bytes
    line: int  # where the tree starts, 1-based
    problem: str = ""  # "unbalanced_brackets" when its brackets do not close properly


def split_trees(data: bytes) -> Iterator[TreeText]:
    """The trees of a treebank file, by bracket depth. A tree that is still open when a line
    starts with "(" in its first column (where trees start, never their inner lines) is missing
    closing brackets; a closing bracket with no tree open means the tree before had one too
    many. Both are marked unbalanced and the trees after them are read normally."""
    data = _COPYRIGHT_LINE.sub(lambda line: b" " * len(line.group()), data)  # offsets unchanged
    trees: list[TreeText] = []
    depth, start = 0, 0
    newline_before = _line_counter(data)
    for match in _BRACKET.finditer(data):
        position = match.start()
        if data[position] == ord("("):
            at_line_start = position == 0 or data[position - 1] == ord("\n")
            if depth > 0 and at_line_start:
                trees.append(TreeText(data[start:position], newline_before(start) + 1, "unbalanced_brackets"))
                depth = 0
            if depth == 0:
                start = position
            depth += 1
        elif depth == 0:
            if trees:
                last = trees.pop()
                trees.append(TreeText(last.text + b")", last.line, "unbalanced_brackets"))
            else:
                trees.append(TreeText(b")", newline_before(position) + 1, "unbalanced_brackets"))
        else:
            depth -= 1
            if depth == 0:
                trees.append(TreeText(data[start : position + 1], newline_before(start) + 1))
    if depth > 0:
        trees.append(TreeText(data[start:], newline_before(start) + 1, "unbalanced_brackets"))
    return iter(trees)


def _line_counter(data: bytes):
    """position -> number of newlines before it (a 0-based line number), by bisection."""
    from bisect import bisect_left

    newlines = [m.start() for m in re.finditer(rb"\n", data)]
    return lambda position: bisect_left(newlines, position)


# --------------------------------------------------------------------------------- one tree


def strip_function_tags(label: str) -> str:
    """`NP-SBJ-1` -> `NP`, `NP=2` -> `NP`, `ADVP|PRT` -> `ADVP`; `-LRB-`, `-NONE-` unchanged."""
    if label.startswith("-"):
        return label
    return re.split(r"[-=|]", label, maxsplit=1)[0] or label


def clean(tree: Tree) -> Tree | None:
    """Drop traces and the constituents they leave empty; strip function tags. None if nothing
    is left."""
    if tree.is_preterminal:
        return None if tree.label == "-NONE-" else Tree(strip_function_tags(tree.label), tree.children)
    children: list[Tree | str] = []
    for child in tree.children:
        if isinstance(child, str):
            children.append(Tree(TAG, [child]))  # a bare word: give it a tag so it stays a leaf
        else:
            cleaned = clean(child)
            if cleaned is not None:
                children.append(cleaned)
    return Tree(strip_function_tags(tree.label), children) if children else None


def unwrap(tree: Tree) -> Tree:
    """Remove the treebank's outer `( (S ...) )` or `(ROOT (S ...))` when it holds one tree."""
    while tree.label in WRAPPERS and len(tree.children) == 1 and isinstance(tree.children[0], Tree):
        tree = tree.children[0]
    return tree


def words(tree: Tree) -> list[str]:
    if tree.is_preterminal:
        word = str(tree.children[0])
        return [WORD_ESCAPES.get(word, word.replace("\\/", "/").replace("\\*", "*"))]
    return [word for child in tree.children if isinstance(child, Tree) for word in words(child)]


def linearise(tree: Tree) -> str:
    """Vinyals' form: `(S (NP XX XX )NP XX )S`."""
    if tree.is_preterminal:
        return TAG
    inner = " ".join(linearise(child) for child in tree.children if isinstance(child, Tree))
    return f"({tree.label} {inner} ){tree.label}"


def parse_example(text: str) -> tuple[str, str]:
    """A treebank tree -> (input words, linearised target). Raises `TreeError`."""
    cleaned = clean(parse_tree(text))
    if cleaned is None:
        raise EmptyTree("no words left after removing traces")
    tree = unwrap(cleaned)
    return " ".join(words(tree)), linearise(tree)
