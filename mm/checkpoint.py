"""Checkpoints: a directory that any expert-parallel layout can load.

    dense.pt                 dense weights and their Adam moments, by parameter name
    experts/expert-007.pt    everything of global expert 7: its slice of every MoE layer's
                             weights and Adam moments, by parameter name
    trainer.pt               step, learning-rate schedule, task sampler
    config.json              the experiment config
    tasks.json               per task: kind, command id, classes and their names, input features
    vocab.model              the vocabulary (when the run had one)
    run.json                 the MLflow run and step that wrote it
    streams/rank-001.json    where rank 1's data stream of every task was (epoch, batches
                             taken), so that a resumed run reads on from the same rows
    NAME.sha256              beside every file above: its sha256, checked on load

Each file carries its own checksum file, so the ranks' directories merge into one checkpoint
with every hash in place; a file that was cut short or altered fails the load with its name.

Experts are stored one file per global id, so a checkpoint written by 4 ranks (2 experts each)
loads on 2 ranks (4 each) or 1: each rank reads the files of the experts it now holds. Rank 0
writes the dense part; the ranks of the first expert-parallel group write their experts; the
files of all ranks together make one checkpoint (Ray Train merges the workers' directories).
Everything is plain tensors and numbers, loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mm.moe import Experts

DENSE, TRAINER, CONFIG, TASKS, VOCAB = "dense.pt", "trainer.pt", "config.json", "tasks.json", "vocab.model"
RUN = "run.json"  # which run wrote it, at which step: the lineage of a resumed run
EXPERTS_DIR = "experts"
STREAMS_DIR = "streams"
MOMENTS = ("exp_avg", "exp_avg_sq")
STEP = "step"  # Adam's per-parameter step count: a parameter unused by a task skips steps
CHECKSUM = ".sha256"


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
    run: dict[str, Any] | None = None,
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
            write_file(directory / CONFIG, json.dumps(config, indent=2).encode())
        if vocab is not None:
            write_file(directory / VOCAB, vocab)
        if tasks is not None:
            write_file(directory / TASKS, json.dumps(tasks, indent=2).encode())
        if run is not None:
            write_file(directory / RUN, json.dumps(run, indent=2).encode())
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
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_file(path, buffer.getvalue())


def write_file(path: Path, content: bytes) -> None:
    """A file of a checkpoint, then its checksum, each by rename: a reader never sees half of
    either. Anything added to a checkpoint (a sweep's segment state) goes through here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, data in (
        (path, content),
        (_checksum_file(path), hashlib.sha256(content).hexdigest().encode()),
    ):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM)


def save_stream_positions(directory: str | Path, rank: int, world: int, positions: dict[str, Any]) -> None:
    """This rank's position in each task's data stream (`TaskStream.state_dict`)."""
    record = {"rank": rank, "world": world, "positions": positions}
    write_file(Path(directory) / STREAMS_DIR / f"rank-{rank:03d}.json", json.dumps(record).encode())


def read_stream_positions(directory: str | Path) -> dict[int, dict[str, Any]]:
    """{rank: {"world": ..., "positions": {task: state}}} of every rank that saved one (none in
    checkpoints from before streams were saved)."""
    records = [json.loads(p.read_text()) for p in sorted((Path(directory) / STREAMS_DIR).glob("rank-*.json"))]
    return {record["rank"]: record for record in records}


# ----------------------------------------------------------------------------------------- verify


def verify_checkpoint(directory: str | Path) -> None:
    """Every file of the checkpoint against its recorded sha256; the first that does not match
    (or has no record) is an error naming it. Cheap next to loading: run it before any work."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not (directory / DENSE).is_file():
        raise CheckpointError(f"{directory}: not a checkpoint ({DENSE} is missing)")
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name.endswith(CHECKSUM) or path.name.startswith("."):
            continue
        record = _checksum_file(path)
        if not record.is_file():
            raise CheckpointError(f"{path}: no recorded sha256 ({record.name} is missing)")
        if _sha256(path) != record.read_text().strip():
            raise CheckpointError(
                f"{path}: sha256 does not match the one recorded when it was written "
                "(cut short or altered); use another checkpoint"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- load


def load_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load weights (and Adam moments) into `model` as it is sharded now; returns the trainer
    state. Any difference in parameter names or shapes is an error naming the parameter."""
    directory = Path(directory)
    verify_checkpoint(directory)
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file whose hash matched but which torch cannot read
        raise CheckpointError(
            f"{path}: not a readable checkpoint file ({type(err).__name__}: {err})"
        ) from None


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
        step = entry[STEP].reshape(()).to(param.device, copy=True)  # fused Adam keeps it beside the weight
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


def read_run_record(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / RUN
    return json.loads(path.read_text()) if path.is_file() else {}


def read_vocab(directory: str | Path) -> bytes | None:
    path = Path(directory) / VOCAB
    return path.read_bytes() if path.is_file() else None
