"""Serving through FastAPI's TestClient on a tiny model, the micro-batcher, drift, and one real server process."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tuneforge.serving.app import ServeSettings, run_predictor, create_app, require_promoted
from tuneforge.serving.batcher import MicroBatcher
from tuneforge.serving.monitor import load_reference

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _client(run_dir, tmp_path, **overrides):
    settings = ServeSettings(run_dir=run_dir, api_key=KEY, monitor_url=f"sqlite:///{tmp_path / 'log.sqlite'}",
                             drift_min_rows=20, **overrides)
    return TestClient(create_app(settings, run_predictor(run_dir), reference=load_reference(run_dir)))


def test_endpoints_auth_and_predictions(served_run, tmp_path):
    with _client(served_run, tmp_path) as c:
        assert c.get("/health").json() == {"status": "alive"}
        assert c.get("/ready").json() == {"status": "ready"}
        assert c.post("/v1/predict", json={"texts": ["good"]}).status_code == 401
        assert c.post("/v1/predict", json={"texts": ["good"]}, headers={"Authorization": "Bearer nope"}).status_code == 401
        texts = ["good great film", "awful dull", "the plot was tedious and flat"]
        r = c.post("/v1/predict", json={"texts": texts}, headers=AUTH)
        assert r.status_code == 200
        preds = r.json()["predictions"]
    # the served answers are the run's model's, row for row (the predictor loaded directly, no server)
    from tuneforge.tasks.classification.predictor import Predictor

    expected = Predictor.load(served_run / "model").predict(texts)
    assert [p["label"] for p in preds] == [e["label"] for e in expected]
    for p, e in zip(preds, expected):
        assert p["probabilities"] == pytest.approx(e["probabilities"], abs=1e-6)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-5


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
    # one request at a time: each of the 3 authorised requests is its own forward pass of 2 texts (the 401 makes none)
    assert _sample(text, "tuneforge_batch_size_count") == 3 and _sample(text, "tuneforge_batch_size_sum") == 6
    assert _sample(text, 'tuneforge_batch_size_bucket{le="1.0"}') == 0 and _sample(text, 'tuneforge_batch_size_bucket{le="2.0"}') == 3
    assert _sample(text, "tuneforge_prediction_confidence_count") == 6


def _sample(metrics_text: str, name: str) -> float:
    """The value of one Prometheus sample, by its full name (with labels, if any)."""
    values = [line.rsplit(" ", 1)[1] for line in metrics_text.splitlines() if line.rsplit(" ", 1)[0] == name]
    assert len(values) == 1, (name, values)
    return float(values[0])


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


class HeldPredict:
    """A predict function whose forward passes the test finishes by hand: each pass records its texts, signals that it
    began, then blocks until the test releases it. Timing plays no part in which texts share a pass."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self._begun = threading.Semaphore(0)
        self._allowed = threading.Semaphore(0)

    def __call__(self, texts: list[str]) -> list[dict]:
        self.calls.append(list(texts))
        self._begun.release()
        if not self._allowed.acquire(timeout=30):
            raise TimeoutError("the test never released this forward pass")
        if self.fail_on in texts:
            raise RuntimeError(f"model failed on {self.fail_on}")
        return [{"label": t, "probabilities": {}} for t in texts]

    async def begun(self) -> None:
        """Wait (bounded) until the next forward pass has started and holds its texts."""
        assert await asyncio.to_thread(self._begun.acquire, True, 10), "no forward pass began"

    def release(self, passes: int = 1) -> None:
        self._allowed.release(passes)


def _run_batcher(scenario, predict, **kwargs):
    async def main():
        b = MicroBatcher(predict, **kwargs)
        b.start()
        try:
            return await asyncio.wait_for(scenario(b), 30)
        finally:
            predict.release(100)  # never leave the model thread blocked
            await b.stop()

    return asyncio.run(main())


