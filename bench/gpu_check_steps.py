"""The GPU check's steps and their runner (bench/gpu_check.py wires them): the environment, the models, each
example's run with the estimate against the actual, FSDP. The serving steps are in bench/gpu_check_serve.py.

    bash bench/gpu_check.sh OUTDIR [--dry-run]
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import gpu_assets as assets  # bench/ is on sys.path: the scripts' folder

ROOT = assets.ROOT
TASK_ORDER = ("text-classification", "token-classification", "causal-lm", "image-classification", "seq2seq")
RESERVE_S, MIN_STEP_S = 10, 25  # kept for the summary; a step with less left is not run (out-of-time)
SETTINGS = {  # per mode: the whole check's budget, each step's cap (seconds), and how the examples are shortened
    "gpu": {"budget": 540, "env": 60, "models": 90, "serve": 75, "serve_other": 40, "llm-bench": 150, "fsdp": 150,
            "run": {"text-classification": 150, "token-classification": 120, "causal-lm": 170, "image-classification": 120,
                    "seq2seq": 120},
            "max_steps": {"text-classification": 300, "token-classification": 300, "causal-lm": 100,
                          "image-classification": 300, "seq2seq": 200},
            "max_new_tokens": 64, "rows": None,
            "llm_bench": ["--levels", "8", "--rounds", "1", "--requests-per-client", "4", "--min-requests", "32",
                          "--max-tokens", "64", "--level-seconds", "60", "--request-timeout", "120"]},
    "dry-run": {"budget": 1500, "env": 120, "models": 180, "serve": 150, "serve_other": 120, "llm-bench": 300, "fsdp": 240,
                "run": {"text-classification": 240, "token-classification": 240, "causal-lm": 300,
                        "image-classification": 240, "seq2seq": 240},
                "max_steps": {"text-classification": 4, "token-classification": 4, "causal-lm": 3, "image-classification": 4,
                              "seq2seq": 3},
                "max_new_tokens": 8, "rows": {"text-classification": 500, "token-classification": 250, "causal-lm": 80,
                                              "image-classification": 300, "seq2seq": 120},
                "llm_bench": ["--levels", "8", "--rounds", "1", "--requests-per-client", "1", "--min-requests", "8",
                              "--max-tokens", "8", "--threads", "1", "--level-seconds", "120", "--request-timeout", "120"]},
}
REVIEWS = ["a gorgeous, moving film", "a tedious mess that never finds its footing", "the cast is superb",
           "two hours I will never get back", "funny, sharp and surprisingly tender", "flat, lifeless and far too long",
           "an instant classic", "the plot makes no sense at all", "beautifully shot but emotionally hollow",
           "I laughed, I cried, I bought the soundtrack", "a by-the-numbers sequel", "bold, strange and unforgettable",
           "Barack Obama visited Paris with Angela Merkel on Tuesday", "Apple opened a new store in London"]


class Check:
    """The steps' runner: time boxes, logs, the summary after every step."""

    def __init__(self, out: Path, work: Path, mode: str, budget: float, models_mode: str):
        self.out, self.work, self.mode, self.s = out, work, mode, SETTINGS[mode]
        self.models_mode = models_mode
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget
        self.python = sys.executable
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1"}
        self.summary = {"mode": mode, "what": "GPU check (issue #19): each GPU branch run once" if mode == "gpu" else
                        "dry run on a CPU: proves the check's plumbing, not GPU speed",
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget, "outdir": str(out),
                        "workdir": str(work), "models": {}, "steps": {}}
        self.runs: dict[str, dict] = {}  # example name -> {"dir", "task", "ok"}
        self.models: dict[str, dict] = {}

    # ---- plumbing
    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def save(self) -> None:
        self.summary["wall_s"] = round(time.monotonic() - self.t0, 1)
        steps = self.summary["steps"].values()
        self.summary["failed"] = [n for n, s in self.summary["steps"].items() if s["status"] == "fail"]
        self.summary["out_of_time"] = [n for n, s in self.summary["steps"].items() if s["status"] == "out-of-time"]
        self.summary["ok"] = bool(steps) and not self.summary["failed"] and not self.summary["out_of_time"]
        assets_tmp = self.out / "summary.json.tmp"
        assets_tmp.write_text(json.dumps(self.summary, indent=2, default=str))
        os.replace(assets_tmp, self.out / "summary.json")

    def step(self, name: str, cap: float, fn, *args) -> dict:
        left = self.left()
        if left < MIN_STEP_S:
            return self.record(name, {"status": "out-of-time", "why": f"not run: {max(left, 0):.0f} s of the budget left"}, 0)
        limit = min(cap, left)
        print(f"--- {name} (at most {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            r = fn(self, limit, *args) or {}
        except StepError as err:
            r = {"status": "fail", "why": str(err)}
        except Exception as err:
            r = {"status": "fail", "why": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
        r.setdefault("status", "ok")
        return self.record(name, r, time.monotonic() - t0)

    def record(self, name: str, r: dict, seconds: float) -> dict:
        r["seconds"] = round(seconds, 1)
        r["window"] = [round(time.time() - seconds, 2), round(time.time(), 2)]  # wall clock, for the GPU trace
        self.summary["steps"][name] = r
        self.save()
        line = r.get("line") or r.get("why") or ""
        print(f"[{r['status']}] {name} {r['seconds']} s{': ' + line if line else ''}", flush=True)
        if r["status"] == "fail" and r.get("log"):
            print("    ... " + "\n    ... ".join(_tail(self.out / r["log"], 15).splitlines()), flush=True)
        return r

    def sh(self, cmd: list[str], log: str, timeout: float, env: dict | None = None) -> tuple[int | None, float]:
        """Run a command, its output appended to OUT/logs/LOG, in its own process group (killed whole on timeout).
        (exit status or None on timeout, seconds)"""
        path = self.out / "logs" / log
        with open(path, "ab") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            t0 = time.monotonic()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env or self.env,
                                 start_new_session=True)
            try:
                return p.wait(max(1.0, timeout)), time.monotonic() - t0
            except subprocess.TimeoutExpired:
                _kill(p)
                f.write(f"\n[gpu_check] stopped after {timeout:.0f} s\n".encode())
                return None, time.monotonic() - t0


    def start_gpu_trace(self) -> None:
        """nvidia-smi sampled every 500 ms into OUT/gpu_trace.csv (memory used, utilisation), where there is one."""
        self.trace = None
        if self.mode == "gpu" and shutil.which("nvidia-smi"):
            with open(self.out / "gpu_trace.csv", "wb") as f:
                self.trace = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,memory.used,utilization.gpu",
                                               "--format=csv,noheader,nounits", "-lms", "500"], stdout=f,
                                              stderr=subprocess.DEVNULL, start_new_session=True)

    def stop_gpu_trace(self) -> None:
        if getattr(self, "trace", None) is not None:
            _kill(self.trace)
            per_step = gpu_by_step(self.out / "gpu_trace.csv", self.summary["steps"])
            for name, g in per_step.items():
                self.summary["steps"][name]["gpu"] = g


