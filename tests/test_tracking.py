"""Experiment tracking: a tiny run sent to MLflow (a file store, and a real `mlflow server` the test starts on a
free port with a sqlite backend) and to TensorBoard, read back through MlflowClient and TensorBoard's own event
reader; the MLflow UI's run page opened in headless Chromium; `tune` as a parent run with nested trials; an
unreachable tracker stopping the run before training (exit 2); a tracker failing mid-run losing no training."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main
from tuneforge.config import parse_config
from tuneforge.errors import ConfigError
from tuneforge.pipeline import run

from conftest import make_rows, stop_process, wait_ready

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port: sqlite backend store, artifacts served by the server."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                             str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, lambda: (root / "server.log").read_text()[-3000:], timeout=120, path="/health")
    except BaseException:
        stop_process(proc)
        raise
    yield url
    stop_process(proc)
    log.close()


def _raw(base_config, write_csv, tmp_path, promote: bool | None = None, **tracking) -> dict:
    """A tiny run: 200 rows (120 train), 2 epochs of batch 8, 6 evaluations. `promote`: a gate every model passes
    (True) or none can (False: a margin of 1 over the majority baseline)."""
    raw = base_config(write_csv(make_rows(200)), train={"method": "full", "epochs": 2, "eval_every": 5},
                      eval={"baselines": ["majority", "tfidf_logreg"]})
    if promote is not None:
        raw["eval"]["gate"] = {"min_margin": -1.0, "ci_lower_above_baseline": False} if promote else {"min_margin": 1.0}
    raw["tracking"] = tracking
    return raw


def _check_tracked_run(client: MlflowClient, out: Path, experiment: str, registered_as: str | None = None):
    """The run in the tracker holds what the run wrote: params, a metric point per evaluation, test metrics of the
    model and the baselines, tags, artifacts; and the registry holds it when promoted."""
    metrics = json.loads((out / "metrics.json").read_text())
    run_json = json.loads((out / "run.json").read_text())
    record = run_json["tracking"]
    assert record["backend"] == "mlflow" and record["not_logged"] == [] and record["experiment"] == experiment
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [record["run_id"]]
    tracked = runs[0]
    assert tracked.info.status == "FINISHED"
    params = tracked.data.params
    assert params["train.learning_rate"] == "0.005" and params["task.type"] == "text-classification"
    assert params["data.path"].endswith("data.csv") and params["train.epochs"] == "2.0"

    history = metrics["validation"]["history"]
    key = f"val_{metrics['validation']['metric']}"
    for name in ("train_loss", key, "val_loss", "lr"):
        points = client.get_metric_history(record["run_id"], name)
        assert [p.step for p in points] == [row["step"] for row in history], name
        assert [p.value for p in points] == pytest.approx([row[name] for row in history], rel=1e-9), name
    speed = client.get_metric_history(record["run_id"], "train_rows_per_second")
    assert len(speed) == len(history) and all(p.value > 0 for p in speed)

    final = tracked.data.metrics
    main_metric = metrics["main_metric"]
    assert final[f"test_{main_metric}"] == pytest.approx(metrics["test"]["model"][main_metric])
    for name, scores in metrics["test"]["baselines"].items():
        assert final[f"baseline.{name}.{main_metric}"] == pytest.approx(scores[main_metric])
    assert final["promoted"] == float(metrics["promoted"])
    assert final["cost.actual.seconds_train"] == pytest.approx(metrics["cost"]["actual"]["seconds_train"])
    assert "cost.estimated.seconds_total" in final

    tags = tracked.data.tags
    assert tags["tuneforge.task"] == "text-classification"
    assert tags["tuneforge.test_sha256"] == run_json["data"]["splits"]["test"]
    assert tags["tuneforge.promoted"] == str(metrics["promoted"]).lower()
    assert tags["tuneforge.torch"] == run_json["versions"]["torch"] and tags["tuneforge.hardware"]

    names = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"report.html", "metrics.json", "audit.json", "config.yaml", "run.json", "model_card"} <= names
    logged = json.loads(Path(client.download_artifacts(record["run_id"], "metrics.json", str(out.parent / "dl"))).read_text())
    assert logged == metrics
    if registered_as:
        assert "model" in names
        model_files = {Path(a.path).name for a in client.list_artifacts(record["run_id"], "model")}
        assert {"model.safetensors", "config.json", "README.md"} <= model_files
        versions = client.search_model_versions(f"name='{registered_as}'")
        if metrics["promoted"]:
            assert [v.run_id for v in versions] == [record["run_id"]] and record["registered"]["version"] == "1"
        else:
            assert versions == [] and record["registered"] is None
    return record, metrics


def test_mlflow_file_store_holds_params_metrics_per_evaluation_artifacts_and_the_promoted_model(base_config, write_csv,
                                                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.7+ refuses its file store without it
    uri = (tmp_path / "mlruns").as_uri()
    cfg = parse_config(_raw(base_config, write_csv, tmp_path, promote=True, backend="mlflow", uri=uri, log_model=True,
                            register_as="reviews"))
    run(cfg)
    record, metrics = _check_tracked_run(MlflowClient(uri, uri), tmp_path / "out", "out", registered_as="reviews")
    assert metrics["promoted"] and record["registered"] == {"name": "reviews", "version": "1"}
    assert json.loads((tmp_path / "out" / "tracking.json").read_text())["run_id"] == record["run_id"]


def test_mlflow_default_store_is_mlflows_own_in_the_working_directory(base_config, write_csv, tmp_path, monkeypatch):
    """tracking.uri null: MLflow's default (sqlite:///mlflow.db in the working directory), what `mlflow ui` there shows."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = parse_config(_raw(base_config, write_csv, tmp_path, backend="mlflow", experiment="reviews-default"))
    run(cfg)
    record = json.loads((tmp_path / "out" / "run.json").read_text())["tracking"]
    assert record["uri"] == mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").is_file() or (tmp_path / "mlruns").is_dir()
    if (tmp_path / "mlflow.db").is_file():
        _check_tracked_run(MlflowClient(uri), tmp_path / "out", "reviews-default")


