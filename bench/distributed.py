"""Scale-out: the demo config trained by one process (2 threads) and by `--nproc 2` (1 thread each), one run after the
other, through the CLI a user types; samples/s of both and the test-metric difference set against the bootstrap CI.

    .venv/bin/python bench/distributed.py            # examples/sentiment.yaml (MiniLM) -> bench/results_distributed.json
    .venv/bin/python bench/distributed.py --smoke    # a tiny random BERT on a few rows, ~1 min -> a file in /tmp
    .venv/bin/python bench/distributed.py --threads 8 --nproc 4   # on a larger machine: 8 threads vs 4 processes x 2

Both runs train the same recipe (same steps, same rows per optimizer step: the processes split each batch), so the
test metrics differ only by the dropout draws (each process has its own stream) and float rounding. On 2 cores, two
processes of one thread each cannot beat one process of two threads: the same arithmetic on the same cores, plus the
gradient all-reduce after every step. The figure that matters there is that the metric stays within the CI; the
speed-up needs cores (or GPUs) to spare.
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

import yaml

import harness  # bench/harness.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results_distributed.json"
DEMO = ROOT / "examples" / "sentiment.yaml"


def smoke_config(work: Path) -> Path:
    """A tiny random BERT (2 layers, hidden 32, word-level tokenizer) and 200 review-like rows: the plumbing only."""
    import random

    import pandas as pd
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    pos, neg = "good great superb lovely moving brilliant".split(), "bad awful dull boring weak clumsy".split()
    filler = "the film movie plot actor story was is a and very".split()
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.sample(pos if i % 2 == 0 else neg, 2) + rng.sample(filler, 4)) + f" {i}",
             "label": "pos" if i % 2 == 0 else "neg"} for i in range(200)]
    pd.DataFrame(rows).to_csv(work / "data.csv", index=False)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(pos + neg + filler)) + [str(i) for i in range(200)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    model_dir = work / "tiny-bert"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                            mask_token="[MASK]", model_max_length=64).save_pretrained(model_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(model_dir)
    cfg = {"data": {"path": str(work / "data.csv"), "val_fraction": 0.2, "test_fraction": 0.2},
           "model": {"name": str(model_dir), "max_length": 32},
           "train": {"method": "full", "epochs": 4, "batch_size": 8, "learning_rate": 2e-3, "eval_every": 3},
           "eval": {"bootstrap_samples": 200}, "audit": {"label_issues": False}, "output": {"dir": str(work / "run")}}
    path = work / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, out: Path, nproc: int, threads: int) -> dict:
    """One run through the CLI; its figures from metrics.json and run.json."""
    cmd = [sys.executable, "-m", "tuneforge", "run", str(config), "--output", str(out), "--overwrite"]
    cmd += ["--nproc", str(nproc)] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    main = metrics["main_metric"]
    model = metrics["test"]["model"]
    return {"command": " ".join(cmd[1:]), "omp_num_threads": threads, "processes": run["distributed"]["processes"],
            "planned_steps": run["resolved"]["total_steps"], "steps": run["steps"],
            "stopped_early": metrics["validation"]["stopped_early"], "best_step": metrics["validation"]["best_step"],
            "samples_per_s": metrics["cost"]["actual"]["train_samples_per_second"],
            "train_seconds": metrics["cost"]["actual"]["seconds_train"], "wall_seconds": round(wall, 1),
            "main_metric": main, "test_metric": model[main], "ci": model.get("ci"),
            "test_accuracy": model.get("accuracy"), "precision": run["precision"]}


def compare(runs: dict) -> dict:
    one, many = runs.get("one_process"), runs.get("processes")
    if not one or not many or "error" in one or "error" in many:
        return {"why": "a run is missing or failed"}
    diff = many["test_metric"] - one["test_metric"]
    ci = one["ci"] or {}
    half = (ci["high"] - ci["low"]) / 2 if ci else None
    # the same plan; the steps run may differ where early stopping reads a validation score the dropout draws moved
    return {"speedup": many["samples_per_s"] / one["samples_per_s"], "same_plan": one["planned_steps"] == many["planned_steps"],
            "steps_run": [one["steps"], many["steps"]],
            "metric": one["main_metric"], "metric_difference": diff, "ci_half_width_one_process": half,
            "within_ci": (ci["low"] <= many["test_metric"] <= ci["high"]) if ci else None,
            "difference_over_ci_half_width": diff / half if half else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEMO), help="the config both runs train (default examples/sentiment.yaml)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model on a few rows: checks the bench, measures nothing")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the distributed run (default 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the one-process run (default: usable cores); each process gets threads / nproc")
    ap.add_argument("--out", default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; --smoke: a file in "
                    f"{tempfile.gettempdir()}, so a smoke test never overwrites the committed figures)")
    args = ap.parse_args()
    from tuneforge.models.device import cpu_info
    from tuneforge.training.launch import usable_cores

    threads = args.threads or usable_cores()
    work = Path(tempfile.mkdtemp(prefix="tuneforge-bench-distributed-"))
    config = smoke_config(work) if args.smoke else Path(args.config)
    out_path = harness.output_path(args.out, args.smoke, "tuneforge_distributed_smoke.json", DEFAULT_OUT)
    results = {"bench": "distributed", "config": str(config), "smoke": args.smoke, "cpu_info": cpu_info(),
               "note": "a smoke test: a tiny random model, not a measurement" if args.smoke else
               "one run after the other on the same machine; samples/s are tuneforge's optimizer-step times",
               "runs": {}, "failed": []}

    save, update = harness.recorder(out_path, results, compare)

    per_process = max(1, threads // args.nproc)
    harness.attempt(results, "one_process", lambda: train(config, work / "one", 1, threads), save, update)
    harness.attempt(results, "processes", lambda: train(config, work / "many", args.nproc, per_process), save, update)
    c = results["comparison"]
    print(json.dumps(c, indent=2))
    print(f"results: {out_path}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
