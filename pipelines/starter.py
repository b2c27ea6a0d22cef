"""Build the starter suite: six small raw corpora made from Debian packages, with no downloads.

The starter suite stands in for the paper's corpora on a laptop. Each corpus is written in the
*standard raw layout* of the corpus it imitates, so the demo exercises the very readers that
prepare ImageNet, WMT, COCO, LibriSpeech and the Penn Treebank:

- ``fashion_mnist/``: ``dataset-fashion-mnist`` (IDX files) as ImageNet class folders;
- ``wmt_en_de/``: ``trans-de-en`` (Ding) full-sentence examples as WMT parallel text;
- ``wmt_en_fr/``: French gettext catalogs (msgid -> msgstr) as WMT parallel text;
- ``coco_emoji/``: ``fonts-noto-color-emoji`` drawn by Pillow, named by PyPI ``emoji``, as COCO
  captions json + PNGs;
- ``librispeech/``: ``flite`` voices reading Ding sentences as LibriSpeech folders of FLAC;
- ``ptb/``: ``link-parser`` constituents of Ding sentences as Penn Treebank bracketed trees;
- ``README.md`` (sources, versions, licences, counts) and ``starter.json`` (the summary).

Choices worth knowing:

* **EN-FR.** Only the ``.mo`` files owned by :data:`GETTEXT_PACKAGES` are read (found with
  ``dpkg -L``), not whatever happens to sit in ``/usr/share/locale/fr``, so the corpus depends on
  package versions only. The set is small architecture-independent l10n/data packages (glibc,
  GnuPG, GTK 2, GLib, xkeyboard-config, shared-mime-info, GSettings schemas) plus the
  ``Priority: required`` tools every Debian has (coreutils, tar, dpkg, apt, bash, diffutils, login):
  about 8k usable pairs. ``iso-codes`` is left out on purpose: its 9k language names would swamp
  the sentence-like messages.
* **Emoji captioning** is split by rendering *variant*, not by emoji: every emoji appears in train
  (variant 0 is the plain centred rendering), and dev/test hold other renderings (shifted, scaled,
  on a tinted background). Splitting by emoji would make captioning unlearnable at this scale.
* **Speech** uses the four 16 kHz flite voices as speakers 101-104 in every split (LibriSpeech
  keeps speakers apart; four voices are too few for that). Sentences are disjoint across splits.
* **Parsing.** ``link-parser`` gives phrase labels but not POS tags: preterminals get a coarse
  tag from the word's link-grammar subscript (``.n`` → NN, ``.v`` → VB ...) or ``XX``. Sentences
  that need null links (``!null=0``) or whose tokens cannot be aligned back to the sentence are
  dropped.

Everything is deterministic for a seed: the same seed and package versions give byte-identical
files. A build goes to a hidden sibling directory that is renamed into place when complete, so a
killed build never leaves a corpus that looks finished. Call :func:`build_starter`, or run
``python -m pipelines.starter --out data/starter --size small``.
"""

from __future__ import annotations

import argparse
import functools
import gettext
import gzip
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Bump when the files written change, so an older build is not taken for a current one.
FORMAT_VERSION = 2
SPLITS = ("train", "dev", "test")

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DING_FILE = Path("/usr/share/trans/de-en")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")

# Packages that ship French catalogs; see the module docstring for why these.
GETTEXT_PACKAGES = (
    "libc-l10n",
    "gnupg-l10n",
    "libgtk2.0-common",
    "libglib2.0-data",
    "xkb-data",
    "shared-mime-info",
    "gsettings-desktop-schemas",
    "coreutils",
    "tar",
    "dpkg",
    "apt",
    "bash",
    "diffutils",
    "login",
)

CORPUS_PACKAGES = {
    "fashion_mnist": ("dataset-fashion-mnist",),
    "wmt_en_de": ("trans-de-en",),
    "wmt_en_fr": GETTEXT_PACKAGES,
    "coco_emoji": ("fonts-noto-color-emoji",),
    "librispeech": ("flite", "sox", "trans-de-en"),
    "ptb": ("link-grammar", "link-grammar-dictionaries-en", "trans-de-en"),
}
PACKAGES = tuple(dict.fromkeys(p for pkgs in CORPUS_PACKAGES.values() for p in pkgs))

# Licences read from /usr/share/doc/<pkg>/copyright where the file is not machine-readable or
# where its "Files: *" stanza is not the part we use (the emoji font itself is OFL, not Apache).
LICENCE_NOTES = {
    "fonts-noto-color-emoji": "OFL-1.1 (the font; its build tools are Apache-2.0)",
    "flite": "CMU/Edinburgh BSD-style free licence (code and voices)",
    "libc-l10n": "LGPL-2.1+",
    "libglib2.0-data": "LGPL-2.1+",
    "libgtk2.0-common": "LGPL-2+",
    "xkb-data": "MIT/X11-style permissive",
    "shared-mime-info": "GPL-2+",
}


