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


# ------------------------------------------------------------------ what a prediction reads comes from the task

def _toy_task_and_spec():
    from pydantic import BaseModel, ConfigDict

    class ImagesRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        images: list[str]

    spec = TaskSpec(name="toy-images", config=object, metrics={"accuracy": "max"}, selectable=("accuracy",),
                    baselines=(), summary="toy", pipeline_tag="image-classification", input="image",
                    inputs="images", request=ImagesRequest, input_help="an image")

    class ToyTask:
        name = "toy-images"

        def check_inputs(self, items, settings):
            return "image 0 is not an image" if items and items[0] == "junk" else None

        def input_size(self, item):
            return 7 * len(item)  # "pixels": not characters

        def measure_input(self, item):
            return {"darkness": float(len(item))}

        def mount_routes(self, app, ctx):
            return None

        def parse_upload(self, body, content_type):  # an upload of its own: one name per line, as text/plain
            return {"images": body.decode().split()} if content_type.startswith("text/plain") else None

    return ToyTask(), spec


def test_predict_route_reads_the_request_model_check_and_size_of_the_served_task(monkeypatch, tmp_path):
    import sqlite3

    from fastapi.testclient import TestClient

    import tuneforge.tasks as registry
    from tuneforge.serving.app import create_app
    from tuneforge.serving.context import ServeSettings

    task, spec = _toy_task_and_spec()
    real = registry.get_spec
    monkeypatch.setattr(registry, "get_spec", lambda name: spec if name == spec.name else real(name))
    seen = []

    def load():
        def predict(items):
            seen.extend(items)
            return [{"label": "cat", "probabilities": {"cat": 0.9, "dog": 0.1}} for _ in items]
        return predict, ["cat", "dog"], lambda r: ([r["label"]], r["probabilities"][r["label"]])

    load.task = task
    settings = ServeSettings(run_dir=tmp_path, api_key=None, monitor_url=f"sqlite:///{tmp_path / 'log.sqlite'}")
    with TestClient(create_app(settings, load)) as client:
        ok = client.post("/v1/predict", json={"images": ["abc", "de"]})
        assert ok.status_code == 200 and [p["label"] for p in ok.json()["predictions"]] == ["cat", "cat"]
        assert seen == ["abc", "de"]
        wrong = client.post("/v1/predict", json={"texts": ["abc"]})
        assert wrong.status_code == 422 and 'Expected JSON {"images": ["..."]}' in wrong.json()["detail"]
        refused = client.post("/v1/predict", json={"images": ["junk"]})
        assert refused.status_code == 422 and refused.json()["detail"] == "image 0 is not an image"
        uploaded = client.post("/v1/predict", content=b"xy\nzzz", headers={"Content-Type": "text/plain"})
        assert uploaded.status_code == 200 and seen[-2:] == ["xy", "zzz"]
        empty = client.post("/v1/predict", json={"images": []})
        assert empty.status_code == 422 and "images is empty" in empty.json()["detail"]
        schema = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["requestBody"]
        assert list(schema["content"]["application/json"]["schema"]["properties"]) == ["images"]
    rows = sorted(sqlite3.connect(tmp_path / "log.sqlite").execute("SELECT input_chars, measures FROM predictions"))
    assert [r[0] for r in rows] == [14, 14, 21, 21]  # the task's measure (7 per character here), not len(text)
    assert [r[1] for r in rows] == ['{"darkness": 2.0}'] * 2 + ['{"darkness": 3.0}'] * 2  # and its other measures


def test_drift_bins_the_input_size_with_the_reference_edges():
    from tuneforge.drift import profile
    from tuneforge.serving.monitor import drift_report

    edges = [0, 1000, 5000, 10**9]  # a task's own bins (pixels, say)
    reference = profile([400] * 60, ["a"] * 60, [0.9] * 60, ["a"], edges)
    same = drift_report(reference, [(700, "a", 0.9)] * 60, {})
    moved = drift_report(reference, [(7000, "a", 0.9)] * 60, {})
    assert reference["length"]["edges"] == edges
    assert not same["signals"]["length"]["drift"] and moved["signals"]["length"]["drift"]
    # with the default character bins 400 and 700 fall in different bins: the edges are the reference's
    assert profile([400], ["a"], [0.9], ["a"])["length"]["shares"] != profile([700], ["a"], [0.9], ["a"])["length"]["shares"]


