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


def _pass_through(module: str):
    """Commands whose module owns its arguments: hand it the rest of the command line."""

    def run(args: argparse.Namespace) -> None:
        import importlib

        sys.exit(importlib.import_module(module).main(args.rest))

    return run


def _load(args: argparse.Namespace):
    from mm.config import load_config

    return load_config(args.config, args.override)


def _train(args: argparse.Namespace) -> None:
    from rich.console import Console

    from cluster.job import TrainingFailed, train
    from mmcli.failures import report_failure
    from mmcli.tables import task_metric_table

    config = _load(args)
    if args.workers:
        low, _, high = args.workers.partition("-")
        config.cluster.workers = int(high or low)
        config.cluster.min_workers = int(low) if high else None
    try:
        result = train(config, address=args.address, resume=args.resume)
    except TrainingFailed as failed:
        sys.exit(report_failure("train", failed, hint=_resume_hint(failed)))
    console = Console()
    console.print(task_metric_table(result.metrics, f"{config.name}: step {result.metrics.get('step')}"))
    console.print(f"checkpoint: {result.checkpoint}")
    console.print(f"MLflow run: {result.run_id} at {result.tracking_uri}")


def _resume_hint(failed) -> str:
    """What the user reads after the restarts ran out: the checkpoint, and the exact command."""
    import shlex

    if failed.checkpoint is None:
        return f"{failed}; start again with: mm {shlex.join(sys.argv[1:])}"
    argv = sys.argv[1:]
    if "--resume" in argv:  # resumed before: continue from the newer checkpoint instead
        at = argv.index("--resume")
        argv = argv[:at] + argv[at + 2 :]
    return f"{failed}; continue with: mm {shlex.join([*argv, '--resume', str(failed.checkpoint)])}"


def _tune(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from tune.sweep import sweep

    result = sweep(_load(args), address=args.address)
    table = Table(title="trials")
    for column in ("trial", "objective", "status", "parameters"):
        table.add_column(column)
    for trial in result.trials:
        status = "failed: " + trial.error if trial.error else ("best" if trial is result.best else "done")
        objective = "-" if trial.objective is None else f"{trial.objective:.4f}"
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
        )
        table.add_row(trial.name, objective, status, params)
    console = Console()
    console.print(table)
    if result.registered:
        r = result.registered
        console.print(f"registered {r['name']} v{r['version']} as {r['alias']}: {r['reason']}")


def _demo(args: argparse.Namespace) -> None:
    from rich.console import Console

    from mmcli.tables import floors_table, task_metric_table
    from tune.demo import run_demo

    console = Console()
    config = _load(args)
    result = run_demo(config, address=args.address, log=lambda line: console.print(line, markup=False))
    flat = {
        f"test/{task}/{metric}": value
        for task, values in result.test.items()
        for metric, value in values.items()
    }
    console.print(task_metric_table(flat, "starter suite: test split", prefix="test/"))
    primary = {task.name: task.metrics[0] for task in config.tasks}
    console.print(floors_table(primary, result.test, result.blind, result.chance, "test, beside its floors"))
    console.print(f"report: {result.report} (and summary.json beside it)")


def _experiment(args: argparse.Namespace) -> None:
    import shlex

    from rich.console import Console

    from tune.experiment import run_experiment

    console = Console()
    command = "mm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_experiment(
        _load(args),
        args.study,
        seeds=args.seeds,
        preset=args.preset,
        address=args.address,
        out=args.out,
        command=command,
        log=lambda line: console.print(line, markup=False),
    )
    console.print(result.report.read_text(), markup=False)
    console.print(f"report: {result.report}  MLflow parent run: {result.parent_run_id}")
    if all(run.error for run in result.runs):
        sys.exit(1)


def _tracking_uri(args: argparse.Namespace) -> str | None:
    import os

    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def _evaluate(args: argparse.Namespace) -> None:
    from rich.console import Console

    from cluster.data import read_rows
    from mmcli.tables import floors_table, task_metric_table
    from tune.predictor import Predictor
    from tune.registry import checkpoint_from
    from tune.report import chance_levels

    with checkpoint_from(args.model, _tracking_uri(args)) as checkpoint:  # a download is removed after
        predictor = Predictor(checkpoint, beam=args.beam)
        scores = predictor.evaluate(args.shards, args.split, args.examples)
        blind = predictor.evaluate(args.shards, args.split, args.examples, blind=True)
    flat = {
        f"eval/{task}/{metric}": value for task, values in scores.items() for metric, value in values.items()
    }
    config = predictor.config
    limit = args.examples or config.train.eval_examples
    shards = args.shards or config.data.shards
    references = {t: list(read_rows(shards, t, args.split, limit)["references"]) for t in scores}
    chance = chance_levels(config, list(predictor.records.values()), references)
    primary = {task.name: task.metrics[0] for task in config.tasks}
    console = Console()
    console.print(task_metric_table(flat, f"{args.model} on {args.split}"))
    console.print(
        floors_table(primary, scores, blind, chance, "beside chance and input-blind (inputs blanked)")
    )
    console.print(f"aggregate score: {predictor.aggregate(scores):.4f}")