def gpu_by_step(trace: Path, steps: dict) -> dict:
    """Each step's most GPU memory used (MiB, all processes: nvidia-smi's view) and its mean / highest utilisation,
    from the trace's samples inside the step's window."""
    samples = []
    for line in trace.read_text(errors="replace").splitlines() if trace.is_file() else []:
        parts = [x.strip() for x in line.split(",")]
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((t, float(parts[2]), float(parts[3])))
        except (ValueError, IndexError):
            continue
    out = {}
    for name, s in steps.items():
        inside = [(m, u) for t, m, u in samples if s.get("window") and s["window"][0] <= t <= s["window"][1]]
        if inside:
            out[name] = {"memory_used_max_mib": max(m for m, _ in inside),
                         "utilization_mean_pct": round(sum(u for _, u in inside) / len(inside), 1),
                         "utilization_max_pct": max(u for _, u in inside), "samples": len(inside)}
    return out


class StepError(Exception):
    pass


def _kill(p: subprocess.Popen) -> None:
    """The process and its children (its own process group, started by us)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _status(rc: int | None, limit: float) -> str | None:
    return f"timed out after {limit:.0f} s" if rc is None else (f"exit status {rc}" if rc else None)


# ------------------------------------------------------------------ env

ENV_PROBE = r'''
import importlib, importlib.metadata as md, json, os, shutil, subprocess, sys, time
out = {"python": sys.version.split()[0], "executable": sys.executable, "pythonpath": os.environ.get("PYTHONPATH", "")}
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap,clocks.max.sm",
                        "--format=csv,noheader"], capture_output=True, text=True)
    out["nvidia_smi"] = q.stdout.strip().splitlines() or q.stderr.strip()
    open(sys.argv[2], "w").write(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
else:
    out["nvidia_smi"] = "not found"
import torch
out["torch"] = torch.__version__
out["cuda"] = {"built_for": torch.version.cuda, "available": torch.cuda.is_available(), "devices": torch.cuda.device_count()}
if torch.cuda.is_available():
    try:  # without emulation: is_bf16_supported() says True on pre-Ampere GPUs, where bf16 is emulated (slow)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        native = None
    out["cuda"].update(names=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                       capability=list(torch.cuda.get_device_capability(0)), bf16_supported=torch.cuda.is_bf16_supported(),
                       bf16_native=native,
                       memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                       nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
    for _ in range(3): a @ b
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(10): a @ b
    torch.cuda.synchronize()
    out["cuda"]["bf16_matmul_tflops"] = round(10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12, 1)
from tuneforge.models.device import cpu_info, resolve_device, resolve_precision
device = resolve_device("auto"); precision, why = resolve_precision("auto", device)
from tuneforge.cli import version_text
out["tuneforge"] = {"version": version_text(), "device_auto": str(device), "precision_auto": precision, "why": why,
                    "cpu": cpu_info()}
mods = {"transformers": "transformers", "accelerate": "accelerate", "peft": "peft", "tokenizers": "tokenizers",
        "safetensors": "safetensors", "numpy": "numpy", "pandas": "pandas", "scikit-learn": "sklearn",
        "pydantic": "pydantic", "fastapi": "fastapi", "uvicorn": "uvicorn", "httptools": "httptools",
        "cleanlab": "cleanlab", "seqeval": "seqeval", "sklearn-crfsuite": "sklearn_crfsuite",
        "rouge-score": "rouge_score", "nltk": "nltk", "sacrebleu": "sacrebleu", "prometheus-client": "prometheus_client",
        "httpx": "httpx", "typing-extensions": "typing_extensions"}
out["packages"] = {}
for dist, mod in mods.items():
    try:
        m = importlib.import_module(mod)
        out["packages"][dist] = {"version": md.version(dist), "from": os.path.dirname(os.path.dirname(m.__file__))}
    except Exception as err:
        out["packages"][dist] = {"error": f"{type(err).__name__}: {err}"}
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps({k: out[k] for k in ("torch", "cuda", "tuneforge")}, indent=2))
'''


def step_env(c: Check, limit: float) -> dict:
    rc, _ = c.sh([c.python, "-c", ENV_PROBE, str(c.out / "env.json"), str(c.out / "nvidia-smi.txt")], "env.log", limit)
    if rc != 0 or not (c.out / "env.json").is_file():
        return {"status": "fail", "why": _status(rc, limit) or "no env.json", "log": "logs/env.log"}
    env = json.loads((c.out / "env.json").read_text())
    broken = {k: v["error"] for k, v in env["packages"].items() if "error" in v}
    tf = env["tuneforge"]
    line = (f"torch {env['torch']} (CUDA {env['cuda']['built_for']}), {env['cuda'].get('names') or 'no GPU'}; "
            f"tuneforge auto -> {tf['device_auto']}, {tf['precision_auto']} ({tf['why']})")
    if env["cuda"].get("bf16_matmul_tflops"):
        line += f"; bf16 matmul {env['cuda']['bf16_matmul_tflops']} TFLOP/s"
    r = {"line": line, "figures": {"torch": env["torch"], "cuda": env["cuda"], "tuneforge": tf}, "log": "logs/env.log"}
    if broken:
        return {**r, "status": "fail", "why": f"packages that do not import: {broken}"}
    if c.mode == "gpu" and not (tf["device_auto"].startswith("cuda") and tf["precision_auto"] == "bf16"):
        return {**r, "status": "fail", "why": f"tuneforge resolves {tf['device_auto']} / {tf['precision_auto']}, "
                "not cuda / bf16: no GPU check possible here (run with --dry-run on a CPU)", "no_gpu": True}
    return r


# ------------------------------------------------------------------ models and configs

def ordered_examples() -> tuple[list[tuple[str, Path, str]], list[tuple[str, Path, str]]]:
    """(the first example of each task, the others), each (name, path, task); the Makefile's demos come first."""
    makefile = (ROOT / "Makefile").read_text() if (ROOT / "Makefile").is_file() else ""
    demos = re.findall(r"examples/([\w-]+)\.yaml", makefile)
    found = [(p.stem, p, assets.read_example(p)["task"]["type"]) for p in assets.example_configs()]
    variant = {p.stem: _variant(assets.read_example(p)["task"]) for p in assets.example_configs()}
    rank = lambda e: (TASK_ORDER.index(e[2]) if e[2] in TASK_ORDER else len(TASK_ORDER), variant[e[0]],  # noqa: E731
                      demos.index(e[0]) if e[0] in demos else len(demos), e[0])
    first, rest, seen = [], [], set()
    for e in sorted(found, key=rank):
        kind = (e[2], variant[e[0]])
        (rest if kind in seen else first).append(e)
        seen.add(kind)
    return first, rest


