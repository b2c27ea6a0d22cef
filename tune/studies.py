"""The studies of `mm experiment`: the paper's claims as sets of training runs ("arms").

    joint-vs-single  each task alone vs all jointly (Table 2), the same steps *for that task*
    transfer         the parsing task alone vs with EN->DE vs with image classification (Table 3)
    ablation         all blocks vs no MoE vs no decoder attention (Table 4)
    mixing           uniform vs temperature vs the ratios a Ray Tune sweep finds vs the schedule
                     a Population Based Training sweep finds (beyond the paper)

A study is data: its arms (a config change each) and the comparisons the report makes
(an arm against a baseline arm, on some tasks). Nothing here starts Ray; `tune.experiment`
runs the arms.

Steps: a joint run of S steps samples task t with probability p_t (the run's mixing), so t is
trained about p_t * S steps. The single-task arm of t gets round(p_t * S) steps, and in the
transfer study the parsing task has equal weight beside its helper and twice the steps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mm.config import Config, ConfigError, apply_override, parse_config
from tune.space import mixing_ratios

STUDIES = ("joint-vs-single", "transfer", "ablation", "mixing")


@dataclass(frozen=True)
class Arm:
    name: str
    tasks: tuple[str, ...]
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys -> values
    mix_weights: dict[str, float] | None = None  # `ratios` mixing with these weights


@dataclass(frozen=True)
class Comparison:
    baseline: str  # arm names
    other: str
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Study:
    name: str
    arms: tuple[Arm, ...]
    comparisons: tuple[Comparison, ...]

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


# Study sizes. `micro` is for tests; `small` fits 3 seeds of a study in an hour on 2 CPU cores
# (tiny model, one worker); `full` is the config as written (its model, steps, workers).
PRESETS: dict[str, dict[str, Any]] = {
    "micro": {
        "model.d_model": 32,
        "model.num_heads": 2,
        "model.encoder_blocks": 2,
        "model.decoder_blocks": 2,
        "model.moe.hidden": 64,
        "train.steps": 6,
        "train.warmup_steps": 2,
        "train.eval_examples": 8,
        "train.log_every": 2,
        "cluster.workers": 1,
        "cluster.cpus_per_worker": 0.5,
        "batch_size": 8,
    },
    "small": {
        "model.d_model": 64,
        "model.moe.hidden": 128,
        "train.steps": 400,
        "train.warmup_steps": 60,
        "train.eval_examples": 200,
        "train.log_every": 50,
        "cluster.workers": 1,
        "cluster.cpus_per_worker": 1.0,
    },
    "full": {},
}


def sized(config: Config, preset: str) -> Config:
    """The config at a preset's scale; `batch_size` applies to every task."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    raw = config.model_dump(mode="json")
    for key, value in PRESETS[preset].items():
        if key == "batch_size":
            for task in raw["tasks"]:
                task["batch_size"] = value
            continue
        raw = apply_override(raw, f"{key}={json.dumps(value)}", source=f"preset {preset}")
    return parse_config(raw, source=f"preset {preset}")


def expand(study: str, config: Config, sizes: dict[str, int]) -> Study:
    """The study's arms on `config`; `sizes` (training rows per task) set temperature mixing."""
    check_study(study)
    return BUILDERS[study](config, sizes)


def check_study(study: str) -> None:
    if study not in BUILDERS:
        raise ConfigError(f"unknown study {study!r}; studies: {', '.join(STUDIES)}")


