"""The GPU path in one run: the paper config's model trained in bf16 on generated data of every
modality, checked against fp32, its MFU, memory and tokens/s, and the MoE dispatch both ways.

    python -m benchmarks.gpu_check                  # on a GPU: configs/paper.yaml's model
    python -m benchmarks.gpu_check --device cpu     # anywhere: the tiny preset, a few steps

Figures, one JSON line each:
  bf16_tracks_fp32  the same batches from the same weights in fp32 and in bf16 autocast: the
                    largest relative difference of the per-step losses, and whether it is
                    within --tolerance
  train_mfu         bf16 training steps after a warm-up: model FLOP/s (FlopCounterMode, as
                    mm.model.training_flops) ÷ this device's measured bf16 matmul peak; peak
                    memory; target tokens per second
  moe_dispatch      one MoE layer of the config, forward and backward in bf16: padded
                    capacity buffers (nothing dropped) against dropless grouped matmuls
                    (torch.nn.functional.grouped_mm); milliseconds each and the largest output
                    difference (the same routing, so the outputs must agree)
Exits 1 if bf16 does not track fp32 or the two dispatches disagree. Finishes in a few minutes
on one GPU; the data is generated (mm.synthetic), so nothing needs preparing.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time

import torch

from benchmarks.common import emit
from mm.config import ModelConfig, load_config
from mm.model import MultiModel, matmul_peak_gflops, training_flops
from mm.moe import MoE
from mm.selftest import selftest_config
from mm.synthetic import SyntheticData, synthetic_tasks
from mm.train import Trainer


def model_config(device: str) -> ModelConfig:
    if device == "cpu":  # CI's check that the script runs: small, and bf16 is emulated on many CPUs
        return ModelConfig.model_validate({"preset": "tiny"})
    return load_config("configs/paper.yaml").model


def batch_pool(batch: int, device: str) -> list:
    """Two batches of every task kind, on the device: the steps cycle through them."""
    data, tasks = SyntheticData(0), synthetic_tasks()
    return [data.batch(task, batch).to(device) for task in tasks for _ in range(2)]


def trainer_for(config: ModelConfig, vocab: int, precision: str, device: str, steps: int) -> Trainer:
    torch.manual_seed(0)
    model = MultiModel(config, synthetic_tasks(), vocab).to(device)
    train = selftest_config(steps=steps, seed=0)
    train.model = config
    train.train.precision = precision
    train.train.mixing.strategy = "ratios"  # every kind alike
    return Trainer(model, train, device=device)


def task_cycles(pool: list) -> dict:
    return {task: itertools.cycle([b for b in pool if b.task == task]) for task in {b.task for b in pool}}


def losses(trainer: Trainer, pool: list, steps: int) -> list[float]:
    cycles = task_cycles(pool)
    return [trainer.train_step(lambda task: next(cycles[task])).loss for _ in range(steps)]


def bf16_tracks_fp32(config, vocab, pool, steps, device, tolerance) -> dict:
    fp32 = losses(trainer_for(config, vocab, "fp32", device, steps), pool, steps)
    bf16 = losses(trainer_for(config, vocab, "bf16", device, steps), pool, steps)
    worst = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(fp32, bf16, strict=True))
    return {
        "figure": "bf16_tracks_fp32",
        "steps": steps,
        "max_rel_diff": worst,
        "tolerance": tolerance,
        "ok": worst <= tolerance,
        "fp32_last": fp32[-1],
        "bf16_last": bf16[-1],
    }


def train_mfu(config, vocab, pool, steps, device) -> dict:
    trainer = trainer_for(config, vocab, "bf16", device, steps + 5)
    with trainer.autocast():
        flops = {id(b): training_flops(trainer.model, b) * len(b) for b in pool}
    cycles = task_cycles(pool)
    taken: list = []

    def next_batch(task):
        taken.append(next(cycles[task]))
        return taken[-1]

    for _ in range(5):  # warm-up: kernels chosen, memory pools grown
        trainer.train_step(next_batch)
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    taken.clear()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next_batch)
    synchronize(device)
    seconds = time.perf_counter() - started
    achieved = sum(flops[id(b)] for b in taken) / seconds / 1e9
    peak = matmul_peak_gflops(torch.bfloat16, device, size=8192 if device == "cuda" else 256)
    tokens = sum(int((b.targets > 0).sum()) if b.targets.dim() > 1 else len(b) for b in taken)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {
        "figure": "train_mfu",
        "mfu": achieved / peak,
        "tflops": achieved / 1e3,
        "peak_tflops": peak / 1e3,
        "steps": steps,
        "steps_per_s": steps / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_gib": memory,
        "d_model": config.d_model,
        "experts": config.moe.num_experts,
    }


def moe_dispatch(config, tokens: int, device: str, repeats: int) -> dict:
    moe = config.moe
    torch.manual_seed(0)
    padded = MoE(config.d_model, moe.hidden, moe.num_experts, moe.k, capacity_factor=float(moe.num_experts))
    grouped = copy.deepcopy(padded)
    grouped.capacity_factor, grouped.experts.grouped = None, True
    x = torch.randn(tokens, config.d_model, device=device)
    noise = torch.randn(tokens, moe.num_experts, device=device)
    outputs, times = {}, {}
    layers = {"capacity": padded.to(device).train(), "dropless_grouped": grouped.to(device).train()}
    for name, layer in layers.items():

        def step(layer=layer):
            with torch.autocast(device, dtype=torch.bfloat16):
                out = layer(x, noise=noise)
            (out.y.float().square().mean() + out.aux_loss).backward()
            return out

        outputs[name] = step().y.detach().float()
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        synchronize(device)
        times[name] = (time.perf_counter() - started) / repeats * 1e3
    difference = float((outputs["capacity"] - outputs["dropless_grouped"]).abs().max())
    scale = float(outputs["capacity"].abs().max())
    return {
        "figure": "moe_dispatch",
        "tokens": tokens,
        "capacity_ms": times["capacity"],
        "dropless_grouped_ms": times["dropless_grouped"],
        "speedup": times["capacity"] / times["dropless_grouped"],
        "max_abs_diff": difference,
        "ok": difference <= 2e-2 * max(scale, 1.0),  # bf16: about 3 significant digits
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="timed bf16 steps (default: 300 on a GPU, 4 on CPU)")
    parser.add_argument("--batch", type=int, help="examples per batch (default: 48 on a GPU, 2 on CPU)")
    parser.add_argument("--vocab", type=int, help="output vocabulary (default: 32768 on a GPU)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="of bf16 vs fp32 per-step loss")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    steps = args.steps or (300 if gpu else 4)
    config = model_config(args.device)
    vocab = args.vocab or (32768 if gpu else 64)
    pool = batch_pool(args.batch or (48 if gpu else 2), args.device)
    figures = [
        bf16_tracks_fp32(config, vocab, pool, 30 if gpu else 4, args.device, args.tolerance),
        train_mfu(config, vocab, pool, steps, args.device),
        moe_dispatch(config, 16384 if gpu else 64, args.device, 20 if gpu else 2),
    ]
    for figure in figures:
        emit({"benchmark": "gpu_check", "device": device_name(args.device), **figure})
    if not all(f.get("ok", True) for f in figures):
        sys.exit(1)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


if __name__ == "__main__":
    main()
