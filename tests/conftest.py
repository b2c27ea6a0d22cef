"""Shared fixtures. Tests build their own tiny data; `starter` tests use the starter suite.

Tests marked `owns_ray` start and stop Ray clusters with `ray start` / `ray up` / `ray stop`,
which act on every Ray process of the machine: they run last, after the session's local Ray
has been shut down.

Tests marked `stack` check that the compiled dependencies load; they run first, and a failure
among them ends the session (the rest would only fail in less readable ways). For the same reason
this file imports torch and `mm` only inside fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def tasks():
    from mm.synthetic import synthetic_tasks

    return {t.name: t for t in synthetic_tasks()}


@pytest.fixture
def data():
    from mm.synthetic import SyntheticData

    return SyntheticData(seed=0)


def tiny_model(seed: int = 0, **overrides):
    import torch

    from mm.config import ModelConfig
    from mm.model import MultiModel
    from mm.synthetic import VOCAB_SIZE, synthetic_tasks

    torch.manual_seed(seed)
    config = ModelConfig.model_validate({"preset": "tiny", **overrides})
    return MultiModel(config, synthetic_tasks(), VOCAB_SIZE)


@pytest.fixture
def model():
    return tiny_model().eval()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray for the whole session. 4 logical CPUs on 2 cores, so that
    fractional-CPU training workers and Ray Data's read tasks both get scheduled. The dashboard
    (127.0.0.1) is on as in `cluster.job.connect`: Ray Train frees the CPUs of trials that Tune
    stops through its state API."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
            configure_logging=False,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        if item.get_closest_marker("stack"):
            return 0
        return 2 if item.get_closest_marker("owns_ray") else 1

    items.sort(key=rank)  # stable: the order within each rank is kept


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and item.get_closest_marker("stack"):
        item.session.shouldstop = "a compiled dependency does not load (see above): the install is broken"
    return report


@pytest.fixture
def own_ray():
    """For tests that run `ray start`/`ray stop`: the session's local Ray must be gone first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield


@pytest.fixture(scope="session")
def starter_suite(tmp_path_factory):
    """The `small` starter suite, built once per session (or reused from $MM_STARTER_DIR)."""
    from pipelines import starter

    if starter.missing_packages(starter.PACKAGES):
        pytest.skip("starter Debian packages not installed: " + starter.apt_install_line(starter.PACKAGES))
    root = Path(os.environ.get("MM_STARTER_DIR") or tmp_path_factory.mktemp("starter") / "starter")
    return root, starter.build_starter(root, size="small", seed=0)
