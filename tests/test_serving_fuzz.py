"""Hostile input to every task's server (text classification, token classification, causal LM): schemathesis fuzzes
each endpoint from the app's own OpenAPI schema, in process (bodies that fit the schema and bodies that break it);
hand-written attacks (a 20 MB body, 10k nested lists, bytes that are not UTF-8, NaN, 10k texts, wrong content types);
and slow clients on raw sockets against a live `tuneforge serve`. Each gets a clear 4xx, never a 5xx or a hang.

    HF_HUB_OFFLINE=1 pytest -q -s tests/test_serving_fuzz.py   # -s prints the fuzz cases run per endpoint
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tuneforge.serving.app import ServeSettings, create_app, run_predictor
from tuneforge.serving.monitor import load_reference
from conftest import stop_process, wait_ready

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TASKS = ["text-classification", "token-classification", "causal-lm"]
CAP = 8                     # causal LM: max_tokens cap, so a fuzzed request generates little
EXAMPLES = 40               # per endpoint and generation mode (schema-valid, schema-breaking)
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, tiny_model_dir):
    from test_token_pipeline import _write_conll

    from tuneforge.config import parse_config
    from tuneforge.pipeline import run

    d = tmp_path_factory.mktemp("fuzz-ner")
    cfg = parse_config({"task": {"type": "token-classification"},
                        "data": {"path": str(_write_conll(d / "train.conll", 80, seed=0)), "val_fraction": 0.2,
                                 "test_fraction": 0.2},
                        "model": {"name": str(tiny_model_dir), "max_length": 16},
                        "train": {"method": "full", "epochs": 1, "batch_size": 16, "early_stopping_patience": 0},
                        "eval": {"bootstrap_samples": 10}, "output": {"dir": str(d / "out")}})
    run(cfg)
    return d / "out"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_llama_dir):
    from test_causal_lm_pipeline import pair_rows

    from tuneforge.config import parse_config
    from tuneforge.pipeline import run

    d = tmp_path_factory.mktemp("fuzz-lm")
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows(60)))
    cfg = parse_config({"task": {"type": "causal-lm", "max_new_tokens": 4, "samples_in_report": 0},
                        "data": {"path": str(d / "pairs.jsonl"), "val_fraction": 0.2, "test_fraction": 0.2},
                        "model": {"name": str(tiny_llama_dir), "max_length": 32},
                        "train": {"method": "full", "epochs": 1, "early_stopping_patience": 0},
                        "eval": {"bootstrap_samples": 10}, "output": {"dir": str(d / "assistant")}})
    run(cfg)
    return d / "assistant"


@pytest.fixture(params=TASKS)
def task_run(request):
    name = {"text-classification": "served_run", "token-classification": "token_run", "causal-lm": "lm_run"}
    return request.param, request.getfixturevalue(name[request.param])


def _app(run_dir, tmp_path, **overrides):
    settings = ServeSettings(run_dir=run_dir, api_key=KEY, monitor_url=f"sqlite:///{tmp_path / 'log.sqlite'}",
                             options={"max_tokens_cap": CAP}, **overrides)
    return create_app(settings, run_predictor(run_dir), reference=load_reference(run_dir))


# ------------------------------------------------------------------ fuzzing from the OpenAPI schema

def _served_model(case):
    """The served model's name, and a chat of turns with text that ends with the user's: what a request needs to reach
    generation (the rest stays fuzzed: the other fields, the roles, the texts themselves)."""
    if isinstance(case.body, dict):
        case.body["model"] = "assistant"
        messages = case.body.get("messages")
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            for m in messages:
                if not (isinstance(m.get("content"), str) and m["content"].strip()):
                    m["content"] = "cats"
            messages[-1]["role"] = "user"
    return case


def _fuzz(operation, mode, client) -> dict[int, int]:
    """Run up to EXAMPLES cases of one operation in one generation mode; every answer must be under 500. (No
    schema-breaking case exists for a lone string path parameter: a URL path is always a string.)"""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    statuses: dict[int, int] = {}
    strategy = operation.as_strategy(generation_mode=mode)
    if operation.path in OPENAI_ROUTES and mode.value == "positive":
        strategy = strategy.map(_served_model)  # a random model name is a 404 before anything else is looked at

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case):
        response = case.call(session=client, headers=AUTH)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                            f"{response.text[:500]}\n{case.as_curl_command()}")

    try:
        fuzz()
    except Unsatisfiable:
        assert not statuses and mode.value == "negative", (operation.label, mode)
    return dict(sorted(statuses.items()))


def test_fuzzed_requests_to_every_endpoint_never_get_a_5xx(task_run, tmp_path, record_property):
    from schemathesis import GenerationMode
    from schemathesis.python import asgi

    task, run_dir = task_run
    app = _app(run_dir, tmp_path)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/health", "/ready", "/metrics", "/v1/monitor", "/v1/predict"} <= paths
    if task == "causal-lm":
        assert {*OPENAI_ROUTES, "/v1/models", "/v1/models/{name}"} <= paths
    statuses = {}  # endpoint -> generation mode -> {status: cases}
    try:
        with asgi.get_client(app) as client:
            for op in operations:
                takes_input = bool(op.body) or any(True for _ in op.iter_parameters())
                modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if takes_input else [])
                statuses[f"{op.method.upper()} {op.path}"] = {m.value: _fuzz(op, m, client) for m in modes}
            assert client.get("/health").json() == {"status": "alive"}
            ok = client.post("/v1/predict", json={"texts": ["good film"]}, headers=AUTH)
            assert ok.status_code == 200, ok.text
    finally:
        asgi.shutdown_lifespans()
    counts = {endpoint: {mode: sum(by_status.values()) for mode, by_status in by_mode.items()}
              for endpoint, by_mode in statuses.items()}
    record_property("fuzz_cases", counts)
    print(f"\n{task}: fuzz cases per endpoint and mode, by status (none a 5xx): {json.dumps(statuses)}")
    for endpoint, by_mode in counts.items():
        assert by_mode["positive"] >= 1, (endpoint, by_mode)
        if "POST" in endpoint:  # a body to vary: the fuzzer really ran many cases, and some were answered
            assert by_mode["positive"] >= EXAMPLES // 2 and by_mode["negative"] >= EXAMPLES // 2, (endpoint, by_mode)
            assert 200 in statuses[endpoint]["positive"], (endpoint, statuses[endpoint])


# ------------------------------------------------------------------ hand-written attacks, in process

def _endpoints(task: str) -> list[tuple[str, dict]]:
    """Each POST endpoint of the task's server and a valid body for it."""
    out = [("/v1/predict", {"texts": ["good film"]})]
    if task == "causal-lm":
        out += [("/v1/chat/completions", {"model": "assistant", "messages": [{"role": "user", "content": "cats"}]}),
                ("/v1/completions", {"model": "assistant", "prompt": "cats"})]
    return out


