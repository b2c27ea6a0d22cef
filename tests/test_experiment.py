"""`mm experiment`: studies expanded into arms, and a micro study run for real (Ray Tune grid of
Ray Train runs, MLflow parent and children, the report folder)."""

from __future__ import annotations

import pytest

from cluster.tracking import client
from mm.config import ConfigError, parse_config
from tune.experiment import run_experiment
from tune.studies import arm_config, expand, sized

from shardmaker import config_dict, write_shards

SIZES = {"reverse": 300, "patches": 100}


def tiny(tmp_path, **experiment):
    raw = config_dict(tmp_path / "shards", tmp_path, steps=40)
    raw["experiment"] = experiment
    return parse_config(raw)


def test_joint_vs_single_gives_each_single_task_run_its_share_of_the_joint_steps(tmp_path):
    config = tiny(tmp_path)
    config.train.mixing.strategy = "temperature"
    config.train.mixing.temperature = 1.0  # shares = corpus sizes: 3/4 and 1/4
    study = expand("joint-vs-single", config, SIZES)
    steps = {arm.name: arm.steps for arm in study.arms}
    assert steps == {"single:reverse": 30, "single:patches": 10, "joint": 40}
    assert [(c.baseline, c.other, c.tasks) for c in study.comparisons] == [
        ("single:reverse", "joint", ("reverse",)),
        ("single:patches", "joint", ("patches",)),
    ]
    single = arm_config(config, study.arm("single:patches"), seed=7)
    assert single.task_names == ["patches"] and single.train.steps == 10 and single.seed == 7
    assert single.train.eval_every == single.train.checkpoint_every == 10  # scored once, at the end


def test_transfer_and_ablation_arms_change_what_they_say(tmp_path):
    config = tiny(tmp_path, transfer_target="reverse", transfer_helpers=["patches"])
    transfer = expand("transfer", config, SIZES)
    paired = transfer.arm("reverse + patches")
    assert transfer.arm("reverse alone").steps == 40 and paired.steps == 80  # same steps for reverse
    paired_config = arm_config(config, paired, seed=0)
    assert paired_config.train.mixing.strategy == "ratios"
    assert [t.mix_weight for t in paired_config.tasks] == [1.0, 1.0]

    ablation = expand("ablation", tiny(tmp_path, ablation_tasks=["patches", "reverse"]), SIZES)
    models = {arm.name: arm_config(config, arm, 0).model for arm in ablation.arms}
    assert models["all blocks"].use_moe and models["all blocks"].decoder_attention
    assert not models["no MoE"].use_moe and models["no MoE"].decoder_attention
    assert models["no attention"].use_moe and not models["no attention"].decoder_attention


def test_a_study_naming_a_task_the_config_lacks_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="experiment.transfer_target names tasks the config lacks: ptb"):
        tiny(tmp_path, transfer_target="ptb")
    with pytest.raises(ConfigError, match="transfer study needs a constituency_parsing task"):
        expand("transfer", tiny(tmp_path), SIZES)  # no parsing task to pick by kind


def test_presets_size_the_runs(tmp_path):
    micro = sized(tiny(tmp_path), "micro")
    assert micro.model.d_model == 32 and micro.train.steps == 6 and micro.cluster.workers == 1
    assert {t.batch_size for t in micro.tasks} == {8}
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        sized(tiny(tmp_path), "huge")


@pytest.mark.slow
def test_a_micro_study_trains_every_arm_and_writes_the_report_under_one_mlflow_parent(ray_local, tmp_path):
    write_shards(tmp_path / "shards")
    config = tiny(tmp_path, transfer_target="reverse", transfer_helpers=["patches"])
    result = run_experiment(config, "transfer", seeds=1, preset="micro", out=tmp_path / "report")

    assert sorted((r.arm, r.seed) for r in result.runs) == [("reverse + patches", 0), ("reverse alone", 0)]
    assert all(r.error is None for r in result.runs), [r.error for r in result.runs]
    for run in result.runs:
        assert {"bleu", "log_ppl", "token_accuracy"} <= set(run.scores["reverse"])
    assert "patches" in next(r for r in result.runs if r.arm == "reverse + patches").scores

    text = result.report.read_text()
    assert "| task | metric | reverse alone | reverse + patches | reverse + patches − reverse alone |" in text
    for metric in ("bleu ↑", "log_ppl ↓", "token_accuracy ↑"):
        assert f"| reverse | {metric} |" in text
    assert (tmp_path / "report" / "transfer.png").stat().st_size > 0
    assert not [p for p in (tmp_path / "runs").iterdir() if " " in p.name]  # one folder per run

    mlflow = client(result.tracking_uri)
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mm.study"] == "transfer"
    children = mlflow.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert sorted(c.data.tags["mm.arm"] for c in children) == ["reverse + patches", "reverse alone"]
    assert all("test/reverse/bleu" in c.data.metrics for c in children)
    assert {a.path for a in mlflow.list_artifacts(result.parent_run_id, "report")} >= {
        "report/README.md",
        "report/transfer.png",
    }
