"""The `mm` command: a thin layer over mm/, pipelines/, cluster/ and tune/.

Each sub-command imports its package only when it runs, so `mm --help` is instant and a
command that needs no Ray never starts it.
"""

from __future__ import annotations

import argparse
import sys


def _selftest(args: argparse.Namespace) -> None:
    from mm import selftest

    selftest.main(["--steps", str(args.steps), "--seed", str(args.seed)])


def _starter(args: argparse.Namespace) -> None:
    from pipelines import starter

    argv = ["--out", str(args.out), "--size", args.size, "--seed", str(args.seed)]
    sys.exit(starter.main(argv + (["--no-install"] if args.no_install else [])))


def _load(args: argparse.Namespace):
    from mm.config import load_config

    return load_config(args.config, args.override)


def _train(args: argparse.Namespace) -> None:
    from rich.console import Console

    from cluster.job import train
    from mmcli.tables import task_metric_table

    config = _load(args)
    if args.workers:
        low, _, high = args.workers.partition("-")
        config.cluster.workers = int(high or low)
        config.cluster.min_workers = int(low) if high else None
    result = train(config, address=args.address, resume=args.resume)
    console = Console()
    console.print(task_metric_table(result.metrics, f"{config.name}: step {result.metrics.get('step')}"))
    console.print(f"checkpoint: {result.checkpoint}")
    console.print(f"MLflow run: {result.run_id} at {result.tracking_uri}")


def _with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="experiment config (YAML)")
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="e.g. -o train.steps=100"
    )
    parser.add_argument("--address", help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm", description="Train one MultiModel on many tasks on a Ray cluster."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    selftest = commands.add_parser("selftest", help="train a tiny model in-process on generated examples")
    selftest.add_argument("--steps", type=int, default=300)
    selftest.add_argument("--seed", type=int, default=0)
    selftest.set_defaults(run=_selftest)

    starter = commands.add_parser("starter", help="build the starter corpora from Debian packages")
    starter.add_argument("--out", default="data/starter")
    starter.add_argument("--size", choices=["tiny", "small", "full"], default="small")
    starter.add_argument("--seed", type=int, default=0)
    starter.add_argument("--no-install", action="store_true", help="never run apt-get")
    starter.set_defaults(run=_starter)

    train = _with_config(commands.add_parser("train", help="train on the prepared shards with Ray Train"))
    train.add_argument("--workers", help="N, or MIN-MAX for elastic training")
    train.add_argument("--resume", help="checkpoint directory to continue from")
    train.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
