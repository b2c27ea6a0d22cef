"""The Ray Train job for real: a local Ray, TorchTrainer workers joined by gloo, expert
parallelism, checkpoints, resuming on another number of workers, a killed worker, MLflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.job import RESUMED_FROM, RESUMED_FROM_RUN, TrainingFailed, check_resources, train
from cluster.session import JobError
from cluster.tracking import client
from mm.checkpoint import CheckpointError, verify_checkpoint
from mm.config import ConfigError, parse_config
from mm.shards import ShardError

from shardmaker import config_dict, write_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("job") / "shards"
    write_shards(root)
    return root


def job_config(shards: Path, tmp: Path, steps: int = 6, **sections):
    return parse_config(config_dict(shards, tmp, steps=steps, **sections))


def processes_named(fragment: str) -> list[int]:
    """PIDs whose command line contains `fragment` (Ray names its actor processes so)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and fragment in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return sorted(found)


def committed_steps(config) -> int:
    """The highest step rank 0 has logged to MLflow (0 before the run exists)."""
    mlflow = client(config.mlflow.tracking_uri)
    experiment = mlflow.get_experiment_by_name(config.name)
    runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
    steps = [m.step for run in runs for m in mlflow.get_metric_history(run.info.run_id, "train/reverse/loss")]
    return max(steps, default=0)


def history(result, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(result.tracking_uri).get_metric_history(result.run_id, key)]


STEPS = 40  # of the module's reference run, and of the run whose worker is killed
CHECKPOINTED = {"checkpoint_every": 10, "log_every": 10, "eval_every": 1000}  # none changes a loss
STREAMED = {"read": "stream"}  # Ray Data streams the shards to the workers, as for a big corpus


@pytest.fixture(scope="module")
def two_worker_run(ray_local, shards, tmp_path_factory):
    """The module's reference run: 2 workers streaming their shards, with the resident memory of
    the driver and of both workers sampled throughout."""
    tmp = tmp_path_factory.mktemp("run2")
    samples: list[tuple[float, dict[int, int]]] = []
    done = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(samples, done), daemon=True)
    sampler.start()
    try:
        result = train(job_config(shards, tmp, steps=STEPS, train=CHECKPOINTED, data=STREAMED))
    finally:
        done.set()
        sampler.join(timeout=5)
    return result, tmp, samples