def _assert_refused(r, path: str, status: int | None, *words: str) -> None:
    """A 4xx with the body the server uses on that route: {"detail"} on /v1/predict (and for the size and time limits,
    which answer before any route), OpenAI's {"error": {"message", ...}} on the OpenAI routes."""
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, (path, r.status_code, r.text[:300])
    body = r.json()
    message = body["error"]["message"] if path in OPENAI_ROUTES and "error" in body else body["detail"]
    assert isinstance(message, str) and all(w in message for w in words), (path, body)


def _bad_json_status(path: str) -> int:
    return 400 if path in OPENAI_ROUTES else 422


def test_hostile_bodies_get_a_clear_4xx_and_the_server_keeps_serving(task_run, tmp_path):
    task, run_dir = task_run
    nested = b"[" * 10_000 + b"]" * 10_000
    huge = b'{"texts": ["' + b"x" * 20_000_000 + b'"]}'
    with TestClient(_app(run_dir, tmp_path)) as c:
        for path, valid in _endpoints(task):
            post = lambda content, **headers: c.post(path, content=content, headers={**AUTH, **headers})  # noqa: E731
            bad = _bad_json_status(path)
            _assert_refused(post(huge), path, 413, "over the limit of 1000000 bytes", "--max-body-bytes")
            _assert_refused(post(iter([huge[:1_500_000]] * 2)), path, 413, "1000000 bytes")  # chunked: no Content-Length
            _assert_refused(post(nested), path, bad, "nested too deeply")
            _assert_refused(post(b'{"texts": ' + nested + b"}"), path, bad, "nested too deeply")
            _assert_refused(post(b'{"texts": ["\xff\xfe caf\xe9"]}'), path, bad, "not UTF-8")
            _assert_refused(post(b'{"texts": ["\\ud800 half a pair"]}'), path, bad, "lone surrogate")
            for constant in ("NaN", "Infinity", "-Infinity"):
                body = json.dumps(valid)[:-1] + f', "temperature": {constant}}}'
                _assert_refused(post(body.encode()), path, bad, f"{constant} is not a JSON value")
            _assert_refused(post(b""), path, None)
            _assert_refused(post(b"null"), path, None)
            _assert_refused(post(b'"texts"'), path, 422)
            _assert_refused(post(b"<texts><t>good</t></texts>", **{"content-type": "application/xml"}), path, bad)
            _assert_refused(c.post(path, files={"texts": ("a.txt", b"good")}, headers=AUTH), path, bad)
            _assert_refused(c.post(path, data={"texts": "good"}, headers=AUTH), path, bad)
            assert c.get(path, headers=AUTH).status_code == 405
        _assert_refused(c.post("/v1/predict", json={"texts": ["good"] * 10_000}, headers=AUTH), "/v1/predict", 422,
                        "10000 texts is over the limit of 64")
        # the body is read as JSON whatever the Content-Type says: `curl -d` (form-urlencoded) works as written
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            r = c.post("/v1/predict", content=b'{"texts": ["good"]}', headers={**AUTH, "content-type": content_type})
            assert r.status_code == 200, r.text
        if task == "causal-lm":
            many = [{"role": "user", "content": "cats"}] * 10_000
            _assert_refused(c.post("/v1/chat/completions", json={"model": "assistant", "messages": many}, headers=AUTH),
                            "/v1/chat/completions", 400, "maximum context length")
            _assert_refused(c.post("/v1/completions", json={"model": "assistant", "prompt": ["cats"] * 10_000},
                                   headers=AUTH), "/v1/completions", 422, "10000 prompts")
            # a tiny temperature made the probabilities NaN, a tiny top_p dropped every token (each was a 500, and
            # failed every request sharing the forward pass)
            for temperature, top_p in ((5e-324, 1.0), (1e-300, 1.0), (2.0, 1.0), (1.0, 5e-324), (1e-300, 5e-324)):
                r = c.post("/v1/completions", json={"model": "assistant", "prompt": "cats", "temperature": temperature,
                                                    "top_p": top_p, "seed": 1}, headers=AUTH)
                assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
        assert c.get("/health").json() == {"status": "alive"}
        for path, valid in _endpoints(task):
            assert c.post(path, json=valid, headers=AUTH).status_code == 200, path
        metrics = c.get("/metrics").text
    assert 'tuneforge_requests_total{endpoint="/v1/predict",status="413"} 2.0' in metrics  # the limits are counted too
    assert 'status="500"' not in metrics


