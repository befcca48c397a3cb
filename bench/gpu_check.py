"""The GPU check (issue #19): every GPU branch of tuneforge run once on a machine with a GPU, its figures written down.

    bash bench/gpu_check.sh OUTDIR [--dry-run] [--budget S] [--models auto|real|standin] [--only STEPS]  # entry point
    python bench/gpu_check.py OUTDIR [the same flags]     # what gpu_check.sh runs once the carried wheels are installed

Steps, in order; each is time-boxed (its cap, and what is left of --budget), a failed one is recorded and the next
runs, OUTDIR/summary.json is rewritten after each, OUTDIR/logs/STEP.log holds its output:
  env          nvidia-smi, torch and CUDA versions, bf16 support, a bf16 matmul, what tuneforge resolves for
               device and precision `auto` (models/device.py), the packages and where they were imported from
  models       each example's model: the real one where installed, else a stand-in of the same architecture and
               size with random weights (bench/gpu_assets.py; the accuracy figures then mean nothing)
  run:NAME     the first example of each task (examples/*.yaml, the Makefile's demos first), precision auto,
               shortened by train.max_steps (GPU: 300, causal LM 100 and max_new_tokens <= 64, since random weights
               never stop early); the estimate against the actual (metrics.json cost), precision, device, samples/s,
               peak memory. Dry run: a few hundred rows, 4 steps, 8 new tokens.
  serve:NAME   `tuneforge serve` of each finished non-LLM run on device auto / precision auto: /ready, /v1/predict
               alone, with 32 texts, 64 requests from 16 threads, a wrong key (401), /metrics; the classification
               run's served labels against `tuneforge predict` (fp32, CPU)
  llm-bench    bench/llm_serve_throughput.py at 8 clients, tuneforge vs the hand-written server (both on the GPU:
               --peer-device cuda), one round, no soak
  run:NAME     the other examples (more of a task already run)
  fsdp         train.distributed.strategy fsdp with --nproc N on the classification config: N GPUs when there are
               2 or more, else "skipped: 1 GPU"; the dry run uses 2 CPU processes (gloo)
Without --dry-run a machine with no CUDA device stops after `env`. On the GPU, nvidia-smi samples memory and
utilisation every 500 ms (OUTDIR/gpu_trace.csv; each step's highest memory and mean utilisation in the summary).
OUTDIR/summary.json: every step's status (ok, fail, skipped by design, out-of-time), seconds and figures,
`estimate_vs_actual` (one row per run), the models' weights (real or random). Exit status 0 when no step failed or
was left out for time. The steps themselves: bench/gpu_check_steps.py and bench/gpu_check_serve.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gpu_assets as assets  # bench/ is on sys.path: this script's folder
from gpu_check_serve import step_llm_bench, step_serve
from gpu_check_steps import (ROOT, SETTINGS, Check, estimate_table, ordered_examples, step_env, step_fsdp, step_models,
                             step_run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path, help="where the figures go (summary.json, env.json, runs/, logs/)")
    ap.add_argument("--dry-run", action="store_true", help="on a CPU, tiny settings: proves the plumbing")
    ap.add_argument("--budget", type=float, help="seconds for the whole check (default: GPU 540, dry run 1500)")
    ap.add_argument("--models", choices=["auto", "real", "standin"], default=None,
                    help="auto: the real model where installed, else a random stand-in (default; the dry run prefers "
                         "stand-ins, as the GPU machine will build them, when .gpu/ holds their files)")
    ap.add_argument("--only", help="comma-separated steps or their prefixes (run:sentiment, serve, llm-bench, fsdp) to run; "
                    "env and models always run, and a serve or bench step takes its run along (a rerun of what failed)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tuneforge-gpucheck-work"),
                    help="runs, stand-in models and derived data (big files: kept out of OUTDIR)")
    args = ap.parse_args()
    mode = "dry-run" if args.dry_run else "gpu"
    models = args.models or ("standin" if args.dry_run and (assets.GPU_DIR / "models").is_dir() else "auto")
    out, work = args.outdir.resolve(), args.work.resolve()
    for d in (out / "logs", out / "configs", out / "runs", work):
        d.mkdir(parents=True, exist_ok=True)
    c = Check(out, work, mode, args.budget or SETTINGS[mode]["budget"], models)
    if (out / "install.json").is_file():
        c.summary["wheels"] = json.loads((out / "install.json").read_text())
    print(f"GPU check, {mode}: figures -> {out}; work -> {work}; models {models}; budget {c.summary['budget_s']:.0f} s",
          flush=True)
    first, rest = ordered_examples()
    examples = first + rest
    c.summary["examples"] = {n: {"config": str(p.relative_to(ROOT)), "task": t} for n, p, t in examples}
    llm = next((n for n, _, t in first if t == "causal-lm"), None)
    cls = next(((n, p, t) for n, p, t in first if t == "text-classification"), None)
    plan = [(f"run:{n}", c.s["run"].get(t, 150), step_run, (n, p, t)) for n, p, t in first]
    plan += [(f"serve:{n}", c.s["serve" if t == "text-classification" else "serve_other"], step_serve,
              (n, t == "text-classification")) for n, p, t in first if t != "causal-lm"]
    plan += [("llm-bench", c.s["llm-bench"], step_llm_bench, (llm,))] if llm else []
    plan += [(f"run:{n}", c.s["run"].get(t, 150), step_run, (n, p, t)) for n, p, t in rest]
    plan += [("fsdp", c.s["fsdp"], step_fsdp, cls)] if cls else []
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        chosen = {name for name, *_ in plan if any(name == w or name.startswith(w) for w in wanted)}
        needs = {f"serve:{n}": f"run:{n}" for n, _, _ in first} | ({"llm-bench": f"run:{llm}"} if llm else {})
        chosen |= {needs[n] for n in list(chosen) if n in needs}
        plan = [x for x in plan if x[0] in chosen]
    c.start_gpu_trace()
    try:
        env = c.step("env", c.s["env"], step_env)
        if env.get("no_gpu") or "figures" not in env:  # no GPU, or torch / tuneforge would not even load
            for name, *_ in [("models",), *plan]:
                c.record(name, {"status": "skipped", "why": "env failed: " + env.get("why", "")}, 0)
        elif c.step("models", c.s["models"], step_models, examples)["status"] == "ok" or c.models:
            for name, cap, fn, fn_args in plan:
                c.step(name, cap, fn, *fn_args)
    finally:
        c.stop_gpu_trace()
    c.summary["estimate_vs_actual"] = estimate_table(c.summary["steps"])
    random_refs = [r for r, i in c.models.items() if i.get("weights", "").startswith("random")]
    c.summary["weights_note"] = (f"random stand-in weights for {', '.join(random_refs)}: speed, memory and the estimate are "
                                 "the real model's, accuracy figures mean nothing") if random_refs else "real weights"
    c.save()
    print(f"\n{'step':<24}{'status':<9}{'s':>7}  figures")
    for n, st in c.summary["steps"].items():
        print(f"{n:<24}{st['status']:<9}{st['seconds']:>7}  {st.get('line') or st.get('why') or ''}")
    verdict = "OK" if c.summary["ok"] else "; ".join(
        f"{what}: {', '.join(c.summary[key])}" for what, key in (("FAILED", "failed"), ("NOT RUN (time)", "out_of_time"))
        if c.summary[key])
    print(f"\n{verdict}; {c.summary['wall_s']} s; {c.summary['weights_note']}; {out / 'summary.json'}")
    return 0 if c.summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