def _predict(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tune.predictor import PredictError, Predictor
    from tune.registry import checkpoint_from

    def is_file(path: Path) -> bool:
        try:
            return path.is_file()
        except OSError:  # a sentence longer than a file name can be
            return False

    with checkpoint_from(args.model, _tracking_uri(args)) as checkpoint:  # a download is removed after
        predictor = Predictor(checkpoint, beam=args.beam)
        modality = predictor.specs[args.task].input_modality if args.task in predictor.specs else "text"
        path, source = Path(args.input), None
        value: str | bytes = args.input  # text input: the argument itself, or a text file
        try:
            if modality != "text":
                if not path.is_file():
                    what = "not a file" if path.exists() else "no such file"
                    raise PredictError(f"{path}: {what} (task {args.task!r} takes an {modality} file)")
                value, source = path.read_bytes(), str(path)
            elif is_file(path):
                value, source = path.read_text(encoding="utf-8").strip(), str(path)
        except OSError as err:
            raise PredictError(f"{path}: cannot be read ({err.strerror or err})") from None
        except UnicodeDecodeError as err:
            raise PredictError(f"{path}: not a UTF-8 text file (byte {err.start} is not UTF-8)") from None
        print(predictor.predict(args.task, value, source=source))


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

    for name, module, help_text in (
        ("starter", "pipelines.starter", "build the starter corpora from Debian packages"),
        ("prepare", "pipelines.prepare", "corpora into Arrow shards with Ray Data"),
    ):
        command = commands.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        command.add_argument("rest", nargs=argparse.REMAINDER)
        command.set_defaults(run=_pass_through(module))

    train = _with_config(commands.add_parser("train", help="train on the prepared shards with Ray Train"))
    train.add_argument("--workers", help="N, or MIN-MAX for elastic training")
    train.add_argument("--resume", help="checkpoint directory to continue from")
    train.set_defaults(run=_train)

    demo = commands.add_parser("demo", help="the main job: starter suite, prepare, train, register, report")
    _with_config(demo).set_defaults(run=_demo)

    tune = _with_config(
        commands.add_parser("tune", help="sweep mixing ratios and MoE capacity with Ray Tune")
    )
    tune.set_defaults(run=_tune)

    from pathlib import Path

    from tune.studies import PRESETS, STUDIES

    experiment = _with_config(
        commands.add_parser("experiment", help="a study of the paper's claims: runs over seeds, a report")
    )
    experiment.add_argument("--study", required=True, choices=STUDIES)
    experiment.add_argument("--seeds", type=int, default=3)
    experiment.add_argument("--preset", choices=list(PRESETS), default="small")
    experiment.add_argument("--out", type=Path, help="report folder (default reports/NAME-STUDY-TIME)")
    experiment.set_defaults(run=_experiment)

    for name, help_text, run in (
        ("evaluate", "per-task metrics of a checkpoint or registered model", _evaluate),
        ("predict", "one prediction from a checkpoint or registered model", _predict),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("model", help="checkpoint directory, or models:/NAME@champion")
        if name == "predict":
            command.add_argument("--task", required=True)
            command.add_argument("input", help="text, or a file (image, audio, or text)")
        else:
            command.add_argument("--shards", help="shards to score on (default: the config's)")
            command.add_argument("--split", default="dev")
            command.add_argument("--examples", type=int, help="rows per task (default: train.eval_examples)")
        command.add_argument("--beam", type=int, default=1)
        command.add_argument(
            "--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI)"
        )
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:
        if _is_input_error(err):
            print(f"mm: {err}", file=sys.stderr)  # the message names the file and key: no traceback
            sys.exit(2)
        from mmcli.failures import report_failure  # anything else: one line, the traceback in a log

        sys.exit(report_failure(args.command, err))


def _is_input_error(err: Exception) -> bool:
    """Errors about what the user gave (config, shards, checkpoint, cluster size, tracking
    server). Imported here, on the error path, so that `mm --help` stays instant."""
    from cluster.job import JobError
    from cluster.tracking import TrackingError
    from mm.checkpoint import CheckpointError
    from mm.config import ConfigError
    from mm.shards import ShardError
    from mm.vocab import VocabularyError
    from tune.predictor import PredictError

    user_errors = (ConfigError, ShardError, CheckpointError, VocabularyError)
    return isinstance(err, (*user_errors, JobError, TrackingError, PredictError))


if __name__ == "__main__":
    main()
