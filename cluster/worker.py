"""The function every Ray Train worker runs: one rank of the MultiModel's training.

Each rank builds the same model (same seed), keeps its share of the experts, resumes from
Ray Train's latest checkpoint when there is one (re-sharding the experts if the worker group
changed size), then runs `mm.train.fit` over its share of every task's shards. Rank 0 prints
the progress line and logs to MLflow; every rank takes part in evaluation and checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from typing import Any

import numpy as np
import torch

from cluster.data import ray_stream
from cluster.tracking import MetricsBuffer
from mm.build import task_specs
from mm.checkpoint import load_checkpoint, read_stream_positions, save_checkpoint, save_stream_positions
from mm.config import Config, parse_config
from mm.evaluate import score_task
from mm.metrics import aggregate_score, count_routing, scores_by_task
from mm.model import MultiModel, matmul_peak_gflops
from mm.parallel import DataExpertParallel, SingleProcess
from mm.reader import EVAL_SPLIT, TaskStream, evaluation_batches, read_rows, train_rows
from mm.shards import Manifest
from mm.train import StepLog, Trainer, fit
from mm.vocab import Vocabulary


def expert_parallel_size(world: int, num_experts: int, configured: int | None) -> int:
    """Ranks that share one copy of the experts: the configured size, or the whole worker group,
    cut down to what divides both the group and the experts (an elastic group can be any size)."""
    return math.gcd(math.gcd(configured or world, world), num_experts)


def train_worker(loop_config: dict[str, Any]) -> None:
    import ray.data
    import ray.train
    import ray.train.torch

    ray.data.DataContext.get_current().enable_progress_bars = False  # rank 0 prints its own line
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = parse_config(loop_config["config"], source="job config")
    vocab = Vocabulary(loop_config["vocab"])
    manifests = {name: Manifest.model_validate(m) for name, m in loop_config["manifests"].items()}
    specs = task_specs(config, vocab, manifests)
    device = ray.train.torch.get_device() if config.cluster.use_gpu else torch.device("cpu")
    torch.set_num_threads(max(1, int(config.cluster.cpus_per_worker)))

    torch.manual_seed(config.seed)  # every rank starts from the same weights
    model = MultiModel(config.model, specs, vocab.size)
    parallel = SingleProcess()
    if world > 1:
        ep_size = expert_parallel_size(world, config.model.moe.num_experts, config.cluster.expert_parallel)
        parallel = DataExpertParallel(ep_size, device)
        parallel.parallelize(model)
    model.to(device)
    trainer = Trainer(model, config, train_rows(manifests), parallel, device)
    streams = {
        spec.name: ray_stream(
            spec,
            ray.train.get_dataset_shard(spec.name),
            config.task(spec.name).batch_size,
            config.train.batch_by == "tokens",
            config.task(spec.name).max_input_length,
            seed=config.seed + rank,
            window=config.train.sort_window,
        )
        for spec in specs
    }
    resumed_from, positioned = _resume(trainer, streams, rank, world, loop_config.get("resume"))
    records = task_records(specs, manifests)
    run = _Run(config, trainer, vocab, specs, rank, world, loop_config, records, streams)
    if rank == 0 and resumed_from is not None:
        print(
            f"[mm] resumed at step {trainer.step} with {world} workers from {resumed_from}; {positioned}",
            flush=True,
        )
        resumed = {"train/resumed_at_step": trainer.step, "train/workers": world}
        run.metrics.add(trainer.step + 1, resumed, replay=False)
    fit(trainer, lambda task: next(streams[task]).to(device), run.on_step, run.evaluate, run.save)


def task_records(specs, manifests: dict[str, Manifest]) -> list[dict[str, Any]]:
    """What a checkpoint needs to answer requests without the shards: each task's spec, class
    names and input features (image size, mel settings)."""
    return [
        {
            **dataclasses.asdict(spec),
            "class_names": manifests[spec.name].class_names,
            "features": manifests[spec.name].features,
        }
        for spec in specs
    ]


def _resume(trainer: Trainer, streams: dict[str, TaskStream], rank: int, world: int, initial: str | None):
    """Continue from this run's latest checkpoint (after a restart), else from `--resume`:
    weights, optimiser, schedule and each data stream's position. Returns where from (None
    for a fresh start) and how the data streams were placed."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and initial is None:
        return None, ""
    if checkpoint is None:
        return initial, _load(trainer, streams, initial, rank, world)
    with checkpoint.as_directory() as directory:
        return checkpoint.path, _load(trainer, streams, directory, rank, world)


