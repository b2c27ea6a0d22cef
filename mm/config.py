"""Typed experiment configuration, loaded from YAML.

One pydantic model per component (model, MoE, tasks, data, training, ...), nested in `Config`.
Unknown keys and ill-typed values are rejected with the file and the dotted key. A model
`preset` (`tiny`, `base`) fills in the model section; keys given next to it win. Dotted
overrides (`train.steps=100`, `tasks.wmt_en_de.batch_size=8`) are applied before validation,
so they are checked like the file itself.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mm.tasks import kind_of


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------- model


class MoEConfig(Section):
    num_experts: int = Field(8, ge=1)
    k: int = Field(2, ge=1)
    hidden: int = Field(256, ge=1, description="width of each expert's ReLU layer")
    # None: dropless, every expert takes all the tokens routed to it (MegaBlocks)
    capacity_factor: float | None = Field(1.25, gt=0)
    # None: no token is dropped at evaluation, so that decoding one token at a time gives
    # exactly what a full recompute gives (capacity would otherwise depend on the batch).
    eval_capacity_factor: float | None = None
    noisy_gating: bool = True
    balance_coef: float = Field(1e-2, ge=0, description="weight of the CV² balancing loss")
    # Beyond the paper (mm/moe.py), all off by default:
    z_loss_coef: float = Field(0.0, ge=0, description="router z-loss weight (ST-MoE suggests 1e-3)")
    balance: Literal["aux_loss", "bias", "both"] = Field(
        "aux_loss", description="CV² loss, DeepSeek-V3's loss-free expert bias, or both"
    )
    bias_update_rate: float = Field(1e-3, gt=0, description="step of the expert bias per training pass")
    shared_experts: int = Field(0, ge=0, le=1, description="a dense FFN every token goes through too")
    router_fp32: bool = Field(False, description="gating matmuls in fp32 under bf16 autocast")
    grouped_mm: bool = Field(False, description="experts as one grouped matmul, no padded buffers")

    @model_validator(mode="after")
    def _k_fits(self) -> MoEConfig:
        if self.k > self.num_experts:
            raise ValueError(f"k={self.k} is larger than num_experts={self.num_experts}")
        return self


class SpecAugmentConfig(Section):
    """SpecAugment (Park et al. 2019) on speech's training inputs: bands of mel bins and spans
    of frames set to their utterance's mean. Off (no masks) by default, as in the paper's
    model. Each mask's width is drawn uniformly from 0 to its maximum."""

    freq_masks: int = Field(0, ge=0)
    freq_width: int = Field(15, ge=0, description="widest frequency mask, in mel bins")
    time_masks: int = Field(0, ge=0)
    time_width: float = Field(0.1, ge=0, le=1, description="widest time mask, as a share of the utterance")


