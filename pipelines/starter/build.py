"""Build the starter suite: six small raw corpora made from Debian packages, with no downloads.

Runs each corpus's builder in turn into a hidden sibling directory, writes the README and
``starter.json`` (which marks a build as complete) and renames the result into place.
`mm starter` calls it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.starter.coco_emoji import build_coco_emoji
from pipelines.starter.common import SIZES, SPLITS, StarterError
from pipelines.starter.debian import (
    CORPUS_PACKAGES,
    PACKAGES,
    ensure_packages,
    package_licence,
    package_versions,
)
from pipelines.starter.fashion_mnist import build_fashion_mnist
from pipelines.starter.librispeech import build_librispeech
from pipelines.starter.ptb import build_ptb
from pipelines.starter.wmt_en_de import build_wmt_en_de
from pipelines.starter.wmt_en_fr import build_wmt_en_fr

# Bump when the files written change, so an older build is not taken for a current one.
FORMAT_VERSION = 2

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


def python_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("emoji", "Pillow", "numpy", "soundfile")}


def readme(size: str, seed: int, summary: dict, versions: dict[str, str]) -> str:
    lines = [
        "# The starter suite",
        "",
        f"Built by `mm starter` (size `{size}`, seed {seed}) from Debian packages, without "
        "downloads. Rebuild with `mm starter --size SIZE --seed N`.",
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

    started = time.perf_counter()
    summary = build_corpora(partial, size, seed, log)
    write_description(partial, size, seed, summary)
    replace_directory(partial, out)
    log(f"[starter] built {out} ({size}, seed {seed}) in {time.perf_counter() - started:.1f} s")
    return summary


def build_corpora(root: Path, size: str, seed: int, log: Callable[[str], None]) -> dict[str, dict[str, int]]:
    """Every corpus into its folder under `root`, in :data:`BUILDERS` order."""
    summary: dict[str, dict[str, int]] = {}
    for task, builder in BUILDERS.items():
        task_started = time.perf_counter()
        (root / task).mkdir()
        summary[task] = builder(root / task, SIZES[size], seed)
        counts = " / ".join(f"{summary[task][split]} {split}" for split in SPLITS)
        log(f"[starter] {task}: {counts} in {time.perf_counter() - task_started:.1f} s")
    return summary


def write_description(root: Path, size: str, seed: int, summary: dict[str, dict[str, int]]) -> None:
    """README.md, then starter.json: written last, its presence marks the build as complete."""
    versions = package_versions(PACKAGES)
    (root / "README.md").write_text(readme(size, seed, summary, versions), encoding="utf-8")
    info = {
        "format_version": FORMAT_VERSION,
        "size": size,
        "seed": seed,
        "tasks": summary,
        "debian_packages": versions,
        "python_packages": python_versions(),
    }
    (root / "starter.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
