"""Training data streams (cluster/data.py) read from real parquet shards: token-budget batches,
epochs, and a position that a new stream can take up exactly (what exact resume rests on)."""

from __future__ import annotations

import pytest

from cluster.worker import position_streams
from mm.build import task_specs
from mm.reader import TaskStream, parquet_stream
from mm.shards import load_manifest, part_files
from mm.vocab import Vocabulary

from shardmaker import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams") / "shards"
    config = write_shards(root, rows=40)
    vocab = Vocabulary.load(root / "vocab.model")
    manifests = {t.name: load_manifest(root, t.name) for t in config.tasks}
    return root, {spec.name: spec for spec in task_specs(config, vocab, manifests)}


def stream(shards, task: str, batch_size: int, by_tokens: bool, window: int = 1) -> TaskStream:
    root, specs = shards
    return parquet_stream(specs[task], part_files(root, task, "train"), batch_size, by_tokens, window=window)


def padded_and_real(batch) -> tuple[int, int]:
    """Token positions of a text batch once padded, and the real ones among them."""
    padded = batch.inputs.numel() + batch.targets.numel()
    return padded, int((batch.inputs != 0).sum() + (batch.targets != 0).sum())


def one_epoch(s: TaskStream, epoch: int = 0) -> list:
    batches = []
    while s.epoch <= epoch:
        batch = next(s)
        if s.epoch == epoch:
            batches.append(batch)
    return batches


def test_token_batches_stay_within_their_budget_and_cover_every_row_once_per_epoch(shards):
    budget = 40
    reverse = stream(shards, "reverse", budget, by_tokens=True)
    seen: list[str] = []
    while reverse.epoch < 1:
        batch = next(reverse)
        if reverse.epoch == 0:
            padded = len(batch) * max(batch.inputs.shape[1], batch.targets.shape[1])
            assert padded <= budget or len(batch) == 1, f"{len(batch)} rows x padded length > {budget}"
            seen.extend(batch.ids)
    assert len(seen) > 40 // 8  # more batches than 8-row ones: the budget cut them
    assert sorted(seen) == sorted(f"train-{i}" for i in range(40))  # every row once


def test_sorted_windows_pad_less_and_give_each_row_once_an_epoch_in_a_shuffled_order(shards):
    plain = one_epoch(stream(shards, "reverse", 4, False))
    sorted_ = one_epoch(stream(shards, "reverse", 4, False, window=5))
    assert [len(b) for b in sorted_] == [4] * 10  # two windows of five full batches
    ids = [i for batch in sorted_ for i in batch.ids]
    assert sorted(ids) == sorted(f"train-{i}" for i in range(40))
    padded, real = map(sum, zip(*map(padded_and_real, sorted_)))
    padded_plain, real_plain = map(sum, zip(*map(padded_and_real, plain)))
    assert real == real_plain and padded < 0.9 * padded_plain, (padded, padded_plain)
    # given out in a random order, not shortest first
    first_window = [b.targets.shape[1] for b in sorted_[:5]]
    assert first_window != sorted(first_window)


def test_a_sorted_window_keeps_its_full_batches_and_drops_only_a_remainder(shards):
    batches = one_epoch(stream(shards, "reverse", 6, False, 4))  # windows of 24 rows, then 16
    assert [len(b) for b in batches] == [6] * 6
    assert len({i for b in batches for i in b.ids}) == 36


@pytest.mark.parametrize(
    ("task", "by_tokens", "window"), [("patches", False, 1), ("reverse", True, 1), ("reverse", False, 3)]
)
def test_a_stream_loaded_with_a_saved_position_continues_with_the_same_batches(
    shards, task, by_tokens, window
):
    first = stream(shards, task, 8 if not by_tokens else 30, by_tokens, window)
    for _ in range(7):  # into the second epoch (5 batches of 8 make one), mid-chunk for tokens/windows
        next(first)
    saved = first.state_dict()
    assert saved["used"] or window == 1 and not by_tokens
    second = stream(shards, task, 8 if not by_tokens else 30, by_tokens, window)
    second.load_state_dict(saved)
    for _ in range(9):
        expected, got = next(first), next(second)
        assert got.ids == expected.ids
    assert second.state_dict() == first.state_dict()


def test_resumed_streams_take_up_their_ranks_positions_or_a_new_epoch_when_the_group_changed(shards):
    ahead = stream(shards, "patches", 8, by_tokens=False)
    for _ in range(12):  # epoch 2, third batch
        next(ahead)
    saved = {
        0: {"rank": 0, "world": 2, "positions": {"patches": ahead.state_dict()}},
        1: {"rank": 1, "world": 2, "positions": {"patches": {"epoch": 1, "chunks": 4, "used": 0}}},
    }
    same_group = {"patches": stream(shards, "patches", 8, by_tokens=False)}
    assert position_streams(same_group, saved, rank=0, world=2) == "streams resume where they were"
    assert same_group["patches"].state_dict() == {"epoch": 2, "chunks": 2, "used": 0}
    assert next(same_group["patches"]).ids == next(ahead).ids

    regrouped = {"patches": stream(shards, "patches", 8, by_tokens=False)}
    assert "new epoch" in position_streams(regrouped, saved, rank=0, world=1)
    next(regrouped["patches"])
    assert regrouped["patches"].state_dict() == {"epoch": 3, "chunks": 1, "used": 0}

    fresh = {"patches": stream(shards, "patches", 8, by_tokens=False)}
    assert position_streams(fresh, {}, rank=0, world=2) == "streams start over"
    assert fresh["patches"].state_dict() == {"epoch": -1, "chunks": 0, "used": 0}


def test_a_worker_share_smaller_than_one_batch_is_refused_before_training(tmp_path):
    """40 rows over 2 workers: 20 each. Batches of 32 read in stream order drop an epoch's last,
    partial batch, so each worker would get none, and Ray Train would retry that in vain."""
    from mm.config import parse_config
    from mm.reader import check_rows_per_worker
    from mm.shards import ShardError

    from shardmaker import config_dict

    raw = config_dict(tmp_path / "shards", tmp_path)
    raw["tasks"][0]["batch_size"] = 32
    refused = r"its 40 training rows give each of 2 workers 20, fewer than the 32 of one batch \(tasks"
    with pytest.raises(ShardError, match=refused):
        check_rows_per_worker(parse_config(raw), "reverse", 40)
    check_rows_per_worker(parse_config(raw), "reverse", 64)  # 32 each: one full batch
    raw["train"]["sort_window"] = 2  # a sorted window keeps a partial batch
    check_rows_per_worker(parse_config(raw), "reverse", 40)
    raw["cluster"]["workers"] = 1
    raw["train"]["sort_window"] = 1
    check_rows_per_worker(parse_config(raw), "reverse", 40)  # one worker: all 40
    raw["train"]["batch_by"] = "tokens"
    check_rows_per_worker(parse_config(raw), "reverse", 1)
    raw["cluster"]["workers"] = 2  # a worker without a single row
    with pytest.raises(ShardError, match=r"give each of 2 workers 0, fewer than the 1 of one batch; lower"):
        check_rows_per_worker(parse_config(raw), "reverse", 1)
