"""`mm experiment`: studies expanded into arms, and a micro study run for real (Ray Tune grid of
Ray Train runs, MLflow parent and children, the report folder)."""

from __future__ import annotations

import pytest

from cluster.tracking import client
from mm.config import ConfigError, parse_config
from tune.experiment import RunResult, run_experiment
from tune.studies import arm_config, expand, mixing, sized
from tune.study_report import write_study_report

from shardmaker import config_dict, write_shards

SIZES = {"reverse": 300, "patches": 100}
SCHEDULE = [  # as a PBT sweep finds it: phases of weights (shares)
    {"start": 0, "weights": {"reverse": 0.5, "patches": 0.5}},
    {"start": 20, "weights": {"reverse": 0.9, "patches": 0.1}},
]


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
    paper = models["all blocks"].moe
    assert (paper.balance, paper.z_loss_coef, paper.shared_experts) == ("aux_loss", 0.0, 0)
    assert (
        models["z-loss + bias balancing"].moe.balance,
        models["z-loss + bias balancing"].moe.z_loss_coef,
    ) == (
        "both",
        1e-3,
    )
    assert models["dropless"].moe.capacity_factor is None and paper.capacity_factor is not None
    assert models["shared expert"].moe.shared_experts == 1
    assert {c.other for c in ablation.comparisons} >= {"z-loss + bias balancing", "dropless", "shared expert"}


def test_mixing_arms_replay_the_tuned_ratios_and_the_pbt_schedule(tmp_path):
    config = tiny(tmp_path)
    study = mixing(config, SIZES, tuned={"reverse": 3.0, "patches": 1.0}, schedule=SCHEDULE)
    assert [arm.name for arm in study.arms] == ["uniform", "temperature 2", "tuned ratios", "PBT schedule"]
    assert all(c.baseline == "uniform" and c.tasks == ("reverse", "patches") for c in study.comparisons)
    configs = {arm.name: arm_config(config, arm, seed=0) for arm in study.arms}
    assert [t.mix_weight for t in configs["uniform"].tasks] == [1.0, 1.0]
    assert configs["temperature 2"].train.mixing.strategy == "temperature"
    assert [t.mix_weight for t in configs["tuned ratios"].tasks] == [3.0, 1.0]
    replay = configs["PBT schedule"].train.mixing
    assert replay.strategy == "schedule" and replay.phase_at(19).weights == {"reverse": 0.5, "patches": 0.5}
    assert replay.phase_at(20).weights == {"reverse": 0.9, "patches": 0.1}
    assert {arm.steps for arm in study.arms} == {40}


def test_the_report_compares_the_aggregate_objective_of_arms_that_train_the_same_tasks(tmp_path):
    study = mixing(tiny(tmp_path), SIZES)
    runs = [
        RunResult(
            arm, seed, {"reverse": {"bleu": bleu}, "patches": {"accuracy": 0.5}}, None, None, objective, moe
        )
        for arm, seed, bleu, objective, moe in [
            ("uniform", 0, 10.0, 0.30, moe_health(0.1, 0.2, same=None, other=0.6)),
            ("uniform", 1, 12.0, 0.31, moe_health(0.3, 0.4, same=None, other=0.8)),
            ("temperature 2", 0, 14.0, 0.32, {}),  # its MoE layers unknown: left out of that table
            ("temperature 2", 1, 11.0, 0.30, {}),
        ]
    ]
    text = write_study_report(tmp_path / "report", study, runs, [0, 1], "micro", None).read_text()
    # MoE layers: mean ± std over the seeds; no pair of tasks of the same modality: —
    assert "| uniform | 0.200 ± 0.141 | 0.300 ± 0.141 | 0.050 ± 0.000 | — | 0.700 ± 0.141 |" in text
    assert "| temperature 2 |" not in text.split("## MoE layers")[1].split("##")[0]
    # objective: uniform 0.305 ± 0.007, temperature 0.310 ± 0.014, differences +0.02 and -0.01
    assert "| all | objective ↑ | 0.305 ± 0.007 | 0.310 ± 0.014 | +0.005 ± 0.021 (50% same sign) |" in text
    assert "| reverse | bleu ↑ | 11.000 ± 1.414 | 12.500 ± 2.121 | +1.500 ± 3.536 (50% same sign) |" in text
    assert "| uniform | 0 | 40 | reverse, patches | 0.300 |" in text

    found = mixing(tiny(tmp_path), SIZES, tuned={"reverse": 3.0, "patches": 1.0}, schedule=SCHEDULE)
    text = write_study_report(tmp_path / "found", found, runs, [0, 1], "micro", None).read_text()
    assert "| tuned ratios | 40 | reverse, patches | mixing weights reverse 0.75, patches 0.25 |" in text
    assert (
        "mixing schedule from step 0: reverse 0.50, patches 0.50; from step 20: reverse 0.90, patches 0.10"
        in text
    )


