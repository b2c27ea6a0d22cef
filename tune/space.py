"""The sweep's search space, from the config's `tune.space`, and a trial's config from its
sampled parameters.

Parameters, flat so every searcher and scheduler can handle them (the first trial of a random
or Optuna search takes the config's own values, `config_point`):

    mix.<task>        a task's mixing weight (space.mixing: weights), normalised by the sampler
    temperature       temperature over corpus sizes (space.mixing: temperature)
    capacity_factor   MoE capacity factor
    k                 experts per token
    lr                peak learning rate
"""

from __future__ import annotations

import copy
from typing import Any

from mm.config import Config

MIX = "mix."  # not "/": Tune flattens the points a search starts from at "/"


def search_space(config: Config) -> dict[str, Any]:
    from ray import tune

    space = config.tune.space
    grid = config.tune.search == "grid"
    choice = tune.grid_search if grid else tune.choice

    def log_range(low_high: tuple[float, float]):
        low, high = low_high
        return tune.grid_search([low, (low * high) ** 0.5, high]) if grid else tune.loguniform(low, high)

    params: dict[str, Any] = {"capacity_factor": choice(space.capacity_factor), "k": choice(space.k)}
    if space.lr is not None:
        params["lr"] = log_range(space.lr)
    if space.mixing == "weights":
        for task in space.tasks or config.task_names:
            params[f"{MIX}{task}"] = tune.loguniform(*space.weight)
    elif space.mixing == "temperature":
        params["temperature"] = log_range(space.temperature)
    return params


def config_point(config: Config) -> dict[str, Any]:
    """The config's own values of what the sweep varies, where they lie in its space.

    The sweep's first trial: its best is then measured against what the config has now, in
    the same trial settings, and a sweep that finds nothing better says so. Values the space
    cannot hold (a capacity factor not among the choices, weights under another mixing
    strategy) are left to the searcher."""
    space, moe, train = config.tune.space, config.model.moe, config.train
    point: dict[str, Any] = {}
    if moe.capacity_factor in space.capacity_factor:
        point["capacity_factor"] = moe.capacity_factor
    if moe.k in space.k:
        point["k"] = moe.k
    if space.lr is not None and space.lr[0] <= train.lr <= space.lr[1]:
        point["lr"] = train.lr
    if space.mixing == "weights" and train.mixing.strategy == "ratios":
        low, high = space.weight
        weights = {t.name: t.mix_weight or 1.0 for t in config.tasks}
        for task in space.tasks or config.task_names:
            if low <= weights[task] <= high:
                point[f"{MIX}{task}"] = weights[task]
    elif space.mixing == "temperature" and train.mixing.strategy == "temperature":
        low, high = space.temperature
        if low <= train.mixing.temperature <= high:
            point["temperature"] = train.mixing.temperature
    return point


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's parameters applied (validated again as a whole)."""
    raw = copy.deepcopy(base.model_dump(mode="json"))
    moe = raw["model"]["moe"]
    moe["capacity_factor"] = float(params.get("capacity_factor", moe["capacity_factor"]))
    moe["k"] = int(params.get("k", moe["k"]))
    if "lr" in params:
        raw["train"]["lr"] = float(params["lr"])
    weights = {key[len(MIX) :]: float(value) for key, value in params.items() if key.startswith(MIX)}
    if weights:
        raw["train"]["mixing"]["strategy"] = "ratios"
        for task in raw["tasks"]:
            task["mix_weight"] = weights.get(task["name"], task.get("mix_weight") or 1.0)
    if "temperature" in params:
        raw["train"]["mixing"].update(strategy="temperature", temperature=float(params["temperature"]))
    # every report a trial makes must carry the objective: evaluate whenever it checkpoints
    raw["train"]["checkpoint_every"] = raw["train"]["eval_every"]
    return type(base).model_validate(raw)


def mixing_ratios(
    config: Config, sizes: dict[str, int] | None = None, tasks: list[str] | tuple[str, ...] | None = None
) -> dict[str, float]:
    """Each task's share of the steps under this config's mixing, when `tasks` (default all)
    train together; `sizes` (training rows per task) matter to temperature mixing. A schedule's
    shares are its phases' weighted by how many of `train.steps` each phase lasts."""
    from mm.train import TaskSampler

    tasks = list(tasks or config.task_names)
    ratios = {t.name: t.mix_weight for t in config.tasks if t.mix_weight is not None}
    mixing = config.train.mixing
    sampler = TaskSampler(tasks, mixing, config.seed, sizes, ratios)
    phases = mixing.schedule if mixing.strategy == "schedule" else []
    steps, starts = config.train.steps, [phase.start for phase in phases] or [0]
    spans = [max(min(end, steps) - start, 0) for start, end in zip(starts, [*starts[1:], steps], strict=True)]
    shares = sum(span * sampler.probabilities(start) for start, span in zip(starts, spans, strict=True))
    return dict(zip(tasks, (shares / sum(spans)).tolist(), strict=True))