def _load(trainer: Trainer, streams: dict[str, TaskStream], directory, rank: int, world: int) -> str:
    trainer.load_state_dict(load_checkpoint(directory, trainer.model, trainer.optimizer))
    return position_streams(streams, read_stream_positions(directory), rank, world)


def position_streams(streams: dict[str, TaskStream], saved: dict[int, dict], rank: int, world: int) -> str:
    """Put each stream where this rank's was when the checkpoint was written. A group of another
    size splits the rows another way, so no saved position applies: every stream then starts
    the epoch after the furthest one any rank had begun."""
    mine = saved.get(rank)
    if mine is not None and mine["world"] == world:
        for task, state in mine["positions"].items():
            if task in streams:
                streams[task].load_state_dict(state)
        return "streams resume where they were"
    if not saved:  # a checkpoint from before streams were saved
        return "streams start over"
    for task, stream in streams.items():
        begun = [r["positions"][task]["epoch"] for r in saved.values() if task in r["positions"]]
        stream.start_at_epoch(max(begun, default=-1) + 1)
    return f"streams start a new epoch (saved by {len(saved)} ranks, {world} now)"


class _Run:
    """What happens around each step on this rank: progress, metrics, evaluation, checkpoints."""

    def __init__(
        self,
        config: Config,
        trainer: Trainer,
        vocab: Vocabulary,
        specs,
        rank,
        world,
        loop_config,
        records,
        streams: dict[str, TaskStream],
    ):
        self.config, self.trainer, self.vocab = config, trainer, vocab
        self.task_records = records
        self.rank, self.world = rank, world
        self.specs = {spec.name: spec for spec in specs}
        self.run_id = loop_config["run_id"]
        self.metrics = MetricsBuffer(loop_config["metrics_sink"], self.run_id) if rank == 0 else None
        self.last_loss: dict[str, float] = {}
        self.window: list[StepLog] = []
        self.step_seconds: list[float] = []
        self.step_flops: list[float] = []
        self.peak_gflops: float | None = None  # one worker's matmul peak, measured once
        self.first_step_at: float | None = None  # when this attempt's first step began
        self.routing: dict[str, list[list[int]]] = {}
        self.dev = self._evaluation_sets()
        self.latest_eval: dict[str, float] = {}
        self.streams = streams  # their positions go into every checkpoint

    def _evaluation_sets(self):
        limit = self.config.train.eval_examples
        sets = {}
        for name, spec in self.specs.items():
            rows = read_rows(self.config.data.shards, name, EVAL_SPLIT, limit)
            sets[name] = evaluation_batches(
                spec, rows, self.rank, self.world, self.config.task(name).batch_size
            )
        return sets

    def on_step(self, log: StepLog) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time() - log.seconds
        self.step_seconds.append(log.seconds)
        self.step_flops.append(log.flops)
        self.last_loss[log.task] = log.loss
        self.window.append(log)
        count_routing(self.routing, log.task, log.expert_load)  # which experts each task uses
        if self.metrics is not None:
            self.metrics.add(log.step, {f"train/{log.task}/loss": log.loss})
        if log.step % self.config.train.log_every == 0:
            self._log_window(log.step)

    def _log_window(self, step: int) -> None:
        seconds = sum(log.seconds for log in self.window)
        examples = sum(log.examples for log in self.window) * self.world
        summary = {
            "throughput/examples_per_s": examples / max(seconds, 1e-9),
            "moe/dropped_fraction": sum(log.dropped_fraction for log in self.window) / len(self.window),
            "train/lr": self.window[-1].lr,
            "train/grad_norm": self.window[-1].grad_norm,
            "train/aux_loss": self.window[-1].aux_loss,
        }
        self.window = []
        if self.metrics is not None:
            self.metrics.add(step, summary)
            losses = "  ".join(f"{task} {loss:.3f}" for task, loss in sorted(self.last_loss.items()))
            print(
                f"[mm] step {step}/{self.config.train.steps}  "
                f"{summary['throughput/examples_per_s']:.1f} ex/s  {losses}",
                flush=True,
            )

    def evaluate(self, step: int) -> dict[str, float]:
        started = time.perf_counter()
        scores = {}
        for name, batches in self.dev.items():
            task = self.config.task(name)
            result = score_task(self.trainer.model, task, batches, self.vocab, parallel=self.trainer.parallel)
            scores.update({f"eval/{name}/{metric}": value for metric, value in result.items()})
        if self.metrics is not None:
            self.metrics.add(step, scores)
            print(
                f"[mm] step {step}: evaluated in {time.perf_counter() - started:.1f}s  {_short(scores)}",
                flush=True,
            )
        self.latest_eval = scores
        return scores

    def save(self, step: int, scores: dict[str, float] | None) -> None:
        import ray.train

        parallel = self.trainer.parallel
        writes_experts = self.rank < getattr(parallel, "ep_size", 1)  # the first group's ranks
        reported = {
            "step": step,
            "mlflow_run_id": self.run_id,
            **self._objective(),
            **self.latest_eval,
            **{f"train/{t}/loss": v for t, v in self.last_loss.items()},
            **self._timing(),
        }
        with tempfile.TemporaryDirectory() as directory:
            positions = {task: stream.state_dict() for task, stream in self.streams.items()}
            save_stream_positions(directory, self.rank, self.world, positions)
            if self.rank == 0 or writes_experts:
                save_checkpoint(
                    directory,
                    self.trainer.model,
                    self.trainer.optimizer,
                    self.trainer.state_dict(),
                    config=self.config.model_dump(mode="json"),
                    vocab=self.vocab.proto,
                    tasks=self.task_records,
                    run={"mlflow_run_id": self.run_id, "step": step},
                    write_dense=self.rank == 0,
                    write_experts=writes_experts,
                )
            checkpoint = ray.train.Checkpoint.from_directory(directory)  # every rank's streams
            last = step == self.config.train.steps
            if last:
                # MLflow before the last report: a sweep's trial ends as soon as Tune has it,
                # and what is not logged by then is lost. A restart in between replays these
                # steps from the checkpoint before, and exact resume makes them the same.
                self._commit_metrics(routing=True)
            ray.train.report(reported, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:07d}")
        if not last:
            # after the report: MLflow never runs ahead of the latest checkpoint, so the steps
            # it holds are the ones a restart (on fewer workers, too) continues from
            self._commit_metrics()

    def _commit_metrics(self, routing: bool = False) -> None:
        if self.metrics is not None:
            self.metrics.commit()
            if routing:
                self.metrics.log_dict(self.routing, "routing.json")

    def _objective(self) -> dict[str, float]:
        """The sweep's objective: the mean over tasks of each primary dev metric, normalised."""
        if not self.latest_eval:
            return {}
        scores = scores_by_task(self.latest_eval)
        primary = self.config.primary_metrics()
        return {"objective": aggregate_score(scores, primary, self.config.tune.reference)}

    def _timing(self) -> dict[str, float]:
        """Steady-state step time (the first steps warm up), when the first step began, and the
        FLOP/s of this attempt's steps over all workers beside their matmul peak (MFU)."""
        steady = self.step_seconds[len(self.step_seconds) // 5 :] or self.step_seconds
        median = float(np.median(steady))
        if self.peak_gflops is None:  # every rank at once, as they share the machine when training
            dtype = torch.bfloat16 if self.config.train.precision == "bf16" else torch.float32
            device = self.trainer.device.type
            # On CPU a 1024² matmul reaches the GFLOP/s of a 2048² one (one thread: 89 and 81
            # against 75 and 80) at an eighth of the cost, which was 2 s of each worker in each
            # run; a GPU needs 8192² (as benchmarks/gpu_check) to come near its peak.
            size = 8192 if device == "cuda" else 1024
            self.peak_gflops = matmul_peak_gflops(dtype, device, size=size)
        gflops = sum(self.step_flops) * self.world / max(sum(self.step_seconds), 1e-9) / 1e9
        return {
            "perf/step_seconds": median,
            "perf/first_step_at": self.first_step_at or 0.0,
            "perf/train_gflops": gflops,
            "perf/mfu": gflops / (self.peak_gflops * self.world),
        }


def _short(scores: dict[str, float]) -> str:
    return "  ".join(f"{key.removeprefix('eval/')} {value:.3g}" for key, value in sorted(scores.items()))
