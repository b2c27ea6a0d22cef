"""Parsing as Penn Treebank bracketed trees: ``link-parser`` constituents of Ding sentences.

link-parser gives phrase labels but not POS tags: preterminals get a coarse tag from the word's
link-grammar subscript (``.n`` → NN, ``.v`` → VB ...) or :data:`mm.trees.TAG`. Sentences that
need null links (``!null=0``) or whose tokens cannot be aligned back to the sentence are dropped.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mm.trees import TAG, Tree, parse_tree
from pipelines.starter.common import Size, progress, seeded, shuffled, take_splits
from pipelines.starter.ding import ding_english

LINK_PARSER_SETTINGS = ("!constituents=1", "!graphics=0", "!verbosity=0", "!echo=1", "!null=0", "!timeout=5")
# link-grammar marks a word's dictionary entry with a subscript: "dog.n", "was.v-d", "as.#that".
SUBSCRIPT = re.compile(r"^(.+)\.([a-z#][a-z#-]*)$")
# Only the unambiguous ones: ".p" marks pronouns and prepositions as well as plural nouns.
SUBSCRIPT_TAGS = {"n": "NN", "s": "NN", "v": "VB", "a": "JJ", "e": "RB"}
PUNCTUATION_TAGS = {".": ".", "?": ".", "!": ".", ",": ",", ";": ":", ":": ":"}
PARSE_BATCH = 1000


def parseable(sentence: str) -> bool:
    # Brackets would clash with the tree syntax; a leading "!" would be a link-parser command.
    return not re.search(r"[()\[\]{}]", sentence) and not sentence.startswith("!")


def link_parse(sentences: Sequence[str]) -> dict[str, str]:
    """Constituent trees from one link-parser run, keyed by sentence; unparsed ones are absent.

    With ``!echo=1`` every input line is printed back before its tree, and a tree spans several
    lines until its brackets balance. Sentences that need null links print no tree at all.
    """
    script = "\n".join([*LINK_PARSER_SETTINGS, *sentences]) + "\n"
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    output = subprocess.run(
        ["link-parser", "en"], input=script, capture_output=True, text=True, env=env, check=True
    ).stdout
    wanted = set(sentences)
    trees: dict[str, str] = {}
    current, tree_lines, depth = None, [], 0
    for line in output.splitlines():
        if depth == 0 and line.startswith("("):
            tree_lines = []
        elif depth == 0:
            current = line if line in wanted else None
            continue
        tree_lines.append(line)
        depth += line.count("(") - line.count(")")
        if depth == 0 and current is not None:
            trees.setdefault(current, " ".join(tree_lines))  # the first linkage is the best ranked
    return trees


def leaf_tag(word: str, subscript: str | None) -> str:
    if word in PUNCTUATION_TAGS:
        return PUNCTUATION_TAGS[word]
    # No telling subscript: the tag a linearised tree gives every word.
    return SUBSCRIPT_TAGS.get((subscript or "").split("-")[0], TAG)


def ptb_tree(link_tree: str, sentence: str) -> str | None:
    """The link-grammar tree in PTB form with the sentence's own words (case restored).

    link-grammar lower-cases sentence-initial words and splits contractions ("you’ll" ->
    "you", "’ll"); each leaf is matched back onto the sentence, and a tree whose leaves do not
    spell the sentence exactly is dropped.
    """
    position = 0

    def original_word(token: str) -> str | None:
        nonlocal position
        while position < len(sentence) and sentence[position] == " ":
            position += 1
        match = SUBSCRIPT.match(token)
        for word, subscript in ([(match.group(1), match.group(2))] if match else []) + [(token, None)]:
            found = sentence[position : position + len(word)]
            if found.lower() == word.lower():
                position += len(word)
                return f"({leaf_tag(found, subscript)} {found})"
        return None

    def convert(node: Tree) -> str | None:
        parts = [
            convert(child) if isinstance(child, Tree) else original_word(child) for child in node.children
        ]
        return None if not parts or None in parts else f"({node.label} {' '.join(parts)})"

    tree = convert(parse_tree(link_tree))
    if tree is None or sentence[position:].strip():
        return None
    return f"(ROOT {tree})"


def parse_until(candidates: Sequence[str], wanted: int | None) -> list[tuple[str, str]]:
    """(sentence, PTB tree) for candidates in order, stopping once `wanted` trees are found."""
    found: list[tuple[str, str]] = []
    with ThreadPoolExecutor(2) as pool, progress(None, "ptb", total=len(candidates)) as bar:
        for start in range(0, len(candidates), PARSE_BATCH):
            batch = candidates[start : start + PARSE_BATCH]
            halves = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]  # one link-parser per core
            trees: dict[str, str] = {}
            for part in pool.map(link_parse, halves):
                trees.update(part)
            for sentence in batch:
                tree = ptb_tree(trees[sentence], sentence) if sentence in trees else None
                if tree is not None:
                    found.append((sentence, tree))
            bar.update(len(batch))
            if wanted is not None and len(found) >= wanted:
                break
    return found[:wanted]


def build_ptb(dst: Path, size: Size, seed: int) -> dict[str, int]:
    candidates = shuffled(ding_english(size.parse_words, keep=parseable), seeded(seed, "ptb"))
    counts = size.parse
    wanted = None if counts.train is None else counts.train + counts.dev + counts.test
    parsed = parse_until(candidates, wanted)
    splits = take_splits([tree for _, tree in parsed], counts, "ptb")
    for split, trees in splits.items():
        (dst / f"{split}.mrg").write_text("".join(tree + "\n" for tree in trees), encoding="utf-8")
    return {split: len(trees) for split, trees in splits.items()}
