"""The default recipe on data sets of different sizes and kinds: does it earn its compute?

    python bench/defaults.py                  # the quick start, defaults only, on each data set
    python bench/defaults.py --epochs 1       # the same with a fixed number of epochs, for comparison

Each data set (bench/public_data.py) runs `tuneforge run --data F --text-column text --label-column label`,
one after another (never two trainings at once), and the table reports test macro-F1 of the model and
of each baseline, whether the gate promoted it, the plan (epochs, steps, the step early stopping chose)
and the whole run's estimated against actual seconds, with the CPU named.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from public_data import write_all  # noqa: E402


def cpu() -> dict:
    from tuneforge.models.device import cpu_info

    return cpu_info()


def run_one(name: str, path: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tuneforge", "run", "--data", str(path), "--text-column", "text", "--label-column", "label",
           "--output", str(out), "--overwrite", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        return {"data": name, "exit_code": proc.returncode, "error": proc.stderr[-2000:]}
    m = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    report = json.loads((out / "data_report.json").read_text())
    audit = json.loads((out / "audit.json").read_text())
    key = m["main_metric"]
    return {
        "data": name, "rows": {k: v["rows"] for k, v in report["splits"].items()},
        "labels": len(m["labels"]), "duplicate_groups": report["duplicate_groups"]["kept_together"],
        "leakage": audit["leakage"]["severity"],
        "model": {key: m["test"]["model"][key], "ci": [m["test"]["model"]["ci"]["low"], m["test"]["model"]["ci"]["high"]]},
        "baselines": {b: v[key] for b, v in m["test"]["baselines"].items()},
        "promoted": m["promoted"], "promotion_reason": m["promotion_reason"],
        "epochs": run["resolved"]["train.epochs"], "max_length": run["resolved"]["model.max_length"], "planned_steps": run["resolved"]["total_steps"],
        "steps": run["steps"], "best_step": m["validation"]["best_step"], "stopped_early": m["validation"]["stopped_early"],
        "seconds": {"estimated": round(m["cost"]["estimated"]["seconds_total"], 1), "actual": m["cost"]["actual"]["seconds_total"],
                    "estimated_for_steps_run": round(m["cost"]["estimated"]["seconds_total_for_steps_run"], 1),
                    "estimated_train": round(m["cost"]["estimated"]["seconds_train"], 1), "train": run["durations_s"]["train"]},
        "precision": run["precision"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="data set names (sms, reviews, debates)")
    ap.add_argument("--epochs", help="pass --epochs to every run (default: the size-adaptive default)")
    ap.add_argument("--out", default="bench/results_defaults.json")
    args = ap.parse_args()
    extra = ["--epochs", args.epochs] if args.epochs else []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_all(Path(tmp) / "data")
        results = {"machine": cpu(), "extra_args": extra, "runs": []}
        for name, path in paths.items():
            if args.only and name not in args.only:
                continue
            r = run_one(name, path, Path(tmp) / name, extra)
            results["runs"].append(r)
            Path(args.out).write_text(json.dumps(results, indent=2))  # each run saved as it finishes
            print(json.dumps(r), flush=True)
    print(f"\n{results['machine']}")
    print("| data | train/val/test | model macro-F1 (95% CI) | tfidf_logreg | frozen_probe | majority | promoted | epochs, steps (best) | est. (for the steps run) / actual s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        if "error" in r:
            print(f"| {r['data']} | exit {r['exit_code']} | | | | | | | |")
            continue
        b = r["baselines"]
        print(f"| {r['data']} | {'/'.join(str(v) for v in r['rows'].values())} | {r['model']['macro_f1']:.4f} "
              f"({r['model']['ci'][0]:.3f}-{r['model']['ci'][1]:.3f}) | {b.get('tfidf_logreg', 0):.4f} | {b.get('frozen_probe', 0):.4f} "
              f"| {b.get('majority', 0):.4f} | {'yes' if r['promoted'] else 'no'} | {r['epochs']:g}, {r['steps']} ({r['best_step']}) "
              f"| {r['seconds']['estimated']:.0f} ({r['seconds']['estimated_for_steps_run']:.0f}) / {r['seconds']['actual']:.0f} |")


if __name__ == "__main__":
    main()
