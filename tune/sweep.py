"""`mm tune CONFIG`: a Ray Tune sweep over mixing ratios, MoE capacity, k and learning rate.

Every trial is a Ray Train run (Train V2: the trial function builds the `TorchTrainer`; its
workers' reports reach Tune through `TuneReportCallback`). The objective is the mean over tasks
of each task's primary dev metric, normalised (`mm.metrics.aggregate_score`): against
`tune.reference` scores where given (1.0 = as good as the reference, e.g. the task's
single-task run), else over the metric's range (BLEU / 100, accuracy, 1 - WER, F1 / 100).

Schedulers: ASHA (stops poor trials at evaluations), FIFO, or Population Based Training, which
runs each trial in segments of `tune.pbt_interval` steps and between segments copies a better
trial's checkpoint and perturbs the mixing weights — the result is a mixing *schedule*, kept
in each checkpoint and replayable with `train.mixing.strategy: schedule`.
Searchers: random or grid (Tune's basic variant generator), Optuna when asked.

MLflow: the sweep is a parent run; each trial a nested child run. The parent gets a summary
table and plots, and the best trial's model is registered (`tune.registry`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cluster.job import train
from cluster.session import preflight
from cluster.tracking import client, experiment_id, resolve_tracking_uri, start_run
from mm.checkpoint import write_file
from mm.config import Config, parse_config
from mm.reader import load_manifests, train_rows
from tune.space import MIX, config_point, mixing_ratios, search_space, trial_config


@dataclass
class Trial:
    name: str
    params: dict[str, Any]
    objective: float | None
    metrics: dict[str, float]
    checkpoint: str | None
    run_id: str | None
    error: str | None = None


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    trials: list[Trial]
    best: Trial | None
    registered: dict[str, Any] = field(default_factory=dict)


def sweep(config: Config, address: str | None = None, register: bool = True, log=print) -> SweepResult:
    from ray import tune

    ready = preflight(config, address)  # fail here, not in every trial
    config, uri = ready.config, ready.tracking_uri
    parent = start_run(uri, config, run_name=f"{config.name}-sweep")
    client(uri).set_tag(parent, "mm.sweep", "true")

    tuner = build_tuner(
        config,
        partial(run_trial, base=config.model_dump(mode="json"), parent_run_id=parent, tracking_uri=uri),
        f"{config.name}-sweep",
        param_space=search_space(config),
        tune_config=tune.TuneConfig(
            metric="objective",
            mode="max",
            num_samples=1 if config.tune.search == "grid" else config.tune.trials,
            max_concurrent_trials=config.tune.max_concurrent,
            scheduler=_scheduler(config),
            search_alg=_searcher(config),
        ),
        # PBT: a trial is done at its last segment, or PBT would exploit at that report too
        # and hand the trial another's final result and checkpoint
        stop={"step": config.train.steps} if config.tune.scheduler == "pbt" else None,
        verbose=1,
    )
    grid = tuner.fit()
    trials = [_trial_of(result) for result in grid]
    finished = [t for t in trials if t.objective is not None and t.checkpoint]
    best = max(finished, key=lambda t: t.objective) if finished else None
    outcome = SweepResult(parent, uri, trials, best)
    _log_summary(outcome, config)
    if register and best is not None:
        from tune.registry import register_and_promote

        outcome.registered = register_and_promote(
            config, uri, best.run_id, best.checkpoint, parent, best.objective, log=log
        )
    client(uri).set_terminated(parent, status="FINISHED" if best else "FAILED")
    return outcome


def build_tuner(config: Config, trial, name: str, param_space, tune_config, stop=None, verbose: int = 0):
    """The Tuner of a sweep or a study. Each trial only waits on the TorchTrainer it starts, whose
    workers hold the CPUs, so a trial asks for almost none; a failed trial is reported, never
    retried (its training run retries on its own, `cluster.max_failures`)."""
    from ray import tune

    return tune.Tuner(
        tune.with_resources(trial, {"CPU": 0.01}),
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(config.cluster.storage_path),
            failure_config=tune.FailureConfig(max_failures=0),
            stop=stop,
            verbose=verbose,
        ),
    )


def run_trial(params: dict[str, Any], base: dict[str, Any], parent_run_id: str, tracking_uri: str) -> None:
    """One trial: the base config with the trial's parameters, trained as a Ray Train run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = trial_config(parse_config(base, source="sweep"), params)
    name = tune.get_context().get_trial_name()
    if config.tune.scheduler == "pbt":
        _run_in_segments(config, name, parent_run_id)
    else:
        train(config, run_name=name, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()])


