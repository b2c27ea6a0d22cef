"""From a config, a vocabulary and the shard manifests to the task specs the model is built with."""

from __future__ import annotations

from collections.abc import Mapping

from mm.config import Config
from mm.shards import Manifest
from mm.tasks import TaskSpec, kind_of
from mm.vocab import Vocabulary


class BuildError(ValueError):
    pass


def task_specs(
    config: Config, vocab: Vocabulary, manifests: Mapping[str, Manifest] | None = None
) -> list[TaskSpec]:
    """Each task's command id from the vocabulary and class count from config or manifest."""
    specs = []
    for task in config.tasks:
        num_classes = task.num_classes
        if kind_of(task.kind).output_modality == "class" and num_classes is None:
            manifest = (manifests or {}).get(task.name)
            if manifest is None or manifest.num_classes is None:
                raise BuildError(
                    f"task {task.name!r}: num_classes is neither in the config nor in its manifest"
                )
            num_classes = manifest.num_classes
        specs.append(
            TaskSpec(
                name=task.name,
                kind=task.kind,
                command_id=vocab.command_id(task.command),
                num_classes=num_classes or 0,
                loss_weight=task.loss_weight,
            )
        )
    return specs
