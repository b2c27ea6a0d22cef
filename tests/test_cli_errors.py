"""`mm` on what the user gave: a mistake ends in one line on stderr that names the user's own
file, exit status 2, no traceback; a registry download is removed after."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from mm.build import task_specs
from mm.checkpoint import CheckpointError, save_checkpoint
from mm.config import parse_config
from mm.model import MultiModel
from mm.vocab import train_vocabulary
from mmcli.main import main
from tune.registry import checkpoint_from, resolve_checkpoint

SENTENCES = ["the cat sat on the mat", "a dog runs in the park", "we like green apples", "hello world"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained checkpoint with an image, an audio and a text task."""
    import torch

    tmp = tmp_path_factory.mktemp("cli")
    config = parse_config(
        {
            "name": "cli-errors",
            "model": {"preset": "tiny"},
            "tasks": [
                {"name": "fashion_mnist", "kind": "image_classification", "num_classes": 2},
                {"name": "speech", "kind": "speech_recognition", "max_target_length": 4},
                {"name": "wmt", "kind": "translation", "max_target_length": 4},
            ],
            "data": {"shards": str(tmp / "shards"), "vocab_size": 40},
        }
    )
    vocab = train_vocabulary(SENTENCES * 5, 40, config.command_tokens)
    specs = task_specs(config, vocab)
    torch.manual_seed(0)
    model = MultiModel(config.model, specs, vocab.size)
    features = {"fashion_mnist": {"image_size": 16}, "speech": {"sample_rate": 16000, "mel_bins": 80}}
    tasks = [
        {
            **dataclasses.asdict(spec),
            "class_names": ["shirt", "shoe"] if spec.name == "fashion_mnist" else None,
            "features": features.get(spec.name, {}),
        }
        for spec in specs
    ]
    config_json = config.model_dump(mode="json")
    return save_checkpoint(tmp / "ckpt", model, config=config_json, vocab=vocab.proto, tasks=tasks)


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    said = capsys.readouterr().err
    assert exit_.value.code == 2, said
    assert "Traceback" not in said and len(said.strip().splitlines()) == 1, said
    return said.strip()


def test_a_missing_checkpoint_is_one_line(capsys, tmp_path):
    said = one_line_error(capsys, ["evaluate", str(tmp_path / "nonexistent")])
    assert said == f"mm: {tmp_path / 'nonexistent'}: no such checkpoint directory"
    said = one_line_error(capsys, ["predict", str(tmp_path), "--task", "wmt", "hello"])
    assert said == f"mm: {tmp_path}: not a checkpoint directory (no dense.pt)"


@pytest.mark.parametrize("option", ["--beam", "--examples"])
@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_a_beam_or_example_count_below_one_is_refused(capsys, tmp_path, option, value):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(tmp_path), option, value])
    said = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"argument {option}: expected a whole number of at least 1, got '{value}'" in said


