"""Shared fixtures. Tests build their own tiny data; `starter` tests use the starter suite."""

from __future__ import annotations

import pytest
import torch

from mm.config import ModelConfig
from mm.model import MultiModel
from mm.synthetic import VOCAB_SIZE, SyntheticData, synthetic_tasks


@pytest.fixture
def tasks():
    return {t.name: t for t in synthetic_tasks()}


@pytest.fixture
def data():
    return SyntheticData(seed=0)


def tiny_model(seed: int = 0, **overrides) -> MultiModel:
    torch.manual_seed(seed)
    config = ModelConfig.model_validate({"preset": "tiny", **overrides})
    return MultiModel(config, synthetic_tasks(), VOCAB_SIZE)


@pytest.fixture
def model():
    return tiny_model().eval()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray for the whole session, dashboard off. 4 logical CPUs on 2 cores, so
    that fractional-CPU training workers and Ray Data's read tasks both get scheduled."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
            configure_logging=False,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()
