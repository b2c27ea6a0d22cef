"""Tests of the starter-suite builder (the pipelines.starter package).

The fast tests build the `tiny` size (a handful of examples per task) and check every layout the
same way the slow `starter` test checks the real `small` suite. Tests that need the Debian
packages skip when they are missing. Set MM_STARTER_DIR to check (and reuse) a `small` build there
instead of building one in a temporary directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines import starter
from pipelines.starter import (
    SIZES,
    SPLITS,
    StarterError,
    coco_emoji,
    common,
    debian,
    ding,
    fashion_mnist,
    librispeech,
    ptb,
    wmt_en_de,
    wmt_en_fr,
)

needs_packages = pytest.mark.skipif(
    bool(starter.missing_packages(starter.PACKAGES)),
    reason="starter Debian packages not installed: " + starter.apt_install_line(starter.PACKAGES),
)


# --------------------------------------------------------------------------------------------
# Layout checks: each returns {split: n_examples} counted from the files themselves.


def check_fashion_mnist(root: Path) -> dict[str, int]:
    from PIL import Image

    folders = (root / "classes.txt").read_text(encoding="utf-8").split()
    assert folders == fashion_mnist.fashion_class_folders()
    assert folders == sorted(folders), "sorting the class folders must give the label order"
    counts = {}
    for split in SPLITS:
        assert sorted(p.name for p in (root / split).iterdir()) == folders
        images = sorted((root / split).glob("*/*.png"))
        assert all(any((root / split / folder).iterdir()) for folder in folders), "empty class folder"
        with Image.open(images[0]) as image:
            assert (image.size, image.mode) == ((28, 28), "L")
        counts[split] = len(images)
    return counts


def check_wmt(root: Path, source: str, target: str) -> dict[str, int]:
    counts, sources = {}, {}
    for split in SPLITS:
        source_lines = (root / f"{split}.{source}").read_text(encoding="utf-8").splitlines()
        target_lines = (root / f"{split}.{target}").read_text(encoding="utf-8").splitlines()
        assert len(source_lines) == len(target_lines) > 0, f"{split} files are not line-aligned"
        assert all(line.strip() for line in source_lines + target_lines), "empty line"
        counts[split], sources[split] = len(source_lines), set(source_lines)
    assert not sources["train"] & (sources["dev"] | sources["test"]), "dev/test sentences seen in training"
    return counts


def check_coco(root: Path) -> dict[str, int]:
    from PIL import Image

    counts = {}
    for split in SPLITS:
        coco = json.loads((root / "annotations" / f"captions_{split}.json").read_text(encoding="utf-8"))
        images = {image["id"]: image for image in coco["images"]}
        assert len(images) == len(coco["images"]) > 0, "image ids must be unique"
        for image in coco["images"]:
            assert (root / split / image["file_name"]).is_file()
        captioned = {annotation["image_id"] for annotation in coco["annotations"]}
        assert captioned == set(images), "every image has captions, every caption an image"
        assert all(annotation["caption"].strip() for annotation in coco["annotations"])
        assert len({annotation["id"] for annotation in coco["annotations"]}) == len(coco["annotations"])
        first = coco["images"][0]
        with Image.open(root / split / first["file_name"]) as picture:
            assert (picture.mode, picture.size) == ("RGB", (first["width"], first["height"]))
        counts[split] = len(images)
    return counts


def check_librispeech(root: Path) -> dict[str, int]:
    import soundfile

    counts = {}
    for split in SPLITS:
        chapters = sorted(path for path in (root / split).glob("*/*") if path.is_dir())
        assert chapters
        counts[split] = 0
        for chapter in chapters:
            speaker_chapter = f"{chapter.parent.name}-{chapter.name}"
            lines = (chapter / f"{speaker_chapter}.trans.txt").read_text(encoding="utf-8").splitlines()
            transcripts = dict(line.split(" ", 1) for line in lines)
            assert sorted(transcripts) == sorted(path.stem for path in chapter.glob("*.flac"))
            for utterance, text in transcripts.items():
                assert re.fullmatch(rf"{speaker_chapter}-\d{{4}}", utterance)
                assert re.fullmatch(r"[A-Z']+( [A-Z']+)*", text), text
                audio, rate = soundfile.read(chapter / f"{utterance}.flac")
                assert rate == 16_000 and audio.ndim == 1 and len(audio) > 1600
            counts[split] += len(transcripts)
    return counts


def tree_words(line: str) -> list[str]:
    """The leaves of a PTB tree, checking that its brackets balance on the way."""
    depth = 0
    for char in line:
        depth += {"(": 1, ")": -1}.get(char, 0)
        assert depth >= 0, f"unbalanced: {line}"
    assert depth == 0, f"unbalanced: {line}"
    return re.findall(r"\([^\s()]+ ([^\s()]+)\)", line)


def check_ptb(root: Path) -> dict[str, int]:
    sentences = {english.replace(" ", "") for english, _ in ding.ding_sentence_pairs()}
    counts = {}
    for split in SPLITS:
        lines = (root / f"{split}.mrg").read_text(encoding="utf-8").splitlines()
        assert lines
        for line in lines:
            assert line.startswith("(ROOT (")
            words = tree_words(line)
            assert "".join(words) in sentences, f"leaves are not a sentence's words: {line}"
        counts[split] = len(lines)
    return counts


def check_suite(root: Path) -> dict[str, dict[str, int]]:
    return {
        "fashion_mnist": check_fashion_mnist(root / "fashion_mnist"),
        "wmt_en_de": check_wmt(root / "wmt_en_de", "en", "de"),
        "wmt_en_fr": check_wmt(root / "wmt_en_fr", "en", "fr"),
        "coco_emoji": check_coco(root / "coco_emoji"),
        "librispeech": check_librispeech(root / "librispeech"),
        "ptb": check_ptb(root / "ptb"),
    }


def file_contents(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


# --------------------------------------------------------------------------------------------
# Unit tests: no packages needed


def test_non_root_error_names_the_apt_get_line():
    with pytest.raises(StarterError) as error:
        debian.ensure_packages(["mm-starter-no-such-package"], install=True, euid=1000)
    assert "apt-get install -y --no-install-recommends mm-starter-no-such-package" in str(error.value)


def test_no_install_refuses_even_as_root():
    with pytest.raises(StarterError, match="apt-get install -y --no-install-recommends mm-starter-x"):
        debian.ensure_packages(["mm-starter-x"], install=False, euid=0)


def test_class_folders_sort_to_labels():
    folders = fashion_mnist.fashion_class_folders()
    assert folders[0] == "00_t-shirt_top" and folders[9] == "09_ankle_boot"
    assert [sorted(folders).index(folder) for folder in folders] == list(range(10))


def test_take_splits_puts_dev_and_test_first():
    splits = common.take_splits(list(range(10)), common.Counts(None, 2, 3), "numbers")
    assert splits == {"train": [5, 6, 7, 8, 9], "dev": [0, 1], "test": [2, 3, 4]}
    with pytest.raises(StarterError):
        common.take_splits([1, 2], common.Counts(5, 2, 3), "numbers")


@pytest.mark.parametrize(
    ("message", "clean"),
    [
        ("_Open", "Open"),
        ("Save _As…", "Save As…"),
        ("&Quit", "Quit"),
        ("Right  Margin", "Right Margin"),
        ("Commandes\u00a0:", "Commandes :"),
        ("cannot open %s", None),
        ("{0} files", None),
        ("two\nlines", None),
        ("max_depth_limit", None),
    ],
)
def test_clean_message(message, clean):
    assert wmt_en_fr.clean_message(message) == clean


def test_librispeech_transcript():
    assert librispeech.librispeech_transcript("It’s getting late, well-fed!") == "IT'S GETTING LATE WELL FED"
    assert librispeech.speakable("We went home well-fed.")
    assert not librispeech.speakable("He paid 20 euros.")
    assert not librispeech.speakable("The USA is big.")
    assert not librispeech.speakable("Mr. Smith is here.")


def test_emoji_captions_use_name_and_aliases():
    assert coco_emoji.emoji_caption(":grinning_face:") == "grinning face"
    data = {"en": ":mouse_face:", "alias": [":mouse:", ":mouse2:"]}
    assert coco_emoji.emoji_captions(data) == ["mouse face", "mouse"]


def test_link_tree_becomes_ptb_with_the_sentence_words():
    link_tree = "(S (NP it) (VP ’s.v (VP getting.v (ADJP late.a))) .)"
    assert (
        ptb.ptb_tree(link_tree, "It’s getting late.")
        == "(ROOT (S (NP (XX It)) (VP (VB ’s) (VP (VB getting) (ADJP (JJ late)))) (. .)))"
    )
    assert ptb.ptb_tree(link_tree, "It’s getting later.") is None  # leaves must spell the sentence


# --------------------------------------------------------------------------------------------
# Fast tests with the packages: the tiny suite


@needs_packages
def test_link_parser_output_is_read_per_sentence():
    trees = ptb.link_parse(["The dog barks.", "Colorless green ideas sleep furiously the of.", "It’s late."])
    assert set(trees) == {"The dog barks.", "It’s late."}  # the second needs null links: no tree
    assert ptb.ptb_tree(trees["The dog barks."], "The dog barks.").startswith(
        "(ROOT (S (NP (XX The) (NN dog))"
    )


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory):
    """Two tiny builds with the same seed, and the summary of the first."""
    first, second = tmp_path_factory.mktemp("tiny1") / "starter", tmp_path_factory.mktemp("tiny2") / "starter"
    summary = starter.build_starter(first, size="tiny", seed=7, log=lambda message: None)
    starter.build_starter(second, size="tiny", seed=7, log=lambda message: None)
    return first, second, summary


@needs_packages
def test_tiny_suite_has_every_layout(tiny_builds):
    root, _, summary = tiny_builds
    assert check_suite(root) == summary
    info = json.loads((root / "starter.json").read_text(encoding="utf-8"))
    assert (info["size"], info["seed"], info["tasks"]) == ("tiny", 7, summary)
    assert "trans-de-en" in info["debian_packages"] and (root / "README.md").is_file()
    assert not list(root.parent.glob(".*")), "the temporary build directory was left behind"


@needs_packages
def test_same_seed_gives_identical_files(tiny_builds):
    first, second, _ = tiny_builds
    first_files, second_files = file_contents(first), file_contents(second)
    assert first_files.keys() == second_files.keys()
    different = [name for name in first_files if first_files[name] != second_files[name]]
    assert not different


@needs_packages
def test_another_seed_gives_other_splits(tmp_path):
    for seed in (7, 8):
        (tmp_path / str(seed)).mkdir()
        wmt_en_de.build_wmt_en_de(tmp_path / str(seed), SIZES["tiny"], seed)
    assert (tmp_path / "7" / "train.en").read_bytes() != (tmp_path / "8" / "train.en").read_bytes()


@needs_packages
def test_second_build_is_skipped(tiny_builds):
    root, _, summary = tiny_builds
    messages = []
    assert starter.build_starter(root, size="tiny", seed=7, log=messages.append) == summary
    assert "skipped" in messages[0]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StarterError, match="not a starter suite"):
        starter.build_starter(tmp_path, size="tiny", log=lambda message: None)
    assert (tmp_path / "precious.txt").exists()


# --------------------------------------------------------------------------------------------
# The real small suite (slow: about a minute on 2 cores)


@pytest.mark.starter
@needs_packages
def test_small_suite(starter_suite):
    root, summary = starter_suite
    assert check_suite(root) == summary
    assert summary["fashion_mnist"] == {"train": 6000, "dev": 500, "test": 500}
    assert summary["wmt_en_de"]["train"] == 8000
    assert summary["wmt_en_fr"]["train"] >= 3000
    assert summary["coco_emoji"]["dev"] == 400
    assert summary["librispeech"] == {
        "train": 2400,
        "dev": 100,
        "test": 100,
    }  # 2 voices per training sentence
    assert summary["ptb"] == {"train": 3000, "dev": 200, "test": 200}