class ModelConfig(Section):
    preset: Literal["tiny", "base"] | None = None
    d_model: int = Field(64, ge=8)
    num_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    attention_dropout: float = Field(0.1, ge=0, lt=1)
    # (kernel, dilation) of the four conv steps of a conv block. The paper: two 3x1 steps,
    # then two steps with the large kernel, the last one dilated.
    conv_kernels: list[tuple[int, int]] = [(3, 1), (3, 1), (5, 1), (5, 2)]
    encoder_blocks: int = Field(2, ge=0, description="conv blocks; the MoE layer sits in the middle")
    mixer_blocks: int = Field(1, ge=0, description="conv blocks after the mixer's attention block")
    decoder_blocks: int = Field(2, ge=0, description="conv+attention blocks; MoE in the middle")
    image_channels: int = Field(3, ge=1)
    audio_bins: int = Field(80, ge=1)
    # time steps per audio position: 16 is the image net's 32x less one spatial axis; short
    # clips (the starter suite's) learn faster at 4
    audio_downsampling: Literal[2, 4, 8, 16] = 16
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # Speech: weight of an auxiliary CTC loss on the encoder's output (hybrid CTC/attention, as
    # ESPnet), which helps the attention find its alignment on little data. 0: the paper's model.
    ctc_weight: float = Field(0.0, ge=0)
    spec_augment: SpecAugmentConfig = SpecAugmentConfig()
    tie_embeddings: bool = False
    moe: MoEConfig = MoEConfig()
    # Ablations (the paper's Table 4): leave the MoE layers out, or the decoder's attention
    # blocks. The mixer's attention stays: it is the only path from the inputs to the outputs.
    use_moe: bool = True
    decoder_attention: bool = True

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in MODEL_PRESETS:
            return _deep_merge(MODEL_PRESETS[data["preset"]], data)
        return data

    @field_validator("conv_kernels")
    @classmethod
    def _four_odd_kernels(cls, kernels: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if len(kernels) != 4:
            raise ValueError(f"a conv block has 4 steps, got {len(kernels)} (kernel, dilation) pairs")
        for kernel, dilation in kernels:
            if kernel < 1 or kernel % 2 == 0 or dilation < 1:
                raise ValueError(f"kernel sizes must be odd and dilations >= 1, got ({kernel}, {dilation})")
        return kernels

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        return self


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # A training step well under a second on one CPU core.
    "tiny": {
        "d_model": 64,
        "num_heads": 4,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "conv_kernels": [(3, 1), (3, 1), (5, 1), (5, 2)],
        "encoder_blocks": 2,
        "mixer_blocks": 1,
        "decoder_blocks": 2,
        "moe": {"num_experts": 4, "k": 2, "hidden": 128},
    },
    # tensor2tensor's multimodel_base.
    "base": {
        "d_model": 512,
        "num_heads": 8,
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "conv_kernels": [(3, 1), (3, 1), (15, 1), (15, 4)],
        "encoder_blocks": 6,
        "mixer_blocks": 2,
        "decoder_blocks": 4,
        "moe": {"num_experts": 30, "k": 2, "hidden": 2048},
    },
}


# --------------------------------------------------------------------------------------------- tasks

CorpusLayout = Literal["imagenet", "wmt", "tsv", "coco", "librispeech", "speech_manifest", "ptb"]


class CorpusConfig(Section):
    path: Path
    layout: CorpusLayout
    source_lang: str | None = None
    target_lang: str | None = None
    # split name -> folder or file prefix inside `path`
    splits: dict[str, str] = {"train": "train", "dev": "dev", "test": "test"}
    # image tasks: side of the square images stored in the shards; None = data.image_size
    image_size: int | None = Field(None, ge=8)


