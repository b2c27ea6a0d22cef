"""Model FLOPs utilisation of the starter config's training step, per task and for the mixture.

One process, `--threads` torch threads, `--dtype` fp32 or bf16 (autocast, fp32 master weights,
as `train.precision: bf16`). For each task, `--steps` real training steps (forward, backward,
gradient clipping, Adam) on batches of the task's train shards; the FLOPs of each of those
batches are counted with PyTorch's FlopCounterMode (as `mm.model.training_flops`) before the
timed run. The peak is this same process's median GFLOP/s on a 2048² matmul in that dtype and
thread count, so the ratio holds on any machine. On a GPU (`--device cuda`) both run there.

Prints one JSON line: the mixture's figures at the top level (steps drawn by the config's
task sampler), each task's in `tasks`. FlopCounterMode counts matmuls and convolutions, not
elementwise work (the body's depthwise taps): compare code changes by `steps_per_s` too.
Needs the starter shards (`make demo`, or `mm starter && mm prepare configs/starter.yaml`).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import emit, shard_tasks, train_streams
from mm.config import load_config
from mm.model import MultiModel, matmul_peak_gflops, training_flops
from mm.reader import train_rows
from mm.train import Trainer


def achieved_gflops(trainer: Trainer, batches: list, device: str) -> tuple[float, float]:
    """Real training steps on `batches` (the first two warm up): GFLOP/s and steps/s."""
    queue = iter(batches)
    flops = [training_flops(trainer.model, b) * len(b) for b in batches]
    for _ in range(2):
        trainer.train_step(lambda task: next(queue))
    started = time.perf_counter()
    for _ in batches[2:]:
        trainer.train_step(lambda task: next(queue))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return sum(flops[2:]) / seconds / 1e9, len(batches[2:]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/starter.yaml")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=30, help="timed steps per task and for the mixture")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--override", action="append", default=[], help="config override a.b=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, [f"train.precision={args.dtype}", *args.override])
    vocab, manifests, specs = shard_tasks(config)
    streams = train_streams(config, specs)
    torch.manual_seed(config.seed)
    model = MultiModel(config.model, specs, vocab.size).to(args.device)
    trainer = Trainer(model, config, train_rows(manifests), device=args.device)

    def batches_of(task: str) -> list:
        return [next(streams[task]).to(args.device) for _ in range(args.steps + 2)]

    per_task = {}
    for spec in specs:
        sampler_task_at = trainer.sampler.task_at
        trainer.sampler.task_at = lambda step, name=spec.name: name  # this task at every step
        per_task[spec.name] = achieved_gflops(trainer, batches_of(spec.name), args.device)
        trainer.sampler.task_at = sampler_task_at
    first = trainer.step
    mixture = [next(streams[trainer.sampler.task_at(first + i)]) for i in range(args.steps + 2)]
    mixed, steps_per_s = achieved_gflops(trainer, [b.to(args.device) for b in mixture], args.device)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    peak = matmul_peak_gflops(dtype, args.device)
    emit(
        {
            "benchmark": "mfu",
            "mfu": mixed / peak,
            "gflops": mixed,
            "peak_gflops": peak,
            "dtype": args.dtype,
            "threads": args.threads,
            "device": args.device,
            "d_model": config.model.d_model,
            "steps_per_s": steps_per_s,
            "tasks": {
                name: {"gflops": g, "mfu": g / peak, "steps_per_s": rate}
                for name, (g, rate) in per_task.items()
            },
        }
    )


if __name__ == "__main__":
    main()