def _variant(task: dict) -> str:
    """A task's variant its first example must cover too: preference tuning (DPO) for the causal LM, told by the
    example's task section setting DPO's knobs."""
    return "preference" if {"beta", "preference_loss", "sft_weight"} & set(task) else ""


def step_models(c: Check, limit: float, examples) -> dict:
    refs = sorted({assets.model_reference(p) for _, p, _ in examples})
    record = c.out / "models.json"
    rc, _ = c.sh([c.python, str(ROOT / "bench" / "gpu_assets.py"), "standin", str(record), str(c.work / "models"), *refs,
                  "--mode", c.models_mode], "models.log", limit)
    if not record.is_file():
        return {"status": "fail", "why": _status(rc, limit) or "no models.json", "log": "logs/models.log"}
    c.models = json.loads(record.read_text())
    c.summary["models"] = {r: {k: v for k, v in i.items() if k != "stamp"} for r, i in c.models.items()}
    errors = {r: i["error"] for r, i in c.models.items() if "error" in i}
    line = "; ".join(f"{r}: {i.get('error') or i['weights']}" for r, i in c.models.items())
    return {"status": "fail" if errors else "ok", "line": line, "log": "logs/models.log",
            **({"why": f"models not available: {errors}"} if errors else {})}


def _subset(src: Path, dst: Path, rows: int) -> Path:
    """A seeded sample of `rows` rows (CSV/Parquet rows, JSONL lines, CoNLL sentences) of a data file."""
    import random

    rng = random.Random(0)
    name = src.name.lower()
    if src.is_dir():  # images in class folders (under train/, test/, ... when given): the same share of each folder
        files = sorted(f for f in src.rglob("*") if f.is_file() and not f.name.startswith("."))
        folders: dict[Path, list[Path]] = {}
        for f in files:
            folders.setdefault(f.parent, []).append(f)
        shutil.rmtree(dst, ignore_errors=True)
        for folder, members in folders.items():
            keep = max(2, round(rows * len(members) / max(len(files), 1)))
            for f in rng.sample(members, min(keep, len(members))):
                (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst / f.relative_to(src))
    elif ".jsonl" in name:
        lines = [x for x in _read_text(src).splitlines() if x.strip()]
        dst = dst.with_suffix(".jsonl")
        dst.write_text("\n".join(rng.sample(lines, min(rows, len(lines)))) + "\n")
    elif ".csv" in name or ".parquet" in name:
        import pandas as pd

        df = pd.read_parquet(src) if ".parquet" in name else pd.read_csv(src, dtype=str, keep_default_na=False)
        dst = dst.with_suffix(".csv")
        df.sample(n=min(rows, len(df)), random_state=0).to_csv(dst, index=False)
    elif name.endswith((".txt", ".conll", ".bio", ".iob")):
        blocks = [b for b in re.split(r"\n\s*\n", _read_text(src)) if b.strip()]
        dst = dst.with_suffix(".txt")
        dst.write_text("\n\n".join(rng.sample(blocks, min(rows, len(blocks)))) + "\n")
    else:
        dst = dst.with_name(src.name)
        shutil.copy2(src, dst)
    return dst


