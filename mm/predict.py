"""Prediction from a checkpoint: a trained MultiModel held whole in one process, which scores
dev/test splits and answers `{task, input}` requests. Used by `mm evaluate`, `mm predict`, the
registered MLflow pyfunc and the champion/challenger comparison.

Inputs by modality: text as a string; an image or an audio clip as the file's bytes (the
pyfunc takes them base64-encoded), decoded exactly as `mm prepare` decodes a corpus (same
image size, same log-mel settings, read from the checkpoint's tasks.json).
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

import torch

from mm.batch import EOS, Batch
from mm.checkpoint import load_checkpoint, read_config, read_tasks, read_vocab
from mm.config import Config, parse_config
from mm.evaluate import decoding_constraint, score_task
from mm.media import AudioSettings, MediaError, load_image, load_log_mel
from mm.metrics import aggregate_score
from mm.model import MultiModel
from mm.reader import evaluation_batches, read_rows, require_vocabulary
from mm.shards import array_to_bytes, collate, load_manifest
from mm.tasks import TaskSpec
from mm.vocab import Vocabulary

SPEC_FIELDS = {"name", "kind", "command_id", "num_classes", "loss_weight"}


class PredictError(ValueError):
    pass


class Predictor:
    def __init__(self, checkpoint: str | Path, beam: int | None = None):
        """`beam`: the beam width for every task; None: each task's own (`tasks[].beam`)."""
        checkpoint = Path(checkpoint)
        self.config: Config = parse_config(read_config(checkpoint), source=str(checkpoint / "config.json"))
        self.vocab = Vocabulary(read_vocab(checkpoint) or b"")
        self.records = {record["name"]: record for record in read_tasks(checkpoint)}
        specs = [TaskSpec(**{k: v for k, v in r.items() if k in SPEC_FIELDS}) for r in self.records.values()]
        self.specs = {spec.name: spec for spec in specs}
        torch.manual_seed(0)
        self.model = MultiModel(self.config.model, specs, self.vocab.size)
        load_checkpoint(checkpoint, self.model)
        self.model.eval()
        self.beam = beam

    # ------------------------------------------------------------------------------- requests

    def predict(self, task: str, value: str | bytes, source: str | None = None) -> str:
        """A class name, or the decoded text. `source`: where the value came from (the user's
        file), named when it cannot be read."""
        batch = self.batch(task, [value], None if source is None else [source])
        spec = self.specs[task]
        if spec.output_modality == "class":
            _, classes = self.model.classify(batch, topk=1)
            names = self.records[task].get("class_names")
            index = int(classes[0, 0])
            return names[index] if names else str(index)
        return self.vocab.decode(self.generate(task, batch)[0])

    def generate(self, task: str, batch: Batch) -> list[list[int]]:
        """Token ids of each output, decoded as the task's config asks: its longest output, its
        beam (unless this predictor has one for every task), its constraint."""
        config = self.config.task(task)
        return self.model.generate(
            batch,
            max_len=config.max_target_length,
            beam=self.beam or config.beam,
            constraint=decoding_constraint(config, self.vocab.pieces),
        )

    def batch(self, task: str, values: list[str | bytes], sources: list[str] | None = None) -> Batch:
        """The requests as shard rows, collated as training and evaluation collate them."""
        self.require_task(task)
        spec = self.specs[task]
        if spec.input_modality == "text":
            if not all(isinstance(v, str) for v in values):
                raise PredictError(f"task {task!r} takes text input")
            inputs, shapes = [self.vocab.encode(v) for v in values], [[] for _ in values]
        else:
            named = sources or ["the input"] * len(values)
            arrays = [self._decode_file(task, spec.input_modality, v, s) for v, s in zip(values, named)]
            inputs, shapes = map(list, zip(*(array_to_bytes(a) for a in arrays)))
        rows = {
            "id": [str(n) for n in range(len(values))],
            "inputs": inputs,
            "input_shape": shapes,
            "targets": [0 if spec.output_modality == "class" else [EOS] for _ in values],  # unused
        }
        return collate(spec, rows, self.config.task(task).max_input_length)

    def _decode_file(self, task: str, modality: str, value: str | bytes, source: str):
        data = value if isinstance(value, bytes) else _from_base64(value, task)
        features = self.records[task].get("features") or {}
        with tempfile.NamedTemporaryFile(suffix=".bin") as file:
            file.write(data)
            file.flush()
            try:
                if modality == "image":
                    return load_image(file.name, int(features.get("image_size", self.config.data.image_size)))
                return load_log_mel(file.name, _audio_settings(features, self.config))
            except MediaError as bad:  # its detail names the temporary file: name the user's instead
                detail = bad.detail.replace(file.name, source).rstrip(".")
                raise PredictError(_unreadable(source, task, modality, bad.reason, detail)) from None

    # ------------------------------------------------------------------------------- scoring

    def evaluate(
        self,
        shards: str | Path | None = None,
        split: str = "dev",
        examples: int | None = None,
        blind: bool = False,
        tasks: list[str] | None = None,
        intervals: bool = False,
    ):
        """{task: {metric: value}} on `examples` rows of `split` of each task (or of `tasks`);
        `blind`: with every input blanked (the input-blind score); `intervals`: with each
        corpus-level metric's 95 % bootstrap interval (`<metric>_low`, `<metric>_high`)."""
        root = shards or self.config.data.shards
        limit = examples or self.config.train.eval_examples
        names = tasks or list(self.specs)
        for name in names:  # before any scoring: all or nothing
            self.require_task(name)
            self.require_vocabulary(root, name)
        scores = {}
        for name in names:
            spec, task = self.specs[name], self.config.task(name)
            rows = read_rows(root, name, split, limit)
            batches = evaluation_batches(spec, rows, 0, 1, task.batch_size)
            scores[name] = score_task(
                self.model, task, batches, self.vocab, self.beam, blind=blind, intervals=intervals
            )
        return scores

    def require_task(self, task: str) -> None:
        if task not in self.specs:
            raise PredictError(f"unknown task {task!r}; this model knows {', '.join(sorted(self.specs))}")

    def require_vocabulary(self, root: str | Path, task: str) -> None:
        """A text task's shards must hold ids of this checkpoint's vocabulary. Shards remade
        since (another seed's starter, a new `mm prepare`) would be scored as noise."""
        spec = self.specs[task]
        if spec.input_modality == "text" or spec.output_modality != "class":
            remedy = "score it on the shards it was trained on (--shards)"
            require_vocabulary(load_manifest(root, task), self.vocab.sha256, "this checkpoint's", remedy)

    def decoded_examples(self, task: str, split: str = "dev", count: int = 3) -> list[dict[str, str]]:
        """A few outputs of a text task beside their references: {id, input, output, reference}."""
        self.require_vocabulary(self.config.data.shards, task)
        spec = self.specs[task]
        rows = read_rows(self.config.data.shards, task, split, count)
        batch = evaluation_batches(spec, rows, 0, 1, count)[0]
        examples = []
        for i, ids in enumerate(self.generate(task, batch)):
            reference = batch.references[i]
            shown_input = self.vocab.decode(batch.inputs[i].tolist()) if spec.input_modality == "text" else ""
            examples.append(
                {
                    "id": batch.ids[i],
                    "input": shown_input or f"({spec.input_modality} {batch.ids[i]})",
                    "output": self.vocab.decode(ids),
                    "reference": reference if isinstance(reference, str) else reference[0],
                }
            )
        return examples

    def aggregate(self, scores: dict[str, dict[str, float]]) -> float:
        return aggregate_score(scores, self.config.primary_metrics(), self.config.tune.reference)


def _unreadable(source: str, task: str, modality: str, reason: str, detail: str) -> str:
    if modality == "image":
        return f"{source}: not an image the image task {task!r} can read ({detail})"
    if reason == "empty_audio":
        return f"{source}: an audio file without samples; the audio task {task!r} needs speech"
    return (
        f"{source}: not an audio file the audio task {task!r} can read (expected WAV, FLAC or OGG; {detail})"
    )


def _from_base64(value: str, task: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise PredictError(f"task {task!r} takes a file: pass its bytes base64-encoded") from None


def _audio_settings(features: dict[str, Any], config: Config) -> AudioSettings:
    data = config.data
    return AudioSettings(
        sample_rate=int(features.get("sample_rate", data.sample_rate)),
        mel_bins=int(features.get("mel_bins", data.mel_bins)),
        window_ms=float(features.get("window_ms", data.window_ms)),
        hop_ms=float(features.get("hop_ms", data.hop_ms)),
    )