class StarterError(RuntimeError):
    """The starter suite cannot be built here; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Counts:
    """How many examples go to each split; ``train=None`` takes everything that is left."""

    train: int | None
    dev: int
    test: int


@dataclass(frozen=True)
class Size:
    images: Counts
    en_de: Counts
    en_fr: Counts
    emoji: int | None  # how many distinct emoji; None = every one the font renders
    emoji_variants: Counts  # renderings per emoji in each split
    speech: Counts
    parse: Counts
    en_de_words: int  # longest sentence kept, in words
    en_fr_words: int
    speech_words: int
    parse_words: int
    # Speech: sentences made only of the N most frequent Ding words (None: any), so that the dev
    # and test sentences, though never heard in training, use words it heard; and how many
    # voices speak each training sentence.
    speech_vocabulary: int | None = None
    speech_voices: int = 1


SIZES = {
    # A handful per task, for fast tests of the whole builder.
    "tiny": Size(
        images=Counts(20, 10, 10),
        en_de=Counts(20, 5, 5),
        en_fr=Counts(20, 5, 5),
        emoji=6,
        emoji_variants=Counts(2, 1, 1),
        speech=Counts(8, 2, 2),
        parse=Counts(8, 2, 2),
        en_de_words=12,
        en_fr_words=12,
        speech_words=6,
        parse_words=10,
    ),
    # The demo's default: minutes to build, enough to learn something in a few thousand steps.
    "small": Size(
        images=Counts(6000, 500, 500),
        en_de=Counts(8000, 500, 500),
        en_fr=Counts(7000, 500, 500),
        emoji=400,
        emoji_variants=Counts(5, 1, 1),
        speech=Counts(1200, 100, 100),
        parse=Counts(3000, 200, 200),
        en_de_words=12,
        en_fr_words=12,
        speech_words=6,
        parse_words=10,
        speech_vocabulary=800,
        speech_voices=2,
    ),
    "full": Size(
        images=Counts(None, 5000, 10000),
        en_de=Counts(None, 1000, 1000),
        en_fr=Counts(None, 500, 500),
        emoji=None,
        emoji_variants=Counts(4, 1, 1),
        speech=Counts(None, 300, 300),
        parse=Counts(None, 500, 500),
        en_de_words=40,
        en_fr_words=40,
        speech_words=8,
        parse_words=15,
    ),
}


def take_splits(items: Sequence, counts: Counts, what: str) -> dict[str, list]:
    """Dev and test first (fixed sizes), then train from what is left."""
    needed = counts.dev + counts.test + 1
    if len(items) < needed:
        raise StarterError(f"{what}: only {len(items)} examples available, need at least {needed}")
    dev_end = counts.dev
    test_end = dev_end + counts.test
    train_end = None if counts.train is None else test_end + counts.train
    return {
        "train": list(items[test_end:train_end]),
        "dev": list(items[:dev_end]),
        "test": list(items[dev_end:test_end]),
    }


def seeded(seed: int, corpus: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across processes.
    return random.Random(f"{seed}:{corpus}")


# --------------------------------------------------------------------------------------------
# Debian packages


def apt_install_line(packages: Iterable[str]) -> str:
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


def missing_packages(packages: Iterable[str]) -> list[str]:
    """The packages dpkg does not list as installed (one dpkg-query call for all)."""
    packages = list(packages)
    if shutil.which("dpkg-query") is None:
        return packages
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *packages],
        capture_output=True,
        text=True,
    )
    installed = {line.split()[0] for line in result.stdout.splitlines() if line.split()[1:2] == ["ii"]}
    return [p for p in packages if p not in installed]


def ensure_packages(
    packages: Sequence[str] = PACKAGES,
    install: bool = True,
    euid: int | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Install what is missing with apt when we are root; otherwise say exactly what to run."""
    missing = missing_packages(packages)
    if not missing:
        return
    line = apt_install_line(missing)
    euid = os.geteuid() if euid is None else euid
    if shutil.which("dpkg-query") is None:
        raise StarterError(f"the starter suite needs Debian packages (Debian or Ubuntu); run: {line}")
    if not install or euid != 0:
        reason = "--no-install was given" if not install else "not running as root"
        raise StarterError(f"missing Debian packages ({reason}); install them with:\n  sudo {line}")
    log(f"[starter] installing {' '.join(missing)}")
    if not _apt_get(["install", "-y", "--no-install-recommends", *missing]):
        # The usual cause on a fresh machine: no package lists yet.
        log("[starter] apt-get install failed; running apt-get update and retrying")
        _apt_get(["update"])
        if not _apt_get(["install", "-y", "--no-install-recommends", *missing], echo=log):
            raise StarterError(f"apt-get could not install the packages; try by hand: {line}")
    still_missing = missing_packages(missing)
    if still_missing:
        raise StarterError(f"still missing after apt-get: {' '.join(still_missing)}")


