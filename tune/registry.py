"""The MLflow model registry: the best trial's model as a pyfunc, and the `champion` alias.

The registered model is an MLflow pyfunc whose artifact is the checkpoint directory (tensors,
config, vocabulary, tasks.json), logged as "models from code": its code is the source file
`tune/pyfunc_model.py`, not a pickled object, so loading a registered model unpickles nothing.
It loads where multimodel is installed (`mlflow models serve --env-manager local`), takes rows
of `{task, input}` — text, or an image / audio file base64-encoded — and returns one prediction
per row: the class name or the decoded text.

Promotion: the new version and the current champion are scored on the same dev sets (the
shards of this config, `train.eval_examples` rows of each task) with the sweep's aggregate
objective. `champion` moves to the new version only if it scores higher; otherwise the new
version becomes `challenger`. The scores and the reason are tags on the version and the sweep.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from mm.config import Config

CHAMPION, CHALLENGER = "champion", "challenger"


PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def signature_and_example(config: Config):
    import pandas as pd
    from mlflow.models import infer_signature

    text_task = next(
        (t for t in config.tasks if t.kind in ("translation", "constituency_parsing")), config.tasks[0]
    )
    example = pd.DataFrame([{"task": text_task.name, "input": "A short example sentence ."}])
    return infer_signature(example, ["a prediction"]), example


def log_pyfunc(config: Config, tracking_uri: str, run_id: str, checkpoint: str | Path) -> Any:
    """Log the checkpoint as a pyfunc model in `run_id` and register it; returns the version."""
    mlflow.set_tracking_uri(tracking_uri)
    signature, example = signature_and_example(config)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),  # models from code: no pickle in the model
            artifacts={"checkpoint": str(checkpoint)},
            signature=signature,
            input_example=example,
            registered_model_name=config.mlflow.model_name or config.name,
        )
    return info.registered_model_version


def checkpoint_score(config: Config, checkpoint: str | Path) -> tuple[float, dict[str, dict[str, float]]]:
    """The aggregate objective of a checkpoint on this config's dev shards."""
    from mm.predict import Predictor

    predictor = Predictor(checkpoint)
    scores = predictor.evaluate(config.data.shards, "dev", config.train.eval_examples)
    return predictor.aggregate(scores), scores


def register_and_promote(
    config: Config,
    tracking_uri: str,
    run_id: str,
    checkpoint: str | Path,
    tag_run_id: str | None = None,
    score: float | None = None,
    log=print,
) -> dict[str, Any]:
    """Register `checkpoint` (logged to `run_id`) and move `champion` to it if it scores higher
    than the current champion on the same dev sets, else call it `challenger`. `score`: the
    checkpoint's aggregate on those dev sets when already known. The outcome is also tagged on
    `tag_run_id` (a sweep's parent run), or on `run_id`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    name = config.mlflow.model_name or config.name
    version = log_pyfunc(config, tracking_uri, run_id, checkpoint)
    if score is None:
        score, _ = checkpoint_score(config, checkpoint)
    client.set_model_version_tag(name, version, "aggregate_score", f"{score:.6f}")

    champion = _champion(client, name)
    if champion is None:
        alias, reason = CHAMPION, "first registered version"
    else:
        with checkpoint_from(f"models:/{name}/{champion.version}", tracking_uri) as previous:
            champion_score, _ = checkpoint_score(config, previous)
        if score > champion_score:
            alias = CHAMPION
            reason = f"aggregate {score:.4f} beats champion v{champion.version}'s {champion_score:.4f}"
        else:
            alias = CHALLENGER
            reason = (
                f"aggregate {score:.4f} does not beat champion v{champion.version}'s {champion_score:.4f}"
            )
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion", reason)
    client.set_tag(tag_run_id or run_id, "promotion", f"v{version} -> {alias}: {reason}")
    log(f"[mm] registered {name} v{version} as {alias}: {reason}")
    return {"name": name, "version": int(version), "alias": alias, "score": score, "reason": reason}


def _champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # MlflowException: no such alias yet
        return None


def resolve_checkpoint(uri_or_path: str, tracking_uri: str | None = None, into: Path | None = None) -> Path:
    """A checkpoint directory from a path, or from a `models:/NAME@alias` / `models:/NAME/version`
    URI, downloaded into `into` (default: a new `mm-model-*` temporary folder, which the caller
    owns; `checkpoint_from` removes it afterwards). A path or a URI that holds no checkpoint is a
    `CheckpointError` naming it."""
    from mm.checkpoint import DENSE, CheckpointError

    if not uri_or_path.startswith("models:/"):
        path = Path(uri_or_path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        if not (path / DENSE).is_file():
            raise CheckpointError(f"{path}: not a checkpoint directory (no {DENSE})")
        return path
    import shutil

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from cluster.tracking import client

    registry = client(tracking_uri)  # the registry is the tracking server's
    target = Path(into) if into is not None else Path(tempfile.mkdtemp(prefix="mm-model-"))
    try:
        try:
            version = registered_version(registry, uri_or_path)
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=registry.get_model_version_download_uri(version.name, version.version),
                dst_path=str(target),
                tracking_uri=tracking_uri,
            )
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            where = f" at {tracking_uri}" if tracking_uri else ""
            raise CheckpointError(
                f"{uri_or_path}: not in the model registry{where} ({err.message})"
            ) from None
        found = sorted((Path(path) / "artifacts").rglob(DENSE))  # the folder keeps its run's name
        if not found:
            raise CheckpointError(f"{uri_or_path}: the model holds no multimodel checkpoint")
    except BaseException:
        if into is None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return found[0].parent


def registered_version(registry, uri: str):
    """The version that `models:/NAME/VERSION` or `models:/NAME@ALIAS` names, looked up in
    `registry` (an MlflowClient). MLflow's own download of such a URI asks the process-wide
    registry (MLFLOW_TRACKING_URI, `mlflow.set_tracking_uri`) whatever registry_uri it is
    given, so `--tracking-uri` would be ignored wherever that points elsewhere."""
    from mm.checkpoint import CheckpointError

    name, at, alias = uri.removeprefix("models:/").partition("@")
    if at:
        return registry.get_model_version_by_alias(name, alias)
    name, _, number = name.rpartition("/")
    if not name or not number.isdigit():
        raise CheckpointError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return registry.get_model_version(name, number)


@contextlib.contextmanager
def checkpoint_from(uri_or_path: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """`resolve_checkpoint` for the length of a `with` block: a registry download (about the
    size of the checkpoint) is removed when the block ends; a local path is left alone."""
    if not uri_or_path.startswith("models:/"):
        yield resolve_checkpoint(uri_or_path, tracking_uri)
        return
    with tempfile.TemporaryDirectory(prefix="mm-model-") as folder:
        yield resolve_checkpoint(uri_or_path, tracking_uri, into=Path(folder))
