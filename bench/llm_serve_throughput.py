"""LLM serving throughput: `tuneforge serve`'s OpenAI chat API against the server a user writes by hand (FastAPI calling
`model.generate` once per request) and against `transformers serve`, with and without --continuous-batching.

    .venv/bin/python bench/llm_serve_throughput.py [RUN_DIR] [--levels 1,8,32] [--rounds 3] [--max-tokens 64] [--soak 500]
    .venv/bin/python bench/llm_serve_throughput.py --smoke     # a tiny random Llama run built on the fly -> /tmp

Target (issues #12, #25): >= 3x the hand-written server's completion tokens/s at 8 concurrent clients, on chat answers
(runs/assistant) and on one-word answers to long shared instructions (runs/sms_triage): `make bench-serve` runs both.

RUN_DIR is a finished causal-LM run (default runs/assistant: `tuneforge run examples/assistant.yaml`). Every server loads the
same RUN_DIR/model and runs as its own process on a loopback port; all are up at once and take turns, level by level,
round after round (the order reversed every other round; medians reported; each round's ratio is paired, since this
VM's speed drifts over minutes). Every request is the same for all: a streaming chat completion
(`stream_options.include_usage`) of one of the run's test prompts (its test split rebuilt from RUN_DIR/config.yaml and
checked against the split's sha256 in run.json), the same prompt order, `max_tokens`, temperature 0 (greedy), and the
same `Authorization: Bearer` header (only tuneforge checks it). The load generator is asyncio with one persistent
HTTP/1.1 connection per client, hand-rolled so it takes little of the CPU the servers share; per level it sends
max(clients x --requests-per-client, --min-requests) requests from a shared queue and starts none after --level-seconds.

Reported per server and level: completion tokens/s (the sum of usage.completion_tokens over the level's wall time;
counted content chunks where a server sends no usage), text tokens/s (the returned texts re-tokenized by the run's
tokenizer after the level: one count for all, since transformers serve's usage counts the end-of-turn token and the
others' do not; the ratios use it), p50 / p99 time to first token (from sending a request to the first SSE chunk
whose delta has non-empty content), p50 / p99 latency, errors, and the CPU seconds the server used and the idle
servers used meanwhile (they should use none). Before the rounds, the first prompts' greedy completions of each
server are compared with the hand-written server's (bf16 can change a close greedy choice).

The contenders:
  hand_written             AutoModelForCausalLM + AutoTokenizer loaded once, `apply_chat_template(messages,
                           add_generation_prompt=True)`, `generate(max_new_tokens=..., do_sample=False)`, a plain `def`
                           endpoint (FastAPI runs it in its thread pool, so concurrent requests generate side by side
                           in threads); `stream: true` through TextIteratorStreamer and a generate thread (the streamer
                           sends whole words, so its first chunk comes at the first word's end).
  tuneforge                `tuneforge serve RUN_DIR --api-key-env ... --force` at its default precision (bf16 autocast
                           where the CPU has fast bf16; --tuneforge-precision fp32 for the peers' fp32).
  transformers_serve       `transformers serve RUN_DIR/model --device PEER_DEVICE` (one request at a time).
  transformers_serve_cb    the same with --continuous-batching (paged attention, sdpa on CPU; its cache is sized from
                           the machine's total RAM: ~9.6 GB RSS on a 24 GB VM even for a tiny model; see
                           --cb-max-memory-percent). A contender that will not start or answer here is recorded with its
                           error text instead of figures.
Then a soak of --soak chat requests at 16 clients against tuneforge (streaming and not, alternately): errors and the
server's RSS (/proc/PID/status VmRSS) after every 100 requests, and its trend after the warm-up (the first 40% of the
requests, in which the KV cache's working set, up to ~150 MB for 16 rows of SmolLM2, is first reached): the least-squares
slope in MB per 100 requests over the rest. The results JSON is rewritten after every level.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import harness  # bench/harness.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results_llm_serve_throughput.json"
TARGET_RATIO, TARGET_CLIENTS = 3.0, 8
KEY_ENV = "TUNEFORGE_BENCH_API_KEY"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
AGREEMENT_PROMPTS = 4

HAND_WRITTEN = '''
import json, sys, threading, time, uuid

import torch
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

model_dir, port, dtype, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
print("hand-written server: model on", model.device, model.dtype, flush=True)
eos = model.generation_config.eos_token_id
eos = set(eos if isinstance(eos, list) else [eos])
app = FastAPI()


def n_tokens(new_ids):  # generated tokens before the end of turn (the end-of-turn token itself not counted)
    return next((i for i, t in enumerate(new_ids) if t in eos), len(new_ids))


def chunk(rid, delta, finish=None, usage=None):
    c = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": "hand-written",
         "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        c["usage"] = usage
    return "data: " + json.dumps(c) + "\\n\\n"


@app.get("/ready")
def ready():
    return {"ok": True}


@app.get("/v1/models")
def models():
    return {"object": "list", "data": [{"id": "hand-written", "object": "model", "created": 0, "owned_by": "me"}]}


@app.post("/v1/chat/completions")
def chat(body: dict):
    inputs = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt").to(device)
    n_prompt, max_tokens = inputs["input_ids"].shape[1], body.get("max_tokens") or 64
    kwargs = dict(**inputs, max_new_tokens=max_tokens, do_sample=False)
    rid = "chatcmpl-" + uuid.uuid4().hex
    if not body.get("stream"):
        with torch.no_grad():
            new = model.generate(**kwargs)[0, n_prompt:].tolist()
        n = n_tokens(new)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": "hand-written",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": tokenizer.decode(new[:n], skip_special_tokens=True)},
                             "finish_reason": "length" if n >= max_tokens else "stop"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    out = {}

    def work():
        with torch.no_grad():
            out["ids"] = model.generate(**kwargs, streamer=streamer)[0, n_prompt:].tolist()

    thread = threading.Thread(target=work)
    thread.start()

    def events():
        yield chunk(rid, {"role": "assistant", "content": ""})
        for text in streamer:
            if text:
                yield chunk(rid, {"content": text})
        thread.join()
        n = n_tokens(out["ids"])
        yield chunk(rid, {}, "length" if n >= max_tokens else "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            yield chunk(rid, None, usage={"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})
        yield "data: [DONE]\\n\\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
'''


# ------------------------------------------------------------------ the load generator

async def _exchange(reader, writer, host: str, path: str, body: bytes, key: str) -> dict:
    """One POST on an open HTTP/1.1 keep-alive connection; the answer read as SSE (chunked or not) or as JSON."""
    t0 = time.perf_counter()
    writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), host.encode(), key.encode(), len(body), body))
    lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
    headers = {k.strip().lower(): v.strip().lower() for k, v in (x.split(b":", 1) for x in lines[1:] if b":" in x)}
    r = {"status": int(lines[0].split(b" ", 2)[1]), "ttft": None, "tokens": None, "prompt_tokens": None, "chunks": 0,
         "text": "", "done": False, "finish": None, "error": None, "close": headers.get(b"connection") == b"close"}
    buf = b""

    def feed(data: bytes, last: bool = False) -> None:
        nonlocal buf
        buf = (buf + data).replace(b"\r\n", b"\n")
        *events, buf = buf.split(b"\n\n")
        if last and buf.strip():
            events.append(buf)
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        r["done"] = True
                    elif payload:
                        take(json.loads(payload))

    def take(obj: dict) -> None:
        if "error" in obj:
            r["error"] = str(obj["error"])[:300]
        for choice in obj.get("choices") or []:
            content = (choice.get("delta") or choice.get("message") or {}).get("content")
            if content:
                r["ttft"] = r["ttft"] or time.perf_counter() - t0
                r["chunks"] += 1
                r["text"] += content
            r["finish"] = choice.get("finish_reason") or r["finish"]
        if obj.get("usage"):
            r["tokens"], r["prompt_tokens"] = obj["usage"].get("completion_tokens"), obj["usage"].get("prompt_tokens")

    if b"content-length" in headers:
        data = await reader.readexactly(int(headers[b"content-length"]))
        if r["status"] != 200:
            r["error"] = data[:300].decode(errors="replace")
        elif headers.get(b"content-type", b"").startswith(b"text/event-stream"):
            feed(data, last=True)
        else:
            take(json.loads(data))
            r["ttft"] = r["ttft"] or time.perf_counter() - t0  # not streamed: the first token comes with the last
    elif headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            data = (await reader.readexactly(size + 2))[:-2]
            if r["status"] == 200:
                feed(data)
            else:
                r["error"] = ((r["error"] or "") + data.decode(errors="replace"))[:300]
        feed(b"", last=True)
    else:  # neither: the body ends with the connection
        feed(await reader.read(), last=True)
        r["close"] = True
    r["latency"] = time.perf_counter() - t0
    r["ok"] = r["status"] == 200 and not r["error"] and (r["done"] or r["finish"] is not None)
    if r["status"] != 200 and not r["error"]:
        r["error"] = f"HTTP {r['status']}"
    return r


async def _load(url: str, bodies: list[bytes], clients: int, requests: int, key: str, seconds: float,
                timeout: float) -> tuple[list[dict], float]:
    """`requests` POSTs from a shared queue by `clients` connections; none starts after `seconds`. (results, wall s)"""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    if host.strip("[]") not in LOOPBACK:
        raise ValueError(f"{url}: the load generator only talks to loopback addresses")
    queue, results = list(range(requests))[::-1], []
    t0 = time.perf_counter()

    async def client() -> None:
        conn = None
        while queue and time.perf_counter() - t0 < seconds:
            i = queue.pop()
            try:
                conn = conn or await asyncio.open_connection(host.strip("[]"), int(port))
                r = await asyncio.wait_for(_exchange(*conn, f"{host}:{port}", path, bodies[i % len(bodies)], key), timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError) as err:
                r = {"ok": False, "status": 0, "error": f"{type(err).__name__}: {err}"[:300], "close": True}
            r["index"] = i
            results.append(r)
            if r["close"] and conn:  # a dropped or closed connection: the next request opens a fresh one
                conn[1].close()
                conn = None
        if conn:
            conn[1].close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return sorted(results, key=lambda r: r["index"]), time.perf_counter() - t0


def _summary(results: list[dict], wall: float, clients: int, tokenizer) -> dict:
    ok = [r for r in results if r["ok"]]
    by_usage = all(r["tokens"] is not None for r in ok)
    tokens = sum(r["tokens"] if by_usage else r["chunks"] for r in ok)
    # the same count for every server: usage differs by whether it counts the end-of-turn token (transformers serve does)
    text_tokens = sum(len(tokenizer(r["text"].strip(), add_special_tokens=False)["input_ids"]) for r in ok)

    def ms(key: str, q: int) -> float | None:
        values = [r[key] * 1000 for r in ok if r[key] is not None]
        return round(float(np.percentile(values, q)), 1) if values else None

    errors = [r["error"] for r in results if not r["ok"]]
    return {"clients": clients, "requests": len(results), "errors": len(errors), "wall_s": round(wall, 2),
            "completion_tokens": tokens, "tokens_counted_by": "usage" if by_usage else "content chunks",
            "tokens_per_s": round(tokens / wall, 2) if wall else 0.0, "text_tokens": text_tokens,
            "text_tokens_per_s": round(text_tokens / wall, 2) if wall else 0.0,
            "ttft_p50_ms": ms("ttft", 50), "ttft_p99_ms": ms("ttft", 99),
            "latency_p50_ms": ms("latency", 50), "latency_p99_ms": ms("latency", 99),
            "mean_completion_tokens": round(tokens / len(ok), 1) if ok else None,
            "mean_prompt_tokens": round(float(np.mean([r["prompt_tokens"] for r in ok])), 1)
            if ok and all(r["prompt_tokens"] is not None for r in ok) else None,
            **({"first_error": errors[0]} if errors else {})}


# ------------------------------------------------------------------ the servers

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")[:300]


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def _start(name: str, cmd: list[str], port: int, ready: str, log: Path, env: dict, wait_s: float) -> subprocess.Popen:
    import httpx

    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before it was ready:\n{_tail(log)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"{name} was not ready on {ready} after {wait_s:.0f} s:\n{_tail(log)}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _model_id(port: int, key: str) -> str:
    import httpx

    r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _commands(args, run_dir: Path, tmp: Path, script: Path) -> dict:
    """name -> (argv builder taking a port, readiness path)."""
    model = str(run_dir / "model")
    ts = Path(sys.executable).with_name("transformers")
    ts_cmd = [str(ts)] if ts.is_file() else [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]
    ts_args = lambda port: ts_cmd + ["serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", args.peer_device,  # noqa: E731
                                     "--dtype", args.peer_dtype, "--log-level", "warning"]
    commands = {
        "hand_written": (lambda port: [sys.executable, str(script), model, str(port), args.peer_dtype, args.peer_device],
                         "/ready"),
        "tuneforge": (lambda port: [sys.executable, "-m", "tuneforge", "serve", str(run_dir), "--api-key-env", KEY_ENV,
                                    "--force", "--port", str(port), "--precision", args.tuneforge_precision,
                                    "--max-tokens-cap", str(max(512, args.max_tokens)),
                                    "--monitor-url", f"sqlite:///{tmp}/requests.sqlite"], "/ready"),
    }
    cb = ["--continuous-batching"] + (["--cb-max-memory-percent", str(args.cb_max_memory_percent)]
                                      if args.cb_max_memory_percent is not None else [])
    if not args.skip_transformers_serve:
        commands["transformers_serve"] = (ts_args, "/health")
        commands["transformers_serve_cb"] = (lambda port: ts_args(port) + cb, "/health")
    return commands


# ------------------------------------------------------------------ prompts and the smoke run

def test_prompts(run_dir: Path) -> tuple[list[list[dict]], str]:
    """The distinct prompts (messages before the last answer) of the run's test split, rebuilt from its config."""
    from tuneforge.config import load_config
    from tuneforge.tasks.behaviour import get_task

    cfg = load_config(run_dir / "config.yaml")
    data = get_task("causal-lm").prepare(cfg)
    recorded = json.loads((run_dir / "run.json").read_text())["data"]["splits"]["test"]
    if data.report["splits"]["test"]["sha256"] != recorded:
        raise SystemExit(f"{run_dir}: the data file no longer gives the run's test split (sha256 differs from run.json)")
    system = cfg.task.system_prompt
    prompts, seen = [], set()
    for chat in data.splits.test.extras["messages"]:
        last = max((k for k, m in enumerate(chat) if m["role"] == "assistant"), default=None)
        if last is None:
            raise SystemExit(f"{run_dir} is a plain-text run: it has no chat prompts to serve")
        messages = ([{"role": "system", "content": system}] if system and chat[0]["role"] != "system" else []) + chat[:last]
        if json.dumps(messages) not in seen:
            seen.add(json.dumps(messages))
            prompts.append(messages)
    return prompts, f"test split of {cfg.data.path} ({len(data.splits.test)} rows, {len(prompts)} distinct prompts)"