def _apt_get(args: list[str], echo: Callable[[str], None] | None = None) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0 and echo is not None:
        echo(result.stdout[-2000:] + result.stderr[-2000:])
    return result.returncode == 0


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\n", *packages],
        capture_output=True,
        text=True,
    )
    return dict(line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)


def package_files(package: str) -> list[str]:
    result = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    return result.stdout.splitlines()


def package_licence(package: str) -> str:
    """The licence of the package's data, from its Debian copyright file."""
    if package in LICENCE_NOTES:
        return LICENCE_NOTES[package]
    copyright_file = Path("/usr/share/doc") / package / "copyright"
    try:
        text = copyright_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown (no copyright file)"
    # Machine-readable copyright files: the licence of the "Files: *" stanza.
    match = re.search(r"^Files:\s*\*\s*$(?:\n(?!License:).*)*\nLicense:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else f"see {copyright_file}"


# --------------------------------------------------------------------------------------------
# Shared source: Ding's example sentences

ANNOTATION = re.compile(r"\s*(\{[^}]*\}|\[[^\]]*\]|\([^)]*\))")


def first_alternative(text: str) -> str:
    """Drop Ding's {gender} [domain] (usage) notes and keep the first of '; '-separated variants."""
    text = ANNOTATION.sub("", text).split("; ")[0]
    return " ".join(text.split())


def is_full_sentence(text: str) -> bool:
    return (
        len(text.split()) >= 2
        and text[0].isupper()
        and text[-1] in ".?!"
        and "/" not in text  # "to the full / to the fullest." marks alternatives, not one sentence
    )


@functools.lru_cache(maxsize=2)
def ding_sentence_pairs(path: Path = DING_FILE) -> tuple[tuple[str, str], ...]:
    """(English, German) full-sentence pairs in file order, one per English sentence.

    Lines are ``German :: English``; aligned sub-entries are separated by `` | ``.
    """
    pairs: dict[str, str] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("#") or " :: " not in line:
                continue
            german, english = line.rstrip("\n").split(" :: ", 1)
            german_parts, english_parts = german.split(" | "), english.split(" | ")
            if len(german_parts) != len(english_parts):
                continue
            for de, en in zip(german_parts, english_parts, strict=True):
                en, de = first_alternative(en), first_alternative(de)
                if is_full_sentence(en) and is_full_sentence(de):
                    pairs.setdefault(en, de)
    return tuple(pairs.items())


def ding_english(max_words: int, keep: Callable[[str], bool] = lambda s: True) -> list[str]:
    return [en for en, _ in ding_sentence_pairs() if len(en.split()) <= max_words and keep(en)]


def shuffled(items: Iterable, rng: random.Random) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


# --------------------------------------------------------------------------------------------
# 1. Fashion-MNIST as ImageNet class folders

FASHION_CLASSES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)


