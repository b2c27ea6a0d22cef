"""Run a function on W real processes joined by a gloo process group (CPU)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mm.parallel import free_port


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args) -> None:
    """`fn(rank, world, *args)` on `world` processes; an exception in any fails the caller.

    The processes are forked, as DataLoader workers are: they start with torch and the test's
    modules already imported (spawning re-imports them, seconds per process on 2 cores), and
    each sets one thread before any torch op, which keeps OpenMP fork-safe."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(
        _entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="fork"
    )