def test_micro_batcher_groups_requests_queued_during_a_pass_into_the_next_one():
    predict = HeldPredict()

    async def scenario(b):
        first = asyncio.ensure_future(b.submit(["a0"]))
        await predict.begun()  # a0's pass is under way and held
        queued = [asyncio.ensure_future(b.submit([f"q{i}", f"r{i}"])) for i in range(5)]
        await asyncio.sleep(0)  # let the five submissions reach the queue
        predict.release()
        answer_first = await first
        await predict.begun()
        predict.release()
        return answer_first, await asyncio.gather(*queued)

    answer_first, answers = _run_batcher(scenario, predict, max_batch_size=64, max_wait_ms=0)
    assert predict.calls == [["a0"], [t for i in range(5) for t in (f"q{i}", f"r{i}")]]
    assert [r["label"] for r in answer_first] == ["a0"]
    assert [[r["label"] for r in a] for a in answers] == [[f"q{i}", f"r{i}"] for i in range(5)]  # each its own answers


def test_idle_server_answers_a_lone_request_without_waiting_to_fill():
    predict = HeldPredict()

    async def scenario(b):
        # max_wait is ten minutes: a batcher that waited to fill would not begin these passes within the bounded waits
        answers = []
        for text in ("alone", "next"):  # the second comes after the first is answered: the server is idle again
            pending = asyncio.ensure_future(b.submit([text]))
            await predict.begun()
            predict.release()
            answers.append(await pending)
        return answers

    answers = _run_batcher(scenario, predict, max_batch_size=64, max_wait_ms=600_000)
    assert predict.calls == [["alone"], ["next"]]
    assert [a[0]["label"] for a in answers] == ["alone", "next"]


def test_under_load_a_batch_waits_for_more_requests_until_it_is_full():
    predict = HeldPredict()

    async def scenario(b):
        first = asyncio.ensure_future(b.submit(["a"]))
        await predict.begun()
        queued = [asyncio.ensure_future(b.submit([t])) for t in ("b", "c")]
        await asyncio.sleep(0)
        predict.release()
        await first  # a is answered; under load, the next batch holds b and c and waits (max_wait: ten minutes)
        late = [asyncio.ensure_future(b.submit([t])) for t in ("d", "e")]  # arrive while it waits; e fills it
        await predict.begun()
        assert predict.calls == [["a"], ["b", "c", "d", "e"]]  # checked before release: a batcher that did not wait fails here
        predict.release()
        return await asyncio.gather(*queued, *late)

    answers = _run_batcher(scenario, predict, max_batch_size=4, max_wait_ms=600_000)
    assert [a[0]["label"] for a in answers] == ["b", "c", "d", "e"]


def test_micro_batcher_respects_max_batch_size():
    predict = HeldPredict()

    async def scenario(b):
        first = asyncio.ensure_future(b.submit(["a0"]))
        await predict.begun()
        queued = [asyncio.ensure_future(b.submit([f"q{i}"])) for i in range(7)]
        await asyncio.sleep(0)
        predict.release(4)  # a0's pass, then every later pass runs straight through
        return [await first] + await asyncio.gather(*queued)

    answers = _run_batcher(scenario, predict, max_batch_size=3, max_wait_ms=0)
    assert predict.calls == [["a0"], ["q0", "q1", "q2"], ["q3", "q4", "q5"], ["q6"]]
    assert [a[0]["label"] for a in answers] == ["a0"] + [f"q{i}" for i in range(7)]


def test_micro_batcher_answers_every_waiting_request_when_predict_fails_and_keeps_serving():
    predict = HeldPredict(fail_on="boom")

    async def scenario(b):
        first = asyncio.ensure_future(b.submit(["a"]))
        await predict.begun()
        doomed = [asyncio.ensure_future(b.submit(texts)) for texts in (["boom"], ["x", "y"])]  # share the failing pass
        await asyncio.sleep(0)
        predict.release()
        answer_first = await first
        await predict.begun()
        predict.release()
        errors = await asyncio.gather(*doomed, return_exceptions=True)
        after = asyncio.ensure_future(b.submit(["after"]))
        await predict.begun()
        predict.release()
        return answer_first, errors, await after

    answer_first, errors, after = _run_batcher(scenario, predict, max_batch_size=64, max_wait_ms=0)
    assert predict.calls == [["a"], ["boom", "x", "y"], ["after"]]
    assert [r["label"] for r in answer_first] == ["a"]
    assert [type(e) for e in errors] == [RuntimeError, RuntimeError] and "boom" in str(errors[1])
    assert [r["label"] for r in after] == ["after"]


