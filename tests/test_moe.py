"""The MoE layer in one process: routing, capacity, balancing loss, gradients."""

import math

import pytest
import torch

from mm.moe import MoE, Routing, arrival_order, cv_squared, flat_assignments


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer computed expert by expert, token by token: no buffers, no batching."""
    routing, _ = moe.route(x, torch.ones(len(x), dtype=torch.bool))
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


def test_each_assignment_gets_its_arrival_slot_and_each_expert_its_load_padding_left_out():
    # 4 tokens, k=2, the third is padding: (token, choice) rows are token-major
    routing = Routing(
        gates=torch.full((4, 2), 0.5),
        experts=torch.tensor([[0, 1], [1, 0], [0, 1], [1, 2]]),
        valid=torch.tensor([True, True, False, True]),
        importance=None,
        load=None,
    )
    token, expert, gate, valid = flat_assignments(routing)
    assert token.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert valid.tolist() == [True, True, True, True, False, False, True, True]
    slot, load = arrival_order(expert, valid, num_experts=3)
    real = valid.nonzero().squeeze(1)
    assert slot[real].tolist() == [0, 0, 1, 1, 2, 0]  # experts 0, 1, 1, 0, 1, 2
    assert load.tolist() == [2, 3, 1]  # the padding token's two choices count nowhere


def test_balancing_loss_is_zero_when_balanced_and_grows_when_skewed():
    assert float(cv_squared(torch.tensor([5.0, 5.0, 5.0, 5.0]))) == pytest.approx(0.0)
    moe = routed_moe(num_experts=4, k=1).eval()
    balanced = torch.eye(4).repeat(8, 1)
    skewed = torch.eye(4)[[0] * 29 + [1, 2, 3]]
    assert float(moe(balanced).aux_loss) < 1e-4
    assert float(moe(skewed).aux_loss) > 0.01


def test_without_gradient_the_layer_computes_the_same_and_skips_its_auxiliary_losses():
    """Decoding and evaluation run without gradient: the output and the routing statistics
    are those of a pass with gradient, and the balancing and z-losses are not computed."""
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=2, z_loss_coef=1e-3, shared_experts=1).eval()
    x = torch.randn(4, 8)[torch.tensor([0] * 20 + [1, 2, 3])]  # skewed: the losses are large
    with_grad = moe(x)
    assert float(with_grad.aux_loss) > 0.01
    with torch.inference_mode():
        without = moe(x)
    assert float(without.aux_loss) == 0.0
    torch.testing.assert_close(without.y, with_grad.y)
    assert without.stats.load.tolist() == with_grad.stats.load.tolist()
    assert without.stats.dropped == with_grad.stats.dropped


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


# ------------------------------------------------------------------------ options beyond the paper


def test_bias_balancing_moves_a_skewed_routing_towards_even_load_without_changing_the_gates():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=1, capacity_factor=None, balance="bias", bias_update_rate=0.02)
    moe.noisy_gating = False
    with torch.no_grad():
        moe.w_gate.normal_(0, 0.5)
    moe.train()
    x = torch.randn(256, 8) + 0.5  # shifted inputs: expert 1 wins more than half the tokens
    before = moe(x).stats.load.float()
    assert before.tolist() == [24, 144, 11, 77]
    for _ in range(100):
        after = moe(x).stats.load.float()
    assert cv_squared(after) < 0.01 * cv_squared(before)
    assert moe.expert_bias[1] < 0 < moe.expert_bias[2]
    assert float(moe(x).aux_loss) == 0.0  # bias only: no balancing loss
    # the bias picks the experts; the chosen experts' weights come from the unbiased logits
    moe.k = 2
    routing, clean = moe.route(x, torch.ones(256, dtype=torch.bool))
    torch.testing.assert_close(routing.gates, torch.softmax(clean.gather(1, routing.experts), dim=-1))
    assert not moe.expert_bias.requires_grad
    evaluated = moe.expert_bias.clone()
    moe.k = 1
    moe.eval()(x)
    assert torch.equal(moe.expert_bias, evaluated)  # only training passes move it


def test_z_loss_is_the_squared_log_partition_of_the_router_logits():
    moe = MoE(8, 16, num_experts=4, k=2, balance="bias", z_loss_coef=1e-3).train()
    with torch.no_grad():
        moe.w_gate.zero_()
    x = torch.randn(10, 8)
    # zero logits: logsumexp = log E for every token
    assert float(moe(x).aux_loss) == pytest.approx(1e-3 * math.log(4) ** 2)
    with torch.no_grad():
        moe.w_gate.normal_(0, 3.0)
    assert float(moe(x).aux_loss) > 1e-3 * math.log(4) ** 2  # large logits cost more
    assert float(MoE(8, 16, 4, balance="bias").train()(x).aux_loss) == 0.0  # off by default


def test_a_shared_expert_adds_its_output_to_every_real_token_and_nothing_to_padding():
    torch.manual_seed(0)
    routed = MoE(8, 16, num_experts=4, k=2, capacity_factor=None).eval()
    shared = MoE(8, 16, num_experts=4, k=2, capacity_factor=None, shared_experts=1).eval()
    shared.load_state_dict(routed.state_dict(), strict=False)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    difference = shared(x, mask).y - routed(x, mask).y
    torch.testing.assert_close(difference[mask], shared.shared(x[mask]))
    assert difference[~mask].abs().sum() == 0


def test_dropless_routing_drops_no_token_however_skewed():
    moe = routed_moe(num_experts=4, k=1, capacity_factor=1.0)
    moe.capacity_factor = None
    x = torch.eye(4)[[0] * 7 + [1]] + 0.01 * torch.randn(8, 4)
    out = moe.train()(x)
    assert out.stats.load.tolist() == [7, 1, 0, 0] and out.stats.dropped == 0
    assert bool((out.y.abs().sum(1) > 0).all())


def test_an_fp32_router_under_bf16_autocast_routes_in_fp32_and_returns_the_inputs_dtype():
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=4, k=2, router_fp32=True).train()
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing, clean = moe.route(x, torch.ones(12, dtype=torch.bool))
        out = moe(x)
    assert clean.dtype == torch.float32 and routing.gates.dtype == torch.float32
    assert out.y.dtype == x.dtype
    out.y.float().sum().backward()
    assert moe.w_gate.grad is not None


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_grouped_matmul_experts_compute_what_the_padded_buffers_compute(capacity_factor):
    torch.manual_seed(0)
    padded = MoE(16, 32, num_experts=4, k=2, capacity_factor=capacity_factor).train()
    grouped = MoE(16, 32, num_experts=4, k=2, capacity_factor=capacity_factor, grouped_mm=True).train()
    grouped.load_state_dict(padded.state_dict())
    x = torch.randn(30, 16)
    x[:20] += 2.0  # a skewed load
    noise = torch.randn(30, 4)
    weights = torch.randn(30, 16)
    outs = []
    for moe in (padded, grouped):
        out = moe(x, noise=noise)
        ((out.y * weights).sum() + out.aux_loss).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].y, outs[0].y, atol=1e-5, rtol=1e-5)
    assert outs[1].stats.dropped == outs[0].stats.dropped
    for (name, a), (_, b) in zip(padded.named_parameters(), grouped.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_the_cuda_grouped_kernel_path_computes_what_the_per_expert_matmuls_compute():
    """CUDA runs the grouped path as torch's grouped_mm, other devices as one matmul per
    expert; torch's grouped_mm also runs on CPU, so both are compared here, an expert with no
    rows included, forward and backward."""
    from mm.moe import Experts, _grouped_matmuls, _matmul_per_expert

    torch.manual_seed(0)
    experts = Experts(4, 16, 32)
    expert_of_row = torch.tensor([0] * 7 + [1] * 2 + [3] * 5)  # expert 2 gets nothing
    counts = torch.bincount(expert_of_row, minlength=4)
    rows = torch.randn(len(expert_of_row), 16)
    weights = torch.randn(len(expert_of_row), 16)
    results = []
    for run in (
        lambda: _grouped_matmuls(experts, rows, expert_of_row, counts, torch.float32),
        lambda: _matmul_per_expert(experts, rows, counts.tolist(), torch.float32),
    ):
        experts.zero_grad()
        out = run()
        (out * weights).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in experts.parameters()]))
    (grouped, grouped_grads), (looped, looped_grads) = results
    torch.testing.assert_close(looped, grouped, atol=1e-5, rtol=1e-5)
    for a, b in zip(grouped_grads, looped_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
