"""One process's training: which task at which step, the optimiser, and the step itself.

Every rank runs the same task at the same step, so that the MoE layers' collectives line up:
the task of step t is drawn from the mixing distribution with an RNG seeded by (seed, t). The
mixing distribution is explicit ratios, temperature sampling over corpus sizes (p ∝ n^(1/T)),
loss-adaptive (p ∝ smoothed loss^power; the loss is averaged over ranks first, so all
ranks agree), or a schedule of weights that change at given steps.

Optimiser and schedule follow tensor2tensor's multimodel_base: Adam (β = 0.9, 0.98, ε = 1e-9),
linear warm-up to the peak learning rate, then inverse-square-root decay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from mm.batch import Batch
from mm.config import Config, MixingConfig
from mm.model import MultiModel
from mm.parallel import Parallel, SingleProcess


class TaskSampler:
    def __init__(
        self,
        tasks: list[str],
        mixing: MixingConfig,
        seed: int = 0,
        sizes: dict[str, int] | None = None,
        ratios: dict[str, float] | None = None,
    ):
        self.tasks, self.mixing, self.seed = list(tasks), mixing, seed
        self.sizes = sizes or {}
        self.ratios = ratios or {}
        self.smoothed_loss: dict[str, float] = {}

    def probabilities(self, step: int = 0) -> np.ndarray:
        strategy = self.mixing.strategy
        if strategy == "ratios":
            weights = [self.ratios.get(t, 1.0) for t in self.tasks]
        elif strategy == "schedule":
            weights = [self.mixing.phase_at(step).weights[t] for t in self.tasks]
        elif strategy == "temperature":
            weights = [max(self.sizes.get(t, 1), 1) ** (1 / self.mixing.temperature) for t in self.tasks]
        else:  # loss_adaptive: tasks not seen yet weigh as much as the worst seen one
            worst = max(self.smoothed_loss.values(), default=1.0)
            weights = [self.smoothed_loss.get(t, worst) ** self.mixing.adaptive_power for t in self.tasks]
        weights = np.asarray(weights, dtype=np.float64)
        if weights.sum() <= 0:
            raise ValueError(f"mixing weights sum to zero: {dict(zip(self.tasks, weights))}")
        return weights / weights.sum()

    def task_at(self, step: int) -> str:
        rng = np.random.default_rng([self.seed, step])
        return self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities(step)))]

    def observe(self, task: str, loss: float) -> None:
        """Record a task's loss (already averaged over ranks) for loss-adaptive mixing."""
        decay = self.mixing.adaptive_decay
        previous = self.smoothed_loss.get(task)
        self.smoothed_loss[task] = loss if previous is None else decay * previous + (1 - decay) * loss

    # Only the running losses are state: the weights come from the config, so that a run
    # resumed with other weights (a PBT perturbation) samples with the new ones.
    def state_dict(self) -> dict[str, Any]:
        return {"smoothed_loss": dict(self.smoothed_loss)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.smoothed_loss = dict(state["smoothed_loss"])


def derived_seed(*keys: int) -> int:
    """A seed for one use, e.g. (seed, step, rank): independent streams, and reproducible."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def lr_factor(step: int, warmup: int, total: int | None = None, cooldown: int = 0) -> float:
    """Linear warm-up for `warmup` steps, then decay as 1/sqrt(step); 1.0 at the peak. With a
    `cooldown`, the last `cooldown` of `total` steps also ramp linearly down towards zero."""
    step += 1
    factor = 1.0 if warmup <= 0 else min(step / warmup, math.sqrt(warmup / step))
    if cooldown > 0 and total is not None:
        factor *= min(1.0, (total - step + 1) / cooldown)
    return factor


@dataclass
class StepLog:
    step: int  # the step just completed (1-based)
    task: str
    loss: float  # the task's own loss, averaged over ranks and micro-batches
    aux_loss: float
    lr: float
    grad_norm: float
    examples: int  # on this rank
    seconds: float
    dropped_fraction: float
    expert_load: list[list[int]] = field(default_factory=list)  # per MoE layer, tokens per expert
    flops: float = 0.0  # of this rank's forward and backward passes (see FlopTally)


class FlopTally:
    """The FLOPs of each training step, for MFU. A task's first `counted` steps are counted
    exactly with FlopCounterMode (slower, so only a few); later steps are estimated from the
    task's FLOPs per example so far times their examples."""

    def __init__(self, counted: int = 3):
        self.counted = counted
        self.steps: dict[str, int] = {}
        self.per_example: dict[str, tuple[float, int]] = {}  # task: (FLOPs, examples) counted

    def counter(self, task: str) -> FlopCounterMode | None:
        return FlopCounterMode(display=False) if self.steps.get(task, 0) < self.counted else None

    def step_flops(self, task: str, examples: int, counter: FlopCounterMode | None) -> float:
        self.steps[task] = self.steps.get(task, 0) + 1
        if counter is not None:
            flops, seen = self.per_example.get(task, (0.0, 0))
            self.per_example[task] = (flops + counter.get_total_flops(), seen + examples)
            return float(counter.get_total_flops())
        flops, seen = self.per_example[task]
        return flops / seen * examples


class Trainer:
    """Sampler → batches → forward/backward → gradient sync → clip → optimiser step."""

    def __init__(
        self,
        model: MultiModel,
        config: Config,
        sizes: dict[str, int] | None = None,
        parallel: Parallel | None = None,
        device: torch.device | str = "cpu",
    ):
        self.model, self.config, self.device = model, config, torch.device(device)
        self.parallel = parallel or SingleProcess()
        train = config.train
        # fused: one kernel over every parameter instead of a dozen small ones per parameter
        # (on CPU too): Adam took 7 % of a starter step as a loop over its 309 small tensors
        self.optimizer = torch.optim.Adam(
            model.parameters(),
            lr=train.lr,
            betas=train.betas,
            eps=train.eps,
            weight_decay=train.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        horizon = train.schedule_steps or train.steps
        cooldown_steps = round(train.cooldown * horizon)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, train.warmup_steps, horizon, cooldown_steps)
        )
        ratios = {t.name: t.mix_weight for t in config.tasks if t.mix_weight is not None}
        self.sampler = TaskSampler(config.task_names, train.mixing, config.seed, sizes, ratios)
        self.step = 0
        self.forward = torch.compile(model) if train.compile else model
        self.flop_tally = FlopTally()

    def autocast(self):
        """bf16 autocast on CPU (AMX, AVX512-BF16) as on CUDA; the weights stay fp32."""
        if self.config.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, next_batch: Callable[[str], Batch]) -> StepLog:
        started = time.perf_counter()
        self.model.train()
        # The step's randomness (dropout, the gates' noise) is a function of (seed, step, rank)
        # alone, so a run resumed at step t draws what the uninterrupted run drew there.
        torch.manual_seed(derived_seed(self.config.seed, self.step, self.parallel.rank))
        task = self.sampler.task_at(self.step)
        accum = self.config.train.grad_accum
        task_loss = aux_loss = 0.0
        examples, stats = 0, []
        counter = self.flop_tally.counter(task)
        with counter or nullcontext():
            for _ in range(accum):
                batch = next_batch(task).to(self.device)
                if batch.task != task:
                    raise ValueError(f"step {self.step}: asked for a {task!r} batch, got {batch.task!r}")
                with self.autocast():
                    out = self.forward(batch)
                (out.loss / accum).backward()
                task_loss += float(out.task_losses[task]) / accum
                aux_loss += float(out.aux_loss.detach()) / accum
                examples += len(batch)
                stats = out.moe
        flops = self.flop_tally.step_flops(task, examples, counter)
        grad_clip = self.config.train.grad_clip
        grad_norm, task_loss = self.parallel.sync_gradients(self.model, grad_clip, task_loss)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sampler.observe(task, task_loss)
        self.step += 1
        return StepLog(
            step=self.step,
            task=task,
            loss=task_loss,
            aux_loss=aux_loss,
            lr=lr,
            grad_norm=grad_norm,
            examples=examples,
            seconds=time.perf_counter() - started,
            dropped_fraction=sum(s.dropped for s in stats) / max(sum(s.assigned for s in stats), 1),
            expert_load=[s.load.tolist() for s in stats],
            flops=flops,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model's weights: the checkpoint module stores those."""
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the scheduler's state names the current rate; the optimiser must use it too
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        self.sampler.load_state_dict(state["sampler"])


def fit(
    trainer: Trainer,
    next_batch: Callable[[str], Batch],
    on_step: Callable[[StepLog], None] | None = None,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    save: Callable[[int, dict[str, float] | None], None] | None = None,
) -> None:
    """The training loop: steps until `train.steps`, evaluating every `eval_every` steps and
    checkpointing every `checkpoint_every` steps and at the end. Starts at `trainer.step`, so
    a resumed trainer continues where its checkpoint stopped."""
    train = trainer.config.train
    while trainer.step < train.steps:
        log = trainer.train_step(next_batch)
        if on_step is not None:
            on_step(log)
        last = trainer.step == train.steps
        metrics = None
        if evaluate is not None and (trainer.step % train.eval_every == 0 or last):
            metrics = evaluate(trainer.step)
        if save is not None and (trainer.step % train.checkpoint_every == 0 or last):
            save(trainer.step, metrics)
