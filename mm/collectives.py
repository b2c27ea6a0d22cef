"""Sums of a few numbers over ranks, made for what gloo's collectives cost on a CPU.

Between the two processes of the demo, gloo's all-reduce of four floats takes about 1.5 ms, as
long as a third of the all-reduce of all 1.5 M dense gradients, while an all-gather of the same
four floats takes 0.6 ms (`python -m benchmarks.two_ranks` lists a step's collectives). So a
small sum is an all-gather, added up locally in rank order: every rank adds the same numbers in
the same order and holds the same result, and with two ranks it is bit for bit what the
all-reduce gave (a + b either way).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def group_sum(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The sum of `t` over the ranks of `group` (the world by default), differentiable.

    Its backward assumes what the MoE's balancing and z-losses do: every rank uses the sum in
    the same way, so every rank's gradient of it is the same. The gradient each rank's input
    gets is then the all-reduce of those gradients, which is that gradient times the group
    size: computed locally, with no second collective in the backward pass.
    """
    return _GroupSum.apply(t, group)


class _GroupSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.ranks = dist.get_world_size(group)
        every = t.new_empty(ctx.ranks * t.numel())
        dist.all_gather_into_tensor(every, t.contiguous().view(-1), group=group)
        return every.view(ctx.ranks, *t.shape).sum(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.ranks, None
