"""Pure helpers of tune/: statistics over seeds, the search space and a trial's config."""

import math

import pytest

from mm.config import ConfigError, parse_config
from mm.metrics import aggregate_score, normalized, scores_by_task
from tune.space import config_point, mixing_ratios, trial_config
from tune.stats import paired_difference, summarize

BASE = {
    "name": "t",
    "tasks": [{"name": "de", "kind": "translation"}, {"name": "img", "kind": "image_classification"}],
    "model": {"moe": {"num_experts": 4}},
}


def test_mean_and_sample_standard_deviation_by_hand():
    s = summarize([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert summarize([5.0]).std == 0.0 and str(summarize([5.0])) == "5.000"


def test_paired_difference_and_sign_consistency_by_hand():
    d = paired_difference([1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 2.0, 5.0])  # +1, +0.5, -1, +1
    assert d.difference.mean == pytest.approx(0.375)
    assert d.sign_consistency == pytest.approx(3 / 4)
    assert paired_difference([1.0], [1.0]).sign_consistency == 0.0
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0], [1.0, 2.0])


def test_normalised_scores_and_their_mean_over_tasks():
    assert normalized("wer", 0.25) == pytest.approx(0.75)
    assert normalized("bleu", 30.0) == pytest.approx(0.3)
    assert normalized("bleu", 15.0, reference=30.0) == pytest.approx(0.5)
    assert normalized("wer", 0.5, reference=0.25) == pytest.approx(0.5)
    flat = {"eval/de/bleu": 20.0, "eval/img/accuracy": 0.6, "eval/img/top5": 0.9, "train/de/loss": 3.0}
    scores = scores_by_task(flat)
    assert scores == {"de": {"bleu": 20.0}, "img": {"accuracy": 0.6, "top5": 0.9}}
    assert aggregate_score(scores, {"de": "bleu", "img": "accuracy"}) == pytest.approx((0.2 + 0.6) / 2)
    # a task that could not be scored is left out of the mean, not counted as 0
    primary = {"de": "bleu", "img": "accuracy"}
    assert aggregate_score({"img": {"accuracy": 0.6}}, primary) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no task of de, img was scored: there is no aggregate"):
        aggregate_score({"de": {"log_ppl": 2.0}}, primary)


def test_trial_parameters_reach_the_config_and_are_validated_again():
    base = parse_config(BASE)
    config = trial_config(base, {"mix.de": 3.0, "mix.img": 1.0, "capacity_factor": 2.0, "k": 1, "lr": 1e-3})
    assert config.train.mixing.strategy == "ratios"
    assert [t.mix_weight for t in config.tasks] == [3.0, 1.0]
    assert (config.model.moe.capacity_factor, config.model.moe.k, config.train.lr) == (2.0, 1, 1e-3)
    assert config.train.checkpoint_every == config.train.eval_every  # every report has an objective
    assert trial_config(base, {"temperature": 4.0}).train.mixing.temperature == 4.0
    with pytest.raises(ValueError, match="k"):
        trial_config(base, {"k": 9})
    with pytest.raises(ConfigError, match="grid search cannot enumerate per-task weights"):
        parse_config({**BASE, "tune": {"search": "grid"}})


def test_step_shares_of_ratios_and_of_a_schedule_by_hand():
    ratios = parse_config({**BASE, "train": {"mixing": {"strategy": "ratios"}}})
    ratios.tasks[0].mix_weight = 3.0
    assert mixing_ratios(ratios) == pytest.approx({"de": 0.75, "img": 0.25})
    phases = [{"start": 0, "weights": {"de": 1, "img": 0}}, {"start": 30, "weights": {"de": 1, "img": 1}}]
    train = {"steps": 100, "mixing": {"strategy": "schedule", "schedule": phases}}
    scheduled = parse_config({**BASE, "train": train})
    # 30 steps all "de", then 70 steps half and half
    assert mixing_ratios(scheduled) == pytest.approx({"de": (30 + 35) / 100, "img": 35 / 100})


def test_schedulers_and_searchers_are_built_from_the_config():
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from tune.sweep import _scheduler, _searcher

    base = {**BASE, "train": {"steps": 100, "eval_every": 10}}
    asha = _scheduler(parse_config({**base, "tune": {"scheduler": "asha", "grace_period": 3}}))
    assert isinstance(asha, ASHAScheduler) and asha._max_t == 10  # evaluations in a run
    pbt = _scheduler(parse_config({**base, "tune": {"scheduler": "pbt", "trials": 2, "max_concurrent": 2}}))
    assert isinstance(pbt, PopulationBasedTraining)
    assert set(pbt._hyperparam_mutations) == {"mix.de", "mix.img"}  # PBT perturbs the mixing weights
    with pytest.raises(ConfigError, match=r"max_concurrent \(1\) must be at least trials \(4\)"):
        parse_config({**base, "tune": {"scheduler": "pbt", "trials": 4}})
    assert isinstance(_searcher(parse_config({**base, "tune": {"search": "optuna"}})), OptunaSearch)
    assert isinstance(_searcher(parse_config(base)), BasicVariantGenerator)  # random or grid


def test_the_config_own_values_are_the_point_a_search_starts_from():
    moe = {"num_experts": 4, "k": 1, "capacity_factor": 1.5}
    raw = {**BASE, "train": {"lr": 2e-3, "mixing": {"strategy": "ratios"}}, "model": {"moe": moe}}
    raw["tasks"] = [{**BASE["tasks"][0], "mix_weight": 1.5}, BASE["tasks"][1]]
    config = parse_config(raw)
    point = config_point(config)
    # capacity factor 1.5 is not among the space's choices: left to the searcher
    assert point == {"k": 1, "lr": 2e-3, "mix.de": 1.5, "mix.img": 1.0}
    again = trial_config(config, point)  # the config itself, as a trial
    assert [t.mix_weight for t in again.tasks] == [1.5, 1.0] and again.train.lr == 2e-3
    # weights of another mixing strategy are no point of the weight space
    assert "mix.de" not in config_point(parse_config({**raw, "train": {"lr": 2e-3}}))
    outside = parse_config({**raw, "tune": {"space": {"weight": [2.0, 4.0], "lr": None}}})
    assert config_point(outside) == {"k": 1}