class TaskConfig(Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: str
    corpus: CorpusConfig | None = None
    command: str | None = Field(None, description="command token; default <2name>")
    loss_weight: float = Field(1.0, ge=0)
    metrics: list[str] | None = None
    num_classes: int | None = Field(None, ge=2)
    batch_size: int = Field(16, ge=1)
    max_input_length: int = Field(256, ge=1)
    max_target_length: int = Field(128, ge=2)
    mix_weight: float | None = Field(None, ge=0, description="explicit mixing ratio")
    # parsing: decode only well-formed trees with one leaf per input word (mm.decoding)
    constrained_decoding: bool = True
    beam: int = Field(1, ge=1, description="beam width of this task's decoding (evaluation, prediction)")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        kind_of(kind)
        return kind

    @model_validator(mode="after")
    def _defaults_from_kind(self) -> TaskConfig:
        if self.command is None:
            self.command = f"<2{self.name}>"
        if self.metrics is None:
            self.metrics = list(kind_of(self.kind).metrics)
        return self


# ---------------------------------------------------------------------------------------- data, train


class DataConfig(Section):
    shards: Path = Path("shards")
    vocab_size: int = Field(8000, ge=16)
    # sentences the vocabulary is trained on, shared equally by the tasks that have text
    vocab_sample: int = Field(200_000, ge=1)
    image_size: int = Field(28, ge=8)
    sample_rate: int = Field(16000, ge=1000)
    mel_bins: int = Field(80, ge=8)
    window_ms: float = Field(25.0, gt=0)
    hop_ms: float = Field(10.0, gt=0)
    max_rejected_fraction: float = Field(0.01, ge=0, le=1)
    shard_rows: int = Field(20000, ge=1, description="rows per parquet part")
    # training: read the shards into the object store once (fast epochs) or stream them from
    # storage every epoch (any size); auto reads up front what fits a share of the store
    read: Literal["auto", "materialize", "stream"] = "auto"


class MixingPhase(Section):
    """From step `start` on, tasks are sampled in proportion to `weights` (until the next phase)."""

    start: int = Field(ge=0)
    weights: dict[str, float]

    @field_validator("weights")
    @classmethod
    def _usable_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        negative = sorted(task for task, weight in weights.items() if not weight >= 0)
        if negative:
            raise ValueError(f"weights must be >= 0, not for {', '.join(negative)}")
        if sum(weights.values()) <= 0:
            raise ValueError("weights sum to zero")
        return weights


class MixingConfig(Section):
    strategy: Literal["ratios", "temperature", "loss_adaptive", "schedule"] = "temperature"
    temperature: float = Field(2.0, gt=0)
    # loss-adaptive: p ∝ (running loss)^power, smoothed with this decay
    adaptive_power: float = Field(1.0, ge=0)
    adaptive_decay: float = Field(0.9, ge=0, lt=1)
    # schedule: weights that change with the step, e.g. the schedule a PBT sweep found
    schedule: list[MixingPhase] = Field(default_factory=list)

    @model_validator(mode="after")
    def _schedule_in_order(self) -> MixingConfig:
        if self.strategy == "schedule" and not self.schedule:
            raise ValueError("strategy 'schedule' needs phases under schedule: [{start: 0, weights: {...}}]")
        starts = [phase.start for phase in self.schedule]
        if starts and (starts[0] != 0 or starts != sorted(set(starts))):
            raise ValueError(f"schedule phases must start at step 0 and in increasing order, not {starts}")
        return self

    def phase_at(self, step: int) -> MixingPhase:
        """The schedule's phase in force at `step`."""
        return [phase for phase in self.schedule if phase.start <= step][-1]


class TrainConfig(Section):
    steps: int = Field(1000, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate, reached after warm-up")
    warmup_steps: int = Field(100, ge=0)
    # The last `cooldown` (a fraction) of `steps` take the learning rate linearly down towards
    # zero: a run then ends at a lower loss than its schedule's curve would, but no longer
    # continues into a longer run's. A fraction, so that `-o train.steps=N` keeps it in
    # proportion. 0: no cool-down.
    cooldown: float = Field(0.0, ge=0, le=1)
    # Where the learning-rate schedule (its cool-down) ends, when a run stops before it: a PBT
    # trial trains in segments, each stopping at its own `steps`. None: at `steps`.
    schedule_steps: int | None = Field(None, ge=1)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    batch_by: Literal["examples", "tokens"] = "examples"
    # Batches' worth of rows sorted by length together before they are cut into batches, so
    # that each batch pads little (`mm.reader.plan_batches`; token batches read 256 rows at a
    # time, sorted when this is above 1). 1: batches in stream order. Off in the starter: it
    # made steps 11 % faster but learnt less per second (README "Results").
    sort_window: int = Field(1, ge=1)
    mixing: MixingConfig = MixingConfig()
    eval_every: int = Field(500, ge=1)
    eval_examples: int = Field(200, ge=1)
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False

    @model_validator(mode="after")
    def _schedule_covers_the_run(self) -> TrainConfig:
        if self.schedule_steps is not None and self.schedule_steps < self.steps:
            raise ValueError(
                f"schedule_steps={self.schedule_steps} ends before the run does (steps={self.steps})"
            )
        return self


class ClusterConfig(Section):
    """Where and how wide training runs (Ray Train)."""

    workers: int = Field(2, ge=1)
    min_workers: int | None = Field(None, ge=1, description="elastic: shrink down to this many")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    expert_parallel: int | None = Field(None, ge=1, description="ranks sharing one copy of the experts")
    # Restarts of the worker group from its latest checkpoint (-1: unlimited). On by default: a
    # worker lost to a node failure or an OOM kill should cost a few steps, not the run.
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from the last checkpoint")
    storage_path: Path = Path("runs")
    checkpoints_to_keep: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _elastic_bounds(self) -> ClusterConfig:
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"min_workers={self.min_workers} is larger than workers={self.workers}")
        return self


class MLflowConfig(Section):
    tracking_uri: str = "sqlite:///mlruns.db"
    experiment: str | None = Field(None, description="default: the config's name")
    model_name: str | None = Field(None, description="registered model; default: the config's name")
    artifact_location: str | None = Field(
        None,
        description="for a new experiment; default: ./mlartifacts for a local store, "
        "the tracking server's own store for an http(s) one",
    )


class SearchSpace(Section):
    """What a sweep varies. Lists are choices (a grid under `search: grid`); pairs are ranges,
    sampled log-uniformly."""

    mixing: Literal["weights", "temperature", "none"] = "weights"
    tasks: list[str] | None = Field(None, description="tasks whose weight is searched; default all")
    weight: tuple[float, float] = (0.25, 4.0)
    temperature: tuple[float, float] = (1.0, 5.0)
    capacity_factor: list[float] = [1.0, 1.25, 2.0]
    k: list[int] = [1, 2]
    lr: tuple[float, float] | None = (3e-4, 3e-3)


class TuneConfig(Section):
    trials: int = Field(4, ge=1)
    max_concurrent: int = Field(1, ge=1)
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: evaluations before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2)
    pbt_interval: int = Field(100, ge=1, description="PBT: steps between exploit/explore")
    # Per-task reference scores (e.g. each task's single-task run); without one a task's metric
    # is normalised over its range (see mm.metrics.normalized).
    reference: dict[str, float] = Field(default_factory=dict)
    space: SearchSpace = SearchSpace()

    @model_validator(mode="after")
    def _grid_is_finite(self) -> TuneConfig:
        if self.search == "grid" and self.space.mixing == "weights":
            raise ValueError(
                "grid search cannot enumerate per-task weights: use space.mixing: temperature or none"
            )
        if self.scheduler == "pbt" and self.max_concurrent < self.trials:
            raise ValueError(
                f"scheduler pbt trains the population side by side: max_concurrent "
                f"({self.max_concurrent}) must be at least trials ({self.trials})"
            )
        return self