def fashion_class_folders() -> list[str]:
    # The index prefix makes sorted folder names come out in label order, like ImageNet synsets.
    return [f"{label:02d}_{name}" for label, name in enumerate(FASHION_CLASSES)]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic (0, 0, dtype 0x08 = ubyte, ndim), dims, data."""
    data = gzip.decompress(path.read_bytes())
    zeros, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zeros != 0 or dtype != 0x08:
        raise StarterError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def balanced(order: Sequence[int], labels: np.ndarray, count: int | None) -> list[int]:
    """The first `count` indices of `order` with at most count/10 per class (None: all of them).

    Fashion-MNIST is balanced, and so stays every split we cut from it: no empty class folder.
    """
    if count is None:
        return sorted(order)
    per_class = -(-count // len(FASHION_CLASSES))
    taken = [0] * len(FASHION_CLASSES)
    chosen = []
    for index in order:
        if len(chosen) == count:
            break
        if taken[labels[index]] < per_class:
            taken[labels[index]] += 1
            chosen.append(index)
    return sorted(chosen)


def build_fashion_mnist(dst: Path, size: Size, seed: int) -> dict[str, int]:
    from PIL import Image

    rng = seeded(seed, "fashion_mnist")
    images = {part: read_idx(FASHION_DIR / f"{part}-images-idx3-ubyte.gz") for part in ("train", "t10k")}
    labels = {part: read_idx(FASHION_DIR / f"{part}-labels-idx1-ubyte.gz") for part in ("train", "t10k")}

    # Dev is carved from the official training set; test comes from the official test set.
    train_order = shuffled(range(len(labels["train"])), rng)
    dev = balanced(train_order, labels["train"], size.images.dev)
    in_dev = set(dev)
    rest = [index for index in train_order if index not in in_dev]
    chosen = {
        "train": ("train", balanced(rest, labels["train"], size.images.train)),
        "dev": ("train", dev),
        "test": (
            "t10k",
            balanced(shuffled(range(len(labels["t10k"])), rng), labels["t10k"], size.images.test),
        ),
    }

    folders = fashion_class_folders()
    (dst / "classes.txt").write_text("\n".join(folders) + "\n", encoding="utf-8")
    for split, (part, indices) in chosen.items():
        for folder in folders:
            (dst / split / folder).mkdir(parents=True, exist_ok=True)
        source_name = "train" if part == "train" else "test"  # the file names say where it came from
        for i in progress(indices, f"fashion_mnist {split}"):
            path = dst / split / folders[labels[part][i]] / f"{source_name}_{i:05d}.png"
            Image.fromarray(images[part][i]).save(path)
    return {split: len(indices) for split, (_, indices) in chosen.items()}


# --------------------------------------------------------------------------------------------
# 2. and 3. Translation as WMT parallel text


def write_parallel(dst: Path, splits: dict[str, list[tuple[str, str]]], src: str, tgt: str) -> dict[str, int]:
    for split, pairs in splits.items():
        for lang, side in ((src, 0), (tgt, 1)):
            lines = [pair[side] for pair in pairs]
            assert not any("\n" in line for line in lines), "a sentence spans two lines"
            (dst / f"{split}.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {split: len(pairs) for split, pairs in splits.items()}


def build_wmt_en_de(dst: Path, size: Size, seed: int) -> dict[str, int]:
    pairs = [(en, de) for en, de in ding_sentence_pairs() if len(en.split()) <= size.en_de_words]
    splits = take_splits(shuffled(pairs, seeded(seed, "wmt_en_de")), size.en_de, "wmt_en_de")
    return write_parallel(dst, splits, "en", "de")


# Printf/brace/shell formats, escapes, markup and addresses: not plain text on both sides.
NOT_PLAIN_TEXT = re.compile(r"%|\{|\}|\$|\\|<|>|https?://|@|\t")


def strip_accelerator(text: str) -> str | None:
    """Remove the keyboard mnemonic: GTK's "_Open"/"Save _As", Qt's "&Open".

    One marker before a letter is a mnemonic; several underscores are an identifier
    ("max_depth_limit"), which we drop rather than mangle.
    """
    for marker in ("_", "&"):
        if text.count(marker) > 1:
            return None
        text = re.sub(re.escape(marker) + r"(?=\w)", "", text)
    return text


def clean_message(text: str) -> str | None:
    if not text or "\n" in text or NOT_PLAIN_TEXT.search(text):
        return None
    text = strip_accelerator(text)
    # str.split() also splits on the no-break spaces French puts before ':' and '?'.
    return " ".join(text.split()) if text else None


def french_catalogs(packages: Sequence[str] = GETTEXT_PACKAGES) -> list[Path]:
    catalogs = []
    for package in packages:
        files = package_files(package)
        catalogs += sorted(
            Path(f) for f in files if f.startswith("/usr/share/locale/fr/") and f.endswith(".mo")
        )
    existing = [path for path in catalogs if path.exists()]
    if catalogs and not existing:
        raise StarterError(
            "the French .mo catalogs are listed by dpkg but missing on disk: dpkg probably excludes "
            "/usr/share/locale (see /etc/dpkg/dpkg.cfg.d/); remove that path-exclude and reinstall "
            + " ".join(packages)
        )
    return existing


def gettext_pairs(catalog: Path) -> Iterable[tuple[str, str]]:
    """(English, French) from one .mo file, skipping plurals, contexts and the header."""
    try:
        with open(catalog, "rb") as mo:
            messages = gettext.GNUTranslations(mo)._catalog
    except (OSError, UnicodeDecodeError):
        return
    for msgid, msgstr in sorted((k, v) for k, v in messages.items() if isinstance(k, str)):
        if "\x04" in msgid:  # msgctxt
            continue
        english, french = clean_message(msgid), clean_message(msgstr)
        if english and french and english.casefold() != french.casefold() and re.search("[A-Za-z]", english):
            yield english, french


def en_fr_pairs(max_words: int) -> list[tuple[str, str]]:
    pairs: dict[str, str] = {}
    for catalog in french_catalogs():
        for english, french in gettext_pairs(catalog):
            if english.startswith("-") or len(english.split()) > max_words:  # skip option help
                continue
            pairs.setdefault(english, french)  # the first package's translation wins
    return list(pairs.items())


def build_wmt_en_fr(dst: Path, size: Size, seed: int) -> dict[str, int]:
    pairs = shuffled(en_fr_pairs(size.en_fr_words), seeded(seed, "wmt_en_fr"))
    return write_parallel(dst, take_splits(pairs, size.en_fr, "wmt_en_fr"), "en", "fr")


# --------------------------------------------------------------------------------------------
# 4. Emoji captioning as COCO captions

EMOJI_RENDER_SIZE = 109  # the only size at which Noto Color Emoji's bitmaps render
EMOJI_IMAGE_SIZE = 64
# Faces, animals, plants, food and sky first: simple, familiar pictures with plain names.
SIMPLE_EMOJI_BLOCKS = (
    (0x1F600, 0x1F64F),
    (0x1F910, 0x1F92F),
    (0x1F970, 0x1F97F),
    (0x1FAE0, 0x1FAEF),
    (0x1F400, 0x1F43F),
    (0x1F980, 0x1F9AE),
    (0x1F330, 0x1F344),
    (0x1F345, 0x1F37F),
    (0x1F950, 0x1F96F),
    (0x1F300, 0x1F320),
)


def emoji_caption(name: str) -> str:
    """':grinning_face:' -> 'grinning face'."""
    return " ".join(name.strip(":").replace("_", " ").split())


def emoji_captions(data: dict) -> list[str]:
    """The CLDR name, then the aliases, except numbered ones such as GitHub's ':mouse2:'."""
    name = emoji_caption(data["en"])
    aliases = [emoji_caption(alias) for alias in data.get("alias", [])]
    aliases = [alias for alias in aliases if not re.search(r"\d", alias) or re.search(r"\d", name)]
    return list(dict.fromkeys([name, *aliases]))


