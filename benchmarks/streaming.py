"""Training steps/s with the shards streamed from storage every epoch, against the same run with
them read into the object store once (`data.read: stream` vs `materialize`).

Two real `mm train` jobs (Ray Train, the config's workers) of `--steps` steps each, one after
the other on a local Ray started here, with the tracking store and checkpoints in a temporary
folder. Steps/s is the workers' steady-state median step time (`perf/step_seconds`: the first
fifth warms up), so worker-group start and the final checkpoint are left out. Prints one JSON
line; `ratio` is streamed ÷ materialised steps/s (1.0: streaming costs nothing).
Needs the config's shards (the starter's: `make demo`, or `mm starter && mm prepare CONFIG`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import emit
from cluster.job import train
from cluster.session import connect
from mm.config import load_config


def steps_per_second(config_path: str, read: str, steps: int, overrides: list[str], tmp: Path) -> float:
    config = load_config(
        config_path,
        [
            f"data.read={read}",
            f"train.steps={steps}",
            f"train.eval_every={steps * 10}",  # evaluation only at the end
            f"train.checkpoint_every={steps}",
            f"cluster.storage_path={tmp / read}",
            f"mlflow.tracking_uri=sqlite:///{tmp / read}.db",
            f"mlflow.artifact_location={(tmp / read).as_uri()}-art",
            *overrides,
        ],
    )
    result = train(config)
    return 1.0 / result.metrics["perf/step_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/starter.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("-o", "--override", action="append", default=[], help="config override a.b=value")
    args = parser.parse_args()
    connect()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        materialised = steps_per_second(args.config, "materialize", args.steps, args.override, tmp)
        streamed = steps_per_second(args.config, "stream", args.steps, args.override, tmp)
    emit(
        {
            "benchmark": "streaming",
            "ratio": streamed / materialised,
            "streamed_steps_per_s": streamed,
            "materialised_steps_per_s": materialised,
            "steps": args.steps,
        }
    )


if __name__ == "__main__":
    main()
