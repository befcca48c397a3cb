"""Serving through FastAPI's TestClient on a tiny model, the micro-batcher, drift, and one real server process."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tuneforge.serving.app import ServeSettings, classification_predictor, create_app, require_promoted
from tuneforge.serving.batcher import MicroBatcher
from tuneforge.serving.monitor import load_reference

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _client(run_dir, tmp_path, **overrides):
    settings = ServeSettings(run_dir=run_dir, api_key=KEY, monitor_url=f"sqlite:///{tmp_path / 'log.sqlite'}",
                             drift_min_rows=20, **overrides)
    return TestClient(create_app(settings, classification_predictor(run_dir), reference=load_reference(run_dir)))


def test_endpoints_auth_and_predictions(served_run, tmp_path):
    with _client(served_run, tmp_path) as c:
        assert c.get("/health").json() == {"status": "alive"}
        assert c.get("/ready").json() == {"status": "ready"}
        assert c.post("/v1/predict", json={"texts": ["good"]}).status_code == 401
        assert c.post("/v1/predict", json={"texts": ["good"]}, headers={"Authorization": "Bearer nope"}).status_code == 401
        r = c.post("/v1/predict", json={"texts": ["good great film", "awful dull"]}, headers=AUTH)
        assert r.status_code == 200
        preds = r.json()["predictions"]
        assert len(preds) == 2 and all(p["label"] in ("pos", "neg") for p in preds)
        assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in preds)


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(served_run, tmp_path):
    with _client(served_run, tmp_path, max_texts=3, max_chars=50, max_body_bytes=2000) as c:
        cases = [
            (dict(content=b"{not json", headers={**AUTH, "content-type": "application/json"}), 422, "invalid request"),
            (dict(json={"texts": "just a string"}), 422, "texts"),
            (dict(json={"texts": [1, 2]}), 422, "texts"),
            (dict(json={"texts": []}), 422, "empty"),
            (dict(json={"texts": ["a"] * 4}), 422, "limit of 3"),
            (dict(json={"texts": ["x" * 51]}), 422, "limit of 50 characters"),
            (dict(json={"texts": ["x" * 40] * 3, "pad": "y" * 3000}), 413, "2000 bytes"),
        ]
        for kwargs, status, words in cases:
            kwargs.setdefault("headers", AUTH)
            r = c.post("/v1/predict", **kwargs)
            assert r.status_code == status, (kwargs, r.text)
            assert words in r.json()["detail"]
        assert c.post("/v1/predict", json={"texts": ["fine"]}, headers=AUTH).status_code == 200


def test_metrics_counters_move(served_run, tmp_path):
    with _client(served_run, tmp_path) as c:
        for _ in range(3):
            c.post("/v1/predict", json={"texts": ["good", "bad"]}, headers=AUTH)
        c.post("/v1/predict", json={"texts": ["good"]})
        text = c.get("/metrics").text
    assert 'tuneforge_requests_total{endpoint="/v1/predict",status="200"} 3.0' in text
    assert 'tuneforge_requests_total{endpoint="/v1/predict",status="401"} 1.0' in text
    labels = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("tuneforge_predicted_label_total{"))
    assert labels == 6
    assert "tuneforge_batch_size_count" in text and "tuneforge_prediction_confidence_bucket" in text


def test_drift_detected_on_a_shifted_stream_not_on_an_unshifted_one(served_run, tmp_path):
    from conftest import make_rows

    texts = [r["text"] for r in make_rows(100, seed=3)]
    with _client(served_run, tmp_path / "a") as c:
        for i in range(0, 100, 10):
            c.post("/v1/predict", json={"texts": texts[i:i + 10]}, headers=AUTH)
        same = c.get("/v1/monitor", headers=AUTH).json()
    assert same["status"] == "ok", same
    long_texts = [" ".join([t] * 12) for t in texts]
    with _client(served_run, tmp_path / "b") as c:
        for i in range(0, 100, 10):
            c.post("/v1/predict", json={"texts": long_texts[i:i + 10]}, headers=AUTH)
        shifted = c.get("/v1/monitor", headers=AUTH).json()
        gauges = c.get("/metrics").text
    assert shifted["status"] == "drift" and shifted["signals"]["length"]["drift"]
    assert 'tuneforge_drift_alarm{signal="length"} 1.0' in gauges


def test_request_log_keeps_no_raw_text_by_default(served_run, tmp_path):
    import sqlite3

    with _client(served_run, tmp_path) as c:
        c.post("/v1/predict", json={"texts": ["a secret review"]}, headers=AUTH)
    rows = sqlite3.connect(tmp_path / "log.sqlite").execute("SELECT input_chars, input_sha256, text FROM predictions").fetchall()
    assert rows[0][0] == len("a secret review") and len(rows[0][1]) == 64 and rows[0][2] is None


def test_micro_batcher_groups_concurrent_requests():
    calls = []

    def predict(texts):
        calls.append(len(texts))
        return [{"label": t, "probabilities": {}} for t in texts]

    async def scenario():
        b = MicroBatcher(predict, max_batch_size=64, max_wait_ms=50)
        b.start()
        results = await asyncio.gather(*(b.submit([f"t{i}", f"u{i}"]) for i in range(10)))
        await b.stop()
        return results

    results = asyncio.run(scenario())
    assert [r[0]["label"] for r in results] == [f"t{i}" for i in range(10)]  # each request gets its own answers
    assert sum(calls) == 20 and len(calls) < 10 and max(calls) > 2


def test_micro_batcher_waits_to_fill_only_under_load():
    calls = []

    def predict(texts):
        calls.append(len(texts))
        time.sleep(0.05)  # a forward pass
        return [{"label": t, "probabilities": {}} for t in texts]

    async def staggered_round(b, n):
        async def one(i):
            await asyncio.sleep(0.004 * i)  # clients come back a few ms apart
            return await b.submit([f"t{i}"])
        return await asyncio.gather(*(one(i) for i in range(n)))

    async def scenario():
        b = MicroBatcher(predict, max_batch_size=64, max_wait_ms=1000)
        b.start()
        t0 = time.perf_counter()
        await b.submit(["alone"])  # idle server: answered at once, not after max_wait
        idle_s = time.perf_counter() - t0
        await staggered_round(b, 8)
        calls.clear()
        await staggered_round(b, 8)  # under load now: the staggered arrivals fill one batch
        await b.stop()
        return idle_s

    idle_s = asyncio.run(scenario())
    assert idle_s < 0.5
    assert calls == [8]


def test_micro_batcher_skips_requests_that_timed_out_while_queued():
    calls = []

    def predict(texts):
        calls.append(list(texts))
        time.sleep(0.3)
        return [{"label": t, "probabilities": {}} for t in texts]

    async def scenario():
        b = MicroBatcher(predict, max_batch_size=64, max_wait_ms=0)
        b.start()
        first = asyncio.ensure_future(b.submit(["A"]))
        await asyncio.sleep(0.05)  # A's forward pass is under way
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.submit(["B"]), 0.05)  # gives up while queued behind A
        later = asyncio.ensure_future(b.submit(["C"]))
        answers = [await first, await later]
        await b.stop()
        return answers

    answers = asyncio.run(scenario())
    assert [a[0]["label"] for a in answers] == ["A", "C"]
    assert calls == [["A"], ["C"]]  # no forward pass spent on B


def test_unpromoted_run_is_refused_unless_forced(served_run, tmp_path):
    from tuneforge.errors import OutputError

    metrics = json.loads((served_run / "metrics.json").read_text())
    copy = tmp_path / "run"
    (copy / "model").mkdir(parents=True)
    (copy / "model" / "model.safetensors").write_bytes(b"x")
    (copy / "metrics.json").write_text(json.dumps({**metrics, "promoted": False, "promotion_reason": "too weak"}))
    with pytest.raises(OutputError, match="not promoted.*too weak"):
        require_promoted(copy, force=False)
    require_promoted(copy, force=True)
    (copy / "metrics.json").write_text(json.dumps({**metrics, "promoted": True}))
    require_promoted(copy, force=False)


def test_serve_without_a_key_refuses_to_start(served_run, capsys, monkeypatch):
    from tuneforge.cli import main

    monkeypatch.delenv("TUNEFORGE_API_KEY", raising=False)
    assert main(["serve", str(served_run), "--force"]) == 2
    assert "no API key" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_process_answers_concurrent_requests(served_run, tmp_path):
    port = _free_port()
    env = {**os.environ, "TF_TEST_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(served_run), "--port", str(port), "--force",
                             "--api-key-env", "TF_TEST_KEY", "--monitor-url", f"sqlite:///{tmp_path / 'log.sqlite'}",
                             "--max-wait-ms", "20"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail("server did not become ready: " + proc.stdout.read1().decode())

        def call(i):
            return httpx.post(f"{base}/v1/predict", json={"texts": [f"good film {i}", "awful"]}, headers=AUTH, timeout=30)

        with ThreadPoolExecutor(16) as pool:
            statuses = [r.status_code for r in pool.map(call, range(64))]
        assert statuses == [200] * 64
        metrics = httpx.get(f"{base}/metrics").text
        count = [line for line in metrics.splitlines() if line.startswith("tuneforge_batch_size_count")][0]
        total = [line for line in metrics.splitlines() if line.startswith("tuneforge_batch_size_sum")][0]
        assert float(total.split()[-1]) == 128 and float(count.split()[-1]) < 64  # requests were grouped
    finally:
        proc.terminate()
        proc.wait(10)


def test_predictor_in_bf16_agrees_with_fp32(served_run):
    from conftest import make_rows
    from tuneforge.models.predictor import Predictor

    texts = [r["text"] for r in make_rows(40, seed=7)]
    fp32 = Predictor.load(served_run / "model").probabilities(texts)
    bf16 = Predictor.load(served_run / "model", precision="bf16")
    assert bf16.precision == "bf16"
    half = bf16.probabilities(texts)
    assert not np.array_equal(half, fp32)  # it really ran in bf16
    np.testing.assert_allclose(half, fp32, atol=0.03)


def test_serve_refuses_a_device_the_machine_lacks(served_run, capsys, monkeypatch):
    from tuneforge.cli import main

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["serve", str(served_run), "--no-auth", "--force", "--device", "cuda"]) == 2
    assert "not on this machine" in capsys.readouterr().err
    assert main(["serve", str(served_run), "--no-auth", "--force", "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