def smoke_run(tmp: Path) -> Path:
    """A finished causal-LM run of the tiny random Llama on a few chats in its vocabulary (seconds, one thread)."""
    import yaml

    from causal_lm_throughput import smoke_pairs, tiny_llama_dir

    data = tmp / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]})
                            + "\n" for p, c in smoke_pairs(120)))
    cfg = tmp / "smoke.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": {"type": "causal-lm"}, "data": {"path": str(data), "val_fraction": 0.15, "test_fraction": 0.15},
        "model": {"name": str(tiny_llama_dir(tmp / "tiny-llama")), "max_length": 32},
        "train": {"method": "full", "epochs": 10, "learning_rate": 1e-2, "early_stopping_patience": 0},
        "eval": {"bootstrap_samples": 50}, "output": {"dir": str(tmp / "assistant")}}))
    subprocess.run([sys.executable, "-m", "tuneforge", "run", str(cfg)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return tmp / "assistant"


# ------------------------------------------------------------------ the bench

def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 2) if values else None


def _levels(raw: dict) -> list[dict]:
    """One row per level: the median over rounds of each figure, errors summed."""
    rows = []
    for clients, runs in raw.items():
        row = {"clients": int(clients), "rounds": len(runs), "errors": sum(r["errors"] for r in runs)}
        for key in ("tokens_per_s", "text_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms",
                    "mean_completion_tokens", "mean_prompt_tokens", "server_cpu_s", "idle_servers_cpu_s"):
            row[key] = _median([r.get(key) for r in runs])
        rows.append(row)
    return rows


def _ratios(results: dict) -> dict:
    """tuneforge's tokens/s over each peer's, per level: paired within each round, then the median. The tokens are
    the returned texts' (re-tokenized by the run's tokenizer after the level): one count for all servers."""
    raw, out = results["raw"], {}
    for peer in (p for p in raw if p != "tuneforge"):
        per_level = {}
        for clients, runs in raw.get("tuneforge", {}).items():
            pairs = list(zip(runs, raw[peer].get(clients, [])))
            each = [round(a["text_tokens_per_s"] / b["text_tokens_per_s"], 2) for a, b in pairs if b["text_tokens_per_s"]]
            per_level[clients] = {"median": _median(each), "each_round": each}
        out[f"tuneforge_vs_{peer}"] = per_level
    at = out.get("tuneforge_vs_hand_written", {}).get(str(TARGET_CLIENTS), {}).get("median")
    results["target"] = {"what": f">= {TARGET_RATIO}x the hand-written server's completion tokens/s at {TARGET_CLIENTS} "
                                 "clients (text tokens)", "ratio": at, "met": None if at is None else at >= TARGET_RATIO}
    return out


def _body(messages: list[dict], model: str, max_tokens: int, stream: bool = True) -> bytes:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default=str(ROOT / "runs" / "assistant"), help="a finished causal-LM run")
    ap.add_argument("--levels", default=None, help="concurrent clients, comma-separated (default 1,8,32; --smoke 1,8)")
    ap.add_argument("--requests-per-client", type=int, default=None, help="requests per level = clients x this "
                    "(default 3; --smoke 2), at least --min-requests")
    ap.add_argument("--min-requests", type=int, default=None, help="requests per level at least (default 8; --smoke 4)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of every level on every server (default 3; --smoke 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="max_tokens of every request (default 64; --smoke 16)")
    ap.add_argument("--soak", type=int, default=None, help="chat requests of the soak against tuneforge, 0 for none "
                    "(default 2000; --smoke 64)")
    ap.add_argument("--soak-clients", type=int, default=16)
    ap.add_argument("--level-seconds", type=float, default=300, help="no new request starts after this, per level")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--tuneforge-precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="serve --precision (auto: bf16 autocast where the CPU has fast bf16, its default)")
    ap.add_argument("--peer-dtype", default="auto", help="dtype of the hand-written server and transformers serve "
                    "(auto: the weights', fp32 for a tuneforge export)")
    ap.add_argument("--peer-device", default="cpu", help="device of the hand-written server and transformers serve "
                    "(cuda where tuneforge serves on a GPU: the same hardware for all)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every server (default: unset; --smoke 1)")
    ap.add_argument("--skip-transformers-serve", action="store_true")
    ap.add_argument("--cb-max-memory-percent", type=float, default=None, help="transformers serve --cb-max-memory-percent "
                    "(default: its own, which on a CPU sizes the paged cache from total RAM: ~8 GB RSS of a 24 GB VM)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random Llama run built in a temp dir, tiny counts")
    ap.add_argument("--out", default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; --smoke: a file "
                    f"in {tempfile.gettempdir()}, so a smoke test never overwrites the figures)")
    args = ap.parse_args()
    smoke = args.smoke
    pick = lambda value, real, tiny: value if value is not None else (tiny if smoke else real)  # noqa: E731
    levels = [int(x) for x in pick(args.levels, "1,8,32", "1,8").split(",")]
    rpc, min_requests = pick(args.requests_per_client, 3, 2), pick(args.min_requests, 8, 4)
    rounds, args.max_tokens, soak = pick(args.rounds, 3, 2), pick(args.max_tokens, 64, 16), pick(args.soak, 2000, 64)
    threads = pick(args.threads, None, 1)
    out_path = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "tuneforge_llm_serve_smoke.json" \
        if smoke else DEFAULT_OUT
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tmp = Path(tempfile.mkdtemp(prefix="tuneforge_llm_serve_"))
    run_dir = smoke_run(tmp) if smoke else Path(args.run_dir)
    if not (run_dir / "model" / "model.safetensors").is_file() or not (run_dir / "config.yaml").is_file():
        sys.exit(f"{run_dir} holds no finished run: run `make demo-llm` first")
    prompts, prompts_source = test_prompts(run_dir)

    import torch
    import transformers

    from tuneforge.models.device import cpu_info

    key = secrets.token_hex(16)
    env = {**os.environ, KEY_ENV: key, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    results: dict = {
        "status": "running", "cpu_info": cpu_info(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "args": {**vars(args), "levels": levels, "requests_per_client": rpc, "min_requests": min_requests,
                 "rounds": rounds, "soak": soak, "threads": threads},
        "setup": {"run_dir": str(run_dir), "model_dir": str(run_dir / "model"), "prompts": prompts_source,
                  "max_tokens": args.max_tokens, "decoding": "greedy (temperature 0)", "workdir": str(tmp),
                  "requests_per_level": {c: max(c * rpc, min_requests) for c in levels}, "servers": {}},
        "target": {}, "raw": {}, "levels": {}, "ratios": {}, "soak": None, "failed": [],
    }
    if smoke:
        results["note"] = "a tiny random Llama: a smoke test of the bench, not a measurement"
    save = lambda: harness.write_json(out_path, results)  # noqa: E731
    print(f"CPU {results['cpu_info']['model']} ({results['cpu_info']['usable_cpus']} usable); {prompts_source}; "
          f"max_tokens {args.max_tokens}; results -> {out_path}", flush=True)

    script = tmp / "hand_written.py"
    script.write_text(HAND_WRITTEN)
    procs, urls, models = {}, {}, {}
    try:
        for name, (cmd, ready) in _commands(args, run_dir, tmp, script).items():  # all up at once, idle between turns
            port, log = _port(), tmp / f"{name}.log"
            info = results["setup"]["servers"][name] = {"command": " ".join(cmd(port)), "ready": ready, "log": str(log)}
            try:
                t0 = time.perf_counter()
                procs[name] = _start(name, cmd(port), port, ready, log, env, 600)
                info["start_s"] = round(time.perf_counter() - t0, 1)
                models[name], urls[name] = _model_id(port, key), f"http://127.0.0.1:{port}/v1/chat/completions"
                info["model_id"] = models[name]
                # warm-up, and the first prompts' greedy completions (compared with the hand-written server's below)
                rs, _ = asyncio.run(_load(urls[name], [_body(p, models[name], args.max_tokens) for p in prompts],
                                          2, AGREEMENT_PROMPTS, key, args.level_seconds, args.request_timeout))
                bad = [r for r in rs if not r["ok"]]
                if bad:
                    raise RuntimeError(f"{len(bad)} of {len(rs)} warm-up requests failed: {bad[0]['error']}\n{_tail(log)}")
                info.update(rss_mb_ready=_rss_mb(procs[name].pid), warmup_texts=[r["text"].strip() for r in rs])
                print(f"{name} ready in {info['start_s']} s (model id {models[name]!r}, RSS {info['rss_mb_ready']} MB)", flush=True)
            except Exception as err:  # record why, go on with the others
                info["error"] = f"{type(err).__name__}: {err}"
                results["failed"].append(name)
                print(f"{name} FAILED: {_last_line(info['error'])} (the whole text in the results JSON)", flush=True)
                if name in procs:
                    _stop(procs.pop(name))
                urls.pop(name, None)
        base = results["setup"]["servers"].get("hand_written", {}).get("warmup_texts")
        results["setup"]["agreement_with_hand_written"] = {
            name: f"{sum(a == b for a, b in zip(info['warmup_texts'], base))} of {len(base)} greedy completions equal"
            for name, info in results["setup"]["servers"].items() if base and "warmup_texts" in info}
        save()
        if "tuneforge" in urls:
            tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "model")
            _compare(results, procs, urls, models, prompts, levels, rpc, min_requests, rounds, key, args, save, tokenizer)
            if soak:
                _soak(results, procs["tuneforge"], urls["tuneforge"], models["tuneforge"], prompts, soak, key, args, save,
                      tokenizer)
        results["status"] = "complete" if not results["failed"] else "complete, with failed servers"
    except BaseException:
        results["status"] = "interrupted"
        raise
    finally:
        for name, proc in procs.items():
            results["setup"]["servers"][name]["rss_mb_end"] = _rss_mb(proc.pid) if proc.poll() is None else None
            _stop(proc)
        save()
    print_table(results)
    print(f"results: {out_path}")
    return 0 if "tuneforge" in urls and not results["failed"] else 1


def _compare(results, procs, urls, models, prompts, levels, rpc, min_requests, rounds, key, args, save, tokenizer) -> None:
    """Every level on every server in turn, round after round; the order reversed every other round."""
    names = list(urls)
    raw = results["raw"] = {name: {str(c): [] for c in levels} for name in names}
    for r in range(rounds):
        for clients in levels:
            n = max(clients * rpc, min_requests)
            start = (r * n) % len(prompts)  # the same prompts in the same order for every server of this round and level
            order = [p for p in prompts[start:] + prompts[:start]]
            for name in (names if r % 2 == 0 else names[::-1]):
                if procs[name].poll() is not None:
                    continue
                bodies = [_body(p, models[name], args.max_tokens) for p in order]
                cpu0 = {k: _cpu_s(p.pid) for k, p in procs.items()}
                rs, wall = asyncio.run(_load(urls[name], bodies, clients, n, key, args.level_seconds, args.request_timeout))
                row = _summary(rs, wall, clients, tokenizer)
                cpu = {k: _cpu_s(p.pid) - cpu0[k] for k, p in procs.items()}
                row.update(round=r + 1, server_cpu_s=round(cpu.pop(name), 2),
                           idle_servers_cpu_s=round(sum(v for v in cpu.values() if v == v), 2))
                if len(rs) < n:
                    row["stopped_by_time"] = f"{len(rs)} of {n} requests started within {args.level_seconds:g} s"
                if procs[name].poll() is not None:
                    row["server_exited"] = f"status {procs[name].returncode}: {_tail(Path(results['setup']['servers'][name]['log']))}"
                    results["failed"].append(name)
                raw[name][str(clients)].append(row)
                results["levels"] = {k: _levels(v) for k, v in raw.items()}
                results["ratios"] = _ratios(results)
                save()
                print(f"round {r + 1} {name:<22} " + json.dumps({k: v for k, v in row.items() if k != "round"}), flush=True)
        at = results["ratios"].get("tuneforge_vs_hand_written", {}).get(str(TARGET_CLIENTS), {}).get("each_round")
        if at:
            print(f"round {r + 1}: tuneforge / hand_written tokens/s at {TARGET_CLIENTS} clients {at[-1]}", flush=True)


def _soak(results, proc, url, model, prompts, total, key, args, save, tokenizer) -> None:
    """`total` chat requests at --soak-clients, every other one not streamed; RSS after every 100."""
    bodies = [_body(p, model, args.max_tokens, stream=i % 2 == 0) for i, p in enumerate(prompts * 2)]
    rss, chunks, all_rs, t0 = [_rss_mb(proc.pid)], [], [], time.perf_counter()
    for done in range(0, total, 100):
        rs, wall = asyncio.run(_load(url, bodies[done % len(bodies):] + bodies[:done % len(bodies)], args.soak_clients,
                                     min(100, total - done), key, args.request_timeout, args.request_timeout))
        all_rs += rs
        chunks.append(wall)
        rss.append(_rss_mb(proc.pid) if proc.poll() is None else None)
        if proc.poll() is not None:
            break
    s = _summary(all_rs, sum(chunks), args.soak_clients, tokenizer)
    errors = [r["error"] for r in all_rs if not r["ok"]]
    results["soak"] = {"clients": args.soak_clients, "requests": len(all_rs), "errors": len(errors),
                       "streamed": "every other request", "wall_s": round(time.perf_counter() - t0, 1),
                       "tokens_per_s": s["tokens_per_s"], "latency_p50_ms": s["latency_p50_ms"],
                       "latency_p99_ms": s["latency_p99_ms"], "rss_mb_first": rss[0], "rss_mb_last": rss[-1],
                       "rss_mb_every_100": rss, **_rss_trend(rss), "server_alive": proc.poll() is None,
                       **({"first_error": errors[0]} if errors else {})}
    save()
    print("soak " + json.dumps(results["soak"]), flush=True)


def _rss_trend(rss: list) -> dict:
    """RSS after the warm-up (the first 40% of the soak) and its least-squares slope, MB per 100 requests, after it."""
    rss = [r for r in rss if r is not None]
    tail = rss[int(len(rss) * 0.4):]
    if len(tail) < 3:
        return {}
    slope = float(np.polyfit(np.arange(len(tail)), tail, 1)[0])
    return {"rss_mb_after_warmup": tail[0], "rss_mb_max_after_warmup": max(tail),
            "rss_mb_per_100_after_warmup": round(slope, 1)}


def print_table(results: dict) -> None:
    s = results["setup"]
    print(f"\n{s['prompts']}; max_tokens {s['max_tokens']}, greedy; CPU {results['cpu_info']['model']}, "
          f"{results['cpu_info']['usable_cpus']} usable CPUs; medians of {results['args']['rounds']} rounds")
    print(f"{'server':<23}{'clients':>7}{'tokens/s':>10}{'text t/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'lat p50':>10}{'lat p99':>10}"
          f"{'tok/req':>8}{'errors':>7}{'idle cpu':>9}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for name, rows in results["levels"].items():
        for r in rows:
            print(f"{name:<23}{r['clients']:>7}{fmt(r['tokens_per_s'], '.1f'):>10}{fmt(r['text_tokens_per_s'], '.1f'):>10}"
                  f"{fmt(r['ttft_p50_ms'], '.0f'):>10}"
                  f"{fmt(r['ttft_p99_ms'], '.0f'):>10}{fmt(r['latency_p50_ms'], '.0f'):>10}{fmt(r['latency_p99_ms'], '.0f'):>10}"
                  f"{fmt(r['mean_completion_tokens'], '.1f'):>8}{r['errors']:>7}{fmt(r['idle_servers_cpu_s'], '.1f'):>9}")
    for name, info in s["servers"].items():
        if "error" in info:
            print(f"{name:<23}FAILED: {_last_line(info['error'])}")
    for name, per_level in results["ratios"].items():
        print(f"{name} (text tokens/s): " + ", ".join(f"{c} clients {v['median']}x" for c, v in per_level.items()))
    if s.get("agreement_with_hand_written"):
        print("greedy agreement with hand_written: " + "; ".join(f"{k} {v}" for k, v in s["agreement_with_hand_written"].items()))
    t = results.get("target") or {}
    if t:
        print(f"target {t['what']}: ratio {t['ratio']}, {'met' if t['met'] else 'NOT met' if t['met'] is False else 'n/a'}")
    if results.get("soak"):
        k = results["soak"]
        print(f"soak: {k['requests']} requests at {k['clients']} clients, {k['errors']} errors, p99 {k['latency_p99_ms']} ms, "
              f"RSS {k['rss_mb_first']} -> {k['rss_mb_last']} MB"
              + (f" ({k['rss_mb_after_warmup']} MB after the warm-up, {k['rss_mb_per_100_after_warmup']:+} MB per 100 "
                 f"requests since)" if "rss_mb_after_warmup" in k else ""))


if __name__ == "__main__":
    sys.exit(main())
