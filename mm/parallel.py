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
Clipping uses the global norm: every dense gradient once, every expert's once. The experts'
squared norm and the step's loss ride in the dense gradients' all-reduce: on gloo a separate
all-reduce of one number costs about a quarter of that one (`mm.collectives`).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mm.collectives import group_sum
from mm.moe import Experts, MoE


class Parallel(Protocol):
    rank: int
    world: int

    def sync_gradients(
        self, model: nn.Module, max_norm: float | None, loss: float
    ) -> tuple[float, float]: ...
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

    def sync_gradients(self, model: nn.Module, max_norm: float | None, loss: float) -> tuple[float, float]:
        """Clip the gradients to `max_norm` by their global norm: (that norm, `loss`)."""
        params = list(model.parameters())
        norm = float(_squared_norm(params).sqrt())
        _scale(params, norm, max_norm)
        return norm, loss

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

    def sync_gradients(self, model: nn.Module, max_norm: float | None, loss: float) -> tuple[float, float]:
        """Average the gradients over the ranks (as in the module's docstring), clip them to
        `max_norm` by their global norm, and average this rank's `loss` over the ranks:
        (the norm before clipping, the mean loss). Every rank must hold gradients for the same
        dense parameters (they all train the same task in a step)."""
        dense, experts = ([p for p in params if p.grad is not None] for params in split_parameters(model))
        if self.replicas > 1:
            self._all_reduce_grads(experts, self.replica_group, self.replicas)
        for p in experts:
            p.grad.div_(self.ep_size)
        # each rank's experts are its own: their squared norms add up over the ranks, once for
        # every replica of an expert
        extras = torch.stack([_squared_norm(experts, self.device), torch.tensor(loss, device=self.device)])
        expert_squared, loss_sum = self._all_reduce_grads(dense, None, self.world, extras)
        norm = float((_squared_norm(dense, self.device) + expert_squared / self.replicas).sqrt())
        _scale(dense + experts, norm, max_norm)
        return norm, float(loss_sum) / self.world

    @staticmethod
    def _all_reduce_grads(
        params: list[nn.Parameter], group, divide_by: int, extras: Tensor | None = None
    ) -> Tensor | None:
        """Sum the gradients over `group`, divided by `divide_by`; `extras` (a few numbers of
        the gradients' dtype) are summed alongside, undivided, and returned."""
        tensors = [p.grad for p in params] + ([] if extras is None else [extras])
        if not tensors:
            return None
        flat = _flatten_dense_tensors(tensors)
        dist.all_reduce(flat, group=group)
        grads = flat[: len(flat) - (0 if extras is None else len(extras))]
        grads.div_(divide_by)
        for p, synced in zip(params, _unflatten_dense_tensors(grads, [p.grad for p in params])):
            p.grad.copy_(synced)
        return None if extras is None else flat[len(grads) :]

    def sum(self, values: list[float]) -> list[float]:
        return group_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

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
