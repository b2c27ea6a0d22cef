"""Publishing a task's shards atomically.

A task's new shards are built in a private staging directory beside the published ones, on
the same file system:

    <shards>/.staging/<token>/<task>/.incoming/<split>/<random>.parquet   written by the sink
    <shards>/.staging/<token>/<task>/<split>/part-00000.parquet           numbered on publish
    <shards>/.staging/<token>/<task>/manifest.json

and only when every split is complete and within the rejection limit is that `<task>` folder
swapped with the published `<shards>/<task>` (two renames). Readers look for
`<shards>/<task>/<split>/part-*.parquet`, which nothing under `.staging` matches, so a killed
run leaves nothing a reader would take, and the previous shards stay until the new ones are
complete. If the process dies between the two renames, the next run puts the old shards back.
One run at a time prepares a task (`task_lock`), so one never clears away another's staging.
"""

from __future__ import annotations

import fcntl
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mm.shards import Manifest, task_dir, write_manifest
from pipelines.sink import Part

STAGING = ".staging"
INCOMING = ".incoming"
OLD = ".old"


class TaskBusy(RuntimeError):
    """Another process is preparing the same task into the same shards folder."""


@contextmanager
def task_lock(root: Path, task: str) -> Iterator[None]:
    """Hold `<shards>/.staging/<task>.lock` while preparing `task` (released if the process dies)."""
    path = Path(root) / STAGING / f"{task}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TaskBusy(f"task {task!r}: another `mm prepare` is preparing it into {root}") from None
        yield


class Staging:
    """The new shards of one task while they are built."""

    def __init__(self, root: Path, task: str):
        self.root, self.task = Path(root), task
        self.token_dir = self.root / STAGING / uuid.uuid4().hex[:12]
        self.dir = self.token_dir / task
        self.dir.mkdir(parents=True)

    def incoming(self, split: str) -> Path:
        """Where the sink writes a split's parts."""
        return self.dir / INCOMING / split

    def publish(self, parts: dict[str, list[Part]], manifest: Manifest) -> None:
        """Number the parts, write the manifest, swap the task folder into place."""
        for split, split_parts in parts.items():
            folder = self.dir / split
            folder.mkdir()
            for number, part in enumerate(split_parts):
                Path(part.path).rename(folder / f"part-{number:05d}.parquet")
        shutil.rmtree(self.dir / INCOMING, ignore_errors=True)
        write_manifest(self.token_dir, manifest)
        swap_into_place(self.dir, task_dir(self.root, self.task))

    def discard(self) -> None:
        shutil.rmtree(self.token_dir, ignore_errors=True)


def swap_into_place(new: Path, live: Path) -> None:
    old = new.with_name(new.name + OLD)
    if live.exists():
        live.rename(old)
    new.rename(live)
    shutil.rmtree(old, ignore_errors=True)


def clean_up_staging(root: Path, task: str) -> None:
    """Remove what killed runs left behind for `task`, first restoring its published shards if
    a run died in the middle of the swap."""
    staging = Path(root) / STAGING
    live = task_dir(root, task)
    for token_dir in sorted(p for p in staging.iterdir() if p.is_dir()) if staging.is_dir() else []:
        new, old = token_dir / task, token_dir / (task + OLD)
        if old.is_dir() and not live.exists():
            old.rename(live)  # the run died between the two renames of the swap
        if new.exists() or old.exists():
            shutil.rmtree(token_dir, ignore_errors=True)
