"""Two ranks against one, without Ray: where the demo's second worker goes.

The starter config's training step, one thread per process, measured three ways:
  - one process alone;
  - two independent processes side by side (what sharing the machine costs, no talking);
  - two gloo ranks with data + expert parallelism, as the demo's Ray Train workers run.
Each rank skips `3 * rank` batches of every task first, so the ranks hold different batches
(and wait for each other) as in training. Prints examples/s of each, `speedup` (two ranks ÷ one
process) and the milliseconds a 2-rank step spends in each kind of collective, waits
included (the first collective after uneven work absorbs the wait). Needs the starter shards
(`mm starter && mm prepare configs/starter.yaml`).
"""

from __future__ import annotations

import argparse
import collections
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import emit, shard_tasks, train_streams
from mm.config import ConfigError, load_config
from mm.model import MultiModel
from mm.parallel import DataExpertParallel, free_port
from mm.reader import train_rows
from mm.shards import ShardError
from mm.train import Trainer
from mm.vocab import VocabularyError

COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather", "all_gather_into_tensor")


def timed_collectives() -> dict[str, float]:
    """Wrap this process's torch.distributed collectives to add up their seconds."""
    spent: dict[str, float] = collections.defaultdict(float)
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - started

        setattr(dist, name, timed)
    return spent


def measure(rank: int, world: int, port: int | None, config, steps: int, results) -> None:
    """One process's examples/s (and, on gloo ranks, its collectives' milliseconds a step)."""
    torch.set_num_threads(1)
    spent = timed_collectives()
    parallel = None
    if port is not None:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=120),
        )  # fmt: skip
    vocab, manifests, specs = shard_tasks(config)
    torch.manual_seed(config.seed)
    model = MultiModel(config.model, specs, vocab.size)
    if port is not None:
        parallel = DataExpertParallel(world)
        parallel.parallelize(model)
    trainer = Trainer(model, config, train_rows(manifests), parallel)
    streams = train_streams(config, specs)
    for stream in streams.values():
        for _ in range(3 * rank):
            next(stream)
    for _ in range(max(steps // 5, 10)):  # warm-up: allocations, every task's FLOP count
        trainer.train_step(lambda task: next(streams[task]))
    spent.clear()
    examples, started = 0, time.perf_counter()
    for _ in range(steps):
        examples += trainer.train_step(lambda task: next(streams[task])).examples
    seconds = time.perf_counter() - started
    results.put((rank, examples / seconds, {k: v / steps * 1000 for k, v in spent.items()}))
    if port is not None:
        dist.destroy_process_group()


def run(world: int, talk: bool, config, steps: int) -> list[tuple[int, float, dict]]:
    """`world` forked processes (they inherit the parsed config), joined by gloo if `talk`."""
    context = mp.get_context("fork")
    results = context.SimpleQueue()
    port = free_port() if talk else None
    processes = [
        context.Process(target=measure, args=(rank, world, port, config, steps, results))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode:
            raise RuntimeError(f"a measuring process exited with {process.exitcode}")
    return sorted(results.get() for _ in processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/starter.yaml")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    try:  # a wrong path or missing shards: one line here, not a traceback in every process
        config = load_config(args.config)
        shard_tasks(config)
    except (ConfigError, ShardError, VocabularyError) as err:
        parser.error(str(err))
    ((_, alone, _),) = run(1, False, config, args.steps)
    side_by_side = run(2, False, config, args.steps)
    ranks = run(2, True, config, args.steps)
    two_ranks = sum(rate for _, rate, _ in ranks)
    emit(
        {
            "benchmark": "two_ranks",
            "speedup": two_ranks / alone,
            "examples_per_s": {
                "one_process": alone,
                "two_processes_side_by_side": sum(rate for _, rate, _ in side_by_side),
                "two_ranks": two_ranks,
            },
            "collective_ms_per_step": {
                name: max(spent.get(name, 0.0) for _, _, spent in ranks) for name in COLLECTIVES
            },
            "threads_per_process": 1,
        }
    )


if __name__ == "__main__":
    main()