def test_the_mm_command_says_one_line_on_stderr_for_a_missing_checkpoint(tmp_path):
    """The real command: nothing else (an import-time warning, a log line) reaches stderr."""
    mm = Path(sys.executable).with_name("mm")
    done = subprocess.run([str(mm), "evaluate", "/nonexistent"], capture_output=True, text=True, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (2, "mm: /nonexistent: no such checkpoint directory\n")


def test_a_checkpoint_cut_short_is_one_line_naming_the_file(capsys, checkpoint, tmp_path):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(checkpoint, cut)
    dense = cut / "dense.pt"
    dense.write_bytes(dense.read_bytes()[: dense.stat().st_size // 2])
    said = one_line_error(capsys, ["evaluate", str(cut)])
    assert said.startswith(f"mm: {dense}: sha256 does not match"), said


def test_a_starter_build_that_would_replace_other_files_is_one_line(capsys, tmp_path):
    (tmp_path / "mine.txt").write_text("not a starter suite")
    said = one_line_error(capsys, ["starter", "--out", str(tmp_path), "--size", "tiny", "--no-install"])
    assert said == f"mm: {tmp_path} exists and is not a starter suite; refusing to replace it"
    said = one_line_error(capsys, ["starter", "--out", str(tmp_path / "new"), "--size", "huge"])
    assert said.startswith("mm: unknown size 'huge'; choose one of tiny, small")


def test_a_file_that_is_not_there_is_a_user_error_naming_it():
    from mmcli.main import _user_error

    assert _user_error(FileNotFoundError(2, "No such file or directory", "/x/y.yaml")) == (
        "/x/y.yaml: no such file or directory"
    )
    assert _user_error(FileNotFoundError("no file name")) is None  # not the user's: a traceback in a log
    assert _user_error(RuntimeError("a bug")) is None


def test_a_missing_input_file_is_one_line(capsys, checkpoint, tmp_path):
    missing = tmp_path / "missing.png"
    said = one_line_error(capsys, ["predict", str(checkpoint), "--task", "fashion_mnist", str(missing)])
    assert said == f"mm: {missing}: no such file (task 'fashion_mnist' takes an image file)"
    said = one_line_error(capsys, ["predict", str(checkpoint), "--task", "speech", str(tmp_path)])
    assert said == f"mm: {tmp_path}: not a file (task 'speech' takes an audio file)"


def test_text_input_is_the_argument_unless_it_is_a_file(capsys, checkpoint, tmp_path):
    long_sentence = " ".join(["word"] * 80)  # longer than a file name may be
    main(["predict", str(checkpoint), "--task", "wmt", long_sentence])
    (tmp_path / "in.txt").write_text("the cat sat on the mat\n")
    main(["predict", str(checkpoint), "--task", "wmt", str(tmp_path / "in.txt")])
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_a_sound_given_to_an_image_task_names_the_users_file(capsys, checkpoint, tmp_path):
    sound = tmp_path / "sound.wav"
    soundfile.write(sound, np.zeros(1600), 16000)
    said = one_line_error(capsys, ["predict", str(checkpoint), "--task", "fashion_mnist", str(sound)])
    assert said.startswith(f"mm: {sound}: not an image the image task 'fashion_mnist' can read (")
    assert ".bin" not in said and tempfile.gettempdir() + "/tmp" not in said


def test_an_image_given_to_the_speech_task_names_the_users_file(capsys, checkpoint, tmp_path):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (8, 8)).save(picture)
    said = one_line_error(capsys, ["predict", str(checkpoint), "--task", "speech", str(picture)])
    assert said.startswith(f"mm: {picture}: not an audio file the audio task 'speech' can read (")
    assert "expected WAV, FLAC or OGG" in said and ".bin" not in said


def test_a_good_image_and_clip_are_answered(capsys, checkpoint, tmp_path):
    picture, clip = tmp_path / "shirt.png", tmp_path / "clip.flac"
    Image.new("RGB", (20, 20)).save(picture)
    soundfile.write(clip, np.zeros(1600), 16000)
    main(["predict", str(checkpoint), "--task", "fashion_mnist", str(picture)])
    main(["predict", str(checkpoint), "--task", "speech", str(clip)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] in ("shirt", "shoe") and len(out) == 2


def test_the_predictor_names_a_file_given_as_bytes_without_a_source(checkpoint):
    from mm.predict import PredictError, Predictor

    with pytest.raises(PredictError, match=r"^the input: not an image the image task 'fashion_mnist'"):
        Predictor(checkpoint).predict("fashion_mnist", b"RIFF not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    with pytest.raises(PredictError, match=r"^upload.png: not an audio file the audio task 'speech'"):
        Predictor(checkpoint).predict("speech", buffer.getvalue(), source="upload.png")


# ------------------------------------------------------------------------------------ downloads


def mm_model_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("mm-model-*")}


def test_a_local_checkpoint_is_used_in_place_and_left_alone(checkpoint):
    with checkpoint_from(str(checkpoint)) as path:
        assert path == checkpoint
    assert (checkpoint / "dense.pt").is_file()
    with (
        pytest.raises(CheckpointError, match="no such checkpoint directory"),
        checkpoint_from("/nonexistent"),
    ):
        pass


def test_a_registry_download_is_removed_after_use(capsys, checkpoint, tmp_path, monkeypatch):
    """A registered version whose artifacts are the checkpoint, in a sqlite registry: the
    download is found, used and removed, by `checkpoint_from` and by `mm predict`. The registry
    is the one named, not the process's: MLFLOW_TRACKING_URI names a server that is not there."""
    from mlflow import MlflowClient

    from mm.parallel import free_port

    monkeypatch.chdir(tmp_path)  # MLflow's defaults (./mlflow.db) land here, not in the checkout
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a wrong turn fails at once
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("cli", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(checkpoint), "model/artifacts/checkpoint")
    client.create_registered_model("tiny")
    source = f"{run.info.artifact_uri}/model"
    client.create_model_version("tiny", source, run.info.run_id)

    before = mm_model_folders()
    with checkpoint_from("models:/tiny/1", uri) as path:
        assert (path / "dense.pt").is_file() and path.name == "checkpoint"
        assert mm_model_folders() - before  # downloaded into an mm-model-* folder
    assert not path.exists() and mm_model_folders() == before

    main(["predict", "models:/tiny/1", "--tracking-uri", uri, "--task", "wmt", "hello world"])
    assert capsys.readouterr().out.strip() != "" and mm_model_folders() == before

    def predict(model: str) -> str:
        return one_line_error(capsys, ["predict", model, "--tracking-uri", uri, "--task", "t", "x"])

    said = predict("models:/absent/1")
    assert said.startswith("mm: models:/absent/1: not in the model registry") and mm_model_folders() == before
    assert predict("models:/tiny@champion").startswith("mm: models:/tiny@champion: not in the model registry")
    assert predict("models:/tiny") == "mm: models:/tiny: expected models:/NAME/VERSION or models:/NAME@ALIAS"

    path = resolve_checkpoint("models:/tiny/1", uri, into=tmp_path / "download")  # the caller's folder
    assert (path / "dense.pt").is_file() and (tmp_path / "download") in path.parents
