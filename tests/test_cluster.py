"""The cluster workflow for real: cluster configs pass Ray's validation; `ray up` brings
cluster/onprem.yaml up on 127.0.0.1 (sshd started per connection through ssh_proxy_command),
`ray job submit` prepares and trains the starter config there (on a tiny build of the starter
suite) and logs to the head's MLflow server; `ray down`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster.tracking import client
from mm.parallel import free_port
from mm.shards import load_manifest
from pipelines import starter

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def ray_env(**extra: str) -> dict[str, str]:
    # `mm` and `ray` from this virtualenv; jobs authenticate with the token Ray writes
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token", **extra}


def run(*command: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ray_env(), **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def test_cluster_configs_pass_ray_validation_and_bind_servers_to_localhost():
    from ray.autoscaler._private.util import prepare_config, validate_config

    for path in (REPO / "cluster.yaml", REPO / "cluster" / "onprem.yaml"):
        config = yaml.safe_load(path.read_text())
        validate_config(prepare_config(config))
        start = " ".join(config["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in start, path
        assert "mlflow server --host 127.0.0.1" in start, path
        assert any("make -C ~/multimodel venv" in c for c in config["setup_commands"]), path
    aws = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert aws["provider"]["type"] == "aws" and aws["available_node_types"]["gpu_worker"]["max_workers"] > 0
    assert "object_spilling_config" in " ".join(aws["head_start_ray_commands"])


def submit(address: str, workdir: Path, *entrypoint: str) -> str:
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": [".venv", ".git", "data", "shards", "runs", "mlartifacts", "mlruns.db"],
        "env_vars": {"MM_WORKDIR": str(workdir)},  # relative config paths: data/..., shards/...
    }
    result = run(
        RAY, "job", "submit", "--address", address, "--runtime-env-json", json.dumps(runtime_env),
        "--", *entrypoint,
    )  # fmt: skip
    job = next(line for line in result.stdout.splitlines() if "submitted successfully" in line).split("'")[1]
    status = run(RAY, "job", "status", "--address", address, job).stdout
    assert "succeeded" in status.lower(), status
    return result.stdout


# ---------------------------------------------------------------------------------------- ray up


def sshd_through_proxy(tmp: Path) -> tuple[Path, str]:
    """A key pair and an sshd config of our own: sshd runs per connection (`sshd -i`) as the
    cluster's ssh_proxy_command, so no daemon and no port."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key")], check=True)
    shutil.copy(tmp / "key.pub", tmp / "authorized_keys")
    (tmp / "sshd_config").write_text(
        f"HostKey {tmp / 'host_key'}\nAuthorizedKeysFile {tmp / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "StrictModes no\nUsePAM no\nLogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    return tmp / "key", f"/usr/sbin/sshd -i -f {tmp / 'sshd_config'}"


def local_onprem_config(tmp: Path, key: Path, proxy: str, dashboard: int, mlflow_port: int) -> Path:
    """cluster/onprem.yaml pointed at 127.0.0.1, with this checkout's virtualenv instead of
    installing one (the install is what `make venv` does in CI already)."""
    config = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config.update(min_workers=0, max_workers=0, file_mounts={}, setup_commands=[])
    config["auth"] = {"ssh_user": os.environ.get("USER", "root"), "ssh_private_key": str(key),
                      "ssh_proxy_command": proxy}  # fmt: skip

    def local(command: str) -> str:
        command = command.replace("~/mm-venv/bin/", f"{BIN}/").replace("$HOME/mm-venv/bin", str(BIN))
        command = (
            command.replace("$HOME", str(tmp))
            .replace("~/mlflow", f"{tmp}/mlflow")
            .replace("--port 5000", f"--port {mlflow_port}")
        )
        return command.replace(
            "--dashboard-host=127.0.0.1", f"--dashboard-host=127.0.0.1 --dashboard-port={dashboard}"
        )

    for key_name in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[key_name] = [local(c) for c in config[key_name]]
    path = tmp / "onprem-local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tracking_server_answers(url: str, seconds: float = 90) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status == 200
        except OSError:
            time.sleep(1)
    return False


@pytest.mark.slow
@pytest.mark.starter
@pytest.mark.owns_ray
@pytest.mark.skipif(not Path("/usr/sbin/sshd").exists() or not shutil.which("rsync"),
                    reason="needs openssh-server and rsync (make test installs them as root)")  # fmt: skip
@pytest.mark.skipif(bool(starter.missing_packages(starter.PACKAGES)), reason="needs the starter's packages")
def test_ray_up_starts_the_onprem_cluster_trains_the_starter_in_a_job_and_stops(own_ray, tmp_path):
    key, proxy = sshd_through_proxy(tmp_path)
    dashboard, mlflow_port = free_port(), free_port()
    config = local_onprem_config(tmp_path, key, proxy, dashboard, mlflow_port)
    workdir = tmp_path / "work"  # the job's relative paths (data/starter, shards/, runs/) land here
    summary = starter.build_starter(workdir / "data" / "starter", size="tiny", seed=0, log=lambda _: None)
    try:
        run(RAY, "up", "-y", "--no-config-cache", str(config), cwd=tmp_path)
        tracking = f"http://127.0.0.1:{mlflow_port}"
        assert tracking_server_answers(f"{tracking}/health")  # started on the head
        address = f"http://127.0.0.1:{dashboard}"
        submit(address, workdir, "mm", "prepare", "configs/starter.yaml")
        for task, splits in summary.items():
            manifest = load_manifest(workdir / "shards" / "starter", task)
            assert manifest.rows("train") >= splits["train"], task  # COCO: a row per caption
            assert sum(manifest.splits["train"].rejected.values()) == 0, task
        # a tiny build has a few rows per worker: the starter's batches would drop them all
        small_batches = [f"tasks.{task}.batch_size=2" for task in summary]
        logs = submit(
            address, workdir, "mm", "train", "configs/starter.yaml", "-o", f"mlflow.tracking_uri={tracking}",
            "-o", "train.steps=4", "-o", "train.eval_every=4", "-o", "train.checkpoint_every=4",
            "-o", "train.eval_examples=8", "-o", "train.log_every=2",
            *(arg for override in small_batches for arg in ("-o", override)),
        )  # fmt: skip
        assert "[mm] step 4/4" in logs
        mlflow = client(tracking)  # the run went to the head's tracking server
        runs = mlflow.search_runs([mlflow.get_experiment_by_name("starter").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert "eval/fashion_mnist/accuracy" in runs[0].data.metrics
        assert {f"train/{task}/loss" for task in summary} & set(runs[0].data.metrics)
    finally:
        run(RAY, "down", "-y", str(config), cwd=tmp_path)
        run(RAY, "stop", "--force")  # `ray down` runs `ray stop` from PATH, which lacks the venv here
        subprocess.run(["pkill", "-f", f"mlflow server --host 127.0.0.1 --port {mlflow_port}"], check=False)