def _read_text(path: Path) -> str:
    import bz2
    import gzip
    import lzma

    data = path.read_bytes()
    opener = {".bz2": bz2.decompress, ".gz": gzip.decompress, ".xz": lzma.decompress}.get(path.suffix.lower())
    return (opener(data) if opener else data).decode("utf-8")


def derive(c: Check, name: str, example: Path, task: str, fsdp: int = 0) -> tuple[Path, Path, list[str]]:
    """The example's config as this check runs it: its data where this machine has it (a subset in the dry run),
    the model chosen by `models`, shortened; written to WORK/configs/NAME.yaml. (config, output dir, what changed)"""
    import yaml

    raw = assets.read_example(example)
    notes = []
    data = raw.setdefault("data", {})
    for key in ("path", "test_path", "val_path"):
        if not data.get(key):
            continue
        found = assets.local_data_path(data[key])
        script = assets.generator_of(example)
        if found is None and script and not data[key].startswith("pkg:"):  # written by the example's own script
            found = c.work / "data" / f"{name}-{key}-written{Path(data[key]).suffix}"
            found.parent.mkdir(parents=True, exist_ok=True)
            rc, _ = c.sh([c.python, str(ROOT / script), str(found)], f"run-{name}.log", 120)
            notes.append(f"data.{key} written by {script}")
            found = found if rc == 0 and found.exists() else None
        if found is None:
            raise StepError(f"data file {data[key]} of {example.name} is neither here nor in .gpu/, and "
                            f"{script or 'no script named in its header'} could not write it (run bench/gpu_prepare.sh)")
        if c.s["rows"]:
            rows = c.s["rows"].get(task, 200)
            (c.work / "data").mkdir(parents=True, exist_ok=True)
            found = _subset(found, c.work / "data" / f"{name}-{key}", rows)
            notes.append(f"data.{key}: {rows} rows sampled")
        data[key] = str(found)
    ref = assets.model_reference(example)
    model = c.models.get(ref) or {}
    if "path" not in model:
        raise StepError(f"model {ref} is not available: {model.get('error', 'the models step did not run')}")
    raw.setdefault("model", {})["name"] = model["path"]
    train = raw.setdefault("train", {})
    steps = c.s["max_steps"].get(task, min(c.s["max_steps"].values()))
    if not train.get("max_steps") or train["max_steps"] > steps:
        train["max_steps"] = steps
        notes.append(f"train.max_steps {steps}")
    if task in ("causal-lm", "seq2seq"):  # generating tasks: each test row's generation is cut short too
        limit = raw["task"].get("max_new_tokens")
        if limit is None or limit > c.s["max_new_tokens"]:
            raw["task"]["max_new_tokens"] = c.s["max_new_tokens"]
            notes.append(f"task.max_new_tokens {c.s['max_new_tokens']}")
    if c.mode == "dry-run":
        raw.setdefault("eval", {}).update(bootstrap_samples=50, probe_train_rows=200)
    if fsdp:
        train["distributed"] = {"strategy": "fsdp"}
        train["batch_size"] = max(train.get("batch_size", 32), fsdp)
        notes.append(f"train.distributed.strategy fsdp over {fsdp} processes")
    out = c.work / "runs" / name
    raw["output"] = {**raw.get("output", {}), "dir": str(out), "overwrite": True}
    cfg = c.work / "configs" / f"{name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f"# derived from {example.relative_to(ROOT)} by bench/gpu_check.py ({c.mode}): {'; '.join(notes)}\n"
                   + yaml.safe_dump(raw, sort_keys=False))
    shutil.copy2(cfg, c.out / "configs" / cfg.name)
    return cfg, out, notes


