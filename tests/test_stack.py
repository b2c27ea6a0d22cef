"""The compiled dependencies load and run: the first test of the session (conftest puts it first
and stops the session when it fails), so a broken install reads as one line naming the package
and its versions, not as a hundred failures deep inside Ray Data.

The case it guards against, seen on 2026-12-01: torchaudio 2.11.1 declares `torch>=2.11` but its
libtorchaudio.so needs a newer torch ("undefined symbol: torch_exception_get_what_without_backtrace").
"""

from __future__ import annotations

import io
import re
from importlib import metadata
from pathlib import Path

import pytest

LOCK = Path(__file__).resolve().parents[1] / "uv.lock"


def locked_versions() -> dict[str, str]:
    """Package name -> version as uv.lock pins it (empty when there is no lock)."""
    if not LOCK.exists():
        return {}
    pairs = re.findall(r'^name = "([^"]+)"\nversion = "([^"]+)"', LOCK.read_text(), flags=re.M)
    return {name: version for name, version in pairs}


def installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(package: str, partner: str | None, error: BaseException) -> str:
    """One line: the package, what it was loaded beside, what the lock pins, and the error."""
    lock = locked_versions()
    names = [package] + ([partner] if partner else [])
    have = " with ".join(f"{name} {installed(name)}" for name in names)
    pinned = ", ".join(f"{name} {lock.get(name, '?')}" for name in names)
    while error.__cause__ is not None:  # the root cause names the symbol or file that failed
        error = error.__cause__
    first_line = (str(error).strip().splitlines() or [""])[0]
    return (
        f"{have} does not load (uv.lock pins {pinned}; `make venv` installs the lock): "
        f"{type(error).__name__}: {first_line}"
    )


def use_torch():
    import torch

    assert float(torch.ones(4) @ torch.ones(4)) == 4.0


def use_torchaudio():
    import torch
    import torchaudio
    from torchaudio._extension import _IS_TORCHAUDIO_EXT_AVAILABLE

    assert _IS_TORCHAUDIO_EXT_AVAILABLE, "torchaudio's compiled extension did not load"
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_mels=8)(torch.zeros(1, 1600))
    assert mel.shape[1] == 8


def use_sentencepiece():
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a small corpus", "of a few sentences"] * 20),
        model_writer=model,
        vocab_size=20,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert processor.decode(processor.encode("a small corpus")) == "a small corpus"


def use_pyarrow():
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"x": pa.array([[1, 2], [3]], pa.list_(pa.int32()))}), buffer)
    assert pq.read_table(io.BytesIO(buffer.getvalue()))["x"].to_pylist() == [[1, 2], [3]]


def use_soundfile():
    import numpy as np
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(160, dtype="float32"), 16000, format="WAV", subtype="PCM_16")
    buffer.seek(0)
    samples, rate = sf.read(buffer)
    assert rate == 16000 and len(samples) == 160


def use_pillow():
    from PIL import Image

    assert Image.new("RGB", (4, 4)).convert("L").size == (4, 4)


def use_numpy():
    import numpy as np

    assert float(np.ones(3) @ np.ones(3)) == 3.0


# (distribution name, what it is loaded beside, how it is used)
COMPILED = [
    ("torch", None, use_torch),
    ("torchaudio", "torch", use_torchaudio),
    ("sentencepiece", None, use_sentencepiece),
    ("pyarrow", "numpy", use_pyarrow),
    ("soundfile", "numpy", use_soundfile),
    ("pillow", None, use_pillow),
    ("numpy", None, use_numpy),
]


@pytest.mark.stack
@pytest.mark.parametrize(("package", "partner", "use"), COMPILED, ids=[c[0] for c in COMPILED])
def test_compiled_dependency_loads_and_runs(package, partner, use):
    failure = None
    try:
        use()
    except Exception as error:  # any failure to load is the finding
        failure = describe(package, partner, error)
    if failure:  # outside the except block, so pytest shows no chained traceback
        pytest.fail(failure, pytrace=False)


def test_a_load_failure_reads_as_one_line_naming_both_versions_and_the_lock():
    cause = OSError("libtorchaudio.so: undefined symbol: x\nmore detail")
    error = OSError("Could not load this library")
    error.__cause__ = cause
    line = describe("torchaudio", "torch", error)
    assert "\n" not in line
    assert f"torchaudio {installed('torchaudio')} with torch {installed('torch')}" in line
    assert f"uv.lock pins torchaudio {locked_versions()['torchaudio']}, torch" in line
    assert line.endswith("OSError: libtorchaudio.so: undefined symbol: x")


def test_the_lock_pins_torch_and_torchaudio_as_the_pair_pyproject_names():
    lock = locked_versions()
    pyproject = (LOCK.parent / "pyproject.toml").read_text()
    for name in ("torch", "torchaudio"):
        assert f'"{name}=={lock[name]}"' in pyproject, name
    assert lock["torch"].split(".")[:2] == lock["torchaudio"].split(".")[:2]


def test_a_lock_that_no_longer_matches_pyproject_stops_make_naming_the_command(tmp_path):
    """`make check-lock` (run by `make test`, so by CI) on a copy whose pyproject.toml gained a
    dependency that uv.lock lacks."""
    import shutil
    import subprocess

    repo = LOCK.parent
    uv = repo / ".uv" / "bin" / "uv"
    if not uv.exists():
        pytest.skip("uv is installed by `make venv` into .uv/")
    for name in ("pyproject.toml", "uv.lock", "README.md", "uv-bootstrap.txt"):
        shutil.copy2(repo / name, tmp_path / name)  # mtimes kept: make must not reinstall uv
    make = ["make", "-s", "-f", str(repo / "Makefile"), "check-lock", f"UV_HOME={repo / '.uv'}"]
    assert subprocess.run(make, cwd=tmp_path, capture_output=True, text=True).returncode == 0

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace('    "optuna>=3.6",\n', '    "optuna>=3.6",\n    "six",\n')
    )
    result = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "uv.lock does not match pyproject.toml: run 'make lock' and commit uv.lock" in result.stderr