class ExperimentConfig(Section):
    """`mm experiment`: the tasks each study uses. Unset, they are picked by kind (see
    `tune.studies`): all tasks for joint-vs-single and mixing; the parsing task helped by an
    EN->DE translation task and an image classification task for transfer; image
    classification and EN->DE for the ablation."""

    joint_tasks: list[str] | None = None
    transfer_target: str | None = None
    transfer_helpers: list[str] | None = None
    ablation_tasks: list[str] | None = None
    mixing_tasks: list[str] | None = None
    max_concurrent: int = Field(1, ge=1, description="runs at once (each a Ray Train run)")


class Config(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    tasks: list[TaskConfig]
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    mlflow: MLflowConfig = MLflowConfig()
    tune: TuneConfig = TuneConfig()
    experiment: ExperimentConfig = ExperimentConfig()

    @field_validator("tasks")
    @classmethod
    def _unique_task_names(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        if not tasks:
            raise ValueError("at least one task is needed")
        names = [t.name for t in tasks]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"task names must be unique, repeated: {', '.join(duplicated)}")
        return tasks

    def task(self, name: str) -> TaskConfig:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"config {self.name!r} has no task {name!r}; it has {', '.join(self.task_names)}")

    def primary_metric(self, task: str) -> str:
        """The metric a task is judged by (model selection, aggregates, reports): its first."""
        return self.task(task).metrics[0]

    def primary_metrics(self) -> dict[str, str]:
        return {task.name: self.primary_metric(task.name) for task in self.tasks}

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @model_validator(mode="after")
    def _named_tasks_exist(self) -> Config:
        study = self.experiment
        named = {
            "tune.space.tasks": self.tune.space.tasks or [],
            "tune.reference": list(self.tune.reference),
            "experiment.joint_tasks": study.joint_tasks or [],
            "experiment.transfer_target": [study.transfer_target] if study.transfer_target else [],
            "experiment.transfer_helpers": study.transfer_helpers or [],
            "experiment.ablation_tasks": study.ablation_tasks or [],
            "experiment.mixing_tasks": study.mixing_tasks or [],
        }
        for i, phase in enumerate(self.train.mixing.schedule):
            named[f"train.mixing.schedule[{i}].weights"] = list(phase.weights)
            missing = sorted(set(self.task_names) - set(phase.weights))
            if missing:
                raise ValueError(f"train.mixing.schedule[{i}].weights lacks tasks: {', '.join(missing)}")
        for where, tasks in named.items():
            unknown = sorted(set(tasks) - set(self.task_names))
            if unknown:
                raise ValueError(f"{where} names tasks the config lacks: {', '.join(unknown)}")
        if max(self.tune.space.k) > self.model.moe.num_experts:
            raise ValueError(f"tune.space.k has k > model.moe.num_experts={self.model.moe.num_experts}")
        return self

    @model_validator(mode="after")
    def _experts_divide(self) -> Config:
        experts, ranks = self.model.moe.num_experts, self.cluster.expert_parallel
        if ranks is not None and experts % ranks:
            raise ValueError(
                f"model.moe.num_experts={experts} is not divisible by cluster.expert_parallel={ranks}"
            )
        return self

    def resolved(self, base: str | Path | None = None) -> Config:
        """A copy whose file paths no longer depend on the current directory: relative ones are
        taken from `base`, else $MM_WORKDIR, else the current directory. Ray workers, Tune trials
        and submitted jobs run in directories of their own."""
        root = Path(base or os.environ.get("MM_WORKDIR") or ".").absolute()
        config = self.model_copy(deep=True)
        config.data.shards = root / config.data.shards
        config.cluster.storage_path = root / config.cluster.storage_path
        for task in config.tasks:
            if task.corpus is not None:
                task.corpus.path = root / task.corpus.path
        uri = config.mlflow.tracking_uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            config.mlflow.tracking_uri = f"sqlite:///{root / uri[len('sqlite:///') :]}"
        return config

    @property
    def command_tokens(self) -> list[str]:
        """The command tokens in a fixed order: they get ids 3, 4, ... in the vocabulary."""
        return sorted({t.command for t in self.tasks})