def emoji_order(char: str) -> tuple:
    """Single-codepoint emoji of the simple blocks first, then the rest by codepoint."""
    codepoints = [ord(c) for c in char if c != "\ufe0f"]
    block = next(
        (
            i
            for i, (lo, hi) in enumerate(SIMPLE_EMOJI_BLOCKS)
            if len(codepoints) == 1 and lo <= codepoints[0] <= hi
        ),
        len(SIMPLE_EMOJI_BLOCKS),
    )
    return (block, len(codepoints), codepoints)


def render_glyph(char: str, font):
    """The emoji as an RGBA image cropped to its ink, or None when the font cannot draw it alone."""
    from PIL import Image, ImageDraw

    _, _, right, bottom = font.getbbox(char)
    if font.getlength(char) > 1.5 * EMOJI_RENDER_SIZE:  # drawn as several glyphs side by side
        return None
    canvas = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    ink = canvas.getbbox()
    return canvas.crop(ink) if ink else None  # no ink: the font has no glyph for it


def render_variant(glyph, rng: random.Random, plain: bool):
    """A 64x64 RGB picture of the glyph; plain = centred on white, else shifted/scaled/tinted."""
    from PIL import Image

    side = EMOJI_IMAGE_SIZE
    background = (255, 255, 255) if plain else tuple(255 - rng.randrange(48) for _ in range(3))
    scale = 0.8 if plain else rng.uniform(0.55, 0.95)
    width = max(1, round(side * scale))
    height = max(1, round(width * glyph.height / glyph.width))
    small = glyph.resize((width, height), Image.LANCZOS)
    x_room, y_room = side - width, side - height
    x = x_room // 2 if plain else rng.randint(0, max(0, x_room))
    y = y_room // 2 if plain else rng.randint(0, max(0, y_room))
    picture = Image.new("RGB", (side, side), background)
    picture.paste(small, (x, y), small)
    return picture


def choose_emoji(count: int | None) -> list[tuple[str, object]]:
    """(emoji, glyph) for the first `count` emoji in :func:`emoji_order` that the font draws."""
    import emoji
    from PIL import ImageFont

    font = ImageFont.truetype(str(EMOJI_FONT), EMOJI_RENDER_SIZE)
    fully_qualified = emoji.STATUS["fully_qualified"]
    candidates = [c for c, data in emoji.EMOJI_DATA.items() if data["status"] == fully_qualified]
    chosen = []
    for char in sorted(candidates, key=emoji_order):
        if count is not None and len(chosen) == count:
            break
        glyph = render_glyph(char, font)
        if glyph is not None:
            chosen.append((char, glyph))
    return chosen


