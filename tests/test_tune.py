"""A real sweep: Ray Tune trials that are Ray Train runs, against a real `mlflow server` on
127.0.0.1; the best model registered, promoted, loaded back and served."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cluster.tracking import TrackingError, client, resolve_tracking_uri, start_run
from mm.config import ConfigError, parse_config
from mm.parallel import free_port
from mm.train import lr_factor
from tune.registry import CHALLENGER, CHAMPION, register_and_promote
from tune.sweep import pbt_schedule, sweep

from shardmaker import config_dict, write_shards

pytestmark = pytest.mark.slow
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120, log: Path | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            said = log.read_text()[-3000:] if log else ""
            raise RuntimeError(f"{url}: the server exited with {process.returncode}\n{said}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a sqlite store and a local artifact root, on 127.0.0.1 only."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    process = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{uri}/health", process)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def swept(ray_local, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    write_shards(tmp / "shards")
    raw = config_dict(tmp / "shards", tmp, steps=6, train={"eval_every": 3})
    raw["cluster"]["workers"] = 1  # the sweep is what is tested here; 2 cores run 2 trials at once
    raw["mlflow"] = {"tracking_uri": mlflow_server, "model_name": "tiny-mm"}
    # a grid of 3 trials; capacity -1 is invalid, so that trial crashes and the sweep goes on
    raw["tune"] = {
        "search": "grid",
        "scheduler": "asha",
        "space": {"mixing": "none", "capacity_factor": [1.25, 2.0, -1.0], "k": [2], "lr": None},
    }
    config = parse_config(raw)
    return sweep(config), config


def test_runs_on_a_tracking_server_keep_their_artifacts_in_its_store(mlflow_server, tmp_path, monkeypatch):
    """Not on the disk of the process that made the experiment: on a cluster that is one node's
    job directory, which Ray deletes (cluster.yaml's server keeps artifacts in S3). A place the
    config names still wins."""
    monkeypatch.chdir(tmp_path)  # where a local default would land
    mlflow = client(mlflow_server)
    raw = config_dict(tmp_path / "shards", tmp_path)
    raw["mlflow"] = {"tracking_uri": mlflow_server, "experiment": "artifacts-on-the-server"}
    config = parse_config(raw)
    on_server = start_run(mlflow_server, config)
    assert mlflow.get_run(on_server).info.artifact_uri.startswith("mlflow-artifacts:/")
    back = Path(mlflow.download_artifacts(on_server, "config.json", str(tmp_path / "back")))
    assert json.loads(back.read_text())["name"] == config.name  # through the server
    assert not (tmp_path / "mlartifacts").exists()

    mine = (tmp_path / "mine").as_uri()
    raw["mlflow"].update(experiment="artifacts-where-configured", artifact_location=mine)
    configured = start_run(mlflow_server, parse_config(raw))
    assert mlflow.get_run(configured).info.artifact_uri.startswith(mine)
    assert list((tmp_path / "mine").rglob("config.json"))


def test_sweep_logs_a_parent_run_with_one_child_per_trial(swept):
    result, _ = swept
    mlflow = client(result.tracking_uri)
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.data.tags["mm.sweep"] == "true"
    assert len(result.trials) == 3
    children = [t for t in result.trials if t.run_id]
    assert len(children) == 2  # the crashed trial never started a run
    for trial in children:
        run = mlflow.get_run(trial.run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.data.params["model.moe.capacity_factor"] == str(trial.params["capacity_factor"])
        assert "eval/reverse/bleu" in run.data.metrics and "eval/patches/accuracy" in run.data.metrics
    assert result.best is not None and result.best.objective == max(t.objective for t in children)
    # a trial that trained all its steps has them all in MLflow, though Tune ends it at its
    # last report: the final evaluation, the last step's loss, the routing, and FINISHED
    completed = [t for t in children if t.metrics["step"] == 6]
    assert completed  # ASHA lets the first trial at each rung go on
    for trial in completed:
        run = mlflow.get_run(trial.run_id)
        assert run.info.status == "FINISHED"
        assert 6 in {m.step for m in mlflow.get_metric_history(trial.run_id, "eval/reverse/bleu")}
        losses = [mlflow.get_metric_history(trial.run_id, f"train/{t}/loss") for t in ("reverse", "patches")]
        assert max(m.step for history in losses for m in history) == 6
        assert "routing.json" in {a.path for a in mlflow.list_artifacts(trial.run_id)}
    for trial in children:
        if trial not in completed:
            assert mlflow.get_run(trial.run_id).info.status == "KILLED"
        # a trial ASHA stopped has its rung's evaluation too, from the report Tune kept
        bleu = mlflow.get_metric_history(trial.run_id, "eval/reverse/bleu")
        assert trial.metrics["step"] in {m.step for m in bleu}
    artifacts = {a.path for a in mlflow.list_artifacts(result.parent_run_id)}
    assert {"trials.json", "objective_per_trial.png", "metric_vs_mixing_ratio.png"} <= artifacts


def test_a_trial_stopped_at_a_rung_gets_its_last_report_logged_and_is_killed(tmp_path):
    """Rank 0 logs a step after reporting it, and Tune may end the trial at that report: the
    sweep logs what the report held, once, and only for the trial that stopped early."""
    from tune.sweep import SweepResult, Trial, _log_summary

    config = parse_config(config_dict(tmp_path / "shards", tmp_path, steps=6))
    mlflow = client(config.mlflow.tracking_uri)
    experiment = mlflow.create_experiment("rungs", artifact_location=(tmp_path / "art").as_uri())
    parent, stopped, finished, failed = (mlflow.create_run(experiment).info.run_id for _ in range(4))
    mlflow.log_metric(stopped, "train/reverse/loss", 2.5, step=3)  # already there: not logged again
    mlflow.set_terminated(finished, status="FAILED")  # its job saw the trainer go as Tune ended it
    mlflow.set_terminated(failed, status="FAILED")
    trials = [
        Trial("stopped", {}, 0.4, {"step": 3, "eval/reverse/bleu": 7.0, "train/reverse/loss": 2.5,
                                   "training_iteration": 1}, None, stopped),
        Trial("finished", {}, 0.5, {"step": 6, "eval/reverse/bleu": 9.0}, None, finished),
        Trial("failed", {}, None, {"step": 3}, None, failed, error="RuntimeError: out of memory"),
    ]  # fmt: skip
    _log_summary(SweepResult(parent, config.mlflow.tracking_uri, trials, trials[1]), config)

    def logged(run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in mlflow.get_metric_history(run_id, key)]

    assert logged(stopped, "eval/reverse/bleu") == [(3, 7.0)]
    assert logged(stopped, "train/reverse/loss") == [(3, 2.5)]
    assert "training_iteration" not in mlflow.get_run(stopped).data.metrics  # Tune's, not the run's
    assert mlflow.get_run(stopped).info.status == "KILLED"
    assert logged(finished, "eval/reverse/bleu") == []  # its rank 0 logged everything itself
    assert mlflow.get_run(finished).info.status == "FINISHED"
    assert mlflow.get_run(failed).info.status == "FAILED" and logged(failed, "eval/reverse/bleu") == []


def test_a_crashing_trial_is_reported_and_the_sweep_goes_on(swept):
    result, _ = swept
    crashed = [t for t in result.trials if t.error]
    assert len(crashed) == 1 and crashed[0].params["capacity_factor"] == -1.0
    assert "capacity_factor" in crashed[0].error
    tags = client(result.tracking_uri).get_run(result.parent_run_id).data.tags
    assert tags["failed_trials"] == crashed[0].name


def test_trials_that_tune_stops_give_their_cpus_back(swept, ray_local):
    """ASHA stops each trial at its last report, killing its Ray Train controller: Ray Train's
    cleaner (which needs the dashboard's state API) must then free the workers' CPUs, or the
    next trials wait forever on a small machine. The cleaner is slow on a loaded machine."""
    deadline = time.time() + 180
    while time.time() < deadline:
        held = [pg for pg in ray_local.util.placement_group_table().values() if pg["state"] == "CREATED"]
        if not held:
            break
        time.sleep(1)
    assert not held, held
    assert ray_local.available_resources()["CPU"] == ray_local.cluster_resources()["CPU"]


def test_best_model_is_registered_as_champion_and_an_equal_one_only_as_challenger(swept):
    result, config = swept
    assert result.registered["alias"] == CHAMPION and result.registered["version"] == 1
    best = result.best
    again = register_and_promote(
        config, result.tracking_uri, best.run_id, best.checkpoint, result.parent_run_id, log=lambda _: None
    )
    assert again["version"] == 2 and again["alias"] == CHALLENGER
    assert "does not beat champion v1" in again["reason"]
    mlflow = client(result.tracking_uri)
    assert mlflow.get_model_version_by_alias("tiny-mm", CHAMPION).version == "1"
    assert mlflow.get_model_version_by_alias("tiny-mm", CHALLENGER).version == "2"


def png_base64(label: int) -> str:
    image = np.full((16, 16), 20, dtype=np.uint8)
    row, col = divmod(label, 2)
    image[row * 8 : row * 8 + 6, col * 8 : col * 8 + 6] = 220
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_registered_model_loads_back_with_pyfunc_and_predicts(swept):
    import mlflow.artifacts
    import mlflow.pyfunc

    result, _ = swept
    mlflow.set_tracking_uri(result.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/tiny-mm@champion")
    rows = pd.DataFrame(
        [{"task": "reverse", "input": "red cat runs"}, {"task": "patches", "input": png_base64(2)}]
    )
    predictions = model.predict(rows)
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny-mm@champion"))
    files = {p.name for p in local.rglob("*")}
    assert "python_model.pkl" not in files and not [f for f in files if f.endswith((".pkl", ".cloudpickle"))]
    assert "pyfunc_model.py" in files  # the code, as source
    assert len(predictions) == 2
    assert all(isinstance(p, str) for p in predictions)
    assert predictions[1] in {"0", "1", "2", "3"}  # a class name of the image task


def test_mlflow_models_serve_answers_invocations(swept, tmp_path):
    result, _ = swept
    port = free_port()
    # the server runs `uvicorn` from PATH: the virtualenv's bin, as in an activated venv
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": result.tracking_uri, "PATH": path}
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", "models:/tiny-mm@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", process, log=log)
        body = json.dumps({"dataframe_records": [{"task": "reverse", "input": "green dog"}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert response.status == 200
        assert len(answer["predictions"]) == 1 and isinstance(answer["predictions"][0], str)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _sampled(config, tmp_path) -> list[dict]:
    """The parameters a sweep's searcher gives its trials, in order, from a real Tuner whose
    trials only wait a little and report when they ran."""
    from ray import tune

    from tune.space import search_space
    from tune.sweep import _searcher, build_tuner

    def trial(params):
        started = time.time()
        time.sleep(0.5)
        tune.report({"objective": 0.0, "started": started, "ended": time.time()})

    config.cluster.storage_path = tmp_path
    tuner = build_tuner(
        config,
        trial,
        "points",
        param_space=search_space(config),
        tune_config=tune.TuneConfig(
            metric="objective",
            mode="max",
            num_samples=config.tune.trials,
            max_concurrent_trials=config.tune.max_concurrent,
            search_alg=_searcher(config),
        ),
    )
    results = sorted(tuner.fit(), key=lambda r: r.metrics["started"])
    # tune.max_concurrent (1 here) holds: each trial starts after the one before it ended
    assert all(a.metrics["ended"] <= b.metrics["started"] for a, b in zip(results, results[1:]))
    return [{k: v for k, v in r.config.items()} for r in results]


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_a_search_starts_from_the_config_and_samples_the_same_trials_again(ray_local, tmp_path, search):
    raw = config_dict(tmp_path / "shards", tmp_path)
    raw["train"]["mixing"] = {"strategy": "ratios"}
    raw["tasks"][0]["mix_weight"] = 2.0
    raw["tune"] = {"trials": 3, "search": search, "space": {"capacity_factor": [1.25, 2.0], "lr": None}}
    raw["model"]["moe"]["capacity_factor"] = 2.0
    config = parse_config(raw)
    first, *rest = trials = _sampled(config, tmp_path / "a")
    names = [t["name"] for t in raw["tasks"]]
    assert first["capacity_factor"] == 2.0 and first[f"mix.{names[0]}"] == 2.0
    assert first[f"mix.{names[1]}"] == 1.0 and first["k"] == config.model.moe.k
    assert all(t[f"mix.{names[0]}"] != 2.0 for t in rest)  # the others are sampled
    assert _sampled(config, tmp_path / "b") == trials  # seeded


def test_bad_sweep_inputs_fail_clearly(tmp_path):
    raw = config_dict(tmp_path / "shards", tmp_path)
    raw["tune"] = {"space": {"tasks": ["reverse", "nonesuch"]}}
    with pytest.raises(ConfigError, match="tune.space.tasks names tasks the config lacks: nonesuch"):
        parse_config(raw)
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match="unreachable"):
        resolve_tracking_uri(closed)


def test_a_sweep_over_a_task_without_a_dev_split_is_refused_before_any_trial(tmp_path):
    import shutil

    from mm.shards import ShardError

    write_shards(tmp_path / "shards")
    shutil.rmtree(tmp_path / "shards" / "reverse" / "dev")  # its objective would read 0
    with pytest.raises(ShardError, match="task 'reverse' has no 'dev' split to evaluate on"):
        sweep(parse_config(config_dict(tmp_path / "shards", tmp_path)))


def test_population_based_training_runs_trials_in_segments_and_keeps_the_mixing_schedule(ray_local, tmp_path):
    write_shards(tmp_path / "shards")
    # a cool-down over the last half of the whole run, not of each segment
    raw = config_dict(tmp_path / "shards", tmp_path, steps=6, train={"eval_every": 3, "cooldown": 0.5})
    raw["train"]["log_every"] = 1
    raw["cluster"]["workers"] = 1
    raw["tune"] = {
        "trials": 2,
        "max_concurrent": 2,
        "scheduler": "pbt",
        "pbt_interval": 3,  # two segments of 3 steps; after the first the worse trial copies the better
        "space": {"mixing": "weights", "capacity_factor": [1.25], "k": [2], "lr": None},
    }
    result = sweep(parse_config(raw), register=False)
    assert len(result.trials) == 2 and not [t.error for t in result.trials if t.error]
    mlflow = client(result.tracking_uri)
    for trial in result.trials:
        assert trial.metrics["step"] == 6 and trial.metrics["training_iteration"] == 2  # 2 segments
        assert {"mix.reverse", "mix.patches"} <= set(trial.params) and trial.objective is not None
        # each checkpoint knows the schedule that led to it; its last phase is this trial's weights
        schedule = pbt_schedule(trial.checkpoint)
        assert schedule[0]["start"] == 0 and [p["start"] for p in schedule] in ([0], [0, 3])
        weights = {task: trial.params[f"mix.{task}"] for task in ("reverse", "patches")}
        total = sum(weights.values())
        assert schedule[-1]["weights"] == pytest.approx({t: w / total for t, w in weights.items()})
        # each trial logs into its own MLflow run, even after copying the other's checkpoint
        run = mlflow.get_run(trial.run_id)
        assert trial.name.startswith(run.info.run_name + "_")  # the trial folder: name_params_date
        resumed = mlflow.get_metric_history(trial.run_id, "train/resumed_at_step")
        assert [m.value for m in resumed] == [3.0]  # its second segment, not the other trial's
        rates = sorted((m.step, m.value) for m in mlflow.get_metric_history(trial.run_id, "train/lr"))
        expected = [(s + 1, 3e-3 * lr_factor(s, 2, 6, 3)) for s in range(6)]
        assert [step for step, _ in rates] == [1, 2, 3, 4, 5, 6]
        assert [rate for _, rate in rates] == pytest.approx([rate for _, rate in expected])
    assert len({t.run_id for t in result.trials}) == 2
    # synchronous PBT: the worse trial continued from the better one's step-3 checkpoint, so both
    # schedules start with the better one's weights. The copy's perturbed weights add a phase at
    # step 3, unless PBT scaled every weight by the same factor: that mixes the tasks as before.
    kept, copied = sorted((pbt_schedule(t.checkpoint) for t in result.trials), key=len)
    assert copied[0] == kept[0] and [len(kept), len(copied)] in ([1, 1], [1, 2])
    assert result.best is not None and Path(result.best.checkpoint).is_dir()
    # the best trial's schedule replays as a mixing strategy
    schedule = pbt_schedule(result.best.checkpoint)
    raw["train"]["mixing"] = {"strategy": "schedule", "schedule": schedule}
    assert parse_config(raw).train.mixing.phase_at(5).weights == schedule[-1]["weights"]
