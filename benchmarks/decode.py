"""Incremental greedy decoding vs recomputing the whole prefix at every step.

Tokens per second of 64 greedy steps with the tiny config (EOS suppressed so every row runs
all 64), with the decoder's cached state, divided by the same 64 tokens recomputed from the
full prefix each step, the two runs taking turns (median of 9 each). Goal: ratio >= 3.

Incremental steps of so few hypotheses run on one thread (`mm.decoding.small_steps_on_one_thread`,
as every caller of `generate` gets them); the recompute, whose steps grow with the prefix,
keeps the process's threads. `threads` is the process's count, `incremental_threads` what the
incremental steps used.
"""

from __future__ import annotations

import torch

from benchmarks.common import compare, emit
from mm.batch import EOS
from mm.config import ModelConfig
from mm.decoding import small_steps_on_one_thread
from mm.model import MultiModel
from mm.synthetic import VOCAB_SIZE, SyntheticData, synthetic_tasks

TOKENS, BATCH = 64, 8


def main() -> None:
    torch.manual_seed(0)
    tasks = synthetic_tasks()
    model = MultiModel(ModelConfig(preset="tiny"), tasks, VOCAB_SIZE).eval()
    with torch.no_grad():
        model.text_out.bias[EOS] = -1e9  # never stop early: both runs decode all 64 tokens
    batch = SyntheticData(0).batch(next(t for t in tasks if t.kind == "translation"), BATCH)

    outputs = {}
    with small_steps_on_one_thread(BATCH * model.config.d_model):  # as `generate` will decide
        incremental_threads = torch.get_num_threads()

    def decode(incremental: bool):
        outputs[incremental] = model.generate(batch, max_len=TOKENS, incremental=incremental)

    # interleaved: this machine's speed drifts by tens of per cent within seconds
    incremental, recompute = compare(lambda: decode(True), lambda: decode(False), repeats=9, warmup=1)
    assert outputs[True] == outputs[False], "incremental and full decoding disagree"
    emit(
        {
            "benchmark": "decode",
            "ratio": recompute / incremental,
            "incremental_tokens_per_s": TOKENS * BATCH / incremental,
            "recompute_tokens_per_s": TOKENS * BATCH / recompute,
            "tokens": TOKENS,
            "batch": BATCH,
            "threads": torch.get_num_threads(),
            "incremental_threads": incremental_threads,
        }
    )


if __name__ == "__main__":
    main()
