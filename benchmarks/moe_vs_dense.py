"""MoE layer vs a dense FFN of the same active FLOPs, forward + backward, for every MoE option.

MoE: 16 experts, k=2, d=256, expert hidden 1024, 4096 tokens. Dense: one FFN with hidden
2 x 1024, so each token sees the same number of weights (with a shared expert the dense FFN
gets a third 1024 too). Options: the paper's layer (capacity factor 1.25), dropless
(`capacity_factor: null`), a shared expert, z-loss + bias balancing; each with padded
per-expert buffers, and with `grouped_mm` (each expert computes only its own rows: on CPU one
matmul per expert). Median of repeated runs in the same process, interleaved with the
dense baseline. One JSON line; `ratio` is the paper layer's, `variants` holds each option's.
Goal: ratio <= 1.2 on CPU for every option.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import compare, emit
from mm.moe import MoE

D, HIDDEN, EXPERTS, K, TOKENS = 256, 1024, 16, 2, 4096
OPTIONS = {
    "paper": {"capacity_factor": 1.25},
    "dropless": {"capacity_factor": None},
    "shared_expert": {"capacity_factor": 1.25, "shared_experts": 1},
    "z_loss_bias": {"capacity_factor": 1.25, "z_loss_coef": 1e-3, "balance": "both"},
}
# every option twice: padded per-expert buffers (the paper's batched experts), and each expert
# on exactly its own rows (`grouped_mm`)
VARIANTS = {
    **OPTIONS,
    **{f"{name}_grouped_mm": {**options, "grouped_mm": True} for name, options in OPTIONS.items()},
}


def measure(options: dict, x: torch.Tensor) -> dict:
    torch.manual_seed(0)
    moe = MoE(D, HIDDEN, EXPERTS, K, **options).train()
    active = K * HIDDEN + (HIDDEN if options.get("shared_experts") else 0)
    dense = nn.Sequential(nn.Linear(D, active), nn.ReLU(), nn.Linear(active, D))
    dropped = []

    def moe_step():
        out = moe(x)
        (out.y.sum() + out.aux_loss).backward()
        dropped.append(out.stats.dropped_fraction)

    def dense_step():
        dense(x).sum().backward()

    moe_s, dense_s = compare(moe_step, dense_step, repeats=9)
    return {
        "ratio": moe_s / dense_s,
        "moe_ms": 1000 * moe_s,
        "dense_ms": 1000 * dense_s,
        "dropped_fraction": sum(dropped) / len(dropped),
    }


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(TOKENS, D, requires_grad=True)
    variants = {name: measure(options, x) for name, options in VARIANTS.items()}
    emit(
        {
            "benchmark": "moe_vs_dense",
            **variants["paper"],
            "variants": variants,
            "threads": torch.get_num_threads(),
        }
    )


if __name__ == "__main__":
    main()
