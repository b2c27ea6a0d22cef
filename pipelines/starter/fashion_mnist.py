"""Fashion-MNIST (``dataset-fashion-mnist``, IDX files) as ImageNet class folders of PNGs."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.starter.common import Size, StarterError, progress, seeded, shuffled

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
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
