"""What more experts cost the demo's training: the starter step on 2 expert-parallel ranks.

Two gloo processes with one thread each, as the demo's two Ray Train workers: each holds
num_experts / 2 experts of every MoE layer and trains the starter model (forward, backward,
the MoE all-to-alls, gradient sync, clipping, Adam) on batches of the starter's train shards,
the tasks in the order the config's sampler draws them. One model per `--experts` count
(the first is the baseline), all in the same two processes; their timed blocks of steps take
turns, so that drift in the machine's load falls on each alike. Without Ray and Ray Data: this
measures the model's side only.

Prints one JSON line: steps/s per expert count, and each count's steps/s ÷ the baseline's.
Issue 14's bar for the starter: more experts only if that costs under 10 % of throughput.
Needs the starter shards (`make demo`, or `mm starter && mm prepare configs/starter.yaml`).
"""

from __future__ import annotations

import argparse
import os
import statistics
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import emit, seconds, shard_tasks, train_streams
from mm.config import load_config
from mm.model import MultiModel
from mm.parallel import DataExpertParallel, free_port
from mm.reader import train_rows
from mm.train import Trainer

WORLD = 2


def rank_main(rank: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", f"tcp://127.0.0.1:{port}", timedelta(seconds=300), world_size=WORLD, rank=rank
    )
    configs = {
        e: load_config(args.config, [*args.override, f"model.moe.num_experts={e}"]) for e in args.experts
    }
    config = configs[args.experts[0]]
    vocab, manifests, specs = shard_tasks(config)
    trainers = {}
    for experts, variant in configs.items():
        torch.manual_seed(config.seed)
        parallel = DataExpertParallel()
        model = parallel.parallelize(MultiModel(variant.model, specs, vocab.size))
        trainers[experts] = Trainer(model, variant, train_rows(manifests), parallel)
    # each rank its own batches (every other one of the stream), the same for every model
    streams = train_streams(config, specs)
    sampler = next(iter(trainers.values())).sampler
    steps = args.warmup + args.block * args.repeats
    tasks = [sampler.task_at(i) for i in range(steps)]
    batches = [[next(streams[t]) for _ in range(WORLD)][rank] for t in tasks]

    def run(trainer: Trainer, chunk: list) -> float:
        queue = iter(chunk)
        dist.barrier()
        return seconds(lambda: [trainer.train_step(lambda task: next(queue)) for _ in chunk])

    times: dict[int, list[float]] = {e: [] for e in trainers}
    for trainer in trainers.values():
        run(trainer, batches[: args.warmup])
    for r in range(args.repeats):
        chunk = batches[args.warmup + r * args.block : args.warmup + (r + 1) * args.block]
        for experts, trainer in trainers.items():
            times[experts].append(run(trainer, chunk))
    results[rank] = {e: args.block / statistics.median(t) for e, t in times.items()}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/starter.yaml")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16], help="the first: the baseline")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per expert count")
    parser.add_argument("-o", "--override", action="append", default=[], help="config override a.b=value")
    args = parser.parse_args()
    uneven = [e for e in args.experts if e % WORLD]
    if uneven:  # checked here: inside the two spawned ranks it would be two tracebacks
        parser.error(f"--experts {uneven}: each count must split evenly over the {WORLD} ranks")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(free_port(), args, results), nprocs=WORLD, join=True)
    # a step ends for both ranks at once (its collectives): the slower rank's rate is the rate
    rate = {e: min(results[r][e] for r in range(WORLD)) for e in args.experts}
    base = rate[args.experts[0]]
    emit(
        {
            "benchmark": "experts",
            "steps_per_s": {str(e): r for e, r in rate.items()},
            "relative": {str(e): r / base for e, r in rate.items()},
            "baseline_experts": args.experts[0],
            "ranks": WORLD,
            "threads_per_rank": 1,
            "steps_timed": args.block * args.repeats,
        }
    )


if __name__ == "__main__":
    main()
