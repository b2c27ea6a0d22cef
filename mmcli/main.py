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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm", description="Train one MultiModel on many tasks on a Ray cluster.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    selftest = commands.add_parser("selftest", help="train a tiny model in-process on generated examples")
    selftest.add_argument("--steps", type=int, default=300)
    selftest.add_argument("--seed", type=int, default=0)
    selftest.set_defaults(run=_selftest)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
