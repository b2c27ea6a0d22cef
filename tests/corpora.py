"""Tiny corpora in every raw layout the readers know, written by the tests themselves.

Each writer takes a folder and `bad=True` to add one bad row of every kind its layout can have;
the counts it returns are what a reader should make of it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image

from mm.config import Config, parse_config

SENTENCES = [
    ("the cat sat on the mat", "die katze sass auf der matte"),
    ("a dog runs in the park", "ein hund rennt im park"),
    ("we like green apples", "wir moegen gruene aepfel"),
    ("the house is small", "das haus ist klein"),
    ("she reads a long book", "sie liest ein langes buch"),
    ("the sun is warm today", "die sonne ist heute warm"),
]


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


def write_imagenet(root: Path, bad: bool = False, class_list: bool = True) -> dict[str, int]:
    """Two classes; PNG, JPEG and a grey PNG. Rows per split."""
    classes = ["n02_dog", "n01_cat"]  # the class list's order, not the sorted one
    for split, per_class in (("train", 3), ("dev", 1)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                suffix = ".JPEG" if i == 1 else ".png"
                _image(folder / f"{name}_{i}{suffix}", seed=c * 10 + i, mode="L" if i == 2 else "RGB")
            (folder / "README").write_text("not an image: ignored")
    if class_list:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    if bad:
        (root / "train" / "n01_cat" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return {"train": 6, "dev": 2}


def write_wmt(root: Path, bad: bool = False, gz: bool = True) -> dict[str, int]:
    root.mkdir(parents=True, exist_ok=True)
    sources = [s.encode() for s, _ in SENTENCES]
    targets = [t.encode() for _, t in SENTENCES]
    if bad:
        sources[2] = b"caf\xe9 latin-1 is not utf-8"
        targets.append(b"an unmatched line")
        sources[4] = b" ".join([b"word"] * 80)  # over max_input_length: filtered, not rejected
    for lang, lines in (("en", sources), ("de", targets)):
        data = b"".join(line + b"\n" for line in lines)
        if gz:
            (root / f"train.{lang}.gz").write_bytes(gzip.compress(data))
        else:
            (root / f"train.{lang}").write_bytes(data)
        (root / f"dev.{lang}").write_bytes(b"".join(line + b"\n" for line in lines[:2]))
    return {"train": 4 if bad else 6, "dev": 2}


def write_tsv(root: Path, bad: bool = False) -> dict[str, int]:
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"{s}\t{t}\tCC-BY attribution" for s, t in SENTENCES] + (["no tab on this line"] if bad else [])
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    return {"train": 6}


def write_coco(root: Path, bad: bool = False) -> dict[str, int]:
    """Three images with two captions each; `bad`: the json names a fourth that is missing."""
    for split in ("train", "dev"):
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for i in range(3):
            _image(root / split / f"{i:04d}.png", seed=100 + i, size=(48, 40))
            images.append({"id": i + 1, "file_name": f"{i:04d}.png"})
            for caption in (f"a picture number {i} ", f"an image\nwith {i} things"):
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "caption": caption})
        if bad and split == "train":
            images.append({"id": 99, "file_name": "missing.png"})
            annotations.append({"id": 999, "image_id": 99, "caption": "a picture that is not there"})
        (root / "annotations").mkdir(exist_ok=True)
        coco = {"images": images, "annotations": annotations}
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(coco))
    return {"train": 6, "dev": 3}


def _tone(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def write_librispeech(root: Path, bad: bool = False) -> dict[str, int]:
    """FLAC at 16 kHz (mono) and 8 kHz (stereo): resampled and mixed down by the reader."""
    counts = {}
    for split, n in (("train", 4), ("dev", 2)):
        chapter = root / split / "101" / "7"
        chapter.mkdir(parents=True)
        lines = []
        for i in range(n):
            rate, channels = (16000, 1) if i % 2 == 0 else (8000, 2)
            soundfile.write(chapter / f"101-7-{i:04d}.flac", _tone(0.3, rate, channels, i), rate)
            lines.append(f"101-7-{i:04d} {SENTENCES[i][0].upper()}")
        if bad and split == "train":
            soundfile.write(chapter / "101-7-0090.flac", np.zeros(0), 16000)  # empty
            (chapter / "101-7-0091.flac").write_bytes(b"fLaC but then garbage")
            lines += ["101-7-0090 EMPTY AUDIO", "101-7-0091 BROKEN AUDIO"]
        (chapter / "101-7.trans.txt").write_text("\n".join(lines) + "\n")
        counts[split] = n
    return counts


def write_speech_manifest(root: Path, bad: bool = False) -> dict[str, int]:
    """WAV files and a CSV manifest (train) and a JSONL one (dev), paths relative."""
    (root / "clips").mkdir(parents=True)
    for i in range(4):
        soundfile.write(root / "clips" / f"{i}.wav", _tone(0.25, 16000, seed=i), 16000)
    rows = [("clips/0.wav", "Hello World"), ("clips/1.wav", "Good Morning")]
    csv_lines = ["path,text"] + [f"{p},{t}" for p, t in rows]
    data = ("\n".join(csv_lines) + "\n").encode()
    if bad:
        data += b"clips/2.wav,caf\xe9\n"  # not UTF-8
        data += b"clips/nothing.wav,no such file\n"
        data += b"clips/3.wav,Third One\n"
        soundfile.write(root / "clips" / "empty.wav", np.zeros(0), 16000)
        data += b"clips/empty.wav,nothing said\n"
    (root / "train.csv").write_bytes(data)
    records = [{"path": "clips/2.wav", "text": "Dev One"}, {"path": "clips/3.wav", "text": "Dev Two"}]
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"train": 3 if bad else 2, "dev": 2}


# Multi-line PTB trees: traces, function tags, indices, brackets as words, the outer wrapper.
TREES = [
    """( (S
    (NP-SBJ-1 (DT The) (NN cat) )
    (VP (VBD sat)
      (NP (-NONE- *T*-1) )
      (PP-LOC (IN on)
        (NP (DT the) (NN mat) )))
    (. .) ))""",
    """( (S (NP-SBJ (PRP We) ) (VP (VBP like) (NP (-LRB- -LRB-) (NNS apples) (-RRB- -RRB-) )) (. .) ))""",
    """(ROOT (S (NP (NNP Anna)) (VP (VBZ reads)
   (NP=2 (DT a) (NN book)))))""",
]
LINEARISED = [
    "(S (NP XX XX )NP (VP XX (PP XX (NP XX XX )NP )PP )VP XX )S",
    "(S (NP XX )NP (VP XX (NP XX XX XX )NP )VP XX )S",
    "(S (NP XX )NP (VP XX (NP XX XX )NP )VP )S",
]
WORDS = ["The cat sat on the mat .", "We like ( apples ) .", "Anna reads a book"]


def write_ptb(root: Path, bad: bool = False) -> dict[str, int]:
    """train.mrg with all trees (and, if `bad`, an unbalanced one in the middle); dev as a folder."""
    root.mkdir(parents=True, exist_ok=True)
    trees = list(TREES)
    if bad:
        trees.insert(1, "( (S (NP (DT An) (NN unclosed) (VP (VBD tree) )")
    (root / "train.mrg").write_text("\n".join(trees) + "\n")
    (root / "dev" / "00").mkdir(parents=True)
    (root / "dev" / "00" / "wsj_0001.mrg").write_text(TREES[0] + "\n" + TREES[1] + "\n")
    (root / "dev" / "00" / "wsj_0002.mrg").write_text(TREES[2] + "\n")
    return {"train": 3, "dev": 3}


# ---------------------------------------------------------------------------------------- configs

TASK_KINDS = {
    "imagenet": "image_classification",
    "wmt": "translation",
    "tsv": "translation",
    "coco": "image_captioning",
    "librispeech": "speech_recognition",
    "speech_manifest": "speech_recognition",
    "ptb": "constituency_parsing",
}


def task_entry(name: str, layout: str, path: Path, splits=("train", "dev"), **corpus: Any) -> dict:
    corpus = {"path": str(path), "layout": layout, "splits": {s: s for s in splits}, **corpus}
    if layout == "wmt":
        corpus.setdefault("source_lang", "en")
        corpus.setdefault("target_lang", "de")
    return {"name": name, "kind": TASK_KINDS[layout], "corpus": corpus, "max_input_length": 64}


def make_config(shards: Path, tasks: list[dict], **data: Any) -> Config:
    return parse_config(
        {
            "name": "pipelines-test",
            "model": {"preset": "tiny"},
            "tasks": tasks,
            "data": {"shards": str(shards), "vocab_size": 120, "shard_rows": 4, **data},
        }
    )
