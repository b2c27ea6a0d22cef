"""benchmarks/gpu_check.py, the one script to run when a GPU is lent, runs here on CPU with the
tiny preset: every figure comes out, bf16 tracks fp32, and the two MoE dispatches agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_and_prints_every_figure():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = {f["figure"]: f for f in map(json.loads, done.stdout.strip().splitlines())}
    assert set(figures) == {"bf16_tracks_fp32", "train_mfu", "moe_dispatch"}
    assert figures["bf16_tracks_fp32"]["ok"] and figures["bf16_tracks_fp32"]["max_rel_diff"] > 0
    mfu = figures["train_mfu"]
    assert mfu["mfu"] > 0 and mfu["tokens_per_s"] > 0 and mfu["steps"] == 4
    dispatch = figures["moe_dispatch"]
    assert dispatch["ok"] and dispatch["capacity_ms"] > 0 and dispatch["dropless_grouped_ms"] > 0