def test_two_workers_train_with_sharded_experts_and_log_to_mlflow(two_worker_run):
    result, _, _ = two_worker_run
    assert result.metrics["step"] == STEPS
    assert {"eval/reverse/bleu", "eval/reverse/log_ppl", "eval/patches/accuracy"} <= set(result.metrics)
    # FLOP/s over both workers against the matmul peak each measured: a tiny model is far below it
    assert result.metrics["perf/train_gflops"] > 0 and 0 < result.metrics["perf/mfu"] < 1
    # one checkpoint, merged from both workers: rank 0's dense part, each rank's 2 experts
    files = sorted(p.name for p in (result.checkpoint / "experts").glob("*.pt"))
    assert files == [f"expert-{i:03d}.pt" for i in range(4)]
    assert (result.checkpoint / "dense.pt").is_file() and (result.checkpoint / "vocab.model").is_file()
    run = client(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.moe.num_experts"] == "4"
    assert {"moe/dropped_fraction", "throughput/examples_per_s", "train/reverse/loss"} <= set(
        run.data.metrics
    )
    artifacts = {a.path for a in client(result.tracking_uri).list_artifacts(result.run_id)}
    assert {"checkpoint", "config.json", "routing.json"} <= artifacts


def test_a_two_worker_checkpoint_resumes_on_one_worker_that_holds_every_expert(two_worker_run, shards):
    """Growing the group re-shards the same way (test_checkpoint: saved on 4 ranks, loaded on 1
    and 2); the lost-node test shrinks an elastic group without `--resume`."""
    first, tmp, _ = two_worker_run
    workers = 1
    last_loss = history(first, "train/reverse/loss")[-1][1]
    config = job_config(shards, tmp / f"resume{workers}", steps=STEPS + 4, cluster={"workers": workers})
    resumed = train(config, resume=first.checkpoint)
    assert resumed.metrics["step"] == STEPS + 4
    tags = client(resumed.tracking_uri).get_run(resumed.run_id).data.tags  # its lineage
    assert tags[RESUMED_FROM] == str(first.checkpoint.absolute())
    assert tags[RESUMED_FROM_RUN] == first.run_id
    assert history(resumed, "train/resumed_at_step") == [(STEPS + 1, float(STEPS))]
    assert history(resumed, "train/workers") == [(STEPS + 1, float(workers))]
    steps = [step for step, _ in history(resumed, "train/reverse/loss")]
    assert steps and min(steps) > STEPS  # it continued, it did not start over
    initial = history(first, "train/reverse/loss")[0][1]
    after = history(resumed, "train/reverse/loss")[0][1]
    assert abs(after - last_loss) < abs(initial - last_loss) + 0.5  # the curve goes on from where it was


def test_a_killed_worker_restarts_and_the_run_replays_the_uninterrupted_runs_losses_exactly(
    two_worker_run, shards, tmp_path
):
    config = kill_test_config(shards, tmp_path, steps=STEPS, max_failures=2)
    killed: list[tuple[int, float]] = []
    killer = threading.Thread(target=kill_a_worker_after_step, args=(config, 10, killed), daemon=True)
    killer.start()
    result = train(config)
    killer.join(timeout=1)
    assert killed, "no worker was killed"
    assert result.metrics["step"] == STEPS
    (resumed,) = client(result.tracking_uri).get_metric_history(result.run_id, "train/resumed_at_step")
    assert 10 <= resumed.value < STEPS
    recovery = resumed.timestamp / 1000 - killed[0][1]
    print(f"worker killed; resumed at step {resumed.value:.0f} {recovery:.1f} s later")
    assert recovery > 0  # resumed after the fault (the figure is printed, never asserted)
    uninterrupted = two_worker_run[0]
    for task in ("reverse", "patches"):
        losses = history(result, f"train/{task}/loss")
        steps = [step for step, _ in losses]
        assert len(steps) == len(set(steps)), f"{task}: a step was logged twice"
        # the same batches, the same noise, the same weights: the same loss at every step
        expected = history(uninterrupted, f"train/{task}/loss")
        assert steps == [step for step, _ in expected]
        assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    all_steps = sorted(s for t in ("reverse", "patches") for s, _ in history(result, f"train/{t}/loss"))
    assert all_steps == list(range(1, STEPS + 1))  # every step once, none lost


def test_a_worker_killed_with_no_restarts_left_names_the_latest_checkpoint(
    ray_local, shards, tmp_path, monkeypatch
):
    config = kill_test_config(shards, tmp_path, steps=400, max_failures=0, workers=1)
    killer = threading.Thread(target=kill_a_worker_after_step, args=(config, 10, []), daemon=True)
    killer.start()
    with pytest.raises(TrainingFailed) as caught:
        train(config)
    failed = caught.value
    assert failed.checkpoint is not None and failed.checkpoint.name.startswith("checkpoint_")
    verify_checkpoint(failed.checkpoint)  # whole: it can be resumed from
    assert (
        f"training failed after 0 restart(s) (cluster.max_failures); latest checkpoint {failed.checkpoint}"
        == str(failed)
    )
    assert failed.__cause__ is not None  # what Ray Train raised, for the log
    from mmcli.main import _resume_hint

    sys.argv = ["mm", "train", "cfg.yaml", "-o", "train.steps=400"]
    assert _resume_hint(failed).endswith(
        f"continue with: mm train cfg.yaml -o train.steps=400 --resume {failed.checkpoint}"
    )


def kill_test_config(shards: Path, tmp: Path, steps: int, max_failures: int, workers: int = 2):
    cluster = {"max_failures": max_failures, "workers": workers}
    return job_config(shards, tmp, steps=steps, train=CHECKPOINTED, cluster=cluster, data=STREAMED)


def kill_a_worker_after_step(config, step: int, killed: list[tuple[int, float]]) -> None:
    """SIGKILL one Ray Train worker once rank 0 has logged `step` (it logs a step's metrics once
    the checkpoint covering it is registered); the pid and the time go into `killed`."""
    deadline = time.time() + 240
    while time.time() < deadline:
        if committed_steps(config) >= step:
            workers = processes_named("RayTrainWorker")
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed.append((workers[-1], time.time()))
                return
        time.sleep(0.2)


@pytest.mark.parametrize(("task", "window"), [("patches", 1), ("reverse", 3)])
def test_streamed_shards_give_every_row_once_per_epoch_to_the_two_ranks_together(
    ray_local, shards, task, window
):
    """Also with windows of 3 batches sorted by length: 24 rows, then a last chunk of 8."""
    import ray.data

    from cluster.data import ray_stream, reads_up_front
    from mm.build import task_specs
    from mm.shards import load_manifest, part_files
    from mm.vocab import Vocabulary

    assert not reads_up_front("auto", on_disk=1 << 30, store=4 << 30)  # ImageNet-sized: streams
    assert reads_up_front("auto", on_disk=1 << 20, store=4 << 30)
    config = job_config(shards, shards.parent)
    vocab = Vocabulary.load(shards / "vocab.model")
    manifests = {name: load_manifest(shards, name) for name in ("patches", "reverse")}
    spec = {s.name: s for s in task_specs(config, vocab, manifests)}
    files = [str(p) for p in part_files(shards, task, "train")]
    splits = ray.data.read_parquet(files).streaming_split(2, equal=True)  # not materialised
    seen: dict[int, list[str]] = {}

    def consume(rank: int) -> None:
        stream = ray_stream(spec[task], splits[rank], 8, False, None, seed=rank, window=window)
        for _ in range(3 * 4):  # 3 epochs of 4 batches: 64 rows, 32 per rank
            batch = next(stream)
            seen.setdefault(stream.epoch, []).extend(batch.ids)

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(seen) == [0, 1, 2]
    for epoch, ids in seen.items():
        assert sorted(ids) == sorted(f"train-{i}" for i in range(64)), f"epoch {epoch}"


def test_a_training_job_that_streams_its_shards_completes_with_bounded_memory(two_worker_run):
    result, _, samples = two_worker_run
    assert result.metrics["step"] == STEPS  # about 5 epochs of each task per rank
    training = [rss for _, rss in samples if len(rss) == 3]  # the driver and both workers up
    assert len(training) >= 4
    early, late = training[: len(training) // 2], training[len(training) // 2 :]
    for pid in training[-1]:
        grown = max(s.get(pid, 0) for s in late) - max(s.get(pid, 0) for s in early)
        assert grown < 150 << 20, f"process {pid} grew by {grown >> 20} MiB while streaming"


def sample_memory(samples: list, done: threading.Event) -> None:
    """Resident memory of this process (the driver) and of every Ray Train worker, twice a second."""
    while not done.is_set():
        pids = [os.getpid(), *processes_named("RayTrainWorker")]
        samples.append((time.time(), {pid: resident_bytes(pid) for pid in pids}))
        time.sleep(0.5)


def resident_bytes(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.owns_ray
def test_a_lost_node_shrinks_the_elastic_group_which_resumes_on_the_other_node_and_finishes(
    own_ray, shards, tmp_path, monkeypatch
):
    import ray
    from ray.cluster_utils import Cluster

    # Ray Train's first restart still counts the lost node's CPU and asks for 2 workers; it
    # gives that up after this timeout (Ray's default: 60 s) and starts the 1 that fit
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    # health checks every 0.5 s, dead after 3 misses: Ray's defaults (3 s, 5) only add waiting
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": health},
    )
    second = cluster.add_node(num_cpus=1)  # one 1-CPU worker per node: the group spans both
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        config = job_config(
            shards,
            tmp_path,
            steps=STEPS,
            train=CHECKPOINTED,
            cluster={"workers": 2, "min_workers": 1, "cpus_per_worker": 1},
        )
        removed: list[float] = []

        def remove_the_second_node() -> None:
            deadline = time.time() + 240
            while time.time() < deadline and committed_steps(config) < 10:
                time.sleep(0.2)
            removed.append(time.time())
            cluster.remove_node(second, allow_graceful=False)

        remover = threading.Thread(target=remove_the_second_node, daemon=True)
        remover.start()
        result = train(config)
        remover.join(timeout=1)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed, "the node was not removed"
    assert result.metrics["step"] == STEPS
    assert [workers for _, workers in history(result, "train/workers")] == [1.0]  # 4 experts on 1 rank
    (resumed_at,) = client(result.tracking_uri).get_metric_history(result.run_id, "train/resumed_at_step")
    recovery = resumed_at.timestamp / 1000 - removed[0]
    print(f"node lost; resumed at step {resumed_at.value:.0f} on 1 worker {recovery:.1f} s later")
    assert recovery > 0  # resumed after the fault (the figure is printed, never asserted)
    steps = sorted(s for t in ("reverse", "patches") for s, _ in history(result, f"train/{t}/loss"))
    assert steps == list(range(1, STEPS + 1))


# ------------------------------------------------------------------------- caught before training


def test_bad_inputs_are_caught_before_any_worker_starts(ray_local, shards, tmp_path, two_worker_run):
    with pytest.raises(JobError, match="16 workers x 0.5 CPU need 8 CPUs; the cluster has 4"):
        check_resources(job_config(shards, tmp_path, cluster={"workers": 16}))
    with pytest.raises(ConfigError, match="num_experts=4 is not divisible by cluster.expert_parallel=3"):
        job_config(shards, tmp_path, cluster={"expert_parallel": 3})
    missing = config_dict(shards, tmp_path)
    missing["tasks"].append({"name": "absent", "kind": "translation"})
    with pytest.raises(ShardError, match="task 'absent' has no shards"):
        train(parse_config(missing))
    big_batches = config_dict(shards, tmp_path)
    big_batches["tasks"][0]["batch_size"] = 48  # 64 rows, 32 per worker: no full batch
    with pytest.raises(ShardError, match="task 'reverse': its 64 training rows give each of 2 workers 32"):
        train(parse_config(big_batches))

    other = tmp_path / "other"
    write_shards(other, seed=1)  # other sentences: another vocabulary
    with pytest.raises(CheckpointError, match="another vocabulary"):
        train(job_config(other, tmp_path), resume=two_worker_run[0].checkpoint)
    (other / "vocab.model").write_bytes((shards / "vocab.model").read_bytes())
    with pytest.raises(ShardError, match="shards were made with vocabulary"):
        train(job_config(other, tmp_path))


def test_a_task_without_a_dev_split_is_refused_before_training(ray_local, tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards)
    shutil.rmtree(shards / "reverse" / "dev")  # e.g. its held-out split was named `val`
    with pytest.raises(ShardError, match="task 'reverse' has no 'dev' split to evaluate on"):
        train(job_config(shards, tmp_path))


def test_resuming_from_a_cut_checkpoint_is_refused_before_any_ray_work(two_worker_run, shards, tmp_path):
    copy = tmp_path / "cut"
    shutil.copytree(two_worker_run[0].checkpoint, copy)
    expert = copy / "experts" / "expert-002.pt"
    expert.write_bytes(expert.read_bytes()[:100])
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"expert-002\.pt: sha256 does not match"):
        train(job_config(shards, tmp_path), resume=copy)
    assert time.monotonic() - started < 10  # refused by the driver, no worker started


def test_mm_evaluate_on_a_split_that_does_not_exist_is_an_error_not_a_perfect_score(
    two_worker_run, shards, capsys
):
    from mmcli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(two_worker_run[0].checkpoint), "--shards", str(shards), "--split", "nosuch"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "split 'nosuch' does not exist" in err
    assert "splits there: dev, test, train" in err


def test_mm_evaluate_on_shards_of_another_vocabulary_is_an_error_not_a_score(
    two_worker_run, shards, tmp_path, capsys
):
    # e.g. the starter rebuilt with another seed after the run: same paths, other token ids,
    # and every text score near 0 (a checkpoint's config names its shards by absolute path)
    from mmcli.main import main

    remade = tmp_path / "remade"
    shutil.copytree(shards, remade)
    manifest = remade / "reverse" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "vocab_sha256": "f" * 64}))
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(two_worker_run[0].checkpoint), "--shards", str(remade)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "task 'reverse': shards were made with vocabulary ffffffffffff, not " in err
    assert "(this checkpoint's); score it on the shards it was trained on (--shards)" in err
    # the shards it was trained on still score
    assert main(["evaluate", str(two_worker_run[0].checkpoint), "--shards", str(shards)]) is None


