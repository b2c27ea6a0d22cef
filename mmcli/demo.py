"""`mm demo` (`make demo`): the main job on the starter suite, end to end.

    1. build the starter suite's raw corpora from Debian packages (`mm starter`)
    2. prepare them into shards with Ray Data (`mm prepare`)
    3. train jointly on all six tasks: 2 Ray Train workers, experts sharded across them
    4. evaluate the final model on the dev and test splits, and on the test split with its
       inputs blanked (the input-blind score)
    5. register it in the local MLflow registry (alias `champion` if it beats the current one)
    6. write a report: per-task metrics beside chance and input-blind, decoded examples,
       learning curves, expert routing; and summary.json

Each step skips what is already done (an unchanged starter build, up-to-date shards).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm.config import Config
from mm.metrics import scores_by_task


@dataclass
class DemoResult:
    dev: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    blind: dict[str, dict[str, float]]
    chance: dict[str, float]
    report: Path
    registered: dict[str, Any]
    run_id: str
    tracking_uri: str
    seconds: dict[str, float]


def starter_root(config: Config) -> Path:
    """Where the starter corpora go: the folder holding every task's corpus."""
    parents = {task.corpus.path.parent for task in config.tasks if task.corpus is not None}
    if len(parents) != 1:
        raise ValueError(
            f"the demo config's corpora should share one folder, found {sorted(map(str, parents))}"
        )
    return parents.pop()


def run_demo(config: Config, address: str | None = None, log=print) -> DemoResult:
    from cluster.job import train
    from cluster.session import connect
    from mm.predict import Predictor
    from mm.reader import read_rows
    from mmcli.report import chance_levels, write_report
    from pipelines.prepare import prepare
    from pipelines.starter import build_starter
    from tune.registry import register_and_promote

    seconds: dict[str, float] = {}

    def timed(phase: str, work):
        started = time.time()
        log(f"[demo] {phase} ...")
        result = work()
        seconds[phase] = time.time() - started
        log(f"[demo] {phase} done in {seconds[phase]:.0f} s")
        return result

    timed(
        "starter suite", lambda: build_starter(starter_root(config), size="small", seed=config.seed, log=log)
    )
    connect(address)
    timed("prepare", lambda: prepare(config, log=log))
    trained = timed("train", lambda: train(config))
    predictor = Predictor(trained.checkpoint)
    dev = scores_by_task(trained.metrics)  # the training run's last evaluation
    test = timed("evaluate test", lambda: predictor.evaluate(split="test", intervals=True))
    blind = timed("evaluate input-blind", lambda: predictor.evaluate(split="test", blind=True))
    registered = timed(
        "register",
        lambda: register_and_promote(
            config,
            trained.tracking_uri,
            trained.run_id,
            trained.checkpoint,
            score=predictor.aggregate(dev),
            log=log,
        ),
    )
    references = {
        t.name: list(read_rows(config.data.shards, t.name, "dev", config.train.eval_examples)["references"])
        for t in config.tasks
    }
    chance = chance_levels(config, predictor.records.values(), references)
    examples = {
        t.name: predictor.decoded_examples(t.name, "dev")
        for t in config.tasks
        if predictor.specs[t.name].output_modality == "text"
    }
    training = {
        "seconds": seconds["train"],
        "steps": config.train.steps,
        "train_gflops": trained.metrics.get("perf/train_gflops"),
        "mfu": trained.metrics.get("perf/mfu"),
    }
    folder = Path("reports") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    report = write_report(
        folder.absolute(),
        config,
        trained.tracking_uri,
        trained.run_id,
        dev,
        test,
        chance,
        seconds,
        registered,
        blind,
        examples,
        training,
    )
    return DemoResult(
        dev, test, blind, chance, report, registered, trained.run_id, trained.tracking_uri, seconds
    )