# ------------------------------------------------------------------ runs

def step_run(c: Check, limit: float, name: str, example: Path, task: str) -> dict:
    cfg, out, notes = derive(c, name, example, task)
    shutil.rmtree(out, ignore_errors=True)
    log = f"run-{name}.log"
    rc, wall = c.sh([c.python, "-m", "tuneforge", "run", str(cfg)], log, limit)
    r = {"log": f"logs/{log}", "shortened": notes, "config": f"configs/{cfg.name}"}
    if rc != 0 or not (out / "run.json").is_file():
        return {**r, "status": "fail", "why": _status(rc, limit) or "no run.json"}
    figures = collect_run(c, name, out, task, wall)
    c.runs[name] = {"dir": out, "task": task, "example": example}
    r.update(figures=figures, line=_run_line(figures))
    expected = ("cuda", "bf16") if c.mode == "gpu" else None
    if expected and (figures["device"], figures["precision"]) != expected:
        return {**r, "status": "fail", "why": f"ran on {figures['device']} / {figures['precision']}, expected cuda / bf16"}
    return r


def collect_run(c: Check, name: str, out: Path, task: str, wall: float) -> dict:
    """The run's figures (metrics.json, run.json), and those files copied to OUT/runs/NAME (no weights)."""
    metrics = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    keep = c.out / "runs" / name
    keep.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.json", "run.json", "run.log", "config.yaml", "audit.json"):
        if (out / f).is_file():
            shutil.copy2(out / f, keep / f)
    est, act = metrics["cost"]["estimated"] or {}, metrics["cost"]["actual"]
    corrected = est.get("corrected") or {}
    gib = lambda b: None if b is None else round(b / 2**30, 3)  # noqa: E731
    ratio = lambda a, b: round(a / b, 3) if a is not None and b else None  # noqa: E731
    key = metrics.get("main_metric")
    test = metrics.get("test") or {}
    best = metrics.get("best_baseline")
    model = next((i for i in c.models.values() if i.get("path") == run["model"]["reference"]), {})
    return {
        "task": task, "device": est.get("device"), "precision": run.get("precision"),
        "weights": model.get("weights", "?"), "steps": run.get("steps"), "planned_steps": run["resolved"].get("total_steps"),
        "estimated_s": round(est["seconds_total"], 1) if est else None, "actual_s": act["seconds_total"],
        "actual_over_estimated": ratio(act["seconds_total"], est.get("seconds_total")),
        "estimated_for_steps_run_s": round(est.get("seconds_total_for_steps_run", 0), 1) or None,
        "corrected_estimate_s": round(corrected["seconds_total"], 1) if corrected else None,
        "corrected_after_step": corrected.get("after_step"),
        "train_estimated_s": round(est.get("seconds_train", 0), 2), "train_actual_s": round(act["seconds_train"], 2),
        "train_actual_over_estimated": ratio(act["seconds_train"], est.get("seconds_train")),
        "peak_memory_estimated_gib": gib(est.get("peak_memory_bytes")), "peak_memory_actual_gib": gib(act.get("peak_memory_bytes")),
        "train_samples_per_s": round(act["train_samples_per_second"], 1),
        "train_tokens_per_s": round(act.get("train_tokens_per_second", 0), 1),
        "durations_s": run.get("durations_s"), "wall_s": round(wall, 1),
        "test": {"metric": key, "model": (test.get("model") or {}).get(key), "best_baseline": best,
                 "baseline": ((test.get("baselines") or {}).get(best) or {}).get(key), "promoted": metrics.get("promoted"),
                 "note": "random stand-in weights: these scores mean nothing" if model.get("weights") != "real" else ""},
        "hardware": run.get("hardware"), "distributed": run.get("distributed"),
    }


