"""The training loop's parts: task sampling, schedule, one step."""

import numpy as np
import pytest
import torch

from mm.config import MixingConfig, TrainConfig
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


def test_a_schedule_changes_the_weights_at_its_phase_starts():
    mixing = MixingConfig(
        strategy="schedule",
        schedule=[{"start": 0, "weights": {"a": 1, "b": 0}}, {"start": 100, "weights": {"a": 1, "b": 3}}],
    )
    sampler = TaskSampler(["a", "b"], mixing)
    np.testing.assert_allclose(sampler.probabilities(99), [1.0, 0.0])
    np.testing.assert_allclose(sampler.probabilities(100), [0.25, 0.75])
    assert {sampler.task_at(s) for s in range(100)} == {"a"}
    later = [sampler.task_at(s) for s in range(100, 4100)]
    assert later.count("b") / len(later) == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ([], "needs phases"),
        ([{"start": 5, "weights": {"a": 1}}], "must start at step 0"),
        ([{"start": 0, "weights": {"a": 1}}, {"start": 0, "weights": {"a": 2}}], "increasing order"),
        ([{"start": 0, "weights": {"a": -1, "b": 2}}], "weights must be >= 0, not for a"),
        ([{"start": 0, "weights": {"a": 0}}], "weights sum to zero"),
    ],
)
def test_bad_schedules_are_refused(schedule, expected):
    with pytest.raises(ValueError, match=expected):
        MixingConfig(strategy="schedule", schedule=schedule)


def test_a_resumed_trainer_samples_with_the_weights_of_its_config_not_its_checkpoints():
    """A PBT perturbation resumes a checkpoint with new weights: they must take effect."""
    before = selftest_config(steps=10, seed=0)
    trainer = Trainer(tiny_model(), before)
    after = selftest_config(steps=10, seed=0)
    for task in after.tasks:
        task.mix_weight = 1.0 if task.name == "translation" else 0.0
    resumed = Trainer(tiny_model(), after)
    resumed.load_state_dict(trainer.state_dict())
    assert {resumed.sampler.task_at(s) for s in range(50)} == {"translation"}


def test_learning_rate_warms_up_linearly_then_decays_as_inverse_square_root():
    assert lr_factor(0, 100) == pytest.approx(0.01)
    assert lr_factor(99, 100) == pytest.approx(1.0)
    assert lr_factor(399, 100) == pytest.approx(0.5)
    assert lr_factor(10, 0) == 1.0


def test_a_cooldown_takes_the_last_steps_of_the_run_linearly_towards_zero(tasks):
    config = selftest_config(steps=40, seed=0)
    config.train.warmup_steps, config.train.cooldown = 0, 0.25
    trainer = Trainer(tiny_model(), config)
    rates = []
    for _ in range(40):
        rates.append(trainer.scheduler.get_last_lr()[0])
        trainer.scheduler.step()
    peak = config.train.lr
    assert rates[:30] == pytest.approx([peak] * 30)  # untouched before the last quarter
    assert rates[30:] == pytest.approx([peak * (10 - i) / 10 for i in range(10)])  # 10 steps down
    assert all(a > b > 0 for a, b in zip(rates[30:], rates[31:]))
    # a run that stops early (a PBT segment) follows the schedule of the whole run
    config.train.schedule_steps = 80
    segment = Trainer(tiny_model(), config)
    for _ in range(40):
        assert segment.scheduler.get_last_lr()[0] == pytest.approx(peak)
        segment.scheduler.step()
    with pytest.raises(ValueError, match="schedule_steps=20 ends before the run does"):
        TrainConfig(steps=40, schedule_steps=20)
    # with warm-up, the cool-down scales the inverse-square-root curve, not the peak
    assert lr_factor(899, 100, 1000, 200) == pytest.approx((100 / 900) ** 0.5 * 101 / 200)


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


