"""Tiny shards written straight from generated examples, for tests of training: two tasks
(translation: reverse and re-spell the words; image classification: a bright patch per class)
with a real SentencePiece vocabulary, in the exact format `pipelines/` writes."""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mm.config import Config, parse_config
from mm.shards import Manifest, SplitStats, array_to_bytes, task_dir, write_manifest
from mm.vocab import train_vocabulary

WORDS = "red green blue cat dog bird runs sleeps eats big small old new tree house car".split()
TWIN = {w: w[::-1] + "x" for w in WORDS}


def config_dict(shards: Path, tmp: Path, steps: int = 6, **sections: Any) -> dict[str, Any]:
    raw = {
        "name": "tinyjob",
        "model": {"preset": "tiny", "moe": {"num_experts": 4}},
        "tasks": [
            {"name": "reverse", "kind": "translation", "batch_size": 8, "max_target_length": 16},
            {"name": "patches", "kind": "image_classification", "batch_size": 8},
        ],
        "data": {"shards": str(shards), "vocab_size": 64},
        "train": {
            "steps": steps,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 2,
            "eval_every": 1000,
            "checkpoint_every": 2,
            "eval_examples": 8,
        },
        "cluster": {"workers": 2, "cpus_per_worker": 0.5, "storage_path": str(tmp / "runs")},
        "mlflow": {
            "tracking_uri": f"sqlite:///{fresh_tracking_store(tmp / 'mlflow.db')}",
            "artifact_location": (tmp / "art").as_uri(),
        },
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def fresh_tracking_store(path: Path) -> Path:
    """An empty MLflow sqlite store at `path` (kept if one is there already). Creating a store
    runs every one of MLflow's schema migrations, about 2 s of CPU; the suite's two dozen
    training runs each get a copy of one store that MLflow created, once per session."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_store_made_by_mlflow(), path)
    return path


@functools.cache
def _store_made_by_mlflow() -> Path:
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="mm-tests-mlflow-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates it
    return path


def write_shards(root: Path, rows: int = 64, seed: int = 0) -> Config:
    rng = random.Random(seed)
    config = parse_config(config_dict(root, root.parent))
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for _ in range(rows)]
    twins = [" ".join(TWIN[w] for w in reversed(s.split())) for s in sentences]
    vocab = train_vocabulary(sentences + twins, 64, config.command_tokens)
    root.mkdir(parents=True, exist_ok=True)
    vocab.save(root / "vocab.model")
    for split in ("train", "dev", "test"):
        text = {
            "id": [f"{split}-{i}" for i in range(rows)],
            "inputs": [vocab.encode(s) for s in sentences],
            "input_shape": [[] for _ in sentences],
            "targets": [vocab.encode(t) for t in twins],
            "reference": twins,
            "references": [[t] for t in twins],
        }
        _write(root, "reverse", split, text, vocab.sha256, "wmt")
        labels = [rng.randrange(4) for _ in range(rows)]
        images = [_patch_image(label, rng) for label in labels]
        image = {
            "id": [f"{split}-{i}" for i in range(rows)],
            "inputs": [array_to_bytes(a)[0] for a in images],
            "input_shape": [list(a.shape) for a in images],
            "targets": labels,
            "reference": [str(label) for label in labels],
            "references": [[str(label)] for label in labels],
        }
        _write(root, "patches", split, image, vocab.sha256, "imagenet", num_classes=4)
    return config


def _patch_image(label: int, rng: random.Random) -> np.ndarray:
    image = np.full((16, 16, 1), rng.randrange(30), dtype=np.uint8)
    row, col = divmod(label, 2)
    image[row * 8 : row * 8 + 6, col * 8 : col * 8 + 6] = 220
    return image


def _write(root: Path, task: str, split: str, columns: dict, vocab_sha: str, layout: str, **extra) -> None:
    folder = task_dir(root, task) / split
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("inputs", pa.binary() if layout == "imagenet" else pa.list_(pa.int32())),
            ("input_shape", pa.list_(pa.int32())),
            ("targets", pa.int64() if layout == "imagenet" else pa.list_(pa.int32())),
            ("reference", pa.string()),
            ("references", pa.list_(pa.string())),
        ]
    )
    pq.write_table(pa.table(columns, schema=schema), folder / "part-00000.parquet")
    manifest_path = task_dir(root, task) / "manifest.json"
    manifest = (
        Manifest.model_validate_json(manifest_path.read_text())
        if manifest_path.exists()
        else Manifest(
            task=task, kind="", layout=layout, splits={}, vocab_sha256=vocab_sha, source_fingerprint="test"
        )
    )
    manifest.kind = "translation" if layout == "wmt" else "image_classification"
    manifest.splits[split] = SplitStats(rows=len(columns["id"]), parts=1)
    manifest.num_classes = extra.get("num_classes")
    write_manifest(root, manifest)
