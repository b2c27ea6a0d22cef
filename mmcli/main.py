"""The `mm` command: one argparse tree whose sub-commands call the packages' functions.

Each sub-command imports its package only when it runs, so `mm --help` is instant and a
command that needs no Ray never starts it. Every command that uses Ray connects through
`cluster.session.connect`: the cluster named by `--address` or RAY_ADDRESS, else a local one.
A mistake in what the user gave (a config key, a path, a checkpoint, a file to predict on) ends
in one line and exit status 2; anything else in one line naming a log with the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# ------------------------------------------------------------------------------ sub-commands


def _selftest(args: argparse.Namespace) -> None:
    from rich.console import Console

    from mm.selftest import run
    from mmcli.tables import selftest_table

    console = Console()
    console.print(selftest_table(run(args.steps, args.seed, log=console.print)))


def _starter(args: argparse.Namespace) -> None:
    import json

    from pipelines.starter import build_starter, ensure_packages

    if args.packages_only:
        ensure_packages(install=not args.no_install)
        return
    summary = build_starter(args.out, size=args.size, seed=args.seed, install=not args.no_install)
    print(json.dumps(summary, indent=2))


def _prepare(args: argparse.Namespace) -> None:
    from functools import partial

    from rich.console import Console

    from cluster.session import connect
    from mmcli.tables import shards_table
    from pipelines.prepare import prepare_tasks

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()] if args.tasks else None
    progress = Console(stderr=True, log_path=False)
    outcomes = prepare_tasks(
        _load(args), tasks, args.force, partial(progress.log, markup=False), lambda: connect(args.address)
    )
    # Job logs are no terminal: give the table room rather than rich's default 80 columns.
    Console(width=None if sys.stdout.isatty() else 120).print(shards_table(outcomes))


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


def _demo(args: argparse.Namespace) -> None:
    from rich.console import Console

    from mmcli.demo import run_demo
    from mmcli.tables import floors_table, task_metric_table

    console = Console()
    config = _load(args)
    result = run_demo(config, address=args.address, log=lambda line: console.print(line, markup=False))
    flat = {
        f"test/{task}/{metric}": value
        for task, values in result.test.items()
        for metric, value in values.items()
    }
    console.print(task_metric_table(flat, "starter suite: test split", prefix="test/"))
    primary = config.primary_metrics()
    console.print(floors_table(primary, result.test, result.blind, result.chance, "test, beside its floors"))
    console.print(f"report: {result.report} (and summary.json beside it)")


def _tune(args: argparse.Namespace) -> None:
    from rich.console import Console

    from mmcli.tables import trials_table
    from tune.sweep import sweep

    result = sweep(_load(args), address=args.address)
    console = Console()
    console.print(trials_table(result))
    if result.registered:
        r = result.registered
        console.print(f"registered {r['name']} v{r['version']} as {r['alias']}: {r['reason']}")


def _experiment(args: argparse.Namespace) -> None:
    import shlex

    from rich.console import Console

    from tune.experiment import run_experiment

    console = Console()
    result = run_experiment(
        _load(args),
        args.study,
        seeds=args.seeds,
        preset=args.preset,
        address=args.address,
        out=args.out,
        command="mm " + shlex.join(sys.argv[1:]),
        log=lambda line: console.print(line, markup=False),
    )
    console.print(result.report.read_text(), markup=False)
    console.print(f"report: {result.report}  MLflow parent run: {result.parent_run_id}")
    if all(run.error for run in result.runs):
        sys.exit(1)


def _evaluate(args: argparse.Namespace) -> None:
    from rich.console import Console

    from mm.metrics import is_interval_bound
    from mm.predict import Predictor
    from mm.reader import read_rows
    from mmcli.report import chance_levels
    from mmcli.tables import floors_table, task_metric_table
    from tune.registry import checkpoint_from

    with checkpoint_from(args.model, _tracking_uri(args)) as checkpoint:  # a download is removed after
        predictor = Predictor(checkpoint, beam=args.beam)
        tasks = args.tasks.split(",") if args.tasks else None
        scores = predictor.evaluate(args.shards, args.split, args.examples, tasks=tasks, intervals=True)
        blind = predictor.evaluate(args.shards, args.split, args.examples, blind=True, tasks=tasks)
    flat = {  # the intervals have their own column, beside the floors
        f"eval/{task}/{metric}": value
        for task, values in scores.items()
        for metric, value in values.items()
        if not is_interval_bound(metric)
    }
    config = predictor.config
    limit = args.examples or config.train.eval_examples
    shards = args.shards or config.data.shards
    references = {t: list(read_rows(shards, t, args.split, limit)["references"]) for t in scores}
    chance = chance_levels(config, list(predictor.records.values()), references)
    console = Console()
    console.print(task_metric_table(flat, f"{args.model} on {args.split}"))
    primary = {task: metric for task, metric in config.primary_metrics().items() if task in scores}
    title = "beside chance and input-blind (inputs blanked)"
    console.print(floors_table(primary, scores, blind, chance, title))
    if tasks is None:  # a mean over some of the tasks would not be the model's aggregate
        console.print(f"aggregate score: {predictor.aggregate(scores):.4f}")


def _predict(args: argparse.Namespace) -> None:
    from mm.predict import Predictor
    from tune.registry import checkpoint_from

    with checkpoint_from(args.model, _tracking_uri(args)) as checkpoint:  # a download is removed after
        predictor = Predictor(checkpoint, beam=args.beam)
        value, source = _request(predictor, args.task, Path(args.input), args.input)
        print(predictor.predict(args.task, value, source=source))


def _request(predictor, task: str, path: Path, argument: str) -> tuple[str | bytes, str | None]:
    """What to predict on, and the user's file it came from: a file's bytes for image and audio
    tasks; for text tasks the argument itself, or the text of the file it names."""
    from mm.predict import PredictError

    modality = predictor.specs[task].input_modality if task in predictor.specs else "text"
    try:
        if modality != "text":
            if not path.is_file():
                what = "not a file" if path.exists() else "no such file"
                raise PredictError(f"{path}: {what} (task {task!r} takes an {modality} file)")
            return path.read_bytes(), str(path)
        if _is_file(path):
            return path.read_text(encoding="utf-8").strip(), str(path)
        return argument, None
    except OSError as err:
        raise PredictError(f"{path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise PredictError(f"{path}: not a UTF-8 text file (byte {err.start} is not UTF-8)") from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a sentence longer than a file name can be
        return False


def _load(args: argparse.Namespace):
    from mm.config import load_config

    return load_config(args.config, args.override)


def _tracking_uri(args: argparse.Namespace) -> str | None:
    import os

    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


# ------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm", description="Train one MultiModel on many tasks on a Ray cluster."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    job = _job_options()

    selftest = commands.add_parser("selftest", help="train a tiny model in-process on generated examples")
    selftest.add_argument("--steps", type=int, default=300)
    selftest.add_argument("--seed", type=int, default=0)
    selftest.set_defaults(run=_selftest)

    starter = commands.add_parser("starter", help="build the starter corpora from Debian packages")
    starter.add_argument("--out", type=Path, default=Path("data/starter"), help="where to write the corpora")
    starter.add_argument("--size", default="small", help="tiny, small (default) or full")
    starter.add_argument("--seed", type=int, default=0)
    starter.add_argument(
        "--no-install", action="store_true", help="never run apt-get; fail if packages are missing"
    )
    starter.add_argument(
        "--packages-only", action="store_true", help="only install the Debian packages it needs"
    )
    starter.set_defaults(run=_starter)

    prepare = commands.add_parser("prepare", parents=[job], help="corpora into Arrow shards with Ray Data")
    prepare.add_argument("--tasks", help="comma-separated task names (default: all)")
    prepare.add_argument("--force", action="store_true", help="redo tasks that are up to date")
    prepare.set_defaults(run=_prepare)

    train = commands.add_parser("train", parents=[job], help="train on the prepared shards with Ray Train")
    train.add_argument("--workers", help="N, or MIN-MAX for elastic training")
    train.add_argument("--resume", help="checkpoint directory to continue from")
    train.set_defaults(run=_train)

    demo = commands.add_parser(
        "demo", parents=[job], help="the main job: starter suite, prepare, train, register, report"
    )
    demo.set_defaults(run=_demo)

    tune = commands.add_parser(
        "tune", parents=[job], help="sweep mixing ratios and MoE capacity with Ray Tune"
    )
    tune.set_defaults(run=_tune)

    experiment = commands.add_parser(
        "experiment", parents=[job], help="a study of the paper's claims: runs over seeds, a report"
    )
    experiment.add_argument("--study", required=True, help="joint-vs-single, transfer, ablation or mixing")
    experiment.add_argument("--seeds", type=int, default=3)
    experiment.add_argument("--preset", default="small", help="micro, small (default) or full")
    experiment.add_argument("--out", type=Path, help="report folder (default reports/NAME-STUDY-TIME)")
    experiment.set_defaults(run=_experiment)

    model = _model_options()
    evaluate = commands.add_parser(
        "evaluate", parents=[model], help="per-task metrics of a checkpoint or registered model"
    )
    evaluate.add_argument("--shards", help="shards to score on (default: the config's)")
    evaluate.add_argument("--split", default="dev")
    evaluate.add_argument(
        "--examples", type=_positive_int, help="rows per task (default: train.eval_examples)"
    )
    evaluate.add_argument("--tasks", help="comma-separated tasks to score (default: all the model's)")
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser(
        "predict", parents=[model], help="one prediction from a checkpoint or registered model"
    )
    predict.add_argument("--task", required=True)
    predict.add_argument("input", help="text, or a file (image, audio, or text)")
    predict.set_defaults(run=_predict)
    return parser


def _job_options() -> argparse.ArgumentParser:
    """What every command that runs a job from a config takes."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("config", help="experiment config (YAML)")
    options.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="e.g. -o train.steps=100"
    )
    options.add_argument("--address", help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")
    return options


def _positive_int(text: str) -> int:
    """For counts where 0 would silently mean "the default": an error instead."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _model_options() -> argparse.ArgumentParser:
    """What every command that loads a trained model takes."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("model", help="checkpoint directory, or models:/NAME@champion")
    options.add_argument(
        "--beam", type=_positive_int, help="beam width for every task (default: each task's `beam`)"
    )
    options.add_argument(
        "--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI)"
    )
    return options


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:
        message = _user_error(err)
        if message is not None:
            print(f"mm: {message}", file=sys.stderr)  # the message names the file and key: no traceback
            sys.exit(2)
        from mmcli.failures import report_failure  # anything else: one line, the traceback in a log

        sys.exit(report_failure(args.command, err))


def _user_error(err: Exception) -> str | None:
    """The one line for an error about what the user gave (config, corpus, shards, checkpoint,
    cluster size, tracking server, file to predict on); None for anything else. Imported here,
    on the error path, so that `mm --help` stays instant."""
    from cluster.session import JobError
    from cluster.tracking import TrackingError
    from mm.checkpoint import CheckpointError
    from mm.config import ConfigError
    from mm.predict import PredictError
    from mm.shards import ShardError
    from mm.vocab import VocabularyError
    from pipelines.prepare import PrepareError
    from pipelines.starter import StarterError

    if isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename}: no such file or directory"
    user_errors = (ConfigError, ShardError, CheckpointError, VocabularyError, PrepareError, StarterError)
    if isinstance(err, (*user_errors, JobError, TrackingError, PredictError)):
        return str(err)
    return None


if __name__ == "__main__":
    main()
