"""Sparsely-gated mixture-of-experts layer (Shazeer et al. 2017), as the MultiModel uses it.

A forward pass is four steps:

    route     noisy top-k gating: each token picks k experts and their combine weights
    dispatch  tokens go into per-expert buffers of `capacity` slots; the ones that do not fit
              are dropped (they reach the output through the caller's residual) and counted
    experts   every expert's two-layer ReLU FFN, all experts at once with batched matmuls
    combine   each token sums its experts' outputs weighted by its gates

Options beyond the paper, all off by default (the paper's layer is the default):
    z_loss_coef       router z-loss (ST-MoE): coef * mean(logsumexp(logits)^2), keeps logits small
    balance           "aux_loss" (the paper's CV² loss), "bias" (DeepSeek-V3's auxiliary-loss-free
                      balancing: a per-expert bias added to the logits for choosing experts only,
                      nudged after every training pass towards the under-loaded ones) or "both"
    shared_experts    1: a dense FFN every real token passes through beside its routed experts
                      (DeepSeekMoE)
    capacity_factor   None: dropless, every expert's buffer as long as its load
    router_fp32       the gating matmuls in fp32 under bf16 autocast
    grouped_mm        experts computed over the tokens sorted by expert, each on exactly its own
                      rows, instead of padded per-expert buffers: torch's grouped matmul on CUDA
                      (dropless routing's kernel), one matmul per expert elsewhere

Dispatch and combine belong to a dispatcher. `LocalDispatcher` keeps every expert in this
process. `ExpertParallelDispatcher` holds num_experts / W of them on each of W ranks and moves
tokens to their experts' ranks with `all_to_all_single` and back. Both drop exactly the same
tokens, so an expert-parallel layer computes what the whole layer computes on the
concatenation of every rank's tokens (rank 0's first): a token's slot in an expert's buffer is
its arrival order in that concatenation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

from mm.collectives import group_sum

NOISE_EPSILON = 1e-2  # floor of the gating noise's standard deviation, as tensor2tensor


@dataclass
class Routing:
    """Each token's choice of experts."""

    gates: Tensor  # [N, k] combine weights: softmax over the k largest (noisy) logits
    experts: Tensor  # [N, k] the chosen experts' global ids
    valid: Tensor  # [N] True for real tokens; padding is never routed
    # for the balancing loss, None where no loss is wanted (no gradient: decoding, evaluation)
    importance: Tensor | None  # [E] sum of each expert's gates over the tokens (differentiable)
    load: Tensor | None  # [E] expected tokens per expert: smooth estimate when noisy, else counts


@dataclass
class MoEStats:
    load: Tensor  # [E] tokens routed to each expert (before capacity), over the whole group
    dropped: int  # token-expert assignments that found no free slot
    assigned: int  # token-expert assignments in all

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / max(self.assigned, 1)


@dataclass
class MoEOutput:
    y: Tensor
    aux_loss: Tensor
    stats: MoEStats


class Experts(nn.Module):
    """`num` two-layer ReLU FFNs, computed together: one batched matmul per layer."""

    def __init__(self, num: int, d_model: int, hidden: int, first_id: int = 0, grouped: bool = False):
        super().__init__()
        self.first_id = first_id  # global id of the first expert held here
        self.grouped = grouped  # run with grouped matmuls (run_experts), not padded buffers
        bound1, bound2 = 1 / math.sqrt(d_model), 1 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(num, d_model, hidden).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.zeros(num, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(num, hidden, d_model).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.zeros(num, 1, d_model))

    @property
    def num(self) -> int:
        return self.w1.shape[0]

    def forward(self, x: Tensor) -> Tensor:  # [num, slots, d] -> [num, slots, d]
        return torch.baddbmm(self.b2, F.relu(torch.baddbmm(self.b1, x, self.w1)), self.w2)

    def slice(self, first: int, num: int) -> Experts:
        """A copy holding experts first .. first+num-1 (for expert parallelism)."""
        part = Experts(num, self.w1.shape[1], self.w1.shape[2], self.first_id + first, self.grouped)
        with torch.no_grad():
            for name, param in part.named_parameters():
                param.copy_(getattr(self, name)[first : first + num])
        return part


