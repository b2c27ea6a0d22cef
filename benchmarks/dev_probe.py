"""A quick learning probe: train a config's tasks in one process for N steps, score dev.

For comparing levers (mixing ratios, learning rate, model options) at a fraction of a Ray Train
run's cost: no Ray, one process at `--threads` threads, batches of each task's `batch_size`
(so half the demo's global batch, which has two workers), the config's task sampler, and the
same dev evaluation as the training run's (`train.eval_examples` rows, constrained tree
decoding). Compare two settings with the same steps and seed; the demo's own figures come from
`make demo`. Needs the starter shards (`make demo`, or `mm starter && mm prepare CONFIG`).

Prints one JSON line per evaluation: the step, training seconds, how many steps each task got,
every dev metric (a decoded one with its 95 % bootstrap interval, `<metric>_low` and
`<metric>_high`), each task's routing entropy per MoE layer and the load's CV (as the demo
report has them, over the steps so far).

    python -m benchmarks.dev_probe --steps 1400 --eval-at 700 -o tasks.ptb.mix_weight=0.8
    python -m benchmarks.dev_probe --tasks librispeech --steps 400 -o model.ctc_weight=0.3
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import emit, shard_tasks, train_streams
from mm.config import ConfigError, load_config
from mm.evaluate import score_task
from mm.metrics import count_routing, load_cv, routing_entropy
from mm.model import MultiModel
from mm.reader import EVAL_SPLIT, evaluation_batches, read_rows, train_rows
from mm.train import Trainer
from tune.studies import Arm, arm_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/starter.yaml")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--eval-at", default="", help="comma-separated steps to score dev at (and the last)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", default="", help="comma-separated tasks to train alone (default: all)")
    parser.add_argument("-o", "--override", action="append", default=[], help="config override a.b=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        config = load_config(args.config, [f"train.steps={args.steps}", *args.override])
    except ConfigError as error:
        parser.error(str(error))
    if args.tasks:  # as the joint-vs-single study's single-task arms
        tasks = tuple(args.tasks.split(","))
        if unknown := sorted(set(tasks) - set(config.task_names)):
            known = ", ".join(config.task_names)
            parser.error(f"--tasks: {', '.join(unknown)} not in {args.config} ({known})")
        config = arm_config(config, Arm("probe", tasks, args.steps), config.seed)
    vocab, manifests, specs = shard_tasks(config)
    streams = train_streams(config, specs)
    dev = {
        s.name: evaluation_batches(
            s,
            read_rows(config.data.shards, s.name, EVAL_SPLIT, config.train.eval_examples),
            0,
            1,
            config.task(s.name).batch_size,
        )
        for s in specs
    }
    torch.manual_seed(config.seed)
    model = MultiModel(config.model, specs, vocab.size)
    trainer = Trainer(model, config, train_rows(manifests))
    scored_at = {int(step) for step in args.eval_at.split(",") if step} | {args.steps}
    train_seconds, steps_per_task = 0.0, {s.name: 0 for s in specs}
    routing: dict[str, list[list[int]]] = {}
    while trainer.step < args.steps:
        started = time.perf_counter()
        log = trainer.train_step(lambda task: next(streams[task]))
        train_seconds += time.perf_counter() - started
        steps_per_task[log.task] += 1
        count_routing(routing, log.task, log.expert_load)
        if trainer.step in scored_at:
            # with each decoded metric's 95 % interval: 200 dev examples decide few differences
            scores = {
                name: score_task(model, config.task(name), rows, vocab, intervals=True)
                for name, rows in dev.items()
            }
            emit(
                {
                    "benchmark": "dev_probe",
                    "step": trainer.step,
                    "train_seconds": train_seconds,
                    "threads": args.threads,
                    "steps_per_task": dict(steps_per_task),
                    "dev": scores,
                    "routing_entropy": {t: [routing_entropy(n) for n in ns] for t, ns in routing.items()},
                    "load_cv": load_cv(routing),
                }
            )


if __name__ == "__main__":
    main()
