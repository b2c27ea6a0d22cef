"""MoE layer vs a dense FFN of the same active FLOPs, forward + backward.

MoE: 16 experts, k=2, capacity factor 1.25, d=256, expert hidden 1024, 4096 tokens. Dense: one
FFN with hidden 2 x 1024, so each token sees the same number of weights. Median of repeated runs
in the same process. Goal: ratio <= 1.5 on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import compare, emit
from mm.moe import MoE

D, HIDDEN, EXPERTS, K, TOKENS = 256, 1024, 16, 2, 4096


def main() -> None:
    torch.manual_seed(0)
    moe = MoE(D, HIDDEN, EXPERTS, K, capacity_factor=1.25).train()
    dense = nn.Sequential(nn.Linear(D, K * HIDDEN), nn.ReLU(), nn.Linear(K * HIDDEN, D))
    x = torch.randn(TOKENS, D, requires_grad=True)
    dropped = []

    def moe_step():
        out = moe(x)
        (out.y.sum() + out.aux_loss).backward()
        dropped.append(out.stats.dropped_fraction)

    def dense_step():
        dense(x).sum().backward()

    moe_s, dense_s = compare(moe_step, dense_step, repeats=9)
    emit(
        {
            "benchmark": "moe_vs_dense",
            "ratio": moe_s / dense_s,
            "moe_ms": 1000 * moe_s,
            "dense_ms": 1000 * dense_s,
            "dropped_fraction": sum(dropped) / len(dropped),
            "threads": torch.get_num_threads(),
        }
    )


if __name__ == "__main__":
    main()
