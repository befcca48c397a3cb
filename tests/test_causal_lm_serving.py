"""The OpenAI-compatible server of a causal-LM run: a live `tuneforge serve` process on the tiny Llama run, driven by
the official `openai` client; and the batched generation engine on its own, without HTTP."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from test_causal_lm_pipeline import pair_rows
from conftest import stop_process, wait_ready

openai = pytest.importorskip("openai")

KEY = "change-me"  # as in the README examples, which a test runs
MODEL = "assistant"  # the run directory's name is the served model id
CAP, MAX_PROMPT = 200, 100


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_llama_dir):
    """A finished, promoted pairs run on the tiny Llama (answers 'cats fur', 'dogs bark', ...), in OUT/assistant."""
    from tuneforge.config import parse_config
    from tuneforge.pipeline import run

    d = tmp_path_factory.mktemp("lm-serve")
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows()))
    cfg = parse_config({"task": {"type": "causal-lm"},
                        "data": {"path": str(d / "pairs.jsonl"), "val_fraction": 0.15, "test_fraction": 0.15},
                        "model": {"name": str(tiny_llama_dir), "max_length": 32},
                        "train": {"method": "full", "epochs": 10, "learning_rate": 1e-2, "early_stopping_patience": 0},
                        "eval": {"bootstrap_samples": 20}, "output": {"dir": str(d / MODEL)}})
    metrics = run(cfg)
    assert metrics["promoted"] is True
    return d / MODEL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(lm_run, tmp_path_factory):
    """`tuneforge serve` in its own process. While `hold` exists its engine admits no new request (the test hook that
    makes overlaps deterministic)."""
    d = tmp_path_factory.mktemp("lm-server")
    port, hold = _free_port(), d / "hold"
    env = {**os.environ, "TUNEFORGE_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TUNEFORGE_TEST_HOLD_FILE": str(hold), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    log = open(d / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(lm_run), "--port", str(port), "--device", "cpu",
                             "--precision", "fp32", "--max-tokens-cap", str(CAP), "--max-prompt-tokens", str(MAX_PROMPT),
                             "--monitor-url", f"sqlite:///{d / 'log.sqlite'}"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, timeout=30, trust_env=False)
    try:
        wait_ready(base, proc, lambda: (d / "server.log").read_text())
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0,
                               http_client=openai.DefaultHttpxClient(trust_env=False))
        yield SimpleNamespace(client=client, http=http, hold=hold, log=d / "log.sqlite", run=lm_run)
    finally:
        stop_process(proc)
        log.close()


def _metric(server, name: str) -> float:
    for line in server.http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _wait_for(server, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while _metric(server, name) != value:
        if time.time() > deadline:
            raise AssertionError(f"{name} stayed at {_metric(server, name)}, expected {value}")
        time.sleep(0.05)


def _test_prompts(run) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())["samples"]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------ through the official client

def test_chat_streamed_chat_and_predict_give_the_same_greedy_text(server, capsys):
    from tuneforge.cli import main

    sample = _test_prompts(server.run)[0]
    assert main(["predict", str(server.run), "--json", "--text", sample["prompt"]]) == 0
    predicted = json.loads(capsys.readouterr().out)["completion"]
    assert predicted == sample["model"] == sample["reference"]  # the trained model knows its answers

    c = server.client
    reply = c.chat.completions.create(model=MODEL, messages=_user(sample["prompt"]), temperature=0, seed=5)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == predicted
    assert reply.usage.completion_tokens == 2 and reply.usage.total_tokens == reply.usage.prompt_tokens + 2

    chunks = list(c.chat.completions.create(model=MODEL, messages=_user(sample["prompt"]), temperature=0, seed=5,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == predicted
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2

    with server.http.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": MODEL, "messages": _user(sample["prompt"]), "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"

    assert server.http.post("/v1/predict", json={"texts": [sample["prompt"]]}, headers={"Authorization": f"Bearer {KEY}"}
                            ).json()["predictions"][0]["completion"] == predicted  # the old route, on the same engine


def test_models_lists_the_run_and_completions_continue_a_prompt(server):
    models = server.client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [(MODEL, "model", "tuneforge")]
    assert isinstance(models.data[0].created, int)
    assert server.client.models.retrieve(MODEL).id == MODEL

    done = server.client.completions.create(model=MODEL, prompt="tell me about dogs", max_tokens=3)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("stop", "length")
    assert 1 <= done.usage.completion_tokens <= 3
    streamed = server.client.completions.create(model=MODEL, prompt=["tell me about dogs"], max_tokens=3, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == done.choices[0].text


def test_a_wrong_key_is_an_authentication_error(server):
    bad = openai.OpenAI(base_url=str(server.client.base_url), api_key="wrong", max_retries=0,
                        http_client=openai.DefaultHttpxClient(trust_env=False))
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=MODEL, messages=_user("cats"))
    assert err.value.body["code"] == "invalid_api_key" and "Bearer" in err.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


LONG = " ".join(["cats"] * 120)   # > MAX_PROMPT tokens
MEDIUM = " ".join(["dogs"] * 80)  # fits MAX_PROMPT, but not with max_tokens CAP in the 256-token context

BAD_REQUESTS = [  # (kind of call, arguments, exception, words the message must hold, param)
    ("chat", {"model": "nope", "messages": _user("cats")}, "NotFoundError", ["'nope'", MODEL], "model"),
    ("chat", {"messages": []}, "UnprocessableEntityError", ["messages is empty"], "messages"),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "UnprocessableEntityError", ["role", "'tool'"], "messages.[0].role"),
    ("chat", {"messages": [{"role": "user", "content": "cats"}, {"role": "assistant", "content": "fur"}]},
     "UnprocessableEntityError", ["last message", "user"], "messages"),
    ("chat", {"messages": [{"role": "user", "content": " "}]}, "UnprocessableEntityError", ["content is empty"],
     "messages.[0].content"),
    ("chat", {"messages": _user("cats"), "max_tokens": CAP + 1}, "UnprocessableEntityError", [str(CAP), "--max-tokens-cap"],
     "max_tokens"),
    ("chat", {"messages": _user("cats"), "max_tokens": 0}, "UnprocessableEntityError", ["max_tokens"], "max_tokens"),
    ("chat", {"messages": _user("cats"), "n": 2}, "UnprocessableEntityError", ["n must be 1"], "n"),
    ("chat", {"messages": _user("cats"), "temperature": 3}, "UnprocessableEntityError", ["temperature"], "temperature"),
    ("chat", {"messages": _user("cats"), "stop": ["a", "b", "c", "d", "e"]}, "UnprocessableEntityError", ["stop"], "stop"),
    ("chat", {"messages": _user("cats"), "frequency_penalty": 0.5}, "UnprocessableEntityError", ["frequency_penalty"],
     "frequency_penalty"),
    ("chat", {"messages": _user(LONG)}, "BadRequestError", [f"limit of {MAX_PROMPT}", "--max-prompt-tokens"], "messages"),
    ("chat", {"messages": _user(MEDIUM), "max_tokens": CAP}, "BadRequestError", ["context length is 256"], "messages"),
    ("completion", {"prompt": ["cats", "dogs"]}, "UnprocessableEntityError", ["2 prompts"], "prompt"),
    ("completion", {"prompt": ""}, "UnprocessableEntityError", ["prompt is empty"], "prompt"),
]


def test_bad_requests_get_the_openai_error_naming_the_field_and_the_server_keeps_serving(server):
    for kind, args, error, words, param in BAD_REQUESTS:
        call = server.client.chat.completions.create if kind == "chat" else server.client.completions.create
        with pytest.raises(getattr(openai, error)) as err:
            call(**{"model": MODEL, **args})
        body = err.value.body
        assert body["type"] == "invalid_request_error" and body["param"] == param, (args, body)
        assert all(w in body["message"] for w in words), (args, body)
        if error == "BadRequestError":
            assert body["code"] == "context_length_exceeded"
    raw = server.http.post("/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and "JSON" in raw.json()["error"]["message"]
    missing = server.http.post("/v1/chat/completions", json={"model": MODEL}, headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "messages"
    assert server.http.get("/health").json() == {"status": "alive"}
    assert server.client.chat.completions.create(model=MODEL, messages=_user("tell me about fish")).choices[0].message.content
    _wait_for(server, "tuneforge_requests_in_flight", 0)


def test_a_client_gone_mid_stream_stops_its_generation(server):
    """Held, the request waits in the engine; the client reads the first chunk and leaves; the engine drops the row
    (cancelled, nothing generated, nothing in flight); a non-streamed request whose client times out goes the same way."""
    cancelled = _metric(server, 'tuneforge_completions_total{finish_reason="cancelled"}')
    generated = _metric(server, "tuneforge_completion_tokens_total")
    server.hold.touch()
    try:
        stream = server.client.chat.completions.create(model=MODEL, messages=_user("tell me about cats"), stream=True)
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        assert _metric(server, "tuneforge_requests_in_flight") == 1
        stream.close()
        _wait_for(server, "tuneforge_requests_in_flight", 0)
        with pytest.raises(httpx.TimeoutException):
            server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": _user("cats")},
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
        _wait_for(server, "tuneforge_requests_in_flight", 0)
    finally:
        server.hold.unlink()
    assert _metric(server, 'tuneforge_completions_total{finish_reason="cancelled"}') == cancelled + 2
    assert _metric(server, "tuneforge_completion_tokens_total") == generated
    reply = server.client.chat.completions.create(model=MODEL, messages=_user("tell me about birds"))
    assert reply.choices[0].message.content == "birds wings"


def test_two_concurrent_requests_share_a_forward_pass(server):
    """Both requests are queued while the engine is held (the in-flight gauge shows 2), then released into one wave:
    the batch-size histogram gets observations of 2 rows."""
    def shared() -> float:
        return _metric(server, "tuneforge_generation_batch_size_count") - \
            _metric(server, 'tuneforge_generation_batch_size_bucket{le="1.0"}')

    before, answers = shared(), {}

    def ask(topic: str) -> None:
        answers[topic] = server.client.chat.completions.create(model=MODEL, messages=_user(f"tell me about {topic}")
                                                               ).choices[0].message.content

    server.hold.touch()
    try:
        threads = [threading.Thread(target=ask, args=(t,)) for t in ("cats", "trees")]
        for t in threads:
            t.start()
        _wait_for(server, "tuneforge_requests_in_flight", 2)
    finally:
        server.hold.unlink()
    for t in threads:
        t.join(30)
    assert answers == {"cats": "cats fur", "trees": "trees leaves"}
    assert shared() >= before + 1


def test_completions_are_logged_with_the_signals_drift_compares(server):
    """A truncated completion is logged '(truncated)' with confidence 1; a complete one '' with completion tokens /
    max_tokens; the training-time reference profile has the same signals."""
    reference = json.loads((server.run / "model" / "reference_profile.json").read_text())
    assert reference["label"]["names"] == ["(empty)", "(truncated)", "(none)"] and "count" not in reference
    assert reference["confidence"]["shares"][1] == 1.0  # every test answer: 2 tokens of max_new_tokens 4 -> 0.5

    prompt = "tell me about cats 7"
    server.client.chat.completions.create(model=MODEL, messages=_user(prompt), max_tokens=1)
    server.client.chat.completions.create(model=MODEL, messages=_user(prompt))
    rows = sqlite3.connect(server.log).execute("SELECT input_chars, label, confidence, text FROM predictions "
                                               "ORDER BY ts DESC LIMIT 2").fetchall()
    assert rows == [(len(prompt), "", 0.5, None), (len(prompt), "(truncated)", 1.0, None)]  # newest first, no raw text
    ready = server.http.get("/ready").json()
    assert ready["model"] == MODEL and ready["precision"] == "fp32"


def test_readme_openai_examples_run_as_written(server, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("tuneforge serve runs/assistant")
    port = server.client.base_url.port
    curl = readme[start: readme.index("```", start)].split("\n", 1)[1].replace("localhost:8000", f"127.0.0.1:{port}")
    assert f'"model": "{MODEL}"' in curl
    if shutil.which("curl"):
        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "NO_PROXY": "*", "no_proxy": "*"})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["choices"][0]["message"]["content"]
    start = readme.index("```python\nfrom openai import OpenAI") + len("```python\n")
    snippet = readme[start: readme.index("```", start)].replace("localhost:8000", f"127.0.0.1:{port}")
    snippet = snippet.replace('api_key="change-me")', 'api_key="change-me", http_client=openai.DefaultHttpxClient(trust_env=False))')
    exec(compile(snippet, "README.md", "exec"), {"openai": openai})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0] == printed[1] != ""  # the reply, then the same text streamed


# ------------------------------------------------------------------ the engine, without HTTP

@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    """The untrained tiny Llama: its greedy output runs on for many tokens."""
    import torch

    from tuneforge.tasks.causal_lm.generate import CompletionPredictor
    from tuneforge.tasks.causal_lm.model import load_causal_lm, load_lm_tokenizer

    return CompletionPredictor(load_causal_lm(tiny_llama_dir), load_lm_tokenizer(tiny_llama_dir), {"chat_template": True},
                               torch.device("cpu"))


PROMPTS = ["cats", "tell me about the sun and the moon please", "what about dogs"]


def test_greedy_batch_equals_each_prompt_alone_and_model_generate(base):
    from tuneforge.tasks.causal_lm.engine import Decoder, Params, Row, generate_rows
    from tuneforge.tasks.causal_lm.generate import generate_ids

    decoder = Decoder.of(base)
    prompts = [base.prompt_of(_user(p)) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    alone = [Row(p, Params(16)) for p in prompts]
    for r in alone:
        generate_rows(decoder, [r])
    sizes = []
    together = [Row(p, Params(16)) for p in prompts]
    results = generate_rows(decoder, together, on_forward=sizes.append)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.tokens for r in together] == [generate_ids(base.model, [p], base.pad_id, base.stops, 16)[0] for p in prompts]
    assert sizes == [3] * 16  # one prefill and 15 steps for all three
    assert [r["finish_reason"] for r in results] == ["length"] * 3 and all(r["completion_tokens"] == 16 for r in results)


def test_a_row_joining_a_running_wave_generates_what_it_would_alone(base):
    from tuneforge.tasks.causal_lm.engine import Decoder, Params, Row, generate_rows, join, prefill, step

    decoder = Decoder.of(base)
    prompts = [base.prompt_of(_user(p)) for p in PROMPTS]
    alone = [generate_rows(decoder, [Row(p, Params(12))])[0]["completion"] for p in prompts]
    first, late = Row(prompts[1], Params(12)), [Row(prompts[0], Params(12)), Row(prompts[2], Params(12))]
    wave = prefill(decoder, [first])
    for _ in range(5):
        wave = step(decoder, wave)
    wave = join(wave, prefill(decoder, late))  # a narrower cache (shorter prompts) merged into a running one
    while wave is not None:
        wave = step(decoder, wave)
    assert [late[0].result["completion"], first.result["completion"], late[1].result["completion"]] == alone


def test_stop_strings_cut_the_text_and_max_tokens_ends_with_length(base):
    from tuneforge.tasks.causal_lm.engine import Decoder, Params, Row, generate_rows

    decoder = Decoder.of(base)
    prompt = base.prompt_of(_user(PROMPTS[0]))
    full = generate_rows(decoder, [Row(prompt, Params(12))])[0]
    assert full["finish_reason"] == "length" and full["completion_tokens"] == 12
    stop = full["completion"].split()[3]
    pieces = []
    cut = generate_rows(decoder, [Row(prompt, Params(12, stop=(stop, "never said")), on_text=pieces.append)])[0]
    assert cut["finish_reason"] == "stop"
    assert cut["completion"] == full["completion"][: full["completion"].find(stop)].strip()
    assert "".join(pieces) == cut["completion"] and stop not in "".join(pieces)
    short = generate_rows(decoder, [Row(prompt, Params(3))])[0]
    assert short["finish_reason"] == "length" and short["completion_tokens"] == 3
    assert full["completion"].startswith(short["completion"])


def test_a_seed_repeats_a_sampled_completion(base):
    from tuneforge.tasks.causal_lm.engine import Decoder, Params, Row, generate_rows

    decoder = Decoder.of(base)
    prompts = [base.prompt_of(_user(p)) for p in PROMPTS]

    def sample(seed: int, streamed: bool = False) -> list[str]:
        pieces: list[str] = []
        rows = [Row(p, Params(16, temperature=1.0, top_p=0.9, seed=seed), on_text=pieces.append if streamed else None)
                for p in prompts]
        texts = [r["completion"] for r in generate_rows(decoder, rows)]
        return texts

    assert sample(7) == sample(7) == sample(7, streamed=True)
    assert sample(7) != sample(8)
    greedy = generate_rows(decoder, [Row(prompts[0], Params(16))])[0]["completion"]
    assert sample(7)[0] != greedy


def test_a_cancelled_row_leaves_the_wave_and_the_others_go_on(base):
    from tuneforge.tasks.causal_lm.engine import Decoder, Params, Row, generate_rows

    decoder = Decoder.of(base)
    prompts = [base.prompt_of(_user(p)) for p in PROMPTS[:2]]
    alone = generate_rows(decoder, [Row(prompts[1], Params(10))])[0]
    gone, sizes = Row(prompts[0], Params(10)), []

    def forward(rows: int) -> None:
        sizes.append(rows)
        if len(sizes) == 2:  # the client leaves during the first step, after the prefill gave it a token
            gone.cancel()

    results = generate_rows(decoder, [gone, Row(prompts[1], Params(10))], on_forward=forward)
    assert results[0]["finish_reason"] == "cancelled" and results[0]["completion_tokens"] == 1
    assert results[1] == {**alone, **{k: results[1][k] for k in ("ttft_s", "tokens_per_s", "seconds")}}
    assert sizes == [2, 2] + [1] * 8  # it left the batch after that step


def test_engine_thread_batches_waiting_rows_lets_a_newcomer_join_and_survives_a_failed_pass(base):
    from tuneforge.tasks.causal_lm.engine import Decoder, Engine, Params, Row, generate_rows

    decoder = Decoder.of(base)
    prompts = [base.prompt_of(_user(p)) for p in PROMPTS]
    alone = [generate_rows(decoder, [Row(p, Params(8))])[0]["completion"] for p in prompts]
    held, sizes, done = [True], [], threading.Semaphore(0)
    engine = Engine(decoder, max_batch_size=8, max_wait_ms=0, on_forward=sizes.append, hold=lambda: held[0])
    engine.start()
    try:
        rows = [Row(p, Params(8), on_done=lambda r: done.release()) for p in prompts[:2]]
        for r in rows:
            engine.submit(r)
        time.sleep(0.05)
        assert sizes == []  # held: nothing admitted
        held[0] = False
        for _ in rows:
            assert done.acquire(timeout=10)
        assert sizes == [2] * 8 and [r.result["completion"] for r in rows] == alone[:2]

        sizes.clear()
        late = Row(prompts[2], Params(8), on_done=lambda r: done.release())
        first = Row(prompts[0], Params(8), on_done=lambda r: done.release())
        def forward(rows: int) -> None:
            sizes.append(rows)
            if len(sizes) == 3:  # a request arrives while the first one is generating
                engine.submit(late)

        engine.on_forward = forward
        engine.submit(first)
        for _ in range(2):
            assert done.acquire(timeout=10)
        # first: prefill + 2 steps alone; then the newcomer's prefill; 5 steps together; the newcomer's last 2 alone
        assert sizes == [1, 1, 1, 1, 2, 2, 2, 2, 2, 1, 1]
        assert [first.result["completion"], late.result["completion"]] == [alone[0], alone[2]]

        def out_of_memory(*args, **kwargs):
            raise RuntimeError("out of memory")

        engine.on_forward = None
        decoder.forward = out_of_memory  # an instance attribute over the method
        broken = Row(prompts[0], Params(8), on_done=lambda r: done.release())
        engine.submit(broken)
        assert done.acquire(timeout=10)
        assert broken.result["finish_reason"] == "error" and "out of memory" in broken.result["error"]
        del decoder.forward
        again = Row(prompts[0], Params(8), on_done=lambda r: done.release())
        engine.submit(again)
        assert done.acquire(timeout=10) and again.result["completion"] == alone[0]
    finally:
        engine.stop()


def test_text_goes_out_whole_characters_and_holds_back_a_possible_stop():
    from tuneforge.tasks.causal_lm.engine import Params, Row, visible_text

    decoder = SimpleNamespace(tokenizer=SimpleNamespace(decode=lambda pieces, skip_special_tokens: "".join(pieces)))
    row = Row([1], Params(10, stop=("END",)))
    for pieces, expected in ([[" caf", "\ufffd"], "caf"], [[" caf", "é"], "café"], [[" café", " E"], "café"],
                             [[" café", " EN"], "café"], [[" café", " ENT"], "café ENT"]):
        row.tokens = pieces
        assert visible_text(decoder, row, final=False) == (expected, False), pieces
    row.tokens = [" café", " END", " more"]
    assert visible_text(decoder, row, final=False) == ("café", True)


def test_bf16_check_compares_greedy_test_outputs_with_fp32(lm_run):
    from tuneforge.tasks.causal_lm.generate import CompletionPredictor
    from tuneforge.tasks.causal_lm.serve import precision_check

    predictor = CompletionPredictor.load(lm_run / "model", "cpu", "bf16")
    check = precision_check(predictor, lm_run)
    assert check == {"precision": "bf16", "equal": 3, "of": 3, "max_tokens": 4}  # the tiny model's answers are clear-cut
    assert CompletionPredictor.load(lm_run / "model", "cpu", "auto").precision in ("bf16", "fp32")


def test_observe_labels_a_completion_by_how_it_ended():
    from tuneforge.tasks.behaviour import get_task

    task = get_task("causal-lm")
    assert task.observe({"completion": "", "finish_reason": "stop", "completion_tokens": 0, "max_tokens": 8}) == (["(empty)"], 0.0)
    assert task.observe({"completion": "a b", "finish_reason": "length", "completion_tokens": 8, "max_tokens": 8}) == \
        (["(truncated)"], 1.0)
    assert task.observe({"completion": "a", "finish_reason": "stop", "completion_tokens": 2, "max_tokens": 8}) == ([], 0.25)