def moe_health(dropped: float, cv: float, same: float | None, other: float | None) -> dict:
    return {
        "dropped_fraction": dropped,
        "load_cv": cv,
        "step_seconds": 0.05,
        "same_modality": same,
        "other_modality": other,
    }


def test_the_report_says_whether_tasks_of_one_modality_share_experts(tmp_path):
    study = mixing(tiny(tmp_path), SIZES)
    runs = [
        RunResult("uniform", 0, {}, None, None, None, moe_health(0.0, 0.1, same=0.9, other=0.4)),
        RunResult("temperature 2", 0, {}, None, None, None, moe_health(0.0, 0.1, same=0.3, other=0.5)),
    ]
    text = write_study_report(tmp_path / "report", study, runs, [0], "micro", None).read_text()
    assert "- uniform: tasks of one modality share experts more than tasks of different ones" in text
    assert (
        "- temperature 2: tasks of one modality do not share experts more than tasks of different ones"
        in text
    )
    # a model without MoE layers has a step time and nothing else
    runs[1].moe = {"step_seconds": 0.04}
    text = write_study_report(tmp_path / "report", study, runs, [0], "micro", None).read_text()
    assert "| temperature 2 | — | — | 0.040 | — | — |" in text and "- temperature 2:" not in text


def test_a_study_naming_a_task_the_config_lacks_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="experiment.transfer_target names tasks the config lacks: ptb"):
        tiny(tmp_path, transfer_target="ptb")
    with pytest.raises(ConfigError, match="transfer study needs a constituency_parsing task"):
        expand("transfer", tiny(tmp_path), SIZES)  # no parsing task to pick by kind


def test_a_study_over_a_task_without_a_dev_split_is_refused_before_any_run(tmp_path):
    import shutil

    from mm.shards import ShardError

    config = tiny(tmp_path)
    write_shards(tmp_path / "shards")
    shutil.rmtree(tmp_path / "shards" / "patches" / "dev")
    with pytest.raises(ShardError, match="task 'patches' has no 'dev' split to evaluate on"):
        run_experiment(config, "ablation", seeds=1, preset="micro", out=tmp_path / "report")


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
    for run in result.runs:  # its MoE layers, from the run's metrics and routing.json
        assert (
            0 <= run.moe["dropped_fraction"] < 1 and run.moe["load_cv"] >= 0 and run.moe["step_seconds"] > 0
        )
    joint = next(r for r in result.runs if r.arm == "reverse + patches")
    assert 0 <= joint.moe["other_modality"] <= 1 and joint.moe["same_modality"] is None  # text and image

    text = result.report.read_text()
    assert "| task | metric | reverse alone | reverse + patches | reverse + patches − reverse alone |" in text
    for metric in ("bleu ↑", "log_ppl ↓", "token_accuracy ↑"):
        assert f"| reverse | {metric} |" in text
    assert "## MoE layers" in text and "| reverse alone | " in text.split("## MoE layers")[1]
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