def write_coco_split(dst: Path, split: str, chosen, variants: range, seed: int) -> int:
    """Render the variants of every chosen emoji and write captions_<split>.json."""
    import emoji

    side = EMOJI_IMAGE_SIZE
    images, annotations = [], []
    (dst / split).mkdir(parents=True)
    for char, glyph in progress(chosen, f"coco_emoji {split}"):
        codepoints = "-".join(f"{ord(c):x}" for c in char if c != "\ufe0f")
        for variant in variants:
            rng = random.Random(f"{seed}:coco_emoji:{codepoints}:{variant}")
            file_name = f"u{codepoints}_v{variant}.png"
            render_variant(glyph, rng, plain=variant == 0).save(dst / split / file_name)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": file_name, "height": side, "width": side})
            for caption in emoji_captions(emoji.EMOJI_DATA[char]):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    coco = {
        "info": {"description": f"Noto Color Emoji renderings, {split} split", "version": "1.0"},
        "images": images,
        "annotations": annotations,
    }
    (dst / "annotations").mkdir(exist_ok=True)
    text = json.dumps(coco, ensure_ascii=False, indent=1) + "\n"
    (dst / "annotations" / f"captions_{split}.json").write_text(text, encoding="utf-8")
    return len(images)


def build_coco_emoji(dst: Path, size: Size, seed: int) -> dict[str, int]:
    chosen = choose_emoji(size.emoji)
    # Variant numbers run on across splits: train gets 0 (the plain rendering) and the next few.
    n = size.emoji_variants
    variants = {
        "train": range(0, n.train),
        "dev": range(n.train, n.train + n.dev),
        "test": range(n.train + n.dev, n.train + n.dev + n.test),
    }
    return {split: write_coco_split(dst, split, chosen, variants[split], seed) for split in SPLITS}


# --------------------------------------------------------------------------------------------
# 5. Speech as LibriSpeech folders

SAMPLE_RATE = 16_000
# flite's 16 kHz voices (kal is 8 kHz and robotic) as LibriSpeech speaker ids.
VOICES = {"kal16": 101, "awb": 102, "rms": 103, "slt": 104}
CHAPTERS = {"train": 1, "dev": 2, "test": 3}
SPOKEN_AS_SOMETHING_ELSE = {"mr", "mrs", "ms", "dr", "st", "jr", "etc", "vs"}


def speakable(sentence: str) -> bool:
    """Sentences flite reads exactly as written: no digits, symbols, acronyms or abbreviations."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z ,.?!;:'’-]*", sentence):
        return False
    words = sentence.split()
    if any(w.rstrip(".,?!;:").isupper() and len(w.rstrip(".,?!;:")) > 1 for w in words):
        return False  # "USA", "OK": spelt out by flite
    if any(w.endswith(".") for w in words[:-1]):
        return False  # "Mr. Smith", "e.g. this"
    return not any(w.strip(".,?!;:").lower() in SPOKEN_AS_SOMETHING_ELSE for w in words)


def librispeech_transcript(sentence: str) -> str:
    """LibriSpeech style: upper case, apostrophes kept, other punctuation gone, hyphens split."""
    text = sentence.replace("’", "'").replace("-", " ")
    text = re.sub(r"[^A-Za-z' ]", " ", text)
    words = (word.strip("'") for word in text.upper().split())
    return " ".join(word for word in words if word)


def sox_to_16k(wav: Path) -> list[str]:
    """sox arguments that print the file as raw 16 kHz mono signed 16-bit samples on stdout."""
    return ["sox", str(wav), "-t", "raw", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed", "-"]


def synthesize(text: str, voice: str, flac: Path, scratch: Path) -> None:
    """flite speaks the text to a WAV; sox makes it 16 kHz mono 16-bit; soundfile writes FLAC."""
    import soundfile

    wav = scratch / (flac.stem + ".wav")
    subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True, capture_output=True)
    raw = subprocess.run(sox_to_16k(wav), check=True, capture_output=True).stdout
    wav.unlink()
    soundfile.write(flac, np.frombuffer(raw, dtype="<i2"), SAMPLE_RATE, subtype="PCM_16", format="FLAC")


@dataclass(frozen=True)
class Utterance:
    id: str  # <speaker>-<chapter>-<utt:04d>
    voice: str
    sentence: str

    def chapter_dir(self, split_dir: Path) -> Path:
        speaker, chapter, _ = self.id.split("-")
        return split_dir / speaker / chapter


def plan_utterances(split: str, sentences: Sequence[str]) -> list[Utterance]:
    """Voices take turns (so speakers stay balanced); each speaker has one chapter per split."""
    voices = list(VOICES)
    utterances = []
    for i, sentence in enumerate(sentences):
        voice = voices[i % len(voices)]
        utterance_id = f"{VOICES[voice]}-{CHAPTERS[split]}-{i // len(voices):04d}"
        utterances.append(Utterance(utterance_id, voice, sentence))
    return utterances


def write_transcripts(split_dir: Path, utterances: Sequence[Utterance]) -> None:
    by_chapter: dict[Path, list[str]] = {}
    for utterance in utterances:
        line = f"{utterance.id} {librispeech_transcript(utterance.sentence)}"
        by_chapter.setdefault(utterance.chapter_dir(split_dir), []).append(line)
    for chapter_dir, lines in by_chapter.items():
        chapter_dir.mkdir(parents=True)
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def frequent_words(count: int | None) -> set[str] | None:
    """The `count` most frequent words of Ding's English sentences, as transcripts spell them."""
    if count is None:
        return None
    words = Counter(w for en, _ in ding_sentence_pairs() for w in librispeech_transcript(en).split())
    return {word for word, _ in words.most_common(count)}