def test_micro_batcher_skips_requests_that_timed_out_while_queued():
    predict = HeldPredict()

    async def scenario(b):
        first = asyncio.ensure_future(b.submit(["A"]))
        await predict.begun()  # A's forward pass is held until the test releases it
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.submit(["B"]), 0.05)  # gives up while queued behind A
        later = asyncio.ensure_future(b.submit(["C"]))
        await asyncio.sleep(0)
        predict.release()
        answer_first = await first
        await predict.begun()
        predict.release()
        return [answer_first, await later]

    answers = _run_batcher(scenario, predict, max_batch_size=64, max_wait_ms=0)
    assert [a[0]["label"] for a in answers] == ["A", "C"]
    assert predict.calls == [["A"], ["C"]]  # no forward pass spent on B


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
    from conftest import wait_ready

    port = _free_port()
    env = {**os.environ, "TF_TEST_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(served_run), "--port", str(port), "--force",
                             "--api-key-env", "TF_TEST_KEY", "--monitor-url", f"sqlite:///{tmp_path / 'log.sqlite'}",
                             "--max-wait-ms", "20", "--device", "cpu", "--precision", "fp32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, lambda: proc.stdout.read1().decode())

        from conftest import make_rows
        from tuneforge.tasks.classification.predictor import Predictor

        texts = [r["text"] for r in make_rows(128, seed=11)]

        def call(i):
            return httpx.post(f"{base}/v1/predict", json={"texts": texts[2 * i:2 * i + 2]}, headers=AUTH, timeout=30)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(call, range(64)))
        assert [r.status_code for r in responses] == [200] * 64
        # however the concurrent requests were grouped, each got the answers for its own two texts, in order
        expected = Predictor.load(served_run / "model").predict(texts)
        served = [p for r in responses for p in r.json()["predictions"]]
        assert [p["label"] for p in served] == [e["label"] for e in expected]
        for p, e in zip(served, expected):
            assert p["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)
        # every text went through exactly one forward pass; how many passes depends on timing (the grouping itself is
        # pinned down by the MicroBatcher tests above)
        metrics = httpx.get(f"{base}/metrics").text
        assert _sample(metrics, "tuneforge_batch_size_sum") == 128
        assert _sample(metrics, 'tuneforge_requests_total{endpoint="/v1/predict",status="200"}') == 64
    finally:
        proc.terminate()
        proc.wait(10)


def test_predictor_in_bf16_agrees_with_fp32(served_run):
    from conftest import make_rows
    from tuneforge.tasks.classification.predictor import Predictor

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


def test_the_model_is_loaded_in_a_thread_that_ends_and_served_from_one_thread(tmp_path):
    """Loading and the start-up hooks run in a thread of their own that has ended before the first request (a thread
    that ran torch ops keeps OpenMP workers; more of them than cores slow every op); every batch runs in the one
    batcher thread."""
    seen = {"load": [], "hook": [], "predict": set()}

    def predict(texts):
        seen["predict"].add(threading.current_thread())
        return [{"label": "a", "probabilities": {"a": 1.0}} for _ in texts]

    def load():
        seen["load"].append(threading.current_thread())
        return predict, ["a"], lambda r: (["a"], 1.0)

    settings = ServeSettings(run_dir=tmp_path, api_key=None, monitor_url=f"sqlite:///{tmp_path / 'log.sqlite'}")
    app = create_app(settings, load)
    with TestClient(app) as c:
        loader = seen["load"][0]
        assert loader is not threading.main_thread() and loader.name.startswith("tuneforge-load")
        assert not loader.is_alive()  # gone, with any OpenMP workers it had
        for k in range(3):
            assert c.post("/v1/predict", json={"texts": [f"t{k}", "u"]}).status_code == 200
    assert len(seen["predict"]) == 1 and next(iter(seen["predict"])).name.startswith("tuneforge-model")