def _run_line(f: dict) -> str:
    speed = (f"{f['train_tokens_per_s']} tokens/s" if f["task"] == "causal-lm" else f"{f['train_samples_per_s']} samples/s")
    return (f"{f['device']}/{f['precision']}, {f['steps']} steps; estimated {f['estimated_s']} s, actual {f['actual_s']} s "
            f"(x{f['actual_over_estimated']}; training {f['train_estimated_s']} vs {f['train_actual_s']} s); {speed}; "
            f"peak {f['peak_memory_actual_gib']} GiB (estimated {f['peak_memory_estimated_gib']}); "
            f"weights {f['weights'].split(' ')[0]}")


def estimate_table(steps: dict) -> dict:
    """The estimate against the actual, one row per finished run: what issue #19 asks the GPU check to show."""
    keys = ("device", "precision", "steps", "estimated_s", "actual_s", "actual_over_estimated", "corrected_estimate_s",
            "estimated_for_steps_run_s", "train_estimated_s", "train_actual_s", "train_actual_over_estimated",
            "peak_memory_estimated_gib", "peak_memory_actual_gib", "train_samples_per_s", "train_tokens_per_s")
    return {name.removeprefix("run:"): {k: s["figures"].get(k) for k in keys}
            for name, s in steps.items() if s.get("figures", {}).get("estimated_s") is not None}