def test_the_fused_adam_step_and_foreach_clipping_match_adam_as_a_loop_over_parameters(tasks, monkeypatch):
    """The trainer's fused Adam (one kernel over all parameters) and its foreach gradient norm
    give the weights that torch's reference Adam, one parameter at a time, gives."""
    config = selftest_config(steps=6, seed=0)
    config.train.grad_clip = 0.5  # small enough that every step clips
    config.train.warmup_steps = 0  # the full learning rate from the first step
    # Attention's key bias has a gradient of exactly zero but for rounding, which an eps of
    # 1e-9 turns into full-size steps of either sign: such noise is not what is compared here.
    config.train.eps = 1e-6
    reference_adam = torch.optim.Adam
    weights, losses = {}, {}
    for fused in (True, False):
        if not fused:  # the same trainer, its Adam a loop over parameters
            monkeypatch.setattr(
                torch.optim, "Adam", lambda *args, **kw: reference_adam(*args, **{**kw, "fused": False})
            )
        torch.manual_seed(0)
        model = tiny_model()
        trainer = Trainer(model, config)
        assert trainer.optimizer.defaults["fused"] is fused
        data = SyntheticData(0)
        logs = [trainer.train_step(lambda name, data=data: data.batch(tasks[name], 4)) for _ in range(6)]
        assert all(log.grad_norm > 0.5 for log in logs)
        losses[fused] = [log.loss for log in logs]
        weights[fused] = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    initial = [p.detach() for p in tiny_model().parameters()]
    moves = [(a - start).norm() for a, start in zip(weights[True], initial, strict=True)]
    gaps = [(a - b).norm() for a, b in zip(weights[True], weights[False], strict=True)]
    assert sum(moves) > 1.0  # six steps at the full learning rate moved the weights ...
    # ... the same way, to rounding
    assert all(gap <= 0.01 * move + 1e-6 for gap, move in zip(gaps, moves, strict=True))
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_bf16_autocast_training_on_cpu_tracks_fp32(tasks):
    """`train.precision: bf16` on CPU: every kind of task runs (the MoE combine once failed on
    mixed dtypes), the weights stay fp32, and the losses follow the fp32 run's."""
    losses = {}
    for precision in ("fp32", "bf16"):
        config = selftest_config(steps=12, seed=0)
        config.train.precision = precision
        model = tiny_model()
        data = SyntheticData(0)
        trainer = Trainer(model, config)
        logs = [trainer.train_step(lambda name, data=data: data.batch(tasks[name], 4)) for _ in range(12)]
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        losses[precision] = [log.loss for log in logs]
        tasks_seen = {log.task for log in logs}
    assert tasks_seen == set(tasks)  # every modality went through bf16
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.03)
    assert losses["bf16"] != losses["fp32"]  # bf16 really ran


def test_every_moe_option_trains_the_whole_model_and_its_expert_bias_survives_a_checkpoint(tasks, tmp_path):
    from mm.checkpoint import load_checkpoint, save_checkpoint

    options = {
        "z_loss_coef": 1e-3,
        "balance": "both",
        "bias_update_rate": 1e-2,
        "shared_experts": 1,
        "capacity_factor": None,
        "router_fp32": True,
    }
    model = tiny_model(moe=options)
    config = selftest_config(steps=6, seed=0)
    config.train.precision = "bf16"  # the fp32 router's case
    trainer = Trainer(model, config)
    data = SyntheticData(0)
    logs = [trainer.train_step(lambda name: data.batch(tasks[name], 4)) for _ in range(6)]
    assert all(np.isfinite(log.loss) and log.aux_loss > 0 for log in logs)  # z-loss and CV² counted
    assert all(log.dropped_fraction == 0 for log in logs)  # dropless
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("expert_bias")}
    assert biases and all(b.abs().sum() > 0 for b in biases.values())  # moved by the load
    save_checkpoint(tmp_path, model, trainer.optimizer, trainer.state_dict())
    again = tiny_model(seed=1, moe=options)
    load_checkpoint(tmp_path, again)
    for name, param in again.named_parameters():
        if name in biases:
            assert torch.equal(param, biases[name])