def _run_in_segments(config: Config, name: str, parent_run_id: str) -> None:
    """PBT: train `pbt_interval` steps at a time, each segment resuming from the last checkpoint
    (perhaps another trial's, with perturbed mixing weights) and reported to Tune with it.

    Each checkpoint carries the mixing schedule that led to it (`segment.json`): the phases of
    the trials it descends from, then this trial's weights. The best trial's schedule can be
    replayed from scratch (`train.mixing.strategy: schedule`)."""
    from ray import tune

    total = config.train.steps
    checkpoint = tune.get_checkpoint()
    state = json.loads(Path(checkpoint.path, SEGMENT).read_text()) if checkpoint else {}
    step, schedule = state.get("step", 0), state.get("schedule", [])
    # a checkpoint copied from another trial names that trial's MLflow run, not ours
    run_id = state.get("run_id") if state.get("trial") == name else _trial_run(config, name, parent_run_id)
    shares = mixing_ratios(config, train_rows(load_manifests(config)))
    config.train.schedule_steps = total  # each segment stops early; the cool-down ends the whole run
    while step < total:
        schedule = with_phase(schedule, step, shares)
        config.train.steps = min(step + config.tune.pbt_interval, total)
        config.train.eval_every = config.train.checkpoint_every = config.train.steps
        resume = checkpoint.path if checkpoint else None
        result = train(config, resume=resume, run_name=name, parent_run_id=parent_run_id, run_id=run_id)
        run_id, step = result.run_id, config.train.steps
        state = {"step": step, "trial": name, "run_id": run_id, "schedule": schedule}
        write_file(Path(result.checkpoint, SEGMENT), json.dumps(state, indent=1).encode())
        client(result.tracking_uri).log_dict(run_id, {"schedule": schedule}, "mixing_schedule.json")
        metrics = {**result.metrics, "checkpoint_path": str(result.checkpoint)}
        checkpoint = tune.Checkpoint.from_directory(str(result.checkpoint))
        tune.report(metrics, checkpoint=checkpoint)


SEGMENT = "segment.json"  # a PBT checkpoint's step, trial, MLflow run and mixing schedule


def with_phase(schedule: list[dict[str, Any]], start: int, weights: dict[str, float]) -> list[dict[str, Any]]:
    """The schedule with `weights` from step `start` on (phases from `start` on replaced)."""
    kept = [phase for phase in schedule if phase["start"] < start]
    if kept and kept[-1]["weights"] == weights:
        return kept  # the same weights go on: no new phase
    return [*kept, {"start": start, "weights": weights}]


def pbt_schedule(checkpoint: str | Path) -> list[dict[str, Any]]:
    """The mixing schedule that produced a PBT trial's checkpoint."""
    return json.loads(Path(checkpoint, SEGMENT).read_text())["schedule"]


def _trial_run(config: Config, name: str, parent_run_id: str) -> str | None:
    """The MLflow run this trial made before (None before its first segment)."""
    uri = resolve_tracking_uri(config.mlflow.tracking_uri)
    found = client(uri).search_runs(
        [experiment_id(uri, config)],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.mlflow.runName = '{name}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def _scheduler(config: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    settings = config.tune
    if settings.scheduler == "asha":
        max_t = max(config.train.steps // config.train.eval_every, 1)
        grace = min(settings.grace_period, max_t)
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=grace,
            reduction_factor=settings.reduction_factor,
        )
    if settings.scheduler == "pbt":
        space = search_space(config)
        mutations = {key: space[key] for key in space if key.startswith(MIX) or key == "temperature"}
        # synchronous: the whole population reaches each segment's end before the bottom quarter
        # copies the top's checkpoints, so trials that wait for CPUs still take part
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=1,
            hyperparam_mutations=mutations,
            synch=True,
        )
    return FIFOScheduler()


