"""Search: one default run of the demo, a 20-trial `tuneforge tune` of the same config (TPE, successive-halving
pruning, the task's default space), then the default run again, one after the other through the CLI a user types;
the search's wall time over the default run's (the mean of the two; target <= 5x), and the best trial's validation
metric against the defaults' (target: at least as good).

    .venv/bin/python bench/search.py                 # examples/sentiment.yaml (MiniLM) -> bench/results_search.json
    .venv/bin/python bench/search.py --trials 40     # a longer search
    .venv/bin/python bench/search.py --smoke         # a tiny random BERT on a few rows, 4 trials, ~1 min -> /tmp

The levers that keep a search near a few runs' time: the data is read, audited, split and tokenised once and the
baselines computed once (a run spends a good part of its time there); successive halving stops a trial at its first
evaluation (a quarter epoch) unless it is in the top third of the trials that got there, then again at the 3rd and
9th; trials skip the cost estimate; the default space's epochs span half to twice the run's own; the test split is
evaluated once, by the best trial's model, kept from its trial.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # bench/harness.py: the script's own folder is on sys.path
from distributed import smoke_config, train  # one default run through the CLI, and the tiny smoke config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results_search.json"
DEMO = ROOT / "examples" / "sentiment.yaml"
TARGET_RATIO = 5.0


def tune(config: Path, out: Path, trials: int) -> dict:
    cmd = [sys.executable, "-m", "tuneforge", "tune", str(config), "--output", str(out), "--overwrite",
           "--trials", str(trials)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    search = json.loads((out / "search.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    s, rows = search["summary"], search["trials"]
    main = metrics["main_metric"]
    durations = [r["duration_s"] for r in rows if r["duration_s"] is not None]
    return {"command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1), "trials": s["trials"],
            "complete": s["complete"], "pruned": s["pruned"], "failed": s["failed"],
            "trial_seconds_total": round(sum(durations), 1),
            "trial_seconds_complete": round(sum(r["duration_s"] or 0 for r in rows if r["state"] == "COMPLETE"), 1),
            "trial_seconds_pruned": round(sum(r["duration_s"] or 0 for r in rows if r["state"] == "PRUNED"), 1),
            "seconds_outside_trials": round(wall - sum(durations), 1),
            "best_trial": s["best_trial"], "best_value": s["best_value"], "best_params": s["best_params"],
            "defaults_trial": s["defaults_trial"], "defaults_value": s["defaults_value"],
            "space": s["space"], "main_metric": main, "test_metric": metrics["test"]["model"][main],
            "ci": metrics["test"]["model"].get("ci"), "promoted": metrics.get("promoted"),
            "trials_table": [{k: r[k] for k in ("number", "state", "value", "params", "duration_s")} for r in rows]}


def compare(runs: dict) -> dict:
    run, search = runs.get("default_run"), runs.get("search")
    if not run or not search or "error" in run or "error" in search:
        return {"why": "a run is missing or failed"}
    after = runs.get("default_run_after")
    # the default run's wall time varies by a tenth between runs on this machine: measured before and after the
    # search, the mean is the denominator (both are reported)
    walls = [run["wall_seconds"]] + ([after["wall_seconds"]] if after and "error" not in after else [])
    ratio = search["wall_seconds"] / (sum(walls) / len(walls))
    default_val = run["validation_best"]
    return {"wall_ratio": round(ratio, 2), "default_run_walls": walls, "target_ratio": TARGET_RATIO, "ratio_met": ratio <= TARGET_RATIO,
            "metric": run["main_metric"], "default_run_validation": default_val,
            "search_defaults_trial_validation": search["defaults_value"], "search_best_validation": search["best_value"],
            "best_at_least_default": search["best_value"] >= default_val,
            "test_default_run": run["test_metric"], "test_search_best": search["test_metric"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEMO), help="the config of both (default examples/sentiment.yaml)")
    ap.add_argument("--trials", type=int, default=None, help="trials of the search (default 20; --smoke 4)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model on a few rows: checks the bench, measures nothing")
    ap.add_argument("--out", default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; --smoke: a file in "
                    f"{tempfile.gettempdir()})")
    args = ap.parse_args()
    from tuneforge.models.device import cpu_info
    from tuneforge.training.launch import usable_cores

    trials = args.trials or (4 if args.smoke else 20)
    work = Path(tempfile.mkdtemp(prefix="tuneforge-bench-search-"))
    config = smoke_config(work) if args.smoke else Path(args.config)
    out_path = harness.output_path(args.out, args.smoke, "tuneforge_search_smoke.json", DEFAULT_OUT)
    results = {"bench": "search", "config": str(config), "smoke": args.smoke, "trials": trials, "cpu_info": cpu_info(),
               "note": "a smoke test: a tiny random model, not a measurement" if args.smoke else
               "one default run, the search, the default run again, one after the other on the same machine; wall times "
               "include start-up; the ratio is over the mean of the two default runs",
               "runs": {}, "failed": []}

    save, update = harness.recorder(out_path, results, compare)

    def default_run() -> dict:
        r = train(config, work / "default", 1, usable_cores())
        r["validation_best"] = json.loads((work / "default" / "metrics.json").read_text())["validation"]["best"]
        return r

    harness.attempt(results, "default_run", default_run, save, update)
    harness.attempt(results, "search", lambda: tune(config, work / "search", trials), save, update,
                    hide=("traceback", "trials_table", "space"))
    harness.attempt(results, "default_run_after", default_run, save, update)
    print(json.dumps(results["comparison"], indent=2))
    print(f"results: {out_path}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
