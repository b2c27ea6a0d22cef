"""Checkpoints: a resumed run continues exactly; experts re-shard across layouts."""

from __future__ import annotations

import hashlib

import pytest
import torch

from mm.checkpoint import (
    CheckpointError,
    expert_file,
    load_checkpoint,
    read_run_record,
    save_checkpoint,
    verify_checkpoint,
    write_file,
)
from mm.parallel import DataExpertParallel, split_parameters
from mm.selftest import selftest_config
from mm.synthetic import SyntheticData, synthetic_tasks
from mm.train import Trainer

from conftest import tiny_model
from distributed import run_distributed

TASKS = {t.name: t for t in synthetic_tasks()}


def trainer_for(model, steps: int = 10, **train):
    config = selftest_config(steps=steps, seed=0)
    for key, value in train.items():
        setattr(config.train, key, value)
    return Trainer(model, config)


def batches(seed: int):
    data = SyntheticData(seed)
    return lambda task: data.batch(TASKS[task], 4)


def test_resumed_training_continues_exactly_where_the_checkpoint_stopped(tmp_path):
    original = trainer_for(tiny_model(seed=0))
    next_batch = batches(1)
    for _ in range(3):
        original.train_step(next_batch)
    save_checkpoint(
        tmp_path / "ckpt", original.model, original.optimizer, original.state_dict(), {"name": "x"}
    )

    resumed = trainer_for(tiny_model(seed=99))  # other initial weights: all must be overwritten
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt", resumed.model, resumed.optimizer))
    assert resumed.step == 3
    for a, b in zip(original.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)

    same_batches = [batches(2), batches(2)]
    for trainer, source in zip((original, resumed), same_batches, strict=True):
        torch.manual_seed(5)  # the gating noise
        logs = [trainer.train_step(source) for _ in range(2)]
        trainer.logs = logs
    assert [log.task for log in original.logs] == [log.task for log in resumed.logs]
    assert [log.lr for log in original.logs] == [log.lr for log in resumed.logs]
    for a, b in zip(original.logs, resumed.logs, strict=True):
        assert abs(a.loss - b.loss) < 1e-5
    for a, b in zip(original.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_model())
    wider = tiny_model(d_model=96)
    try:
        load_checkpoint(tmp_path / "ckpt", wider)
    except CheckpointError as err:
        assert "has shape" in str(err)
    else:
        raise AssertionError("a checkpoint of another width loaded")
    try:
        load_checkpoint(tmp_path / "nothing", wider)
    except CheckpointError as err:
        assert "no such checkpoint directory" in str(err)


# ----------------------------------------------------------------------- re-sharding across layouts

EXPERTS = {"moe": {"num_experts": 4, "noisy_gating": False}}


def save_on_ranks(rank: int, world: int, directory: str) -> None:
    """Train one step with experts spread over `world` ranks, then save the checkpoint."""
    model = tiny_model(seed=0, **EXPERTS)
    parallel = DataExpertParallel()
    parallel.parallelize(model)
    trainer = trainer_for(model, warmup_steps=1)
    trainer.parallel = parallel
    data = SyntheticData(3)  # the same global batch on every rank; each takes its part
    trainer.train_step(lambda task: data.batch(TASKS[task], 4 * world).chunks(world)[rank])
    save_checkpoint(directory, model, trainer.optimizer, trainer.state_dict(), write_dense=rank == 0)


def load_on_ranks_and_compare(rank: int, world: int, directory: str, whole_directory: str) -> None:
    """Load with `world` ranks; each rank's experts and moments equal the whole model's slice."""
    model = tiny_model(seed=1, **EXPERTS)
    DataExpertParallel().parallelize(model)
    trainer = trainer_for(model)
    load_checkpoint(directory, model, trainer.optimizer)
    whole = tiny_model(seed=2, **EXPERTS)
    whole_trainer = trainer_for(whole)
    load_checkpoint(whole_directory, whole, whole_trainer.optimizer)
    per_rank = 4 // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    _, experts = split_parameters(model)
    _, whole_experts = split_parameters(whole)
    for p, q in zip(experts, whole_experts, strict=True):
        torch.testing.assert_close(p, q[mine])
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                trainer.optimizer.state[p][moment], whole_trainer.optimizer.state[q][moment][mine]
            )


def test_checkpoint_saved_on_4_ranks_loads_on_1_and_2_and_round_trips(tmp_path):
    four, one = tmp_path / "four", tmp_path / "one"
    run_distributed(save_on_ranks, 4, str(four))
    assert sorted(p.name for p in (four / "experts").glob("*.pt")) == [f"expert-{i:03d}.pt" for i in range(4)]

    # 1 process: every expert; saving again gives the same expert files
    whole = tiny_model(seed=7, **EXPERTS)
    trainer = trainer_for(whole)
    state = load_checkpoint(four, whole, trainer.optimizer)
    assert state["step"] == 1
    save_checkpoint(one, whole, trainer.optimizer, state)
    for i in range(4):
        a = torch.load(expert_file(four, i), weights_only=True)
        b = torch.load(expert_file(one, i), weights_only=True)
        assert a.keys() == b.keys()
        for name in a:
            for key in a[name]:
                torch.testing.assert_close(a[name][key], b[name][key])

    # 2 ranks: two experts each, the right two, with their Adam moments
    run_distributed(load_on_ranks_and_compare, 2, str(four), str(one))


# ------------------------------------------------------------------------------------- integrity


def cut_in_half(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def saved(tmp_path):
    model = tiny_model(seed=0)
    return save_checkpoint(
        tmp_path / "ckpt", model, tasks=[{"name": "t"}], run={"mlflow_run_id": "abc"}
    ), model


def test_every_file_of_a_checkpoint_carries_its_sha256(tmp_path):
    directory, model = saved(tmp_path)
    files = [p for p in directory.rglob("*") if p.is_file() and not p.name.endswith(".sha256")]
    assert {"dense.pt", "trainer.pt", "tasks.json", "run.json"} <= {p.name for p in files}
    for path in files:
        recorded = (path.parent / (path.name + ".sha256")).read_text().strip()
        assert recorded == hashlib.sha256(path.read_bytes()).hexdigest(), path
    verify_checkpoint(directory)
    assert read_run_record(directory) == {"mlflow_run_id": "abc"}
    load_checkpoint(directory, model)


@pytest.mark.parametrize("name", ["dense.pt", "experts/expert-002.pt", "tasks.json"])
def test_a_cut_file_fails_the_load_with_one_line_naming_it(tmp_path, name):
    directory, model = saved(tmp_path)
    cut_in_half(directory / name)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(directory, model)
    message = str(caught.value)
    assert message.startswith(str(directory / name)) and "sha256 does not match" in message
    assert "\n" not in message


def test_a_file_without_its_record_or_a_missing_directory_is_refused(tmp_path):
    directory, model = saved(tmp_path)
    (directory / "trainer.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match=r"trainer\.pt: no recorded sha256"):
        verify_checkpoint(directory)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        verify_checkpoint(tmp_path / "nowhere")


def test_a_file_torch_cannot_read_is_named_even_when_its_hash_matches(tmp_path):
    directory, model = saved(tmp_path)
    write_file(directory / "dense.pt", b"not a zip archive")  # consistent record, unreadable content
    with pytest.raises(CheckpointError, match=r"dense\.pt: not a readable checkpoint file"):
        load_checkpoint(directory, model)
