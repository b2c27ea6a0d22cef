"""Ray Train's overhead: steady-state steps/s of the starter config under a TorchTrainer with
one worker, divided by the same loop (`mm.train.fit` over the same shards) in a plain process.

Both use one thread (`cluster.cpus_per_worker: 1`) and the same batches' sizes; both time each
step from fetching its batch to the optimiser step, and take the median after the first fifth
(warm-up). startup_s is the wall time from `train()` to the worker's first step (Ray start-up
of the worker group, dataset split, model build). Needs the starter shards (`make demo`, or
`mm starter && mm prepare configs/starter.yaml`). Goal: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.common import emit, shard_tasks, train_streams
from cluster.job import train
from cluster.session import connect
from mm.config import load_config
from mm.model import MultiModel
from mm.reader import train_rows
from mm.train import Trainer, fit


def overrides(steps: int, tmp: str) -> list[str]:
    return [
        f"train.steps={steps}",
        f"train.eval_every={10 * steps}",
        f"train.checkpoint_every={10 * steps}",
        f"train.log_every={steps}",
        "cluster.workers=1",
        "cluster.cpus_per_worker=1",
        f"cluster.storage_path={tmp}/runs",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        f"mlflow.artifact_location=file://{tmp}/artifacts",
    ]


def plain_step_seconds(config) -> float:
    torch.set_num_threads(1)
    vocab, manifests, specs = shard_tasks(config)
    torch.manual_seed(config.seed)
    trainer = Trainer(
        MultiModel(config.model, specs, vocab.size),
        config,
        train_rows(manifests),
    )
    streams = train_streams(config, specs)
    seconds: list[float] = []
    fit(trainer, lambda task: next(streams[task]), on_step=lambda log: seconds.append(log.seconds))
    return statistics.median(seconds[len(seconds) // 5 :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/starter.yaml")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.config, overrides(args.steps, tmp))
        plain = plain_step_seconds(config)
        connect(num_cpus=2)
        started = time.time()
        result = train(config)
        ray_step = result.metrics["perf/step_seconds"]
        emit(
            {
                "benchmark": "train_overhead",
                "ratio": plain / ray_step,
                "startup_s": result.metrics["perf/first_step_at"] - started,
                "plain_steps_per_s": 1 / plain,
                "ray_steps_per_s": 1 / ray_step,
                "steps": args.steps,
            }
        )


if __name__ == "__main__":
    main()