class SharedExpert(nn.Module):
    """One dense two-layer ReLU FFN that every real token goes through (DeepSeekMoE)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.relu(self.up(x)))


class MoE(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = 1.25,
        group: dist.ProcessGroup | None = None,
        eval_capacity_factor: float | None = None,
        noisy_gating: bool = True,
        balance_coef: float = 1e-2,
        z_loss_coef: float = 0.0,
        balance: str = "aux_loss",
        bias_update_rate: float = 1e-3,
        shared_experts: int = 0,
        router_fp32: bool = False,
        grouped_mm: bool = False,
    ):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"MoE needs 1 <= k <= num_experts, got k={k}, num_experts={num_experts}")
        if balance not in ("aux_loss", "bias", "both"):
            raise ValueError(f"MoE balance must be aux_loss, bias or both, not {balance!r}")
        self.num_experts, self.k = num_experts, k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.noisy_gating, self.balance_coef, self.z_loss_coef = noisy_gating, balance_coef, z_loss_coef
        self.balance, self.bias_update_rate, self.router_fp32 = balance, bias_update_rate, router_fp32
        # Shazeer et al. start both gating matrices at zero; a small random w_gate instead
        # spreads the tokens over the experts from the first step, also at evaluation.
        self.w_gate = nn.Parameter(torch.randn(d_model, num_experts) * 0.02)
        self.w_noise = nn.Parameter(torch.zeros(d_model, num_experts))
        # not learnt: a parameter without gradient, so that checkpoints and resumes carry it
        biased = balance in ("bias", "both")
        self.expert_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False) if biased else None
        self.experts = Experts(num_experts, d_model, d_hidden, grouped=grouped_mm)
        self.shared = SharedExpert(d_model, d_hidden) if shared_experts else None
        self.dispatcher: LocalDispatcher | ExpertParallelDispatcher = LocalDispatcher()
        if group is not None:
            self.shard(group)

    def shard(self, group: dist.ProcessGroup) -> None:
        """Keep only this rank's num_experts / W experts; tokens will travel to the others."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if self.num_experts % world:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by the {world} expert-parallel ranks"
            )
        per_rank = self.num_experts // world
        self.experts = self.experts.slice(rank * per_rank, per_rank)
        self.dispatcher = ExpertParallelDispatcher(group)

    def capacity(self, tokens: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return tokens
        return math.ceil(self.k * tokens * factor / self.num_experts)

    def forward(self, x: Tensor, mask: Tensor | None = None, noise: Tensor | None = None) -> MoEOutput:
        """x: [..., d]; mask: [...] True at real tokens; noise: [..., E] standard normal (tests)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        valid = torch.ones(len(x), dtype=torch.bool, device=x.device) if mask is None else mask.reshape(-1)
        # Without gradient (decoding, evaluation) no auxiliary loss can act: skip its
        # statistics, a few dozen small kernels per layer and, across expert-parallel ranks,
        # two all-reduces, at every decoded token.
        losses = torch.is_grad_enabled()
        noise = None if noise is None else noise.reshape(-1, self.num_experts)
        routing, clean = self.route(x, valid, noise, balance_stats=losses)
        y, stats = self.dispatcher(x, routing, self.experts, self.capacity)
        if self.shared is not None:
            y = y + self.shared(x) * valid.unsqueeze(1).to(x.dtype)
        if self.training and self.expert_bias is not None:
            self._update_bias(stats.load)
        aux = self.balance_loss(routing) + self.z_loss(clean, valid) if losses else x.new_zeros(())
        return MoEOutput(y.view(shape), aux, stats)

    # ------------------------------------------------------------------------------------ gating

    def route(
        self, x: Tensor, valid: Tensor, noise: Tensor | None = None, balance_stats: bool = True
    ) -> tuple[Routing, Tensor]:
        """The routing, and the clean logits (for the z-loss)."""
        clean = self._gating(x, self.w_gate)
        noisy = self.training and self.noisy_gating
        if noisy:
            noise_std = F.softplus(self._gating(x, self.w_noise)) + NOISE_EPSILON
            noise = torch.randn_like(clean) if noise is None else noise
            logits = clean + noise * noise_std
        else:
            logits = clean
        # the bias only decides which experts a token goes to, never how much they weigh
        bias = 0.0 if self.expert_bias is None else self.expert_bias.to(clean.dtype)
        choosing = logits + bias
        top_values, top_experts = choosing.topk(min(self.k + 1, self.num_experts), dim=-1)
        experts = top_experts[:, : self.k]
        gates = F.softmax(logits.gather(1, experts), dim=-1)
        if not balance_stats:
            return Routing(gates, experts, valid, None, None), clean
        real = valid.unsqueeze(1).to(gates.dtype)
        importance = (gates.new_zeros(clean.shape).scatter(1, experts, gates) * real).sum(0)
        if noisy and self.k < self.num_experts:
            load = (self._smooth_load(clean + bias, choosing, noise_std, top_values) * real).sum(0)
        else:
            load = (F.one_hot(experts, self.num_experts).sum(1).to(gates.dtype) * real).sum(0)
        return Routing(gates, experts, valid, importance, load), clean

    def _gating(self, x: Tensor, weight: Tensor) -> Tensor:
        if not self.router_fp32:
            return x @ weight
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in full precision
            return x.float() @ weight.float()

    def _smooth_load(self, clean: Tensor, noisy: Tensor, noise_std: Tensor, top_values: Tensor) -> Tensor:
        """P(expert in top-k) for each token and expert, differentiable in the gate weights.

        An expert is in the top k while its noisy logit beats the k-th largest of the others:
        the (k+1)-th largest value if it is in now, else the k-th.
        """
        threshold_if_in = top_values[:, self.k : self.k + 1]
        threshold_if_out = top_values[:, self.k - 1 : self.k]
        normal = torch.distributions.Normal(0.0, 1.0)
        prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
        prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
        return torch.where(noisy > threshold_if_in, prob_if_in, prob_if_out)

    def balance_loss(self, routing: Routing) -> Tensor:
        """coef * (CV²(importance) + CV²(load)), over every token of the expert-parallel group."""
        if self.balance == "bias":
            return routing.gates.new_zeros(())
        importance, load = self.dispatcher.sum_over_group(torch.stack([routing.importance, routing.load]))
        return self.balance_coef * (cv_squared(importance) + cv_squared(load))

    def z_loss(self, clean: Tensor, valid: Tensor) -> Tensor:
        """coef * the mean over the group's real tokens of logsumexp(router logits)²."""
        if not self.z_loss_coef:
            return clean.new_zeros(())
        z = torch.logsumexp(clean.float(), dim=-1) ** 2 * valid.float()
        total, count = self.dispatcher.sum_over_group(torch.stack([z.sum(), valid.float().sum()]))
        return self.z_loss_coef * total / count.clamp(min=1)

    @torch.no_grad()
    def _update_bias(self, load: Tensor) -> None:
        """Raise the bias of experts that got fewer tokens than the mean, lower the others'
        (DeepSeek-V3's sign update); `load` is over the whole expert-parallel group."""
        load = load.to(self.expert_bias.dtype)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation: 0 for a perfectly even distribution."""
    return x.var(unbiased=False) / (x.mean() ** 2 + 1e-10)


# ---------------------------------------------------------------------------------------- dispatch


def flat_assignments(routing: Routing) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One row per (token, choice), token-major: token ids, expert ids, gates, validity."""
    n, k = routing.experts.shape
    # expanded views copied once, not repeat_interleave: a decoded token's layer is a few
    # dozen kernels on a handful of rows, where each kernel's fixed cost is what counts
    token = torch.arange(n, device=routing.experts.device).unsqueeze(1).expand(n, k).reshape(-1)
    valid = routing.valid.unsqueeze(1).expand(n, k).reshape(-1)
    return token, routing.experts.reshape(-1), routing.gates.reshape(-1), valid


def arrival_order(expert: Tensor, valid: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """For each assignment, how many valid assignments to the same expert come before it; and
    each expert's valid assignments in all (its load)."""
    # scatter, not F.one_hot: one_hot checks the ids' range, two host round trips a call
    onehot = expert.new_zeros(len(expert), num_experts).scatter_(
        1, expert.unsqueeze(1), valid.unsqueeze(1).long()
    )
    return onehot.cumsum(0).gather(1, expert.unsqueeze(1)).squeeze(1) - 1, onehot.sum(0)


def run_experts(experts: Experts, rows: Tensor, local_expert: Tensor, slot: Tensor) -> Tensor:
    """Place rows in [experts, slots, d] buffers, run the experts, read the rows back out."""
    if experts.grouped:
        return run_experts_grouped(experts, rows, local_expert)
    slots = int(slot.max()) + 1 if len(slot) else 1
    index = local_expert * slots + slot
    buffer = rows.new_zeros(experts.num * slots, rows.shape[-1]).index_copy(0, index, rows)
    out = experts(buffer.view(experts.num, slots, -1)).view(-1, rows.shape[-1]).index_select(0, index)
    # under autocast the batched matmuls return bf16: back to the rows' dtype, so that the
    # combine's index_add (and the return trip of expert parallelism) sees one dtype
    return out.to(rows.dtype)


def run_experts_grouped(experts: Experts, rows: Tensor, local_expert: Tensor) -> Tensor:
    """The same with rows sorted by expert and each expert computing exactly its own rows: no
    slots and no padding, so a skewed (dropless) load costs only its tokens. On CUDA one
    grouped matmul per layer; elsewhere one matmul per expert over its segment, since torch's
    CPU grouped_mm is slower than those matmuls (benchmarks/moe_vs_dense.py)."""
    order = torch.argsort(local_expert, stable=True)
    counts = torch.bincount(local_expert, minlength=experts.num)
    # one dtype for both operands (autocast does not cover grouped_mm): its dtype under
    # autocast, as the padded path's batched matmuls get (CUDA's kernel wants bf16)
    device = rows.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else rows.dtype
    sorted_rows = rows.index_select(0, order).to(dtype)
    if device == "cuda":
        out = _grouped_matmuls(experts, sorted_rows, local_expert[order], counts, dtype)
    else:
        out = _matmul_per_expert(experts, sorted_rows, counts.tolist(), dtype)
    return torch.empty_like(out).index_copy(0, order, out).to(rows.dtype)  # in the rows' order


def _grouped_matmuls(experts: Experts, rows: Tensor, expert_of_row: Tensor, counts: Tensor, dtype) -> Tensor:
    offsets = counts.cumsum(0).to(torch.int32)
    w1, b1 = experts.w1.to(dtype), experts.b1[expert_of_row, 0].to(dtype)
    w2, b2 = experts.w2.to(dtype), experts.b2[expert_of_row, 0].to(dtype)
    hidden = F.relu(F.grouped_mm(rows, w1, offs=offsets) + b1)
    return F.grouped_mm(hidden, w2, offs=offsets) + b2


def _matmul_per_expert(experts: Experts, rows: Tensor, counts: list[int], dtype) -> Tensor:
    # unbind, not w1[e]: each indexing's backward would write a zero gradient of every expert
    w1, b1, w2, b2 = (p.to(dtype).unbind(0) for p in (experts.w1, experts.b1, experts.w2, experts.b2))
    outs = [
        torch.addmm(b2[e][0], F.relu(torch.addmm(b1[e][0], segment, w1[e])), w2[e])
        for e, segment in enumerate(rows.split(counts))
    ]
    return torch.cat(outs)


def dropped_count(load: Tensor, capacity: int) -> int:
    return int((load - capacity).clamp(min=0).sum())


class LocalDispatcher:
    """Every expert in this process."""

    def __call__(
        self, x: Tensor, routing: Routing, experts: Experts, capacity: Callable[[int], int]
    ) -> tuple[Tensor, MoEStats]:
        token, expert, gate, valid = flat_assignments(routing)
        cap = capacity(int(routing.valid.sum()))
        slot, load = arrival_order(expert, valid, experts.num)
        kept = (valid & (slot < cap)).nonzero().squeeze(1)  # one nonzero for the four selections
        token, expert, slot, gate = (t.index_select(0, kept) for t in (token, expert, slot, gate))
        out = run_experts(experts, x.index_select(0, token), expert, slot)
        y = torch.zeros_like(x).index_add(0, token, (out * gate.unsqueeze(1)).to(x.dtype))
        return y, MoEStats(load, dropped_count(load, cap), int(load.sum()))

    def sum_over_group(self, t: Tensor) -> Tensor:
        return t


class ExpertParallelDispatcher:
    """num_experts / W experts on each of the W ranks of `group`, tokens moved with all_to_all.

    Every rank learns every rank's per-expert counts (one small all_gather), so each can tell
    without asking which of its tokens fit: rank r's tokens for expert e take the slots after
    those of ranks 0..r-1. Only kept tokens travel.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def __call__(
        self, x: Tensor, routing: Routing, experts: Experts, capacity: Callable[[int], int]
    ) -> tuple[Tensor, MoEStats]:
        token, expert, gate, valid = flat_assignments(routing)
        num_local, num_experts = experts.num, experts.num * self.world

        arrival, my_load = arrival_order(expert, valid, num_experts)
        counts = self._gather_counts(my_load, routing.valid)  # [W, E + 1]
        load, tokens_per_rank = counts[:, :num_experts], counts[:, num_experts]
        cap = capacity(int(tokens_per_rank.sum()))
        earlier = load.cumsum(0) - load  # assignments of lower ranks, per expert
        kept = (cap - earlier).clamp(min=0).minimum(load)  # [W, E] how many each rank sends

        slot = earlier[self.rank][expert] + arrival
        keep = valid & (slot < cap)
        chosen = keep.nonzero().squeeze(1)
        order = chosen[torch.argsort(expert[chosen], stable=True)]  # by expert, hence by rank

        send = kept[self.rank].view(self.world, num_local).sum(1).tolist()
        mine = kept[:, self.rank * num_local : (self.rank + 1) * num_local]  # [W, E_local]
        receive = mine.sum(1).tolist()
        arrived = self._exchange(x.index_select(0, token[order]), receive, send)
        out = run_experts(experts, arrived, *self._arrival_slots(mine))
        returned = self._exchange(out, send, receive)

        y = torch.zeros_like(x).index_add(0, token[order], (returned * gate[order].unsqueeze(1)).to(x.dtype))
        total_load = load.sum(0)
        return y, MoEStats(total_load, dropped_count(total_load, cap), int(total_load.sum()))

    def _gather_counts(self, load: Tensor, real: Tensor) -> Tensor:
        mine = torch.cat([load, real.sum().view(1)])
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        return torch.stack(every)

    @staticmethod
    def _arrival_slots(mine: Tensor) -> tuple[Tensor, Tensor]:
        """Rows arrive grouped by source rank, then expert, then token: give each its slot."""
        sizes = mine.flatten()  # segment (source rank, local expert), rank-major
        first_slot = (mine.cumsum(0) - mine).flatten()  # slots taken by lower source ranks
        segment = torch.repeat_interleave(torch.arange(len(sizes), device=mine.device), sizes)
        segment_start = torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
        within = torch.arange(len(segment), device=mine.device) - segment_start
        local_expert = segment % mine.shape[1]
        return local_expert, first_slot[segment] + within

    def _exchange(self, rows: Tensor, receive: list[int], send: list[int]) -> Tensor:
        out = rows.new_empty(sum(receive), rows.shape[-1])
        return dist_fn.all_to_all_single(out, rows.contiguous(), receive, send, group=self.group)

    def sum_over_group(self, t: Tensor) -> Tensor:
        return group_sum(t, self.group)
