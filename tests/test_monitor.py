"""The request log on both of its stores (SQLite, PostgreSQL), retention, and the monitor end to end."""
import json

import pytest
from fastapi.testclient import TestClient

from tuneforge.cli import main
from tuneforge.errors import TuneforgeError
from tuneforge.serving.app import ServeSettings, run_predictor, create_app
from tuneforge.serving.monitor import RequestLog, load_reference


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'log.sqlite'}"
    return request.getfixturevalue("postgres_url")


def test_request_log_returns_newest_first_and_prunes_past_retention(log_url, monkeypatch):
    from types import SimpleNamespace

    from tuneforge.serving import monitor

    day, start = 86400, 1_700_000_000.0
    clock = SimpleNamespace(now=start)
    monkeypatch.setattr(monitor, "time", SimpleNamespace(time=lambda: clock.now))  # the log's clock, and only its
    log = RequestLog(log_url, retention_days=1)
    log.write(["old one", "old two"], ["neg", "neg"], [0.9, 0.9], 5.0)  # one batch: one time, the same row read back
    clock.now = start + day - 10  # over a minute since the last pruning: it runs; the old rows are not a day old yet
    log.write(["mid"], ["neg"], [0.5], 2.0)
    assert [r[1] for r in log.recent(10)] == ["neg", "neg", "neg"]
    clock.now = start + day + 20  # the old rows are past the one-day retention, but pruning waits for its interval
    log.write(["new"], ["pos"], [0.7], 3.0)
    assert log.recent(10) == [(3, "pos", 0.7, {}), (3, "neg", 0.5, {}), (7, "neg", 0.9, {}), (7, "neg", 0.9, {})]  # newest first
    assert log.recent(2) == [(3, "pos", 0.7, {}), (3, "neg", 0.5, {})]
    clock.now = start + day + 100  # 90 s since the last pruning: it runs and drops the rows older than a day
    log.write(["newest, longer"], ["neg"], [0.6], 4.0)
    assert log.recent(10) == [(len("newest, longer"), "neg", 0.6, {}), (3, "pos", 0.7, {}), (3, "neg", 0.5, {})]
    log.close()


def _reference_texts(run_dir) -> list[str]:
    """The test split the run's reference profile was built from (the run's own data stage, checked by its hash)."""
    import yaml

    from tuneforge.config import parse_config
    from tuneforge.tasks.classification.data import prepare_data
    from tuneforge.data.split import content_hash

    cfg = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    test = prepare_data(cfg.data, cfg.task).splits.test
    assert content_hash(test) == json.loads((run_dir / "run.json").read_text())["data"]["splits"]["test"]
    return test.texts


def test_serving_logs_to_postgresql_and_monitor_reads_it(served_run, postgres_url, capsys):
    settings = ServeSettings(run_dir=served_run, api_key=None, monitor_url=postgres_url, drift_min_rows=20)
    reference_texts = _reference_texts(served_run)
    n = len(reference_texts)
    assert n == load_reference(served_run)["n"] and 2 * n >= settings.drift_min_rows
    texts = reference_texts * 2  # the reference traffic itself, twice: the same distribution, no drift
    long_texts = [" ".join([t] * 12) for t in reference_texts]  # inputs twelve times as long: drift on length
    with TestClient(create_app(settings, run_predictor(served_run), load_reference(served_run))) as c:
        for i in range(0, len(texts), 10):
            assert c.post("/v1/predict", json={"texts": texts[i:i + 10]}).status_code == 200
        unshifted = c.get("/v1/monitor").json()
        for i in range(0, len(long_texts), 10):
            assert c.post("/v1/predict", json={"texts": long_texts[i:i + 10]}).status_code == 200
        shifted = c.get("/v1/monitor").json()
    assert unshifted["window"] == 2 * n and unshifted["status"] == "ok", unshifted
    assert all(s["psi"] < 0.01 for s in unshifted["signals"].values()), unshifted
    assert shifted["window"] == 3 * n and shifted["status"] == "drift" and shifted["signals"]["length"]["drift"], shifted

    # the CLI reads the same rows back from PostgreSQL and reaches the same verdict
    assert main(["monitor", str(served_run), "--monitor-url", postgres_url]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["window"] == 3 * n and printed["status"] == "drift"
    assert {k: v["psi"] for k, v in printed["signals"].items()} == {k: v["psi"] for k, v in shifted["signals"].items()}


def test_unreachable_postgresql_is_a_clear_error_without_the_password(served_run, capsys):
    pytest.importorskip("psycopg")
    url = "postgresql://monitor:hunter2@127.0.0.1:1/tuneforge"
    with pytest.raises(TuneforgeError) as err:
        RequestLog(url)
    assert "127.0.0.1:1" in err.value.message and "hunter2" not in err.value.message

    # `serve` stops before binding a port, with the message and exit code 2, no traceback
    assert main(["serve", str(served_run), "--no-auth", "--force", "--monitor-url", url]) == 2
    stderr = capsys.readouterr().err
    assert "cannot open the request log" in stderr and "hunter2" not in stderr and "Traceback" not in stderr


def test_unknown_log_url_scheme_is_refused(tmp_path):
    with pytest.raises(TuneforgeError, match="unknown request-log URL"):
        RequestLog(f"mysql://{tmp_path}/log")


def test_multi_label_drift_follows_each_labels_rate():
    from tuneforge.drift import NO_LABEL, profile
    from tuneforge.serving.monitor import drift_report

    names = ["billing", "bug", "praise", NO_LABEL]
    mix = ["billing"] * 30 + ["billing,bug"] * 30 + ["praise"] * 20 + [""] * 20
    reference = profile([50] * 100, mix, [0.9] * 100, names)
    assert reference["label"]["shares"] == [60 / 130, 30 / 130, 20 / 130, 20 / 130]

    def rows(labels):
        return [(50, lab, 0.9) for lab in labels]

    thresholds = {"length": 0.25, "label": 0.25, "confidence": 0.25}
    same = drift_report(reference, rows(mix[::-1]), thresholds, min_rows=50)
    assert same["signals"]["label"]["psi"] < 0.01 and not same["signals"]["label"]["drift"]
    # the same label sets, but "bug" now rides along on almost every prediction
    shifted = drift_report(reference, rows(["billing,bug"] * 60 + ["bug,praise"] * 30 + [""] * 10), thresholds, min_rows=50)
    assert shifted["signals"]["label"]["drift"] and shifted["status"] == "drift"
    # and each prediction now carries more labels: 0, 1 or 2 before; 2 on 90% of them after
    assert reference["count"]["shares"][:3] == [0.2, 0.5, 0.3]
    assert shifted["signals"]["count"]["drift"] and not same["signals"]["count"]["drift"]


def test_sqlite_log_in_an_unusable_place_is_a_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(TuneforgeError, match="cannot open the request log at .*a-file/log.sqlite"):
        RequestLog(f"sqlite:///{tmp_path / 'a-file' / 'log.sqlite'}")
