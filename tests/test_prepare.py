"""`mm prepare` as a job: checks before work, the rejection limit, idempotency, atomic
publishing, the command line. Plus the pure parts: PTB tree handling and sampling."""

from __future__ import annotations

import os
import random
import time

import pyarrow.parquet as pq
import pytest

from mm.shards import load_manifest, part_files
from mmcli.main import main
from pipelines.prepare import PrepareError, prepare
from pipelines.publish import STAGING, clean_up_staging, swap_into_place, task_lock
from pipelines.trees import TreeError, linearise, parse_example, parse_tree, split_trees, strip_function_tags
from pipelines.vocabulary import reservoir

from corpora import make_config, task_entry, write_imagenet, write_ptb, write_tsv, write_wmt


def snapshot(root, task: str) -> dict[str, tuple[int, bytes]]:
    """Every published part file of a task: mtime and contents."""
    files = [p for split in ("train", "dev") for p in part_files(root, task, split)]
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


@pytest.fixture
def wmt_config(tmp_path):
    write_wmt(tmp_path / "raw")
    return make_config(tmp_path / "shards", [task_entry("wmt", "wmt", tmp_path / "raw")])


# ----------------------------------------------------------------------------- before any work


def test_missing_or_empty_corpus_fails_before_any_work(ray_local, tmp_path):
    write_wmt(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    (tmp_path / "speech").mkdir()
    (tmp_path / "speech" / "train.csv").write_text("file,transcript\nclip.wav,hello\n")
    config = make_config(
        tmp_path / "shards",
        [
            task_entry("good", "wmt", tmp_path / "good"),
            task_entry("absent", "ptb", tmp_path / "nowhere"),
            task_entry("hollow", "imagenet", tmp_path / "empty"),
            {**task_entry("mixed", "ptb", tmp_path / "good"), "kind": "image_classification"},
            task_entry("speech", "speech_manifest", tmp_path / "speech", splits=("train",)),
        ],
    )
    with pytest.raises(PrepareError) as error:
        prepare(config)
    message = str(error.value)
    assert "task 'absent'" in message and str(tmp_path / "nowhere") in message
    assert "task 'hollow'" in message and "empty" in message
    assert "task 'mixed': layout ptb reads text -> text examples" in message
    assert "must name the columns `path` and `text`" in message
    assert not (tmp_path / "shards").exists()  # not even the vocabulary was started


def test_missing_split_file_is_named(ray_local, tmp_path):
    write_wmt(tmp_path / "raw")
    config = make_config(
        tmp_path / "shards", [task_entry("wmt", "wmt", tmp_path / "raw", splits=("train", "test"))]
    )
    with pytest.raises(PrepareError, match=r"task 'wmt'.*split 'test'.*test\.en"):
        prepare(config)


# ---------------------------------------------------------------------------------- rejections


def test_too_many_bad_rows_fail_the_job_and_keep_the_published_shards(ray_local, wmt_config, tmp_path):
    prepare(wmt_config)
    before = snapshot(wmt_config.data.shards, "wmt")
    manifest = load_manifest(wmt_config.data.shards, "wmt")

    for path in (tmp_path / "raw").iterdir():
        path.unlink()
    write_wmt(tmp_path / "raw", bad=True)  # 2 of 7 items rejected, over the default 1%
    with pytest.raises(PrepareError) as error:
        prepare(wmt_config)
    message = str(error.value)
    for expected in ("task 'wmt'", "split 'train'", "28.6%", "1.0%", "not_utf8 1", "unmatched_line 1"):
        assert expected in message
    assert snapshot(wmt_config.data.shards, "wmt") == before
    assert load_manifest(wmt_config.data.shards, "wmt") == manifest
    assert not [p for p in (wmt_config.data.shards / STAGING).iterdir() if p.is_dir()]


# -------------------------------------------------------------------------------- idempotency


def test_an_unchanged_source_is_not_prepared_again(ray_local, wmt_config, tmp_path):
    first = prepare(wmt_config)
    shards = wmt_config.data.shards
    parts, vocab_mtime = snapshot(shards, "wmt"), (shards / "vocab.model").stat().st_mtime_ns

    log: list[str] = []
    assert prepare(wmt_config, log=log.append) == first
    assert snapshot(shards, "wmt") == parts
    assert (shards / "vocab.model").stat().st_mtime_ns == vocab_mtime
    assert "wmt: up to date (8 rows)" in log

    forced = prepare(wmt_config, force=True)["wmt"]
    assert forced.created >= first["wmt"].created and snapshot(shards, "wmt") != parts

    source = tmp_path / "raw" / "dev.en"
    source.write_text("a changed line\nanother one\n")
    os.utime(source, ns=(time.time_ns(), time.time_ns()))
    changed = prepare(wmt_config)["wmt"]
    assert changed.source_fingerprint != first["wmt"].source_fingerprint
    dev = pq.read_table(part_files(shards, "wmt", "dev")[0]).to_pydict()
    assert dev["id"] == ["dev:1", "dev:2"] and len(dev["inputs"][0]) > 1


def test_a_stricter_rejection_limit_checks_the_corpus_again(ray_local, tmp_path):
    write_wmt(tmp_path / "raw", bad=True)  # 2 of 7 training items rejected: 28.6%
    tasks = [task_entry("wmt", "wmt", tmp_path / "raw")]
    loose = make_config(tmp_path / "shards", tasks, max_rejected_fraction=0.5)
    prepare(loose)
    log: list[str] = []
    prepare(loose, log=log.append)
    assert "wmt: up to date (6 rows)" in log

    strict = make_config(tmp_path / "shards", tasks, max_rejected_fraction=0.1)
    log.clear()
    with pytest.raises(PrepareError, match=r"28\.6%\), over data.max_rejected_fraction = 10\.0%"):
        prepare(strict, log=log.append)  # no --force: the limit alone is new
    assert not [line for line in log if "up to date" in line and line.startswith("wmt")]


def test_a_new_vocabulary_leaves_image_classification_alone(ray_local, tmp_path):
    write_imagenet(tmp_path / "images")
    write_wmt(tmp_path / "text")
    write_tsv(tmp_path / "tsv")
    tasks = [
        task_entry("images", "imagenet", tmp_path / "images"),
        task_entry("wmt", "wmt", tmp_path / "text"),
    ]
    shards = tmp_path / "shards"
    first = prepare(make_config(shards, tasks))
    images = snapshot(shards, "images")
    # A task is added: a new command token, so a new vocabulary. The text task is prepared
    # again with it; the image task, which holds no token ids, is not.
    tasks.append(task_entry("tsv", "tsv", tmp_path / "tsv", splits=("train",)))
    log: list[str] = []
    prepare(make_config(shards, tasks), tasks=["images", "tsv"], log=log.append)
    assert "wmt: its shards use another vocabulary; prepare it again (--tasks wmt)" in log
    second = prepare(make_config(shards, tasks))
    assert second["wmt"].vocab_sha256 != first["wmt"].vocab_sha256
    assert snapshot(shards, "images") == images
    assert second["images"] == first["images"].model_copy(update={"vocab_sha256": second["wmt"].vocab_sha256})


# --------------------------------------------------------------------------------- atomicity


def test_a_write_killed_before_publishing_leaves_nothing_a_reader_takes(
    ray_local, wmt_config, tmp_path, monkeypatch
):
    prepare(wmt_config)
    shards = wmt_config.data.shards
    before = snapshot(shards, "wmt")

    def killed(new, live):
        assert list((new / "train").glob("part-*.parquet"))  # the new parts were complete ...
        raise KeyboardInterrupt("killed")  # ... when the job died

    monkeypatch.setattr("pipelines.publish.swap_into_place", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(wmt_config, force=True)
    assert snapshot(shards, "wmt") == before
    assert sorted(p.name for p in (shards / "wmt").iterdir()) == ["dev", "manifest.json", "train"]


def test_leftovers_of_a_killed_run_are_invisible_and_cleaned_up(ray_local, wmt_config):
    prepare(wmt_config)
    shards = wmt_config.data.shards
    before = snapshot(shards, "wmt")
    # What a process killed in the middle of writing leaves behind.
    incoming = shards / STAGING / "deadbeef" / "wmt" / ".incoming" / "train"
    incoming.mkdir(parents=True)
    (incoming / "0123abcd.parquet").write_bytes(b"PAR1 half a file")
    assert snapshot(shards, "wmt") == before  # readers see the old parts only

    prepare(wmt_config, force=True)
    assert not (shards / STAGING / "deadbeef").exists()
    assert len(snapshot(shards, "wmt")) == len(before)


def test_a_swap_interrupted_between_its_renames_is_undone(tmp_path):
    live, new = tmp_path / "wmt", tmp_path / STAGING / "token" / "wmt"
    (live / "train").mkdir(parents=True)
    (live / "train" / "part-00000.parquet").write_text("old")
    (new / "train").mkdir(parents=True)
    live.rename(new.with_name("wmt.old"))  # the first rename of swap_into_place, then death

    clean_up_staging(tmp_path, "wmt")
    assert (live / "train" / "part-00000.parquet").read_text() == "old"
    assert not (tmp_path / STAGING / "token").exists()

    (new / "train").mkdir(parents=True)
    (new / "train" / "part-00000.parquet").write_text("new")
    swap_into_place(new, live)
    assert (live / "train" / "part-00000.parquet").read_text() == "new"


def test_one_run_at_a_time_prepares_a_task(ray_local, wmt_config):
    with task_lock(wmt_config.data.shards, "wmt"), pytest.raises(PrepareError, match="another `mm prepare`"):
        prepare(wmt_config)


# ------------------------------------------------------------------------------ command line


def test_command_line(ray_local, tmp_path, capsys):
    write_ptb(tmp_path / "raw")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
name: cli
tasks:
  - name: parse
    kind: constituency_parsing
    corpus: {{path: {tmp_path / "raw"}, layout: ptb, splits: {{train: train, dev: dev}}}}
data: {{shards: {tmp_path / "shards"}, vocab_size: 100}}
"""
    )
    main(["prepare", str(config), "--tasks", "parse", "-o", "data.shard_rows=2"])
    table = capsys.readouterr().out
    assert "parse" in table and "prepared" in table
    assert load_manifest(tmp_path / "shards", "parse").splits["train"].parts == 2

    with pytest.raises(SystemExit) as exit_status:
        main(["prepare", str(config), "--tasks", "nope"])
    err = capsys.readouterr().err
    assert exit_status.value.code == 2 and err.startswith("mm: ") and "no task 'nope'" in err
    assert err.count("\n") == 1  # one line, no traceback


# ------------------------------------------------------------------------------------ pure parts


def test_trees_are_found_across_lines_and_unbalanced_ones_isolated():
    data = b"\n".join(
        [
            b"*x* Copyright (C) 1990 University of Pennsylvania *x*",  # a banner, not a tree
            b"( (S (NP (DT A) )",
            b"   (VP (VB b) )) )",
            b"(S (NP (DT open)",  # never closed
            b"(S (X y) ) )",  # one closer too many
            b"(S (X z) )",
        ]
    )
    trees = list(split_trees(data))
    assert [(t.line, t.problem) for t in trees] == [
        (2, ""),
        (4, "unbalanced_brackets"),
        (5, "unbalanced_brackets"),
        (6, ""),
    ]
    assert trees[0].text.startswith(b"( (S") and trees[0].text.endswith(b")) )")


def test_tree_cleaning_and_linearisation():
    words, target = parse_example(
        "( (S (NP-SBJ (-NONE- *) ) (VP (VBD ran) (ADVP-TMP|PRT (RB fast) )) (. .) ))"
    )
    assert (words, target) == ("ran fast .", "(S (VP XX (ADVP XX )ADVP )VP XX )S")
    assert strip_function_tags("NP-SBJ-1") == "NP" and strip_function_tags("-LRB-") == "-LRB-"
    assert linearise(parse_tree("(TOP (NP (DT a) (NN b)))")) == "(TOP (NP XX XX )NP )TOP"
    with pytest.raises(TreeError, match="no words"):
        parse_example("( (S (-NONE- *T*) ) )")


def test_reservoir_sample_is_uniform_and_seeded():
    items = [str(i) for i in range(1000)]
    sample = reservoir(items, 10, random.Random(1))
    assert sample == reservoir(items, 10, random.Random(1)) and len(set(sample)) == 10
    assert sample == sorted(sample, key=int)  # in source order
    assert reservoir(items[:3], 10, random.Random(1)) == items[:3]