def build_librispeech(dst: Path, size: Size, seed: int) -> dict[str, int]:
    vocabulary = frequent_words(size.speech_vocabulary)

    def usable(sentence: str) -> bool:
        words = librispeech_transcript(sentence).split()
        return bool(words) and (vocabulary is None or all(w in vocabulary for w in words))

    sentences = [s for s in ding_english(size.speech_words, keep=speakable) if usable(s)]
    splits = take_splits(shuffled(sentences, seeded(seed, "librispeech")), size.speech, "librispeech")

    jobs = []  # (text, voice, flac path)
    for split, split_sentences in splits.items():
        utterances = plan_utterances(split, utterances_of(split, size, split_sentences))
        write_transcripts(dst / split, utterances)
        for u in utterances:
            jobs.append((u.sentence.replace("’", "'"), u.voice, u.chapter_dir(dst / split) / f"{u.id}.flac"))

    # The work happens in the flite and sox child processes, so two threads keep both cores busy.
    with tempfile.TemporaryDirectory(prefix="starter-tts-") as scratch, ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda job: synthesize(*job, Path(scratch)), jobs)
        for _ in progress(done, "librispeech", total=len(jobs)):
            pass
    return {split: len(utterances_of(split, size, sentences)) for split, sentences in splits.items()}


def utterances_of(split: str, size: Size, sentences: Sequence[str]) -> list[str]:
    return [s for s in sentences for _ in range(size.speech_voices if split == "train" else 1)]


# --------------------------------------------------------------------------------------------
# 6. Parsing as Penn Treebank trees

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


def read_brackets(text: str) -> list:
    """'(S (NP the dog.n) barks.v)' -> ['S', ['NP', 'the', 'dog.n'], 'barks.v']."""
    stack: list[list] = [[]]
    for token in re.findall(r"\(|\)|[^\s()]+", text):
        if token == "(":
            stack.append([])
        elif token == ")":
            node = stack.pop()
            stack[-1].append(node)
        else:
            stack[-1].append(token)
    return stack[0][0]


def leaf_tag(word: str, subscript: str | None) -> str:
    if word in PUNCTUATION_TAGS:
        return PUNCTUATION_TAGS[word]
    return SUBSCRIPT_TAGS.get((subscript or "").split("-")[0], "XX")


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

    def convert(node: list) -> str | None:
        label, children = node[0], node[1:]
        parts = [convert(child) if isinstance(child, list) else original_word(child) for child in children]
        return None if not parts or None in parts else f"({label} {' '.join(parts)})"

    tree = convert(read_brackets(link_tree))
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


# --------------------------------------------------------------------------------------------
# The whole suite

BUILDERS = {
    "fashion_mnist": build_fashion_mnist,
    "wmt_en_de": build_wmt_en_de,
    "wmt_en_fr": build_wmt_en_fr,
    "coco_emoji": build_coco_emoji,
    "librispeech": build_librispeech,
    "ptb": build_ptb,
}

HOW_MADE = {
    "fashion_mnist": "ImageNet-style class folders of 28x28 grayscale PNGs; `classes.txt` lists the "
    "folders in label order. Test from the official test set, dev carved from the official train set.",
    "wmt_en_de": "Ding's full example sentences (start upper-case, end in . ? !), first alternative "
    "of each side, annotations removed; English is the source. One sentence per line.",
    "wmt_en_fr": "msgid -> msgstr of the packages' French gettext catalogs; plurals, contexts, "
    "format strings, markup and multi-line messages dropped; keyboard accelerators removed; "
    "untranslated pairs dropped; one pair per English message.",
    "coco_emoji": "Noto Color Emoji rendered by Pillow at 109 px, 64x64 RGB PNGs; captions are the "
    "emoji's CLDR name and aliases from the PyPI `emoji` package. Every emoji is in train (plain "
    "rendering plus variants); dev and test hold other shifted/scaled/tinted renderings.",
    "librispeech": "flite voices (kal16, awb, rms, slt = speakers 101-104) reading short Ding "
    "sentences, 16 kHz mono FLAC; transcripts upper-case without punctuation.",
    "ptb": "`link-parser en` constituent trees (`!constituents=1`, no null links) of short Ding "
    "sentences, wrapped in ROOT; POS tags are coarse guesses from link-grammar subscripts or XX.",
}


