"""Config loading: presets, overrides, and clear errors for bad files."""

import pytest

from mm.config import ConfigError, load_config, parse_config

MINIMAL = """
name: demo
model: {preset: tiny}
tasks:
  - {name: wmt_en_de, kind: translation}
  - {name: mnist, kind: image_classification, num_classes: 10}
"""

SCHEDULE = "train: {{mixing: {{strategy: schedule, schedule: [{{start: 0, weights: {}}}]}}}}\ntasks:"


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_presets_fill_the_model_and_explicit_keys_win(tmp_path):
    config = load_config(write(tmp_path, MINIMAL.replace("{preset: tiny}", "{preset: base, dropout: 0.3}")))
    assert (config.model.d_model, config.model.num_heads, config.model.moe.num_experts) == (512, 8, 30)
    assert config.model.moe.hidden == 2048 and config.model.conv_kernels[3] == (15, 4)
    assert config.model.dropout == 0.3
    assert config.task("wmt_en_de").command == "<2wmt_en_de>"
    assert config.task("mnist").metrics == ["accuracy", "top5"]


def test_dotted_overrides_reach_nested_keys_and_named_tasks(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL), ["train.steps=7", "tasks.mnist.batch_size=3", "model.moe.k=1"]
    )
    assert config.train.steps == 7
    assert config.task("mnist").batch_size == 3
    assert config.model.moe.k == 1


@pytest.mark.parametrize(
    "change, expected",
    [
        (("tasks:", "bogus: 1\ntasks:"), "bogus: unknown key"),
        (
            ("{preset: tiny}", "{preset: tiny, moe: {k: 5, num_experts: 4}}"),
            "k=5 is larger than num_experts=4",
        ),
        (("{preset: tiny}", "{d_model: wide}"), "model.d_model: Input should be a valid integer"),
        (("kind: translation", "kind: translate"), "tasks.wmt_en_de.kind: Value error, unknown task kind"),
        (("num_classes: 10", "num_classes: 10, batchsize: 4"), "tasks.mnist.batchsize: unknown key"),
        (("{preset: tiny}", "{conv_kernels: [[4, 1], [3, 1], [3, 1], [3, 1]]}"), "kernel sizes must be odd"),
        (
            ("tasks:", SCHEDULE.format("{wmt_en_de: 1}")),
            "train.mixing.schedule[0].weights lacks tasks: mnist",
        ),
        (
            ("tasks:", SCHEDULE.format("{wmt_en_de: 1, mnist: 1, ptb: 1}")),
            "train.mixing.schedule[0].weights names tasks the config lacks: ptb",
        ),
    ],
)
def test_bad_configs_name_the_file_and_the_key(tmp_path, change, expected):
    path = write(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_bad_overrides_and_files_are_reported(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="no item named 'nope'"):
        load_config(path, ["tasks.nope.batch_size=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.steps"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed"))


def test_duplicate_task_names_are_rejected():
    with pytest.raises(ConfigError, match="task names must be unique, repeated: a"):
        parse_config({"name": "x", "tasks": [{"name": "a", "kind": "translation"}] * 2})


def test_the_mm_command_reports_a_bad_config_key_in_one_line_without_a_traceback(capsys):
    from mmcli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "configs/starter.yaml", "-o", "train.stepz=3"])
    assert exit_.value.code == 2
    said = capsys.readouterr().err
    assert "configs/starter.yaml: invalid config" in said and "train.stepz: unknown key" in said
    assert "Traceback" not in said
