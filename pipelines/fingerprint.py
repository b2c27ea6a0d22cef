"""Fingerprints: what decides whether prepared shards (or the vocabulary) are up to date.

A fingerprint is the sha256 of a JSON document naming everything the output depends on: the
pipeline and reader versions, the settings, and every file of the corpus by relative path,
size and modification time (contents are not read: hashing ImageNet would cost as much as
preparing it). Hidden files are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Bumped when the shared machinery changes what it writes: every task is prepared again.
PIPELINE_VERSION = 2  # 2: training items shuffled


def digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_listing(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every non-hidden file under `root`, sorted."""
    listing = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            stat = os.stat(path)
            listing.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns))
    return sorted(listing)


class SourceFingerprints:
    """Corpus fingerprints, each corpus walked once per `prepare` call (the vocabulary and the
    task both need it)."""

    def __init__(self) -> None:
        self._cache: dict[Path, str] = {}

    def __call__(self, corpus: Path) -> str:
        corpus = Path(corpus).resolve()
        if corpus not in self._cache:
            self._cache[corpus] = digest(file_listing(corpus))
        return self._cache[corpus]
