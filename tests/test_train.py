"""The training loop's parts: task sampling, schedule, one step."""

import numpy as np
import pytest
import torch

from mm.config import MixingConfig
from mm.selftest import selftest_config
from mm.synthetic import SyntheticData
from mm.train import TaskSampler, Trainer, lr_factor

from conftest import tiny_model


def test_task_of_a_step_depends_only_on_seed_and_step():
    a = TaskSampler(["x", "y", "z"], MixingConfig(strategy="temperature"), seed=5)
    b = TaskSampler(["x", "y", "z"], MixingConfig(strategy="temperature"), seed=5)
    assert [a.task_at(s) for s in range(50)] == [b.task_at(s) for s in reversed(range(50))][::-1]
    c = TaskSampler(["x", "y", "z"], MixingConfig(strategy="temperature"), seed=6)
    assert [a.task_at(s) for s in range(50)] != [c.task_at(s) for s in range(50)]


def test_temperature_sampling_flattens_corpus_sizes():
    sizes = {"big": 10_000, "small": 100}
    p1 = TaskSampler(
        list(sizes), MixingConfig(strategy="temperature", temperature=1), sizes=sizes
    ).probabilities()
    p2 = TaskSampler(
        list(sizes), MixingConfig(strategy="temperature", temperature=2), sizes=sizes
    ).probabilities()
    np.testing.assert_allclose(p1, [100 / 101, 1 / 101])
    np.testing.assert_allclose(p2, [10 / 11, 1 / 11])  # sqrt of the sizes


def test_explicit_ratios_and_their_empirical_frequency():
    sampler = TaskSampler(["a", "b"], MixingConfig(strategy="ratios"), ratios={"a": 3.0, "b": 1.0})
    drawn = [sampler.task_at(s) for s in range(4000)]
    assert drawn.count("a") / len(drawn) == pytest.approx(0.75, abs=0.03)


def test_loss_adaptive_mixing_favours_the_task_with_the_higher_loss_and_round_trips():
    sampler = TaskSampler(["easy", "hard"], MixingConfig(strategy="loss_adaptive", adaptive_decay=0.0))
    np.testing.assert_allclose(sampler.probabilities(), [0.5, 0.5])
    sampler.observe("easy", 1.0)
    sampler.observe("hard", 3.0)
    np.testing.assert_allclose(sampler.probabilities(), [0.25, 0.75])
    restored = TaskSampler(["easy", "hard"], MixingConfig(strategy="loss_adaptive"))
    restored.load_state_dict(sampler.state_dict())
    assert [restored.task_at(s) for s in range(20)] == [sampler.task_at(s) for s in range(20)]


def test_learning_rate_warms_up_linearly_then_decays_as_inverse_square_root():
    assert lr_factor(0, 100) == pytest.approx(0.01)
    assert lr_factor(99, 100) == pytest.approx(1.0)
    assert lr_factor(399, 100) == pytest.approx(0.5)
    assert lr_factor(10, 0) == 1.0


def test_train_step_updates_parameters_and_reports(tasks):
    config = selftest_config(steps=4, seed=0)
    config.train.grad_accum = 2
    model = tiny_model()
    data = SyntheticData(0)
    trainer = Trainer(model, config)
    before = [p.detach().clone() for p in model.parameters()]
    logs = [trainer.train_step(lambda name: data.batch(tasks[name], 4)) for _ in range(4)]
    assert [log.step for log in logs] == [1, 2, 3, 4]
    assert all(log.examples == 8 for log in logs)  # two micro-batches of 4
    assert all(np.isfinite(log.loss) and log.grad_norm > 0 for log in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert logs[0].lr < logs[-1].lr  # still warming up
