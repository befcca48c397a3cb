"""The GPU check's serving steps (bench/gpu_check.py runs them): `tuneforge serve` answering requests, and the LLM
serving bench at 8 clients, both on the device `auto` picks.

    bash bench/gpu_check.sh OUTDIR [--dry-run]      # runs these among the other steps
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpu_check_steps import REVIEWS, ROOT, Check, StepError, _kill, _status

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: never through a proxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, key: str | None = None, timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with _LOCAL.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def step_serve(c: Check, limit: float, name: str, full: bool) -> dict:
    """`tuneforge serve` on device auto / precision auto, a few checked requests, stopped."""
    run = c.runs.get(name)
    if run is None:
        return {"status": "skipped", "why": f"run:{name} did not finish"}
    key, port, log = secrets.token_hex(16), _free_port(), c.out / "logs" / f"serve-{name}.log"
    env = {**c.env, "TUNEFORGE_GPUCHECK_KEY": key}
    cmd = [c.python, "-m", "tuneforge", "serve", str(run["dir"]), "--port", str(port), "--api-key-env",
           "TUNEFORGE_GPUCHECK_KEY", "--force", "--device", "auto", "--precision", "auto",
           "--monitor-url", f"sqlite:///{c.work / f'serve-{name}.sqlite'}"]
    deadline = time.monotonic() + limit
    base = f"http://127.0.0.1:{port}"
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    r = {"log": f"logs/{log.name}"}
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise StepError(f"the server exited with status {proc.returncode} before it was ready")
            if time.monotonic() > deadline - 5:
                raise StepError("the server was not ready in time")
            try:
                if _http(base + "/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        fig = {"ready_s": round(time.monotonic() - t0, 1)}
        served = re.search(r"model on (\S+), (\w+)", log.read_text(errors="replace"))
        fig["device"], fig["precision"] = (served.group(1), served.group(2)) if served else (None, None)
        problems = []

        field, texts = _inputs_for(c, run)

        def predict(texts: list[str]) -> tuple[int, list]:
            status, body = _http(base + "/v1/predict", {field: texts}, key, timeout=max(5, deadline - time.monotonic()))
            preds = json.loads(body).get("predictions", []) if status == 200 else []
            if status != 200 or len(preds) != len(texts):
                problems.append(f"{len(texts)} {field} -> HTTP {status} {body[:200]!r}")
            return status, preds

        t1 = time.perf_counter()
        _, one = predict(texts[:1])
        fig["first_request_ms"] = round((time.perf_counter() - t1) * 1000, 1)
        _, batch = predict(texts)
        fig["answer_example"] = one[0] if one else None
        if full:
            latencies, lock = [], threading.Lock()

            def one_request(i: int) -> None:
                t = time.perf_counter()
                predict(texts[i % 32: i % 32 + 1 + i % 4])
                with lock:
                    latencies.append(time.perf_counter() - t)

            t2 = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(one_request, range(64)))
            wall = time.perf_counter() - t2
            latencies.sort()
            fig["concurrent"] = {"requests": 64, "threads": 16, "requests_per_s": round(64 / wall, 1),
                                 "p50_ms": round(latencies[31] * 1000, 1), "p99_ms": round(latencies[63] * 1000, 1)}
            labels = [p.get("label") for p in batch]
            fig["served_labels"] = labels
        status, _ = _http(base + "/v1/predict", {field: texts[:1]}, "wrong-key")
        if status != 401:
            problems.append(f"a wrong key got HTTP {status}, not 401")
        status, metrics = _http(base + "/metrics")
        if status != 200 or b"tuneforge_" not in metrics:
            problems.append(f"/metrics: HTTP {status}, no tuneforge_ series")
        fig["problems"] = problems
    except StepError as err:
        return {**r, "status": "fail", "why": str(err)}
    finally:
        _kill(proc)
    if full and fig.get("served_labels"):
        agree = _predict_agreement(c, run["dir"], texts, fig.pop("served_labels"), deadline)
        fig["labels_equal_to_predict_fp32_cpu"] = agree
    r["figures"] = fig
    r["line"] = (f"served on {fig['device']}/{fig['precision']}, ready in {fig['ready_s']} s"
                 + (f"; {fig['concurrent']['requests_per_s']} req/s at 16 threads, p99 {fig['concurrent']['p99_ms']} ms"
                    if "concurrent" in fig else "")
                 + (f"; labels equal to predict's: {fig['labels_equal_to_predict_fp32_cpu']}"
                    if "labels_equal_to_predict_fp32_cpu" in fig else ""))
    if problems:
        return {**r, "status": "fail", "why": "; ".join(problems)}
    if c.mode == "gpu" and (fig["device"] or "").split(":")[0] != "cuda":
        return {**r, "status": "fail", "why": f"served on {fig['device']}/{fig['precision']}, not cuda"}
    return r


def _inputs_for(c: Check, run: dict) -> tuple[str, list[str]]:
    """(the /v1/predict field of the run's task, 32 inputs for it): reviews for a text task; for an image task the
    first 32 images (base64) of the data the run trained on."""
    import base64

    import yaml
    from tuneforge.tasks import get_spec

    spec = get_spec(run["task"])
    if spec.input != "image":
        return spec.inputs, [REVIEWS[i % len(REVIEWS)] + ("" if i < len(REVIEWS) else f" ({i})") for i in range(32)]
    data = Path(yaml.safe_load((c.work / "configs" / f"{run['dir'].name}.yaml").read_text())["data"]["path"])
    files = sorted(f for f in data.rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))[:32]
    if not files:
        raise StepError(f"no images under {data} to send")
    return spec.inputs, [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]


def _predict_agreement(c: Check, run_dir: Path, texts: list[str], served: list, deadline: float) -> str:
    """The same texts through `tuneforge predict` (the model on the CPU, fp32): how many labels are equal."""
    inp = c.work / "serve-texts.txt"
    inp.write_text("\n".join(texts) + "\n")
    try:
        res = subprocess.run([c.python, "-m", "tuneforge", "predict", str(run_dir), "--input", str(inp), "--json"],
                             capture_output=True, text=True, cwd=ROOT, env=c.env, timeout=max(5, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "predict did not finish in the step's time"
    if res.returncode:
        return f"predict failed: {res.stderr.strip()[-200:]}"
    offline = [json.loads(x)["label"] for x in res.stdout.splitlines() if x.startswith("{")]
    return f"{sum(a == b for a, b in zip(served, offline))} of {len(offline)}"


def step_llm_bench(c: Check, limit: float, name: str) -> dict:
    run = c.runs.get(name)
    if run is None:
        return {"status": "skipped", "why": f"run:{name} did not finish"}
    result = c.out / "llm_serve_throughput.json"
    cmd = [c.python, str(ROOT / "bench" / "llm_serve_throughput.py"), str(run["dir"]), *c.s["llm_bench"], "--soak", "0",
           "--skip-transformers-serve", "--peer-dtype", "bfloat16", "--peer-device", "cuda" if c.mode == "gpu" else "cpu",
           "--out", str(result)]
    rc, _ = c.sh(cmd, "llm-bench.log", limit)
    r = {"log": "logs/llm-bench.log"}
    if not result.is_file():
        return {**r, "status": "fail", "why": _status(rc, limit) or "no results"}
    res = json.loads(result.read_text())
    served = {}
    for server, info in (res.get("setup") or {}).get("servers", {}).items():  # its servers' logs, kept with the figures
        log = Path(info.get("log", ""))
        if log.is_file():
            shutil.copy2(log, c.out / "logs" / f"llm-bench-{server}.log")
            m = re.search(r"model on (\S+?),? (\S+)$", log.read_text(errors="replace"), re.M)
            served[server] = f"{m.group(1)}/{m.group(2)}" if m else None
    levels = {n: {row["clients"]: row for row in rows} for n, rows in res.get("levels", {}).items()}
    at8 = {n: {k: v.get(k) for k in ("tokens_per_s", "ttft_p50_ms", "latency_p99_ms", "errors")}
           for n, lv in levels.items() for cl, v in lv.items() if cl == 8}
    ratio = (res.get("target") or {}).get("ratio")
    r["figures"] = {"at_8_clients": at8, "tuneforge_over_hand_written": ratio, "served_on": served,
                    "agreement": res.get("setup", {}).get("agreement_with_hand_written"), "failed": res.get("failed"),
                    "status": res.get("status")}
    r["line"] = (f"8 clients: tuneforge ({served.get('tuneforge')}) {at8.get('tuneforge', {}).get('tokens_per_s')} tok/s, "
                 f"hand-written ({served.get('hand_written')}) {at8.get('hand_written', {}).get('tokens_per_s')} tok/s, "
                 f"ratio {ratio}")
    errors = sum(v.get("errors") or 0 for v in at8.values())
    if rc != 0 or res.get("failed") or errors or len(at8) < 2:
        return {**r, "status": "fail", "why": _status(rc, limit) or f"failed servers {res.get('failed')}, {errors} errors, "
                f"levels measured: {sorted(at8)}"}
    if c.mode == "gpu" and not all((served.get(n) or "").startswith("cuda") for n in ("tuneforge", "hand_written")):
        return {**r, "status": "fail", "why": f"not both on the GPU: {served}"}
    return r