def arm_config(config: Config, arm: Arm, seed: int) -> Config:
    """The run of one arm and seed: its tasks only, its steps, its changes."""
    raw = config.model_dump(mode="json")
    raw["seed"] = seed
    raw["tasks"] = [t for t in raw["tasks"] if t["name"] in arm.tasks]
    raw["experiment"] = {}  # the study's task choices name tasks this run leaves out
    space, reference = raw["tune"]["space"], raw["tune"]["reference"]
    if space["tasks"]:
        space["tasks"] = [t for t in space["tasks"] if t in arm.tasks] or None
    raw["tune"]["reference"] = {t: v for t, v in reference.items() if t in arm.tasks}
    train = raw["train"]
    for phase in train["mixing"]["schedule"]:
        phase["weights"] = {t: w for t, w in phase["weights"].items() if t in arm.tasks}
    train["steps"] = arm.steps
    train["eval_every"] = train["checkpoint_every"] = arm.steps  # one evaluation, at the end
    train["warmup_steps"] = min(train["warmup_steps"], max(arm.steps // 4, 1))
    if arm.mix_weights is not None:
        train["mixing"]["strategy"] = "ratios"
        for task in raw["tasks"]:
            task["mix_weight"] = arm.mix_weights[task["name"]]
    for key, value in arm.overrides.items():
        raw = apply_override(raw, f"{key}={json.dumps(value)}", source=f"arm {arm.name}")
    return parse_config(raw, source=f"arm {arm.name}")


# ----------------------------------------------------------------------------------- the studies


def joint_vs_single(config: Config, sizes: dict[str, int]) -> Study:
    tasks = tuple(config.experiment.joint_tasks or config.task_names)
    steps = config.train.steps
    shares = mixing_ratios(config, sizes, tasks)
    joint = Arm("joint", tasks, steps)
    singles = [Arm(f"single:{t}", (t,), max(round(shares[t] * steps), 1)) for t in tasks]
    comparisons = tuple(Comparison(f"single:{t}", "joint", (t,)) for t in tasks)
    return Study("joint-vs-single", (*singles, joint), comparisons)


def transfer(config: Config, sizes: dict[str, int]) -> Study:
    target = config.experiment.transfer_target or _task_of_kind(config, "constituency_parsing", "transfer")
    helpers = config.experiment.transfer_helpers or [
        _translation_into(config, "de"),
        _task_of_kind(config, "image_classification", "transfer"),
    ]
    steps = config.train.steps
    alone = Arm(f"{target} alone", (target,), steps)
    paired = [
        Arm(f"{target} + {helper}", (target, helper), 2 * steps, mix_weights={target: 1.0, helper: 1.0})
        for helper in helpers
    ]
    comparisons = tuple(Comparison(alone.name, arm.name, (target,)) for arm in paired)
    return Study("transfer", (alone, *paired), comparisons)


def ablation(config: Config, sizes: dict[str, int]) -> Study:
    tasks = tuple(
        config.experiment.ablation_tasks
        or [_task_of_kind(config, "image_classification", "ablation"), _translation_into(config, "de")]
    )
    steps = config.train.steps
    arms = (
        Arm("all blocks", tasks, steps),
        Arm("no MoE", tasks, steps, {"model.use_moe": False}),
        Arm("no attention", tasks, steps, {"model.decoder_attention": False}),
        # the MoE layer beyond the paper's gating (mm/moe.py), each against "all blocks"
        Arm(
            "z-loss + bias balancing",
            tasks,
            steps,
            {"model.moe.z_loss_coef": 1e-3, "model.moe.balance": "both"},
        ),
        Arm("dropless", tasks, steps, {"model.moe.capacity_factor": None}),
        Arm("shared expert", tasks, steps, {"model.moe.shared_experts": 1}),
    )
    comparisons = tuple(Comparison("all blocks", arm.name, tasks) for arm in arms[1:])
    return Study("ablation", arms, comparisons)


def mixing(
    config: Config,
    sizes: dict[str, int],
    tuned: dict[str, float] | None = None,
    schedule: list[dict[str, Any]] | None = None,
) -> Study:
    """`tuned`: the weights a sweep found; `schedule`: the mixing schedule of a PBT sweep's best
    trial (`tune.experiment` runs both sweeps first)."""
    tasks = tuple(config.experiment.mixing_tasks or config.task_names)
    steps = config.train.steps
    temperature = config.train.mixing.temperature
    arms = [
        Arm("uniform", tasks, steps, mix_weights=dict.fromkeys(tasks, 1.0)),
        Arm(
            f"temperature {temperature:g}",
            tasks,
            steps,
            {"train.mixing.strategy": "temperature"},
        ),
    ]
    if tuned is not None:
        arms.append(Arm("tuned ratios", tasks, steps, mix_weights={t: tuned[t] for t in tasks}))
    if schedule is not None:
        replay = {"train.mixing.strategy": "schedule", "train.mixing.schedule": schedule}
        arms.append(Arm("PBT schedule", tasks, steps, replay))
    comparisons = tuple(Comparison("uniform", arm.name, tasks) for arm in arms[1:])
    return Study("mixing", tuple(arms), comparisons)


BUILDERS: dict[str, Callable[[Config, dict[str, int]], Study]] = {
    "joint-vs-single": joint_vs_single,
    "transfer": transfer,
    "ablation": ablation,
    "mixing": mixing,
}


def _task_of_kind(config: Config, kind: str, study: str) -> str:
    for task in config.tasks:
        if task.kind == kind:
            return task.name
    raise ConfigError(
        f"the {study} study needs a {kind} task and the config has none: name its tasks under "
        f"experiment: in the config"
    )


def _translation_into(config: Config, language: str) -> str:
    """The translation task into `language`, else the first translation task."""
    translations = [t for t in config.tasks if t.kind == "translation"]
    for task in translations:
        if task.corpus is not None and task.corpus.target_lang == language:
            return task.name
    if translations:
        return translations[0].name
    raise ConfigError("the study needs a translation task and the config has none")