# ------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(raw).__name__}")
    for override in overrides:
        raw = apply_override(raw, override, source=str(path))
    return parse_config(raw, source=str(path)).resolved()


def parse_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, raw, source)) from None


def apply_override(raw: dict[str, Any], override: str, source: str = "<config>") -> dict[str, Any]:
    """`a.b.c=value`, the value parsed as YAML; list items with a `name` are addressed by it."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. train.steps=100")
    raw = copy.deepcopy(raw)
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]), source, create=True)
    last = parts[-1]
    parsed = yaml.safe_load(value)
    if isinstance(node, list):
        _child(node, last, key, source, create=False)  # raises when no such named item
        raise ConfigError(f"{source}: override {key}: replace fields of the item, not the item")
    node[last] = parsed
    return raw


def _child(node: Any, part: str, where: str, source: str, create: bool) -> Any:
    if isinstance(node, dict):
        if part not in node and create:
            node[part] = {}
        return node[part]
    if isinstance(node, list):
        for item in node:
            if isinstance(item, dict) and item.get("name") == part:
                return item
        names = [item.get("name") for item in node if isinstance(item, dict)]
        raise ConfigError(f"{source}: override {where}: no item named {part!r} (have {names})")
    raise ConfigError(f"{source}: override {where}: {type(node).__name__} has no keys")


def _describe(err: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = [f"{source}: invalid config"]
    for problem in err.errors():
        key = _dotted(problem["loc"], raw)
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            # a check of the whole config (empty location) would print the whole config
            shown = problem["type"] != "missing" and problem["loc"]
            got = f" (got {problem['input']!r})" if shown else ""
            lines.append(f"  {key}: {problem['msg']}{got}")
    return "\n".join(lines)


def _dotted(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """Turn pydantic's location into a dotted key, naming list items by their `name`."""
    parts, node = [], raw
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            node = node[item]
            name = node.get("name") if isinstance(node, dict) else None
            parts.append(f"{name}" if name else f"[{item}]")
            continue
        if re.fullmatch(r"[a-z_]+\[.*\]", str(item)) or item in ("tuple", "list"):
            continue  # pydantic's internal markers for tuple/union members
        parts.append(str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return re.sub(r"\.\[", "[", ".".join(parts)) or "<top>"


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def flatten(config: BaseModel) -> dict[str, Any]:
    """The config as dotted keys (MLflow params); tasks are keyed by name."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            for item in value:
                walk(f"{prefix}.{item['name']}", {k: v for k, v in item.items() if k != "name"})
        else:
            out[prefix] = value

    walk("", config.model_dump(mode="json"))
    return out
