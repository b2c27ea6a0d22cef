"""Data and expert parallelism over torch.distributed, kept apart from the model.

W ranks train data-parallel. The experts of every MoE layer are split over expert-parallel
groups of P ranks (P divides W): ranks g*P .. g*P+P-1 form group g, each holds num_experts / P
experts, and tokens travel within the group (see `mm.moe.ExpertParallelDispatcher`). With
P < W every expert has W / P replicas, one per group, at the same position in each group.

Gradients, with every rank minimising its own mean loss and the job the mean over ranks:
  - dense parameters: averaged over all W ranks (one flat all-reduce);
  - expert parameters: already summed over the P ranks whose tokens they saw (the all-to-all's
    backward does that), so averaged over their replicas and divided by P, never mixed with
    another expert's.
Clipping uses the global norm: every dense gradient once, every expert's once.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mm.moe import Experts, MoE


class Parallel(Protocol):
    rank: int
    world: int

    def sync_gradients(self, model: nn.Module) -> None: ...
    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float: ...
    def mean(self, value: float) -> float: ...
    def sum(self, values: list[float]) -> list[float]: ...
    def gather(self, obj: Any) -> list[Any]: ...
    def all_done(self, done: bool) -> bool: ...


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) parameters, each in a fixed order."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    dense = [p for p in model.parameters() if id(p) not in expert_ids]
    experts = [p for p in model.parameters() if id(p) in expert_ids]
    return dense, experts


def _squared_norm(params: list[nn.Parameter], device: torch.device | str = "cpu") -> Tensor:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    # one foreach kernel over all gradients, not two small kernels per parameter
    return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True).float().square()


def _scale(params: list[nn.Parameter], norm: float, max_norm: float | None) -> None:
    if max_norm is None or not math.isfinite(norm) or norm <= max_norm:
        return
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm), foreach=True)


class SingleProcess:
    rank, world = 0, 1

    def sync_gradients(self, model: nn.Module) -> None:
        pass

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        params = list(model.parameters())
        norm = float(_squared_norm(params).sqrt())
        _scale(params, norm, max_norm)
        return norm

    def mean(self, value: float) -> float:
        return value

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def all_done(self, done: bool) -> bool:
        return done


class DataExpertParallel:
    def __init__(self, expert_parallel: int | None = None, device: torch.device | str = "cpu"):
        if not dist.is_initialized():
            raise RuntimeError("DataExpertParallel needs torch.distributed.init_process_group first")
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.device = torch.device(device)  # where collectives' own tensors live (cuda for NCCL)
        self.ep_size = expert_parallel or self.world
        if self.world % self.ep_size:
            raise ValueError(
                f"expert-parallel size {self.ep_size} does not divide the world size {self.world}"
            )
        self.replicas = self.world // self.ep_size
        self.ep_group = self._my_group(
            [range(g * self.ep_size, (g + 1) * self.ep_size) for g in range(self.replicas)]
        )
        self.replica_group = self._my_group(
            [range(i, self.world, self.ep_size) for i in range(self.ep_size)] if self.replicas > 1 else []
        )

    def _my_group(self, rank_sets: list[range]) -> dist.ProcessGroup | None:
        """Every rank must create every group, in the same order; keep the one holding us."""
        mine = None
        for ranks in rank_sets:
            group = dist.new_group(list(ranks)) if len(ranks) < self.world else dist.group.WORLD
            if self.rank in ranks:
                mine = group
        return mine

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Keep only this rank's experts of every MoE layer."""
        for module in model.modules():
            if isinstance(module, MoE):
                module.shard(self.ep_group)
        return model

    def sync_gradients(self, model: nn.Module) -> None:
        dense, experts = split_parameters(model)
        self._all_reduce_grads([p for p in dense if p.grad is not None], None, self.world)
        with_grads = [p for p in experts if p.grad is not None]
        if self.replicas > 1:
            self._all_reduce_grads(with_grads, self.replica_group, self.replicas)
        for p in with_grads:
            p.grad.div_(self.ep_size)

    @staticmethod
    def _all_reduce_grads(params: list[nn.Parameter], group, divide_by: int) -> None:
        if not params:
            return
        flat = _flatten_dense_tensors([p.grad for p in params])
        dist.all_reduce(flat, group=group)
        flat.div_(divide_by)
        for p, synced in zip(params, _unflatten_dense_tensors(flat, [p.grad for p in params])):
            p.grad.copy_(synced)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        dense, experts = split_parameters(model)
        expert_squared = _squared_norm(experts, self.device)
        dist.all_reduce(expert_squared, group=self.ep_group)  # each expert once per group
        norm = float((_squared_norm(dense, self.device) + expert_squared).sqrt())
        _scale(dense + experts, norm, max_norm)
        return norm

    def mean(self, value: float) -> float:
        return self.sum([value])[0] / self.world

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (small Python objects: decoded outputs for corpus metrics)."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_done(self, done: bool) -> bool:
        return self.sum([0.0 if done else 1.0])[0] == 0.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: the rendezvous of a process group
    started on one machine (`init_method=f"tcp://127.0.0.1:{port}"`)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
