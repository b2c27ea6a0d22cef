"""MLflow for training runs: one experiment per config name, one run per training job.

The driver resolves the tracking URI (a relative sqlite path becomes absolute; an http server
must answer, or the job stops before it starts — never a silent fall-back to a local file
store), creates the run and logs the flattened config. Rank 0 then logs metrics into that run,
in batches, when it checkpoints — through `MetricsSink`, an actor on the driver's node: the
tracking server may listen on that node's 127.0.0.1 only (cluster.yaml binds it so), and rank 0
may run on any node. A worker group restarted from a checkpoint replays the steps after it;
steps the run already holds (its `mm.logged_step` tag) are not logged again, so no step is
counted twice.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mm.config import Config, flatten


class TrackingError(RuntimeError):
    pass


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def resolve_tracking_uri(uri: str) -> str:
    """The URI to use; an http(s) server must answer /health first."""
    if is_server(uri):
        check_server(uri)
    return uri


def check_server(uri: str, timeout: float = 5.0) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow tracking server {uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({err}); start it or set mlflow.tracking_uri"
        ) from None


def client(uri: str | None):
    """A client of the tracking server at `uri` and of its model registry (not the registry
    that MLFLOW_REGISTRY_URI or `mlflow.set_registry_uri` may name for the process)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(uri: str, config: Config) -> str:
    name = config.mlflow.experiment or config.name
    mlflow = client(uri)
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_location(uri, config))


def artifact_location(uri: str, config: Config) -> str | None:
    """Where a new experiment keeps its artifacts: the config's place, else ./mlartifacts beside a
    local store, else (None) the tracking server's own store (`mlflow server
    --artifacts-destination`: S3 in cluster.yaml), which every client reaches through the
    server. A local path there would put a job's checkpoints and registered models on the disk
    of whichever node created the experiment, in a working directory Ray deletes."""
    if config.mlflow.artifact_location:
        return config.mlflow.artifact_location
    return None if is_server(uri) else Path("mlartifacts").absolute().as_uri()


def start_run(
    uri: str,
    config: Config,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create the run (nested under `parent_run_id` for a sweep's trials) and log the config."""
    from mlflow.entities import Param

    mlflow = client(uri)
    tags = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    run = mlflow.create_run(experiment_id(uri, config), run_name=run_name or config.name, tags=tags or None)
    params = [Param(key[:250], _param_value(value)) for key, value in flatten(config).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        mlflow.log_batch(run.info.run_id, params=params[start : start + 100])
    mlflow.log_dict(run.info.run_id, config.model_dump(mode="json"), "config.json")
    return run.info.run_id


def _param_value(value: Any) -> str:
    return str(value)[:6000]


LOGGED_STEP = "mm.logged_step"


class MetricsSink:
    """Writes to the tracking server from the driver's node (a Ray actor there, see
    `start_metrics_sink`)."""

    def __init__(self, uri: str):
        self.client = client(uri)

    def logged_step(self, run_id: str) -> int:
        return int(self.client.get_run(run_id).data.tags.get(LOGGED_STEP, 0))

    def log_metrics(self, run_id: str, metrics: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        batch = [Metric(key, value, timestamp, step) for key, value, timestamp, step in metrics]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[start : start + 1000])
        self.client.set_tag(run_id, LOGGED_STEP, str(max(m.step for m in batch)))

    def log_dict(self, run_id: str, value: Any, path: str) -> None:
        self.client.log_dict(run_id, value, path)


def start_metrics_sink(uri: str):
    """A `MetricsSink` actor pinned to this (the driver's) node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(MetricsSink).options(scheduling_strategy=here).remote(uri)


class MetricsBuffer:
    """Rank 0's metrics, sent to the sink in batches; steps already logged are skipped."""

    def __init__(self, sink, run_id: str):
        import ray

        self.sink, self.run_id, self.get = sink, run_id, ray.get
        self.pending: list[tuple[str, float, int, int]] = []
        self.logged_step = self.get(sink.logged_step.remote(run_id))

    def add(self, step: int, metrics: dict[str, float], replay: bool = True) -> None:
        """`replay=False` for events of this attempt (a resume), logged whatever the step."""
        if replay and step <= self.logged_step:
            return  # a replay after a restart: this step is in the run already
        now = int(time.time() * 1000)
        self.pending += [(key, float(value), now, step) for key, value in metrics.items()]

    def commit(self) -> None:
        if not self.pending:
            return
        self.get(self.sink.log_metrics.remote(self.run_id, self.pending))
        self.logged_step = max(self.logged_step, max(step for *_, step in self.pending))
        self.pending = []

    def log_dict(self, value: Any, path: str) -> None:
        self.get(self.sink.log_dict.remote(self.run_id, value, path))
