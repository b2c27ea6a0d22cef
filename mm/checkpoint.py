"""Checkpoints: a directory that any expert-parallel layout can load.

    dense.pt                 dense weights and their Adam moments, by parameter name
    experts/expert-007.pt    everything of global expert 7: its slice of every MoE layer's
                             weights and Adam moments, by parameter name
    trainer.pt               step, learning-rate schedule, task sampler
    config.json              the experiment config
    tasks.json               per task: kind, command id, classes and their names, input features
    vocab.model              the vocabulary (when the run had one)

Experts are stored one file per global id, so a checkpoint written by 4 ranks (2 experts each)
loads on 2 ranks (4 each) or 1: each rank reads the files of the experts it now holds. Rank 0
writes the dense part; the ranks of the first expert-parallel group write their experts; the
files of all ranks together make one checkpoint (Ray Train merges the workers' directories).
Everything is plain tensors and numbers, loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mm.moe import Experts

DENSE, TRAINER, CONFIG, TASKS, VOCAB = "dense.pt", "trainer.pt", "config.json", "tasks.json", "vocab.model"
EXPERTS_DIR = "experts"
MOMENTS = ("exp_avg", "exp_avg_sq")
STEP = "step"  # Adam's per-parameter step count: a parameter unused by a task skips steps


class CheckpointError(ValueError):
    pass


def expert_file(directory: Path, expert_id: int) -> Path:
    return directory / EXPERTS_DIR / f"expert-{expert_id:03d}.pt"


def expert_modules(model: nn.Module) -> dict[str, Experts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Experts)}


def _expert_param_names(model: nn.Module) -> set[str]:
    return {
        f"{prefix}.{name}" for prefix, m in expert_modules(model).items() for name, _ in m.named_parameters()
    }


# ------------------------------------------------------------------------------------------- save


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    vocab: bytes | None = None,
    tasks: list[dict[str, Any]] | None = None,
    write_dense: bool = True,
    write_experts: bool = True,
) -> Path:
    """Write this rank's part of a checkpoint into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    moments = _moments_by_name(model, optimizer)
    expert_names = _expert_param_names(model)
    if write_dense:
        dense = {
            name: {"weight": p.detach().cpu(), **moments.get(name, {})}
            for name, p in model.named_parameters()
            if name not in expert_names
        }
        _save(dense, directory / DENSE)
        _save(
            {"trainer": trainer_state or {}},
            directory / TRAINER,
        )
        if config is not None:
            (directory / CONFIG).write_text(json.dumps(config, indent=2))
        if vocab is not None:
            (directory / VOCAB).write_bytes(vocab)
        if tasks is not None:
            (directory / TASKS).write_text(json.dumps(tasks, indent=2))
    if write_experts:
        for expert_id, content in _expert_contents(model, moments).items():
            _save(content, expert_file(directory, expert_id))
    return directory


def _moments_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, dict[str, Tensor]]:
    if optimizer is None:
        return {}
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        if all(m in state for m in MOMENTS):
            out[name] = {m: state[m].detach().cpu() for m in MOMENTS}
            out[name][STEP] = torch.as_tensor(state[STEP], dtype=torch.float32).reshape(1)
    return out


def _expert_contents(model: nn.Module, moments: dict[str, dict[str, Tensor]]) -> dict[int, dict[str, Any]]:
    """{global expert id: {parameter name: {"weight": slice, "exp_avg": slice, ...}}}"""
    contents: dict[int, dict[str, Any]] = {}
    for prefix, experts in expert_modules(model).items():
        for pname, p in experts.named_parameters():
            name = f"{prefix}.{pname}"
            tensors = {"weight": p.detach().cpu(), **moments.get(name, {})}
            for local in range(experts.num):
                entry = contents.setdefault(experts.first_id + local, {})
                entry[name] = {key: t if key == STEP else t[local].clone() for key, t in tensors.items()}
    return contents


def _save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------- load


def load_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load weights (and Adam moments) into `model` as it is sharded now; returns the trainer
    state. Any difference in parameter names or shapes is an error naming the parameter."""
    directory = Path(directory)
    if not (directory / DENSE).is_file():
        raise CheckpointError(f"{directory}: not a checkpoint ({DENSE} is missing)")
    dense = _load(directory / DENSE)
    expert_names = _expert_param_names(model)
    named = dict(model.named_parameters())
    missing = sorted(set(named) - expert_names - set(dense))
    unexpected = sorted(set(dense) - set(named))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: checkpoint does not fit the model; "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    trainer = _load(directory / TRAINER)
    for name, entry in dense.items():
        _assign(named[name], entry, name, optimizer, directory)
    for prefix, experts in expert_modules(model).items():
        files = [_load_expert(directory, experts.first_id + i) for i in range(experts.num)]
        for pname, p in experts.named_parameters():
            name = f"{prefix}.{pname}"
            stacked = {key: torch.stack([f[name][key] for f in files]) for key in files[0][name]}
            if STEP in stacked:  # the same for every expert of a layer
                stacked[STEP] = stacked[STEP][0]
            _assign(p, stacked, name, optimizer, directory)
    return trainer["trainer"]


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_expert(directory: Path, expert_id: int) -> dict[str, Any]:
    path = expert_file(directory, expert_id)
    if not path.is_file():
        held = sorted(p.name for p in (directory / EXPERTS_DIR).glob("expert-*.pt"))
        raise CheckpointError(
            f"{directory}: no file for expert {expert_id} (has {len(held)} experts: {held[:3]}...)"
        )
    return _load(path)


def _assign(param: nn.Parameter, entry: dict[str, Tensor], name: str, optimizer, where: Path) -> None:
    weight = entry["weight"]
    if weight.shape != param.shape:
        raise CheckpointError(
            f"{where}: {name} has shape {tuple(weight.shape)}, the model {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(weight)
    if optimizer is not None and all(m in entry for m in MOMENTS):
        step = entry[STEP].reshape(()).clone()
        optimizer.state[param] = {STEP: step, **{m: entry[m].to(param.device) for m in MOMENTS}}


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG} in the checkpoint")
    return json.loads(path.read_text())


def read_tasks(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / TASKS
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {TASKS} in the checkpoint (written by `mm train`)")
    return json.loads(path.read_text())


def read_vocab(directory: str | Path) -> bytes | None:
    path = Path(directory) / VOCAB
    return path.read_bytes() if path.is_file() else None