def test_mlflow_server_run_then_its_page_in_a_browser_shows_the_metrics(base_config, write_csv, tmp_path, mlflow_server):
    raw = _raw(base_config, write_csv, tmp_path, promote=False, uri=mlflow_server, log_model=True,
               register_as="reviews-live")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "run.yaml"), "--track", "mlflow"]) == 0
    record, metrics = _check_tracked_run(MlflowClient(mlflow_server, mlflow_server), tmp_path / "out", "out",
                                         registered_as="reviews-live")
    assert not metrics["promoted"] and record["registered"] is None  # the registry holds promoted models only
    assert record["url"] == f"{mlflow_server}/#/experiments/{record['experiment_id']}/runs/{record['run_id']}"
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    main_key = f"test_{metrics['main_metric']}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.goto(record["url"])
        page.get_by_text(main_key, exact=True).first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "mlflow-run.png"), full_page=True)
        browser.close()
    assert "out" in text and "train_loss" in text and main_key in text


def test_tune_is_a_parent_run_with_each_trial_nested_and_pruned_ones_marked(base_config, write_csv, tmp_path,
                                                                            mlflow_server, monkeypatch):
    import optuna

    from tuneforge.tuning import search

    class PruneTrial1(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return trial.number == 1

    monkeypatch.setattr(search, "make_pruner", lambda tune_cfg: PruneTrial1())
    raw = _raw(base_config, write_csv, tmp_path, backend="mlflow", uri=mlflow_server, experiment="search-exp")
    raw["tune"] = {"trials": 3, "space": {"train.learning_rate": {"low": 1e-3, "high": 2e-2, "log": True}}}
    search.tune(parse_config(raw))
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("search-exp")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: int(r.data.tags["tuneforge.trial"]))
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0]
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert [t.data.tags["tuneforge.trial_state"] for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert [t.info.status for t in trials] == ["FINISHED", "KILLED", "FINISHED"]
    assert "pruned at evaluation 1" in trials[1].data.tags["tuneforge.note"]
    assert float(trials[0].data.params["train.learning_rate"]) == pytest.approx(5e-3)  # trial 0: the config's own
    assert len(client.get_metric_history(trials[1].info.run_id, "train_loss")) == 1  # pruned at its first evaluation
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_pruned"] == 1
    assert parent.data.metrics[f"test_{metrics['main_metric']}"] == pytest.approx(metrics["test"]["model"][metrics["main_metric"]])
    best = metrics["search"]["best_trial"]
    assert trials[best].data.metrics[f"best_val_{metrics['validation']['metric']}"] == pytest.approx(metrics["search"]["best_value"])


def test_unreachable_tracker_stops_the_run_before_training(base_config, write_csv, tmp_path, capsys):
    dead = f"http://127.0.0.1:{_free_port()}"
    raw = _raw(base_config, write_csv, tmp_path, backend="mlflow", uri=dead)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    t0 = time.monotonic()
    assert main(["run", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"the MLflow tracker at {dead} cannot be reached" in err and "nothing was trained" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "checkpoint").exists()
    assert time.monotonic() - t0 < 60, "the check must not wait out MLflow's retries"


def test_a_tracker_failing_mid_run_loses_no_training(base_config, write_csv, tmp_path, monkeypatch, capsys):
    from tuneforge import tracking

    calls = {"n": 0}
    real = tracking.MlflowTracker._log_metrics

    def flaky(self, values, step):  # the server goes away after the first evaluation
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("Connection refused")
        return real(self, values, step)

    monkeypatch.setattr(tracking.MlflowTracker, "_log_metrics", flaky)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    metrics = run(parse_config(_raw(base_config, write_csv, tmp_path, backend="mlflow", uri=uri)))
    out = tmp_path / "out"
    assert (out / "model" / "model.safetensors").is_file() and metrics["test"]["model"]
    record = json.loads((out / "run.json").read_text())["tracking"]
    steps = [row["step"] for row in metrics["validation"]["history"]]
    assert len(steps) == 6
    failed = record["not_logged"]
    assert failed[:3] == [f"metrics at step {s}: ConnectionError: Connection refused" for s in steps[1:4]]
    # after 3 failures in a row the tracker is left alone: the rest is named, not tried (no wait on a dead server)
    assert all("not tried" in line for line in failed[3:])
    assert {"test metrics", "artifact report.html", "artifact metrics.json"} <= {line.split(" (")[0] for line in failed}
    history = MlflowClient(uri).get_metric_history(record["run_id"], "train_loss")
    assert [p.step for p in history] == steps[:1]
    assert "were not logged to mlflow" in capsys.readouterr().out


MAX_FAILURES_SEEN = 3  # tracking.MAX_FAILURES: failed calls in a row before the tracker is left alone


def test_tensorboard_event_files_hold_the_same_curve(base_config, write_csv, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = _raw(base_config, write_csv, tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "run.yaml"), "--track", "tensorboard"]) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    history = metrics["validation"]["history"]
    loss = events.Scalars("train_loss")
    assert [e.step for e in loss] == [row["step"] for row in history]
    assert [e.value for e in loss] == pytest.approx([row["train_loss"] for row in history], rel=1e-6)
    main_key = f"test_{metrics['main_metric']}"
    assert events.Scalars(main_key)[-1].value == pytest.approx(metrics["test"]["model"][metrics["main_metric"]], rel=1e-6)
    assert json.loads((out / "run.json").read_text())["tracking"]["log_dir"] == str(out / "tensorboard")


def test_tracking_options_are_checked_once(base_config, write_csv, tmp_path):
    with pytest.raises(ConfigError, match="register_as needs tracking.log_model"):
        parse_config(_raw(base_config, write_csv, tmp_path, backend="mlflow", register_as="x"))
    with pytest.raises(ConfigError, match="are MLflow's"):
        parse_config(_raw(base_config, write_csv, tmp_path, backend="tensorboard", uri="http://x"))
    with pytest.raises(ConfigError, match="backend"):
        parse_config(_raw(base_config, write_csv, tmp_path, backend="wandb"))
