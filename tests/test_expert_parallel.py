"""Expert parallelism on real processes: the sharded layer computes what the whole layer
computes on every rank's tokens together, and a training step on 2 or 4 ranks updates the
parameters exactly as one process does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from mm.collectives import group_sum
from mm.moe import MoE
from mm.parallel import DataExpertParallel, SingleProcess, split_parameters
from mm.selftest import selftest_config
from mm.synthetic import SyntheticData, synthetic_tasks
from mm.train import Trainer

from conftest import tiny_model
from distributed import run_distributed

D, HIDDEN, EXPERTS, K = 16, 32, 8, 2
TOKENS_PER_RANK = [13, 7, 10, 6]  # uneven on purpose: all_to_all splits differ per rank
TOL = {"atol": 1e-5, "rtol": 1e-5}


OPTIONS = {  # the paper's layer, and every option beyond it
    "nothing dropped": {"capacity_factor": 4.0},
    "many dropped": {"capacity_factor": 0.5},
    "dropless": {"capacity_factor": None},
    "z-loss and bias balancing": {"capacity_factor": 0.5, "z_loss_coef": 1e-2, "balance": "both"},
    "bias balancing only": {"capacity_factor": 1.0, "balance": "bias", "bias_update_rate": 0.1},
    "shared expert": {"capacity_factor": 0.5, "shared_experts": 1},
    "fp32 router": {"capacity_factor": 1.0, "router_fp32": True},
    "grouped matmul, dropless": {"capacity_factor": None, "grouped_mm": True},
    "grouped matmul, dropping": {"capacity_factor": 0.5, "grouped_mm": True},
}


def whole_and_sharded_layer_agree(rank: int, world: int) -> None:
    for options in OPTIONS.values():
        whole_and_sharded_layer_agree_with(rank, world, options)


def whole_and_sharded_layer_agree_with(rank: int, world: int, options: dict) -> None:
    torch.manual_seed(0)
    whole = MoE(D, HIDDEN, EXPERTS, K, **options).train()
    capacity_factor = options["capacity_factor"]
    counts = TOKENS_PER_RANK[:world]
    x = torch.randn(sum(counts), D)
    noise = torch.randn(sum(counts), EXPERTS)
    weights = torch.randn(sum(counts), D)  # the loss: a random projection of the outputs

    sharded = copy.deepcopy(whole)
    sharded.shard(dist.group.WORLD)
    mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))

    ref = whole(x, noise=noise)
    ((ref.y * weights).sum() + ref.aux_loss).backward()
    out = sharded(x[mine], noise=noise[mine])
    # every rank adds aux / W: the all-reduce's backward sums the ranks' shares back to one
    ((out.y * weights[mine]).sum() + out.aux_loss / world).backward()

    torch.testing.assert_close(out.y, ref.y[mine], **TOL)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, **TOL)
    assert out.stats.load.tolist() == ref.stats.load.tolist()
    assert out.stats.dropped == ref.stats.dropped
    if capacity_factor is None:
        assert ref.stats.dropped == 0
    elif capacity_factor < 1:
        assert ref.stats.dropped > 0, "the test should drop tokens"
    if whole.expert_bias is not None:  # updated from the group's load: the same on every rank
        assert whole.expert_bias.abs().sum() > 0
        torch.testing.assert_close(sharded.expert_bias, whole.expert_bias, **TOL)
    per_rank = EXPERTS // world
    experts = slice(rank * per_rank, (rank + 1) * per_rank)
    for name in ("w1", "b1", "w2", "b2"):
        torch.testing.assert_close(
            getattr(sharded.experts, name).grad, getattr(whole.experts, name).grad[experts], **TOL
        )
    dense = {n: p for n, p in whole.named_parameters() if p.requires_grad and not n.startswith("experts.")}
    for name, param in sharded.named_parameters():
        if name in dense:  # dense: each rank holds its tokens' share
            grad = param.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, dense[name].grad, **TOL)
    # as decoding runs it: no gradient, so no losses and none of their all-reduces
    with torch.inference_mode():
        decoded, whole_decoded = sharded.eval()(x[mine]), whole.eval()(x)
    torch.testing.assert_close(decoded.y, whole_decoded.y[mine], **TOL)
    assert decoded.stats.load.tolist() == whole_decoded.stats.load.tolist()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_layer_equals_the_whole_layer_with_every_moe_option(world):
    run_distributed(whole_and_sharded_layer_agree, world)


def training_step_matches_single_process(rank: int, world: int, expert_parallel: int) -> None:
    overrides = {"moe": {"noisy_gating": False, "num_experts": 4}}
    if expert_parallel < world:  # replicas: each group balances and drops on its own tokens
        overrides["moe"].update(capacity_factor=8.0, balance_coef=0.0)
    config = selftest_config(steps=1, seed=0)
    config.train.grad_clip = 0.05  # small enough to clip: the global norm must be right
    task = next(t for t in synthetic_tasks() if t.kind == "image_captioning")  # fixed-length targets
    for t in config.tasks:
        t.mix_weight = 1.0 if t.name == task.name else 0.0
    batch = SyntheticData(seed=7).batch(task, 4 * world)
    mine = batch.chunks(world)[rank]

    single = tiny_model(seed=0, **overrides)
    sharded = copy.deepcopy(single)
    parallel = DataExpertParallel(expert_parallel)
    parallel.parallelize(sharded)

    # gradients after sync, and the global norm, equal one process's on the whole batch
    single(batch).loss.backward()
    sharded(mine).loss.backward()
    # the step's loss rides in the gradients' all-reduce: the mean of every rank's
    norm, loss = parallel.sync_gradients(sharded, None, loss=float(rank))
    assert norm == pytest.approx(SingleProcess().sync_gradients(single, None, 0.0)[0], rel=1e-5)
    assert loss == pytest.approx((world - 1) / 2)
    assert_same_parameters(sharded, single, rank, expert_parallel, grads=True)

    # one full Trainer step (sync, global-norm clipping, Adam) gives the same parameters
    single.zero_grad(), sharded.zero_grad()
    Trainer(single, config).train_step(lambda _: batch)
    Trainer(sharded, config, parallel=parallel).train_step(lambda _: mine)
    assert_same_parameters(sharded, single, rank, expert_parallel, grads=False)


def assert_same_parameters(sharded, single, rank: int, expert_parallel: int, grads: bool) -> None:
    get = (lambda p: p.grad) if grads else (lambda p: p.detach())
    dense_sharded, experts_sharded = split_parameters(sharded)
    dense_single, experts_single = split_parameters(single)
    for a, b in zip(dense_sharded, dense_single, strict=True):
        if b.grad is not None or not grads:
            torch.testing.assert_close(get(a), get(b), atol=2e-5, rtol=1e-4)
    position = rank % expert_parallel
    for a, b in zip(experts_sharded, experts_single, strict=True):
        per_rank = len(b) // expert_parallel
        torch.testing.assert_close(
            get(a), get(b)[position * per_rank : (position + 1) * per_rank], atol=2e-5, rtol=1e-4
        )


@pytest.mark.parametrize("world, expert_parallel", [(2, 2), (4, 2)], ids=["2-ranks", "4-ranks-2-replicas"])
def test_training_step_on_ranks_equals_the_single_process_step(world, expert_parallel):
    run_distributed(training_step_matches_single_process, world, expert_parallel)


def evaluation_on_ranks_equals_the_single_process_one(rank: int, world: int) -> None:
    from mm.evaluate import evaluate_task

    single = tiny_model(seed=0, moe={"noisy_gating": False, "num_experts": 4})
    sharded = copy.deepcopy(single)
    parallel = DataExpertParallel(world)
    parallel.parallelize(sharded)
    for kind, metrics in (("image_classification", ["accuracy"]), ("translation", ["bleu"])):
        task = next(t for t in synthetic_tasks() if t.kind == kind)
        rows = SyntheticData(seed=3).batch(task, 12 * world)
        # contiguous shares, as `mm.reader.evaluation_batches` cuts them: gathered in rank
        # order they are the whole set in its order, so even the seeded resamples agree
        batches, mine = rows.chunks(3), rows.chunks(world)[rank].chunks(3)
        whole = evaluate_task(single, task.name, batches, metrics, max_len=8, intervals=True)
        split = evaluate_task(sharded, task.name, mine, metrics, max_len=8, parallel=parallel, intervals=True)
        assert set(split) == {metrics[0], f"{metrics[0]}_low", f"{metrics[0]}_high"}
        assert split == pytest.approx(whole)
        assert split[f"{metrics[0]}_low"] <= split[metrics[0]] <= split[f"{metrics[0]}_high"]
    # without intervals, only the metrics
    assert set(evaluate_task(sharded, task.name, mine, metrics, max_len=8, parallel=parallel)) == {"bleu"}


@pytest.mark.parametrize("world", [2])
def test_evaluation_with_intervals_on_ranks_equals_the_single_process_one(world):
    run_distributed(evaluation_on_ranks_equals_the_single_process_one, world)


def group_sum_is_the_all_reduce_it_replaces(rank: int, world: int) -> None:
    x = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1) + 0.1 * rank
    x.requires_grad_(True)
    total = group_sum(x)
    expected = x.detach().clone()
    dist.all_reduce(expected)
    if world == 2:  # a + b either way: the same bits
        assert torch.equal(total, expected)
    torch.testing.assert_close(total, expected)
    assert all(torch.equal(total, other) for other in DataExpertParallel().gather(total.detach()))
    # every rank uses the sum alike, as the MoE's losses do: each input's gradient is then the
    # all-reduce of the same upstream gradient, which is that gradient times the world size
    (total * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    assert x.grad.tolist() == [1.0 * world, -2.0 * world, 0.5 * world]
    # the float64 sums that evaluation and the stopping test use
    assert DataExpertParallel().sum([float(rank), 1.0]) == [world * (world - 1) / 2, float(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_group_sum_is_the_all_reduce_it_replaces(world):
    run_distributed(group_sum_is_the_all_reduce_it_replaces, world)
