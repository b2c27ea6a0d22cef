"""`mm train`: a Ray Train job that trains the MultiModel from a config.

Everything that can be wrong is checked on the driver before a worker starts: the shards
exist for every task and were made with the current vocabulary (and the one of the checkpoint
to resume), the experts divide over the expert-parallel ranks, the cluster can place the
workers, the tracking server answers. Then a `TorchTrainer` runs `cluster.worker.train_worker`
on every worker, restarts the group from its latest checkpoint after a failure
(`cluster.max_failures`), and the driver logs the final checkpoint to the MLflow run.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.data import train_datasets
from cluster.session import JobError, preflight
from cluster.tracking import client, start_metrics_sink, start_run
from mm.checkpoint import CheckpointError, read_run_record, verify_checkpoint
from mm.config import Config


class TrainingFailed(RuntimeError):
    """Training failed and Ray Train's restarts (`cluster.max_failures`) are used up; the
    cause is chained. `checkpoint` is the latest complete one, to `--resume` from."""

    def __init__(self, restarts: int, checkpoint: Path | None):
        latest = f"latest checkpoint {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"training failed after {restarts} restart(s) (cluster.max_failures); {latest}")
        self.restarts, self.checkpoint = restarts, checkpoint


@dataclass
class TrainingResult:
    run_id: str
    tracking_uri: str
    checkpoint: Path | None
    metrics: dict[str, Any]
    seconds: float


def check_resources(config: Config) -> None:
    """More workers than the cluster can place would wait forever: say so instead."""
    import ray

    cluster = config.cluster
    needed = cluster.min_workers or cluster.workers
    available = ray.cluster_resources()
    if cluster.use_gpu and available.get("GPU", 0) < needed:
        raise JobError(f"{needed} workers need {needed} GPUs; the cluster has {available.get('GPU', 0):g}")
    cpus = needed * cluster.cpus_per_worker
    if available.get("CPU", 0) < cpus:
        raise JobError(
            f"{needed} workers x {cluster.cpus_per_worker:g} CPU need {cpus:g} CPUs; the cluster has "
            f"{available.get('CPU', 0):g} (lower cluster.workers or cluster.cpus_per_worker)"
        )


def scaling_config(config: Config):
    """Fixed `cluster.workers`, or elastic between `min_workers` and `workers`: Ray Train
    restarts the group at another size as nodes come and go, from the latest checkpoint, and
    the experts are re-sharded on load."""
    import ray.train

    cluster = config.cluster
    workers = (cluster.min_workers, cluster.workers) if cluster.min_workers else cluster.workers
    resources = {"CPU": cluster.cpus_per_worker}  # use_gpu adds one GPU per worker
    return ray.train.ScalingConfig(
        num_workers=workers, use_gpu=cluster.use_gpu, resources_per_worker=resources
    )


def train(
    config: Config,
    address: str | None = None,
    resume: str | Path | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    callbacks: list | tuple = (),
) -> TrainingResult:
    """Train `config` on the cluster. A sweep passes its trial's name and parent run (its child
    run is created here), or an existing `run_id` to continue (population-based training runs a
    trial in segments), and Tune's report callback."""
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.time()
    ready = preflight(config, address, resume)
    config, vocab, manifests, uri = ready.config, ready.vocab, ready.manifests, ready.tracking_uri
    check_resources(config)
    run_id = run_id or start_run(uri, config, run_name, parent_run_id, lineage_tags(resume))

    cluster = config.cluster
    name = f"{folder_name(run_name or config.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "vocab": vocab.proto,
            "manifests": {name: m.model_dump(mode="json") for name, m in manifests.items()},
            "metrics_sink": start_metrics_sink(uri),
            "run_id": run_id,
            "resume": str(Path(resume).absolute()) if resume else None,
        },
        scaling_config=scaling_config(config),
        run_config=ray.train.RunConfig(
            name=name,
            callbacks=list(callbacks),
            storage_path=str(cluster.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cluster.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures),
        ),
        datasets=train_datasets(config),
        dataset_config=ordered_split(),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        client(uri).set_terminated(run_id, status="FAILED")
        latest = latest_checkpoint(Path(cluster.storage_path) / name)
        raise TrainingFailed(cluster.max_failures, latest) from err
    checkpoint = Path(result.checkpoint.path) if result.checkpoint else None
    mlflow = client(uri)
    if checkpoint is not None:
        mlflow.log_artifacts(run_id, str(checkpoint), "checkpoint")
    mlflow.set_terminated(run_id)
    return TrainingResult(run_id, uri, checkpoint, dict(result.metrics or {}), time.time() - started)


def ordered_split():
    """Split every task's rows over the workers in block order, ignoring where blocks live:
    then each rank reads the same rows in the same order whenever an epoch is read again,
    which is what lets a restarted group resume on the very batches it would have seen.
    (By default Ray Data hands a block to whichever worker is nearest, which varies.)"""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


RESUMED_FROM, RESUMED_FROM_RUN = "mm.resumed_from", "mm.resumed_from_run"


def lineage_tags(resume: str | Path | None) -> dict[str, str]:
    """A resumed run is a new MLflow run that names where it came from: the checkpoint, and the
    run that wrote it (recorded in the checkpoint's run.json)."""
    if resume is None:
        return {}
    tags = {RESUMED_FROM: str(Path(resume).absolute())}
    origin = read_run_record(resume).get("mlflow_run_id")
    if origin:
        tags[RESUMED_FROM_RUN] = origin
    return tags


def latest_checkpoint(run_folder: Path) -> Path | None:
    """The newest checkpoint of a Ray Train run folder that is whole (every file's sha256)."""
    for candidate in sorted(run_folder.glob("checkpoint_*"), reverse=True):
        try:
            verify_checkpoint(candidate)
        except CheckpointError:
            continue  # being written when the run died
        return candidate
    return None


def folder_name(run_name: str) -> str:
    """A run name as one folder name: "ptb alone / seed 0" -> "ptb_alone_seed_0"."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_name).strip("_") or "run"


def _train_worker(loop_config: dict[str, Any]) -> None:
    # imported inside the worker: the driver need not import torch's training stack twice
    from cluster.worker import train_worker

    train_worker(loop_config)