def progress(items, desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, leave=False, mininterval=1.0, disable=None)


def python_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("emoji", "Pillow", "numpy", "soundfile")}


def readme(size: str, seed: int, summary: dict, versions: dict[str, str]) -> str:
    lines = [
        "# The starter suite",
        "",
        f"Built by `pipelines/starter.py` (size `{size}`, seed {seed}) from Debian packages, without "
        "downloads. Rebuild with `python -m pipelines.starter --size SIZE --seed N`.",
        "",
        "| corpus | Debian source (version) | licence | train | dev | test |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task, counts in summary.items():
        sources = "<br>".join(f"`{p}` {versions.get(p, '?')}" for p in CORPUS_PACKAGES[task])
        licences = "<br>".join(package_licence(p) for p in CORPUS_PACKAGES[task])
        lines.append(
            f"| `{task}/` | {sources} | {licences} | {counts['train']} | {counts['dev']} | {counts['test']} |"
        )
    lines += ["", "## How each corpus was made", ""]
    lines += [f"- **{task}**: {HOW_MADE[task]}" for task in summary]
    py = python_versions()
    lines += [
        "",
        f"Emoji names come from the PyPI package `emoji` {py['emoji']} (BSD licence); images were "
        f"drawn with Pillow {py['Pillow']}. Licences are read from `/usr/share/doc/<package>/copyright`.",
        "",
    ]
    return "\n".join(lines)


def existing_build(out: Path, size: str, seed: int) -> dict | None:
    try:
        info = json.loads((out / "starter.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = (info.get("size"), info.get("seed"), info.get("format_version")) == (size, seed, FORMAT_VERSION)
    return info if same else None


def check_replaceable(out: Path) -> None:
    """Only an empty directory or an earlier starter build may be replaced."""
    if out.exists() and any(out.iterdir()) and not (out / "starter.json").exists():
        raise StarterError(f"{out} exists and is not a starter suite; refusing to replace it")


def replace_directory(built: Path, out: Path) -> None:
    """Swap the finished build into place; the old tree is removed only after the rename."""
    check_replaceable(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        built.rename(out)
        shutil.rmtree(old)
    else:
        built.rename(out)


def build_starter(
    out: Path, size: str = "small", seed: int = 0, install: bool = True, log: Callable[[str], None] = print
) -> dict:
    """Build the six raw starter corpora under `out`; returns {task: {split: n_examples}}.

    Skips the work when `out/starter.json` records the same size and seed. Needs the Debian
    packages in :data:`PACKAGES`; installs the missing ones with apt when `install` and root.
    """
    out = Path(out)
    if size not in SIZES:
        raise StarterError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    done = existing_build(out, size, seed)
    if done is not None:
        log(f"[starter] {out} already holds the {size} suite for seed {seed}; skipped")
        return done["tasks"]

    check_replaceable(out)
    ensure_packages(PACKAGES, install=install, log=log)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed build
    partial.mkdir(parents=True)

    summary: dict[str, dict[str, int]] = {}
    started = time.perf_counter()
    for task, builder in BUILDERS.items():
        task_started = time.perf_counter()
        (partial / task).mkdir()
        summary[task] = builder(partial / task, SIZES[size], seed)
        counts = " / ".join(f"{summary[task][split]} {split}" for split in SPLITS)
        log(f"[starter] {task}: {counts} in {time.perf_counter() - task_started:.1f} s")

    versions = package_versions(PACKAGES)
    (partial / "README.md").write_text(readme(size, seed, summary, versions), encoding="utf-8")
    info = {
        "format_version": FORMAT_VERSION,
        "size": size,
        "seed": seed,
        "tasks": summary,
        "debian_packages": versions,
        "python_packages": python_versions(),
    }
    # Written last: its presence is what marks a build as complete.
    (partial / "starter.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    replace_directory(partial, out)
    log(f"[starter] built {out} ({size}, seed {seed}) in {time.perf_counter() - started:.1f} s")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mm starter", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/starter"), help="where to write the corpora")
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-install", action="store_true", help="never run apt-get; fail if packages are missing"
    )
    parser.add_argument(
        "--packages-only", action="store_true", help="only install the Debian packages it needs"
    )
    args = parser.parse_args(argv)
    try:
        if args.packages_only:
            ensure_packages(install=not args.no_install)
            return 0
        summary = build_starter(args.out, size=args.size, seed=args.seed, install=not args.no_install)
    except StarterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
