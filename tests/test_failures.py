"""A failure inside Ray Data or Ray Train ends `mm` in one line naming where and why, with the
whole traceback in a log file that the line names. The two end-to-end tests break the install the
way a bad upstream release does, but only inside Ray's worker processes: a `sitecustomize` on
PYTHONPATH makes one import fail there, so the driver's checks pass and the failure happens
where users met it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from mmcli.failures import explain

from corpora import write_librispeech
from shardmaker import config_dict, write_shards

MM = Path(sys.executable).with_name("mm")
SYMBOL = "libtorchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace"


def broken_import_in_ray_workers(folder: Path, module: str) -> dict[str, str]:
    """An environment in which importing `module` fails in Ray worker processes only."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"""
import sys
if any("default_worker.py" in arg for arg in sys.argv):
    class BrokenInstall:
        def find_spec(self, name, path=None, target=None):
            if name == {module!r}:
                raise OSError({SYMBOL!r})
    sys.meta_path.insert(0, BrokenInstall())
"""
    )
    return {**os.environ, "PYTHONPATH": str(folder), "MM_LOG_DIR": str(folder / "logs")}


@pytest.fixture
def dead_ray_recorded():
    """Ray's temp dir (short: Ray's socket paths have a length limit) holding the address of a
    cluster that is gone, as a crashed `ray start` leaves it. `ray.init()` would join that
    cluster and hang; `mm` must start its own Ray."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # the discard port: nothing listens
    yield {"RAY_TMPDIR": str(temp)}
    shutil.rmtree(temp, ignore_errors=True)


def one_line_and_log(result: subprocess.CompletedProcess, command: str) -> tuple[str, str]:
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mm {command} failed in "), result.stderr[-3000:]
    log = re.search(r"\(full traceback: (.+)\)$", last)
    assert log, last
    return last, Path(log.group(1)).read_text()


# ------------------------------------------------------------------------- explain, without Ray


class FakeRayTaskError(Exception):
    """What a Ray task's error looks like on the driver: its cause only as traceback text."""


def test_a_ray_task_error_is_explained_by_the_exception_in_its_traceback_text():
    text = (
        "\x1b[36mray::MapBatches(convert_batch)()\x1b[39m (pid=1, ip=1.2.3.4)\n"
        '  File "/x/media.py", line 59, in load\n    import torchaudio\n'
        f"OSError: /venv/{SYMBOL}\n\nThe above exception was the direct cause of the following exception:\n\n"
        "\x1b[36mray::MapBatches(convert_batch)()\x1b[39m (pid=1, ip=1.2.3.4)\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\nFailed to apply UDF"
    )
    assert explain(FakeRayTaskError(text)) == f"Ray task MapBatches(convert_batch): OSError: /venv/{SYMBOL}"


def test_a_training_workers_failure_names_the_worker_and_the_root_cause():
    class WorkerGroupError(Exception):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors:\n[Rank 1] ...")
            self.worker_failures = failures

    root = ValueError("step 3: asked for a 'coco' batch, got 'ptb'\nsecond line")
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = root
    assert explain(WorkerGroupError({1: wrapped})) == (
        "training worker 1: ValueError: step 3: asked for a 'coco' batch, got 'ptb'"
    )


# ------------------------------------------------------------------------ end to end, real Ray


@pytest.mark.slow
def test_a_reader_that_fails_inside_ray_data_ends_mm_prepare_in_one_line(tmp_path, dead_ray_recorded):
    write_librispeech(tmp_path / "raw")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "broken",
                "tasks": [
                    {
                        "name": "speech",
                        "kind": "speech_recognition",
                        "corpus": {
                            "path": str(tmp_path / "raw"),
                            "layout": "librispeech",
                            "splits": {"train": "train", "dev": "dev"},
                        },  # fmt: skip
                    }
                ],
                "data": {"shards": str(tmp_path / "shards"), "vocab_size": 100},
            }
        )
    )
    env = {**broken_import_in_ray_workers(tmp_path / "site", "torchaudio"), **dead_ray_recorded}
    result = subprocess.run(
        [str(MM), "prepare", str(config)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    last, log = one_line_and_log(result, "prepare")
    assert "Ray task MapBatches(convert_batch)" in last
    assert re.search(r"task 'speech' \((train|dev)\) at (train|dev)/\S+\.trans\.txt:\d+", last), last
    assert f"OSError: {SYMBOL}" in last
    assert "Traceback (most recent call last)" in log and SYMBOL in log
    assert not list((tmp_path / "shards").glob("speech/train/*.parquet"))  # nothing half-written


@pytest.mark.slow
def test_an_exception_on_a_training_worker_ends_mm_train_in_one_line(tmp_path, dead_ray_recorded):
    shards = tmp_path / "shards"
    write_shards(shards)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_dict(shards, tmp_path, steps=4)))
    env = {**broken_import_in_ray_workers(tmp_path / "site", "cluster.worker"), **dead_ray_recorded}
    result = subprocess.run(
        [str(MM), "train", str(config), "-o", "cluster.max_failures=0", "-o", "cluster.workers=1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    last, log = one_line_and_log(result, "train")
    assert re.search(rf"training worker \d: OSError: {re.escape(SYMBOL)}", last), last
    assert SYMBOL in log and "Traceback" in log
