"""A failure deep inside Ray, told in one line.

When a reader raises inside a Ray Data task, or a training worker raises inside Ray Train, the
exception reaches the `mm` command wrapped two or three times (RayTaskError, UserCodeException,
WorkerGroupError) with some hundred lines of traceback. `explain` finds what user code raised and
where; `report_failure` writes the whole traceback to a log file and prints one line naming it.

Ray's wrappers lose the Python cause chain when they cross processes: what survives is the
formatted traceback text of the task, so for those the root cause is read off that text.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from pathlib import Path

LOG_DIR_ENV = "MM_LOG_DIR"
DEFAULT_LOG_DIR = Path("runs") / "logs"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_HEADER = re.compile(r"^ray::([^\s]+?)(?:\(\))? \(pid=", re.M)
# "OSError: ...", "pipelines.rows.ReaderFailed: ...": a dotted name with no spaces, at column 0
_EXCEPTION_LINE = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*): (.+)$", re.M)


def explain(err: BaseException) -> str:
    """Where it failed and the exception that user code raised, in one line."""
    place, root = _unwrap(err)
    text = _ANSI.sub("", str(root))
    task = _TASK_HEADER.search(text)
    if task:  # a Ray task's error: its own traceback text holds the cause
        place = place or f"Ray task {task.group(1)}"
        raised = [m for m in _EXCEPTION_LINE.finditer(text) if not m.group(1).startswith("ray.")]
        if raised:
            name, message = raised[-1].group(1).rsplit(".", 1)[-1], raised[-1].group(2)
            return f"{place}: {name}: {message.strip()}"
    first_line = (text.strip().splitlines() or [""])[0]
    where = f"{place}: " if place else ""
    return f"{where}{type(root).__name__}: {first_line}"


def _unwrap(err: BaseException) -> tuple[str | None, BaseException]:
    """Follow Ray Train's per-worker failures, Ray's `.cause` and Python's chain to the end."""
    place = None
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            rank = min(failures)
            place, err = f"training worker {rank}", failures[rank]
            continue
        inner = (
            getattr(err, "controller_failure", None)  # Ray Train's controller
            or getattr(err, "_base_exc", None)  # Ray Train's user exception with its traceback
            or getattr(err, "cause", None)  # RayTaskError
        )
        if (
            isinstance(inner, BaseException)
            and inner is not err
            and not _TASK_HEADER.search(_ANSI.sub("", str(err)))
        ):
            err = inner
            continue
        if err.__cause__ is not None:
            err = err.__cause__
            continue
        break
    return place, err


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def log_path(command: str) -> Path:
    """A new log file for this failure: $MM_LOG_DIR, else runs/logs under the current folder."""
    folder = Path(os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path("/tmp") / "mm-logs"
        folder.mkdir(parents=True, exist_ok=True)
    return folder / f"mm-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def report_failure(command: str, err: BaseException, hint: str | None = None) -> int:
    """Write the whole traceback to a log file, print one line that names it (and `hint`, what
    to do next); the exit status."""
    path = log_path(command).absolute()
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    path.write_text(f"mm {command}: {' '.join(sys.argv[1:])}\n\n{text}")
    _stop_ray()  # Ray forwards the workers' output to this terminal: stop it first, so this line is last
    sys.stdout.flush()
    advice = f"; {hint}" if hint else ""
    print(f"mm {command} failed in {explain(err)}{advice} (full traceback: {path})", file=sys.stderr)
    return 1
