"""How every command meets Ray and checks its inputs before a job starts.

`connect` is the one way `mm` starts or joins Ray. `preflight` is the sequence every job (a
training run, a sweep, a study) runs on the driver before any worker starts, so that a wrong
path, stale shards or an unreachable tracking server fail in seconds with one clear line, not
in every worker or trial.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cluster.tracking import resolve_tracking_uri
from mm.checkpoint import CheckpointError, read_vocab, verify_checkpoint
from mm.config import Config
from mm.reader import check_shards, load_manifests
from mm.shards import VOCAB, Manifest
from mm.vocab import Vocabulary


class JobError(RuntimeError):
    """A job cannot start as configured (cluster size, checkpoint path): the message says why."""


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray whose dashboard
    listens on 127.0.0.1 only. The dashboard is on because Ray Train frees the CPUs of a run
    whose controller was killed (Tune stopping a trial) through its state API: without it,
    every trial that ASHA or PBT stops keeps its workers' CPUs reserved, and a 2-CPU machine
    runs out after two."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": Ray's default would join the cluster that the last `ray start` on this machine
        # recorded in /tmp/ray, and hang on it if that cluster is gone
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", include_dashboard=True)


@dataclass
class Ready:
    """What a job starts from once its inputs are checked."""

    config: Config  # with absolute paths: workers and trials run in other directories
    vocab: Vocabulary
    manifests: dict[str, Manifest]
    tracking_uri: str


def preflight(config: Config, address: str | None = None, resume: str | Path | None = None) -> Ready:
    """Resolve the paths, load the vocabulary, check every task's shards (and the checkpoint to
    resume), then connect to Ray and find the tracking server."""
    config = config.resolved()
    vocab = Vocabulary.load(Path(config.data.shards) / VOCAB)
    manifests = load_manifests(config)
    check_shards(config, vocab, manifests)
    if resume is not None:
        check_checkpoint(Path(resume), vocab)
    connect(address)
    return Ready(config, vocab, manifests, resolve_tracking_uri(config.mlflow.tracking_uri))


def check_checkpoint(checkpoint: Path, vocab: Vocabulary) -> None:
    """The checkpoint to resume: whole (every file's sha256) and made with this vocabulary."""
    if not checkpoint.is_dir():
        raise JobError(f"--resume {checkpoint}: no such checkpoint directory")
    verify_checkpoint(checkpoint)
    saved = read_vocab(checkpoint)
    if saved is not None and Vocabulary(saved).sha256 != vocab.sha256:
        raise CheckpointError(
            f"{checkpoint} was trained with another vocabulary than {VOCAB} of the shards; "
            "resume with the shards it was trained on"
        )
