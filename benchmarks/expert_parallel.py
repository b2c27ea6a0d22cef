"""Expert parallelism: the same global tokens through an MoE layer on 2 ranks vs 1 rank.

Forward + backward of one MoE layer (E=8, k=2, d=256, hidden 1024) on 8192 global tokens:
one process with 1 thread holding every expert, against 2 processes with 1 thread each,
4096 tokens and 4 experts per rank, tokens exchanged with all_to_all over gloo. Speed-up is
the single rank's median step time over the slower rank's; all_to_all_share is the part of a
rank's step spent in the all_to_all calls (forward and backward), from the PyTorch profiler.
Goal: speedup >= 1.6 on 2 cores.
"""

from __future__ import annotations

import os
import statistics
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import emit, seconds
from mm.moe import MoE
from mm.parallel import free_port

D, HIDDEN, EXPERTS, K, TOKENS, REPEATS = 256, 1024, 8, 2, 8192, 11


def make_layer() -> MoE:
    torch.manual_seed(0)
    return MoE(D, HIDDEN, EXPERTS, K, capacity_factor=1.25).train()


def step(layer: MoE, x: torch.Tensor) -> None:
    out = layer(x)
    (out.y.pow(2).mean() + out.aux_loss).backward()


def median_step(layer: MoE, x: torch.Tensor) -> float:
    for _ in range(2):
        step(layer, x)
    return statistics.median(seconds(lambda: step(layer, x)) for _ in range(REPEATS))


def all_to_all_share(layer: MoE, x: torch.Tensor) -> float:
    with torch.profiler.profile() as prof:
        total = seconds(lambda: step(layer, x))
    # the backend's own record of each exchange (the autograd and c10d wrappers around it
    # would count the same time again)
    exchange_us = sum(
        e.cpu_time_total for e in prof.key_averages() if e.key in ("gloo:all_to_all", "nccl:all_to_all")
    )
    return exchange_us / 1e6 / total


def rank_main(rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    address = f"tcp://127.0.0.1:{port}"
    dist.init_process_group(
        "gloo", init_method=address, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    layer = make_layer()
    layer.shard(dist.group.WORLD)
    x = torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1))[rank::world].contiguous()
    x.requires_grad_(True)
    dist.barrier()
    step_s = median_step(layer, x)
    share = all_to_all_share(layer, x)
    results[rank] = (step_s, share)
    dist.destroy_process_group()


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    whole = make_layer()
    x = torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    single = median_step(whole, x)

    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(2, free_port(), results), nprocs=2, join=True)
    slowest = max(results[r][0] for r in range(2))
    emit(
        {
            "benchmark": "expert_parallel",
            "speedup": single / slowest,
            "all_to_all_share": statistics.mean(results[r][1] for r in range(2)),
            "one_rank_ms": 1000 * single,
            "two_ranks_ms": 1000 * slowest,
            "tokens": TOKENS,
        }
    )


if __name__ == "__main__":
    main()
