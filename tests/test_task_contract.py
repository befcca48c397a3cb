"""A task is one folder: its facts in its spec, its behaviour behind the typed contract, and no stage outside
tasks/ naming a task or a task's model class."""
import re
from pathlib import Path

import pytest

from tuneforge.config import TASK_CONFIGS, parse_config
from tuneforge.errors import ConfigError
from tuneforge.tasks import DEFAULT_TASK, TASKS, all_specs, get_spec
from tuneforge.tasks.behaviour import get_task
from tuneforge.tasks.spec import Task, TaskSpec

SRC = Path(__file__).resolve().parents[1] / "src" / "tuneforge"


def test_no_module_outside_tasks_names_a_task_or_a_model_class():
    """What differs per task lives in its folder: a stage that names a task (or its folder, or an AutoModelFor...
    class) branches on it. The registry (tasks/__init__.py) names them once."""
    folders = "|".join(p.name for p in (SRC / "tasks").iterdir() if p.is_dir() and not p.name.startswith("_"))
    names = "|".join(re.escape(n) for n in TASKS)
    pattern = re.compile(rf"(?<![\w-])({names})(?![\w-])|tasks[./]({folders})\b|AutoModelFor\w+")
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if (SRC / "tasks") in path.parents:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert found == []


def test_every_registered_task_has_a_spec_and_satisfies_the_contract():
    assert DEFAULT_TASK in TASKS
    for spec in all_specs():
        assert isinstance(spec, TaskSpec) and TASK_CONFIGS[spec.name] is spec.config
        assert spec.config.model_fields["type"].annotation.__args__ == (spec.name,)
        task = get_task(spec.name)
        assert isinstance(task, Task) and task.name == spec.name
        assert set(spec.selectable) - {None} <= set(spec.metrics), spec.name  # every choice has a direction
        assert set(spec.card_metrics) <= set(spec.metrics), spec.name
        # the config takes the spec's choices: its default metric and every baseline
        cfg = parse_config({"task": {"type": spec.name}, "data": {"path": "x"}})
        assert cfg.eval.metric == spec.selectable[0] and cfg.eval.baselines == list(spec.baselines)


def test_a_task_missing_part_of_the_contract_fails_loudly_naming_it(monkeypatch):
    from tuneforge.tasks.classification import task as module

    class Half:
        name = "text-classification"

    monkeypatch.setattr(module, "TASK", Half())
    with pytest.raises(RuntimeError, match=r"does not satisfy tasks.spec.Task: missing \[.*'prepare'"):
        get_task("text-classification")


def test_a_tasks_defaults_and_choices_come_from_its_spec():
    spec = get_spec("causal-lm")
    cfg = parse_config({"task": {"type": "causal-lm"}, "data": {"path": "x"}})
    assert cfg.model.name == spec.defaults["model"]["name"] and cfg.train.method == spec.defaults["train"]["method"]
    assert cfg.train.lora.r == spec.defaults["train.lora"]["r"]
    with pytest.raises(ConfigError, match="is not one of causal-lm's"):
        parse_config({"task": {"type": "causal-lm"}, "data": {"path": "x"}, "eval": {"metric": "f1"}})
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        get_spec("nope")


def test_a_tasks_own_flag_sets_its_key_and_another_tasks_flag_is_refused(tmp_path):
    from tuneforge.cli import _config_from_args, build_parser

    data = str(tmp_path / "d.jsonl")
    args = build_parser().parse_args(["run", "--task", "causal-lm", "--data", data, "--no-chat-template"])
    assert _config_from_args(args).task.chat_template is False
    args = build_parser().parse_args(["run", "--data", data, "--text-column", "t", "--label-column", "l", "--multi-label"])
    assert _config_from_args(args).task.multi_label is True
    args = build_parser().parse_args(["run", "--task", "causal-lm", "--data", data, "--multi-label"])
    with pytest.raises(ConfigError, match="--multi-label is a text-classification flag"):
        _config_from_args(args)
    args = build_parser().parse_args(["run", "--data", data])
    with pytest.raises(ConfigError, match="quick start needs --text-column and --label-column"):
        _config_from_args(args)