def test_mm_evaluate_scores_only_the_tasks_it_is_given(two_worker_run, shards, capsys):
    from mm.predict import Predictor
    from mmcli.main import main

    checkpoint = str(two_worker_run[0].checkpoint)
    assert set(Predictor(checkpoint).evaluate(shards, "dev", tasks=["reverse"])) == {"reverse"}
    assert main(["evaluate", checkpoint, "--shards", str(shards), "--tasks", "reverse"]) is None
    out = capsys.readouterr().out
    assert "aggregate score" not in out  # not a mean over some of the tasks
    # the BLEU's 95 % interval sits beside the floors, not as metrics of its own
    assert "95 % interval" in out and "bleu_low" not in out
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", checkpoint, "--shards", str(shards), "--tasks", "reverse,nosuch"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("unknown task 'nosuch'; this model knows patches, reverse")
    assert "\n" not in err


def test_report_of_a_run_has_metrics_beside_chance_and_input_blind_curves_routing_and_a_summary(
    two_worker_run, shards, tmp_path
):
    from mm.metrics import learned, scores_by_task
    from mm.predict import Predictor
    from mm.reader import read_rows
    from mmcli.report import chance_levels, write_report

    result, tmp, _ = two_worker_run
    config = job_config(shards, tmp)
    predictor = Predictor(result.checkpoint)
    dev = scores_by_task(result.metrics)
    again = predictor.evaluate(config.data.shards, "dev", config.train.eval_examples, intervals=True)
    # the whole model in one process scores the dev rows as the two workers did together
    assert again["patches"]["accuracy"] == pytest.approx(dev["patches"]["accuracy"])
    for task, metric in (("patches", "accuracy"), ("reverse", "bleu")):
        low, value, high = (again[task][f"{metric}{end}"] for end in ("_low", "", "_high"))
        assert low <= value <= high, (task, low, value, high)
    assert again["reverse"]["log_ppl"] == pytest.approx(dev["reverse"]["log_ppl"], rel=1e-4)
    references = {
        t: list(read_rows(config.data.shards, t, "dev", 8)["references"]) for t in ("reverse", "patches")
    }
    chance = chance_levels(config, list(predictor.records.values()), references)
    assert chance == {"reverse": 0.0, "patches": 0.25}
    blind = predictor.evaluate(config.data.shards, "dev", config.train.eval_examples, blind=True)
    assert blind["reverse"]["log_ppl"] > again["reverse"]["log_ppl"]  # the input helps already
    examples = {"reverse": predictor.decoded_examples("reverse", "dev", 2)}
    assert [set(e) for e in examples["reverse"]] == [{"id", "input", "output", "reference"}] * 2
    training = {
        "seconds": 1.0,
        "steps": config.train.steps,
        "train_gflops": result.metrics["perf/train_gflops"],
        "mfu": result.metrics["perf/mfu"],
    }
    assert training["train_gflops"] > 0 and 0 < training["mfu"] < 1
    report = write_report(
        tmp_path / "report",
        config,
        result.tracking_uri,
        result.run_id,
        dev,
        again,
        chance,
        {},
        blind=blind,
        examples=examples,
        training=training,
    )
    text = report.read_text()
    assert "| patches | accuracy |" in text and "| reverse | bleu |" in text
    assert "input-blind" in text and "decoded dev examples" in text
    for image in ("learning_curves.png", "dev_metrics.png", "expert_routing.png"):
        assert (report.parent / image).stat().st_size > 1000
    summary = json.loads((report.parent / "summary.json").read_text())
    patches = summary["tasks"]["patches"]
    assert patches["input_blind"] == blind["patches"]["accuracy"] and patches["chance"] == 0.25
    assert patches["test_interval"] == [again["patches"]["accuracy_low"], again["patches"]["accuracy_high"]]
    assert "test, 95 % interval" in text
    # the verdict weighs the interval's worse end too
    assert patches["learned"] == learned(
        "accuracy", patches["test"], 0.25, patches["input_blind"], bounds=tuple(patches["test_interval"])
    )
    assert summary["training"]["mfu"] == training["mfu"]
    entropy = summary["routing_entropy"]
    assert set(entropy) == {"reverse", "patches"} and all(0 < h <= 1 for hs in entropy.values() for h in hs)
    assert "routing entropy, MoE layer 1" in text


def test_workers_min_max_maps_to_elastic_scaling(shards, tmp_path):
    from cluster.job import scaling_config
    from mmcli.main import build_parser

    fixed = scaling_config(job_config(shards, tmp_path))
    assert fixed.num_workers == 2 and not fixed.elasticity_enabled
    args = build_parser().parse_args(["train", "c.yaml", "--workers", "1-4"])
    assert args.workers == "1-4"
    elastic = scaling_config(job_config(shards, tmp_path, cluster={"workers": 4, "min_workers": 1}))
    assert elastic.num_workers == (1, 4) and elastic.elasticity_enabled
    assert elastic.resources_per_worker == {"CPU": 0.5}
