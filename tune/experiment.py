"""`mm experiment CONFIG --study S`: run a study's arms (`tune.studies`) on Ray and report.

Every (arm, seed) is one Ray Train run, launched as a trial of a Ray Tune grid so that several
run at once where the cluster has room (`experiment.max_concurrent`). Each trial trains, then
scores its final checkpoint on the test splits with every task's metrics. MLflow: the study is
a parent run, each (arm, seed) a nested child run with its test metrics; the report folder
(markdown tables, PNG plots) is written locally and logged to the parent.

The mixing study first runs two Ray Tune sweeps over the mixing weights alone: one with the
config's `tune:` settings, whose best trial's weights become the "tuned ratios" arm, and one
with Population Based Training, whose best trial's schedule of weights (the weights of the
trials its checkpoint descends from, segment by segment) becomes the "PBT schedule" arm. Every
arm is then trained from scratch on each seed; each run's aggregate objective (the sweep's, on
the test splits) is reported beside the task metrics.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cluster.job import train
from cluster.session import preflight
from cluster.tracking import client, start_run
from mm.config import Config, parse_config
from mm.metrics import expert_sharing, load_cv
from mm.reader import train_rows
from mm.tasks import kind_of
from tune.studies import Study, arm_config, check_study, expand, mixing, sized
from tune.study_report import write_study_report
from tune.sweep import build_tuner, pbt_schedule, sweep


@dataclass
class RunResult:
    arm: str
    seed: int
    scores: dict[str, dict[str, float]]  # test split: {task: {metric: value}}
    run_id: str | None
    error: str | None = None
    objective: float | None = None  # the sweep's aggregate of the primary metrics, test split
    moe: dict[str, float | None] = field(default_factory=dict)  # see `moe_health`


@dataclass
class StudyResult:
    study: Study
    runs: list[RunResult]
    parent_run_id: str
    tracking_uri: str
    report: Path


def run_experiment(
    config: Config,
    study_name: str,
    seeds: int = 3,
    preset: str = "small",
    address: str | None = None,
    out: Path | None = None,
    command: str | None = None,
    log=print,
) -> StudyResult:
    """`command`: the command line that ran the study, quoted in the report."""
    check_study(study_name)  # before Ray starts
    ready = preflight(sized(config, preset), address)  # before any run starts
    config, uri, sizes = ready.config, ready.tracking_uri, train_rows(ready.manifests)
    study = expand(study_name, config, sizes)  # a study naming an unknown task fails here
    parent = start_run(uri, config, run_name=f"{config.name}-{study_name}")
    mlflow = client(uri)
    for key, value in {"mm.study": study_name, "mm.preset": preset, "mm.seeds": str(seeds)}.items():
        mlflow.set_tag(parent, key, value)
    if study_name == "mixing":
        tuned = _tuned_weights(config, study, parent, log)
        study = mixing(config, sizes, tuned=tuned, schedule=_pbt_schedule(config, study, parent, log))
    log(f"[experiment] {study_name}: {len(study.arms)} arms x {seeds} seeds, preset {preset}")

    seed_list = [config.seed + i for i in range(seeds)]
    runs = _run_grid(config, study, seed_list, parent)
    for run in runs:
        status = f"error: {run.error.splitlines()[-1]}" if run.error else "done"
        log(f"[experiment] {run.arm} seed {run.seed}: {status}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = (out or Path("reports") / f"{config.name}-{study_name}-{stamp}").absolute()
    report = write_study_report(folder, study, runs, seed_list, preset, command)
    mlflow.log_artifacts(parent, str(folder), "report")
    failed = [r for r in runs if r.error]
    mlflow.set_tag(parent, "failed_runs", ", ".join(f"{r.arm}/{r.seed}" for r in failed) or "none")
    mlflow.set_terminated(parent, status="FAILED" if len(failed) == len(runs) else "FINISHED")
    return StudyResult(study, runs, parent, uri, report)


def _run_grid(config: Config, study: Study, seeds: list[int], parent: str) -> list[RunResult]:
    from ray import tune

    tuner = build_tuner(
        config,
        partial(run_arm, base=config.model_dump(mode="json"), study=study, parent_run_id=parent),
        f"{config.name}-{study.name}",
        param_space={
            "arm": tune.grid_search([arm.name for arm in study.arms]),
            "seed": tune.grid_search(seeds),
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=config.experiment.max_concurrent,
            trial_dirname_creator=lambda trial: f"run_{trial.trial_id}",  # arm names have spaces
        ),
    )
    return [_run_of(result) for result in tuner.fit()]


def run_arm(params: dict[str, Any], base: dict[str, Any], study: Study, parent_run_id: str) -> None:
    """One (arm, seed): train, score the final checkpoint on the test splits, report."""
    from ray import tune

    from mm.predict import Predictor

    arm, seed = study.arm(params["arm"]), int(params["seed"])
    config = arm_config(parse_config(base, source="experiment"), arm, seed)
    result = train(config, run_name=f"{arm.name} / seed {seed}", parent_run_id=parent_run_id)
    predictor = Predictor(result.checkpoint)
    scores = predictor.evaluate(split="test")
    objective = predictor.aggregate(scores)
    mlflow = client(result.tracking_uri)
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            mlflow.log_metric(result.run_id, f"test/{task}/{metric}", value)
    mlflow.log_metric(result.run_id, "test/objective", objective)
    mlflow.set_tag(result.run_id, "mm.arm", arm.name)
    moe = json.dumps(moe_health(config, result))
    tune.report(
        {"scores": json.dumps(scores), "objective": objective, "mlflow_run_id": result.run_id, "moe": moe}
    )


def moe_health(config: Config, result) -> dict[str, float | None]:
    """How a run's MoE layers were used: the mean share of routed tokens dropped over capacity,
    the CV of the experts' load, the steady-state step time, and the routing overlap of tasks
    with the same input modality beside that of tasks with different ones (`expert_sharing`)."""
    mlflow = client(result.tracking_uri)
    dropped = [m.value for m in mlflow.get_metric_history(result.run_id, "moe/dropped_fraction")]
    with tempfile.TemporaryDirectory() as folder:
        routing = json.loads(
            Path(mlflow.download_artifacts(result.run_id, "routing.json", folder)).read_text()
        )
    step_seconds = result.metrics.get("perf/step_seconds")
    if not any(routing.values()):  # a model without MoE layers (the "no MoE" arm): nothing routed
        return {"step_seconds": step_seconds}
    modality = {task.name: kind_of(task.kind).input_modality for task in config.tasks}
    return {
        "dropped_fraction": sum(dropped) / len(dropped) if dropped else None,
        "load_cv": load_cv(routing),
        "step_seconds": step_seconds,
        **expert_sharing(routing, modality),
    }


def _run_of(result) -> RunResult:
    params, metrics = result.config or {}, result.metrics or {}
    error = None if result.error is None else str(result.error).strip()[-600:]
    scores = json.loads(metrics["scores"]) if "scores" in metrics else {}
    run_id, objective = metrics.get("mlflow_run_id"), metrics.get("objective")
    moe = json.loads(metrics["moe"]) if "moe" in metrics else {}
    return RunResult(
        params.get("arm", "?"), int(params.get("seed", -1)), scores, run_id, error, objective, moe
    )


def _tuned_weights(config: Config, study: Study, parent: str, log) -> dict[str, float]:
    """The mixing weights of the best trial of a sweep over the weights alone."""
    from tune.space import trial_config

    searched, outcome = _mixing_sweep(config, study, parent, "mm.mixing_sweep_run", log)
    tuned = trial_config(searched, outcome.best.params)
    return {task.name: float(task.mix_weight) for task in tuned.tasks}


def _pbt_schedule(config: Config, study: Study, parent: str, log) -> list[dict[str, Any]]:
    """The mixing schedule of the best trial of a PBT sweep: its population (`tune.trials`)
    trains side by side, and every quarter of the steps the worse trials copy the better ones'
    checkpoints and perturb their weights."""

    steps = config.train.steps
    pbt = {"scheduler": "pbt", "max_concurrent": config.tune.trials, "pbt_interval": max(steps // 4, 1)}
    _, outcome = _mixing_sweep(config, study, parent, "mm.pbt_sweep_run", log, **pbt)
    return pbt_schedule(outcome.best.checkpoint)


def _mixing_sweep(config: Config, study: Study, parent: str, tag: str, log, **tune_settings):
    """A sweep over the mixing weights alone (MoE settings and learning rate as configured),
    on the first arm's config; its MLflow run is tagged on the study's parent run."""

    raw = arm_config(config, study.arms[0], config.seed).model_dump(mode="json")
    space = raw["tune"]["space"]
    space.update(mixing="weights", tasks=None, capacity_factor=[raw["model"]["moe"]["capacity_factor"]])
    space.update(k=[raw["model"]["moe"]["k"]], lr=None)
    raw["tune"].update(tune_settings)
    raw["train"]["eval_every"] = max(raw["train"]["steps"] // 2, 1)  # ASHA decides at the half
    # (PBT evaluates at the end of each of its segments)
    searched = parse_config(raw, source="mixing sweep")
    settings = searched.tune
    log(f"[experiment] mixing: sweeping the weights ({settings.trials} trials, {settings.scheduler})")
    outcome = sweep(searched, register=False, log=log)
    client(outcome.tracking_uri).set_tag(parent, tag, outcome.parent_run_id)
    if outcome.best is None:
        raise RuntimeError(f"the mixing sweep finished no trial; see its MLflow run {outcome.parent_run_id}")
    return searched, outcome