def test_a_tasks_input_measures_are_logged_and_watched_for_drift(tmp_path):
    import sqlite3
    import time

    from tuneforge.drift import profile_of
    from tuneforge.serving.monitor import RequestLog, drift_report

    edges = [0, 64, 128, 192, 256]  # a task's own measure: an image's brightness, say
    results = [{"label": "a", "probabilities": {"a": 0.9, "b": 0.1}}] * 80
    reference = profile_of([10] * 80, results, ["a", "b"], measures={"brightness": (edges, [100.0] * 60 + [150.0] * 20)})
    assert reference["inputs"]["brightness"] == {"edges": edges, "shares": [0.0, 0.75, 0.25, 0.0]}
    log = RequestLog(f"sqlite:///{tmp_path / 'log.sqlite'}")
    log.write(["x"] * 60, ["a"] * 60, [0.9] * 60, 1.0, sizes=[10] * 60, measures=[{"brightness": 110.0}] * 45 + [{"brightness": 140.0}] * 15)
    same = drift_report(reference, log.recent(100), {})
    assert same["signals"]["brightness"]["psi"] < 0.01 and same["status"] == "ok"
    log.write(["x"] * 60, ["a"] * 60, [0.9] * 60, 1.0, sizes=[10] * 60, measures=[{"brightness": 230.0}] * 60)  # overexposed
    dark = drift_report(reference, log.recent(60), {"brightness": 0.5})
    assert dark["signals"]["brightness"]["drift"] and dark["signals"]["brightness"]["threshold"] == 0.5
    assert not dark["signals"]["length"]["drift"] and dark["status"] == "drift"
    assert "brightness" not in drift_report(profile_of([10] * 80, results, ["a", "b"]), log.recent(60), {})["signals"]
    log.close()
    # a log written before inputs had measures gains the column, and its old rows read back with none
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as conn:
        conn.execute("CREATE TABLE predictions (ts DOUBLE PRECISION, input_chars INTEGER, input_sha256 TEXT, label TEXT, "
                     "confidence DOUBLE PRECISION, latency_ms DOUBLE PRECISION, text TEXT)")
        conn.execute("INSERT INTO predictions VALUES (?, 5, 'h', 'a', 0.8, 1.0, NULL)", (time.time() - 60,))
    log = RequestLog(f"sqlite:///{old}")
    log.write(["y"], ["b"], [0.7], 1.0, measures=[{"brightness": 12.5}])
    assert log.recent(5) == [(1, "b", 0.7, {"brightness": 12.5}), (5, "a", 0.8, {})]
    log.close()


def test_predict_and_serve_flags_come_from_the_specs(monkeypatch):
    import tuneforge.tasks as registry
    from tuneforge.cli import _serve_option_values, build_parser
    from tuneforge.errors import ConfigError

    _, spec = _toy_task_and_spec()
    real = registry.all_specs
    monkeypatch.setattr(registry, "all_specs", lambda: [*real(), spec])
    parser = build_parser()
    args = parser.parse_args(["predict", "runs/x", "--image", "a.png", "--image", "b.png", "--text", "hi"])
    assert args.image == ["a.png", "b.png"] and args.text == ["hi"]
    serve = parser.parse_args(["serve", "runs/x", "--max-tokens-cap", "64"])
    assert _serve_option_values(serve, "causal-lm") == {"max_tokens_cap": 64, "max_prompt_tokens": None}
    assert _serve_option_values(serve, "text-classification") == {}
    with pytest.raises(ConfigError, match="--max-prompt-tokens is 0: it must be at least 1"):
        _serve_option_values(parser.parse_args(["serve", "runs/x", "--max-prompt-tokens", "0"]), "causal-lm")