def _searcher(config: Config):
    """Optuna, or Tune's variant generator (random sampling, grid_search entries as a grid),
    both seeded so that a sweep samples the same trials again. A random or Optuna search
    starts from the config's own values (`config_point`): the baseline its trials must beat.
    Tune limits the concurrency of a Searcher (Optuna) itself, but not of a variant generator
    handed to it, which must be told."""
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    first = None if config.tune.search == "grid" else [config_point(config)]
    if config.tune.search == "optuna":
        return OptunaSearch(seed=config.seed, points_to_evaluate=first)
    return BasicVariantGenerator(
        points_to_evaluate=first, max_concurrent=config.tune.max_concurrent, random_state=config.seed
    )


def _trial_of(result) -> Trial:
    metrics = dict(result.metrics or {})
    params = {k: v for k, v in (result.config or {}).items()}
    error = None if result.error is None else _last_lines(str(result.error))
    return Trial(
        name=Path(result.path).name if result.path else "?",
        params=params,
        objective=metrics.get("objective"),
        metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
        checkpoint=metrics.get("checkpoint_path"),
        run_id=metrics.get("mlflow_run_id"),
        error=error,
    )


def _last_lines(traceback: str, lines: int = 4) -> str:
    """The end of a trial's traceback: the exception and its message."""
    kept = [line for line in traceback.strip().splitlines() if line.strip()][-lines:]
    return "\n".join(kept)[-600:]


def _log_summary(outcome: SweepResult, config: Config) -> None:
    """A table of the trials and two plots on the parent run."""
    from tune.plots import metric_vs_ratio_plot, objective_plot

    mlflow = client(outcome.tracking_uri)
    rows = [
        {
            "trial": t.name,
            "objective": t.objective,
            "error": t.error or "",
            "run_id": t.run_id or "",
            **t.params,
        }
        for t in outcome.trials
    ]
    mlflow.log_table(
        outcome.parent_run_id,
        data={k: [r.get(k) for r in rows] for k in rows[0]},
        artifact_file="trials.json",
    )
    mlflow.log_figure(outcome.parent_run_id, objective_plot(outcome.trials), "objective_per_trial.png")
    mlflow.log_figure(
        outcome.parent_run_id, metric_vs_ratio_plot(outcome.trials, config), "metric_vs_mixing_ratio.png"
    )
    if outcome.best is not None:
        mlflow.log_metric(outcome.parent_run_id, "best/objective", outcome.best.objective)
        mlflow.set_tag(outcome.parent_run_id, "best_trial", outcome.best.name)
    failed = [t.name for t in outcome.trials if t.error]
    mlflow.set_tag(outcome.parent_run_id, "failed_trials", ", ".join(failed) or "none")
    # Tune ends a trial at a report, before its job marks the run (or while the job marks it
    # FAILED, its trainer gone): one that trained all its steps is FINISHED, one that ASHA
    # stopped early is KILLED. A trial that failed on its own stays FAILED.
    for trial in outcome.trials:
        if trial.run_id and not trial.error:
            trained_all = trial.metrics.get("step") == config.train.steps
            if not trained_all:
                _log_last_report(mlflow, trial)
            mlflow.set_terminated(trial.run_id, status="FINISHED" if trained_all else "KILLED")


def _log_last_report(mlflow, trial: Trial) -> None:
    """A trial stopped at a rung loses what rank 0 logs after its report (MLflow stays behind the
    checkpoint): the rung's evaluation and losses come from the report Tune kept instead."""
    from mlflow.entities import Metric

    step, now = int(trial.metrics["step"]), int(time.time() * 1000)
    missing = [
        Metric(key, value, now, step)
        for key, value in trial.metrics.items()
        if "/" in key  # rank 0's metrics (eval/, train/, perf/), not Tune's own
        and step not in {m.step for m in mlflow.get_metric_history(trial.run_id, key)}
    ]
    if missing:
        mlflow.log_batch(trial.run_id, metrics=missing)
