"""The MoE layer in one process: routing, capacity, balancing loss, gradients."""

import math

import pytest
import torch

from mm.moe import MoE, cv_squared


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer computed expert by expert, token by token: no buffers, no batching."""
    routing = moe.route(x, torch.ones(len(x), dtype=torch.bool))
    e = moe.experts
    out = torch.zeros_like(x)
    for token in range(len(x)):
        for gate, expert in zip(routing.gates[token], routing.experts[token]):
            hidden = torch.relu(x[token] @ e.w1[expert] + e.b1[expert, 0])
            out[token] += gate * (hidden @ e.w2[expert] + e.b2[expert, 0])
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_large_capacity_drops_nothing_and_matches_expert_by_expert_loop(k):
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=6, k=k, capacity_factor=100.0).eval()
    moe.eval_capacity_factor = 100.0
    x = torch.randn(40, 16)
    out = moe(x)
    assert out.stats.dropped == 0
    assert out.stats.assigned == 40 * k
    assert int(out.stats.load.sum()) == 40 * k
    torch.testing.assert_close(out.y, reference_moe(moe, x), atol=1e-5, rtol=1e-5)


def routed_moe(num_experts: int = 4, k: int = 1, capacity_factor: float = 1.0) -> MoE:
    """A layer whose gate sends token t to expert argmax(x_t): route by construction."""
    moe = MoE(num_experts, 8, num_experts=num_experts, k=k, capacity_factor=capacity_factor)
    with torch.no_grad():
        moe.w_gate.copy_(torch.eye(num_experts) * 10)
    moe.noisy_gating = False
    return moe


def test_small_capacity_drops_the_tokens_a_hand_count_predicts():
    moe = routed_moe(num_experts=4, k=1, capacity_factor=1.0).train()
    # 8 tokens: expert 0 gets 5, expert 1 gets 2, expert 2 gets 1, expert 3 none.
    choices = [0, 0, 1, 0, 2, 0, 1, 0]
    x = torch.eye(4)[choices] + 0.01 * torch.randn(8, 4)
    capacity = math.ceil(1 * 8 * 1.0 / 4)  # 2 slots per expert
    assert moe.capacity(8) == capacity
    out = moe(x)
    assert out.stats.load.tolist() == [5, 2, 1, 0]
    assert out.stats.dropped == 5 - capacity
    assert out.stats.dropped_fraction == pytest.approx(3 / 8)
    # the first two of expert 0's tokens (in token order) were computed, the later three dropped
    kept = out.y.abs().sum(1) > 0
    assert kept.tolist() == [True, True, True, False, True, False, True, False]


def test_padding_is_never_routed_and_does_not_take_capacity():
    moe = routed_moe(num_experts=4, k=1, capacity_factor=1.0).train()
    x = torch.eye(4)[[0, 0, 0, 0, 1, 2, 3, 3]]
    mask = torch.tensor([True, False, False, True, True, True, True, True])
    out = moe(x, mask)
    assert out.stats.load.tolist() == [2, 1, 1, 2]
    assert out.stats.dropped == 0  # 6 real tokens: capacity 2 each, all fit
    assert out.y[~mask].abs().sum() == 0


def test_balancing_loss_is_zero_when_balanced_and_grows_when_skewed():
    assert float(cv_squared(torch.tensor([5.0, 5.0, 5.0, 5.0]))) == pytest.approx(0.0)
    moe = routed_moe(num_experts=4, k=1).eval()
    balanced = torch.eye(4).repeat(8, 1)
    skewed = torch.eye(4)[[0] * 29 + [1, 2, 3]]
    assert float(moe(balanced).aux_loss) < 1e-4
    assert float(moe(skewed).aux_loss) > 0.01


def test_gradients_reach_both_gating_matrices_and_every_used_expert():
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=4, k=2).train()
    out = moe(torch.randn(64, 16))
    (out.y.pow(2).sum() + out.aux_loss).backward()
    assert moe.w_gate.grad.abs().sum() > 0
    assert moe.w_noise.grad.abs().sum() > 0  # only through the smooth load estimate
    used = out.stats.load > 0
    assert (moe.experts.w1.grad.abs().sum((1, 2))[used] > 0).all()


def test_k_larger_than_experts_is_rejected():
    with pytest.raises(ValueError, match="k <= num_experts"):
        MoE(8, 8, num_experts=2, k=3)