# ------------------------------------------------------------------ FSDP

def step_fsdp(c: Check, limit: float, name: str, example: Path, task: str) -> dict:
    gpus = (c.summary["steps"].get("env", {}).get("figures") or {}).get("cuda", {}).get("devices") or 0
    if c.mode == "gpu" and gpus < 2:
        return {"status": "skipped", "why": f"{gpus} GPU: FSDP needs 2 or more (it is tested on 2 CPU processes)"}
    nproc = gpus if c.mode == "gpu" else 2
    cfg, out, notes = derive(c, "fsdp", example, task, fsdp=nproc)
    shutil.rmtree(out, ignore_errors=True)
    rc, wall = c.sh([c.python, "-m", "tuneforge", "run", str(cfg), "--nproc", str(nproc)], "fsdp.log", limit)
    r = {"log": "logs/fsdp.log", "shortened": notes}
    if rc != 0 or not (out / "run.json").is_file():
        return {**r, "status": "fail", "why": _status(rc, limit) or "no run.json"}
    f = collect_run(c, "fsdp", out, task, wall)
    d = f["distributed"] or {}
    r.update(figures=f, line=f"{nproc} processes, {d.get('backend')}, sharded {d.get('sharded')}, each holds "
             f"{d.get('weights_held_per_process')} of the weights; " + _run_line(f))
    if not d.get("sharded") or (d.get("weights_held_per_process") or 1) > 0.75:
        return {**r, "status": "fail", "why": f"not sharded: {d}"}
    return r


# ------------------------------------------------------------------ main