# ------------------------------------------------------------------ slow and huge clients, live server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head)
    return s


def _headers(port: int, extra: str) -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def _reply(s: socket.socket, timeout: float) -> tuple[int, dict]:
    """The status and JSON body of the response on a raw socket (the server closes the connection after it)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
            if length and len(body) >= length[0]:
                break
    except ConnectionResetError:
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data[:200]
    return int(head.split()[1]), json.loads(body)


def test_slow_stalled_and_huge_clients_on_a_live_server(served_run, tmp_path):
    port = _free_port()
    env = {**os.environ, "TF_FUZZ_KEY": KEY, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(served_run), "--port", str(port), "--force",
                             "--api-key-env", "TF_FUZZ_KEY", "--monitor-url", f"sqlite:///{tmp_path / 'log.sqlite'}",
                             "--device", "cpu", "--precision", "fp32", "--body-timeout-s", "2",
                             "--max-body-bytes", "100000"], env=env, stdout=log, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5, trust_env=False)
    sockets = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, lambda: (tmp_path / "server.log").read_text())

        half_headers = _open(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        stalled = _open(port, _headers(port, "Content-Length: 50\r\n") + b'{"texts": [')  # never finishes its body
        trickle = _open(port, _headers(port, "Content-Length: 40\r\n"))
        sockets += [half_headers, stalled, trickle]
        t0 = time.monotonic()
        for i in range(6):  # one byte every 0.4 s: each arrives well within 2 s, the whole body does not
            trickle.sendall(b" ")
            # meanwhile everyone else is served at once
            assert http.get("/health").json() == {"status": "alive"}
            r = http.post("/v1/predict", json={"texts": [f"good great film {i}"]}, headers=AUTH)
            assert r.status_code == 200 and time.monotonic() - t0 < 10, r.text
            time.sleep(0.4)
        for s in (stalled, trickle):
            status, body = _reply(s, timeout=10)
            assert status == 408 and "did not arrive within 2 s" in body["detail"], (status, body)
        assert time.monotonic() - t0 < 10

        claims_huge = _open(port, _headers(port, "Content-Length: 20000000\r\n"))  # answered before any body is sent
        sockets.append(claims_huge)
        status, body = _reply(claims_huge, timeout=10)
        assert status == 413 and "100000 bytes" in body["detail"], body

        chunked = _open(port, _headers(port, "Transfer-Encoding: chunked\r\n"))
        sockets.append(chunked)
        try:
            for _ in range(20):  # 20 x 64 KiB: the server stops it after 100 kB
                chunked.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, body = _reply(chunked, timeout=10)
        assert status == 413 and "100000 bytes" in body["detail"], body

        assert http.get("/health").json() == {"status": "alive"}
        assert http.post("/v1/predict", json={"texts": ["good"]}, headers=AUTH).status_code == 200
        assert 'status="500"' not in http.get("/metrics").text
        assert proc.poll() is None
    finally:
        for s in sockets:
            s.close()
        http.close()
        stop_process(proc)
        log.close()
    server_log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in server_log and "Exception in ASGI" not in server_log, server_log[-3000:]
