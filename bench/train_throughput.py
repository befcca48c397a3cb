"""Training throughput: tuneforge's default recipe vs a plain Hugging Face `Trainer` (its defaults),
same model, same data, same split, side by side in this one process.

    .venv/bin/python bench/train_throughput.py [--train-rows 3000] [--trainer-bf16]

Both train one epoch at batch 32 on the demo data (Rotten Tomatoes, MiniLM-L6) and are scored on the
same test split. Reports samples/s of the training loop (evaluation excluded for both), the ratio,
and test accuracy. `--train-rows 0` uses the whole training split (slow on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-rows", type=int, default=3000)
    ap.add_argument("--trainer-bf16", action="store_true", help="also run the Trainer with bf16=True")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train.* default for tuneforge's side, e.g. --set frozen_layers=3")
    ap.add_argument("--skip-trainer", action="store_true", help="only tuneforge's side (for trying settings)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results_train_throughput.json"))
    args = ap.parse_args()

    from accelerate import Accelerator
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from tuneforge.config import load_config
    from tuneforge.data.prepare import prepare_data
    from tuneforge.models.infer import encode, pad_id_of, predict_logits
    from tuneforge.models.load import apply_method, load_classifier, load_tokenizer
    from tuneforge.models.resolve import resolve_model
    from tuneforge.tasks.classification import LabelSpace
    from tuneforge.training.loop import TrainData, train
    from tuneforge.training.precision import resolve_precision

    hf_logging.set_verbosity_error()
    cfg = load_config(ROOT / "examples" / "sentiment.yaml")
    cfg.train = type(cfg.train)(**{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    # ^ tuneforge's defaults (not the demo's), plus any --set overrides
    data = prepare_data(cfg.data, cfg.task)
    train_ex, val_ex, test_ex = data.splits.train, data.splits.val, data.splits.test
    if args.train_rows:
        train_ex = train_ex.subset(np.random.default_rng(0).permutation(len(train_ex))[: args.train_rows])
    model_dir = resolve_model(cfg.model.name)
    tok = load_tokenizer(model_dir)
    space = LabelSpace(tuple(data.labels), False)
    ids = {k: encode(tok, ex.texts, cfg.model.max_length) for k, ex in (("train", train_ex), ("val", val_ex), ("test", test_ex))}
    y = {k: space.encode(ex.labels) for k, ex in (("train", train_ex), ("val", val_ex), ("test", test_ex))}
    pad = pad_id_of(tok)

    def test_accuracy(model) -> float:
        pred = predict_logits(model, ids["test"], pad).argmax(1)
        return float((pred == y["test"]).mean())

    results = {"train_rows": len(train_ex), "test_rows": len(test_ex), "torch_threads": torch.get_num_threads()}

    # --- tuneforge default recipe ---
    precision, why = resolve_precision("auto", torch.device("cpu"))
    model = apply_method(load_classifier(model_dir, space, cfg.train.seed), cfg.train)
    acc = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.early_stopping_patience = 0
        cfg.train.eval_every = 10**9  # evaluate once, at the end (the Trainer evaluates never)
        r = train(model, TrainData(ids["train"], y["train"]), TrainData(ids["val"], y["val"]), space, cfg.train, cfg.eval,
                  accelerator=acc, precision=precision, pad_id=pad, checkpoint_dir=Path(tmp) / "ckpt", resume=False)
    results["tuneforge"] = {"samples_per_s": r.samples_per_second, "test_accuracy": test_accuracy(acc.unwrap_model(model)),
                            "method": cfg.train.method, "precision": precision, "seconds": r.train_seconds}
    print("tuneforge", results["tuneforge"], flush=True)

    # --- plain Trainer, defaults (fp32), batch 32, dynamic padding ---
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids["train"])

        def __getitem__(self, i):
            return {"input_ids": ids["train"][i], "labels": int(y["train"][i])}

    if args.skip_trainer:
        return
    variants = [("trainer_fp32", False)] + ([("trainer_bf16", True)] if args.trainer_bf16 else [])
    for name, bf16 in variants:
        torch.manual_seed(42)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=2, local_files_only=True)
        with tempfile.TemporaryDirectory() as tmp:
            targs = TrainingArguments(output_dir=tmp, num_train_epochs=1, per_device_train_batch_size=32, bf16=bf16,
                                      report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
            trainer = Trainer(model=model, args=targs, train_dataset=Rows(), data_collator=DataCollatorWithPadding(tok))
            t0 = time.perf_counter()
            out = trainer.train()
            seconds = time.perf_counter() - t0
        results[name] = {"samples_per_s": out.metrics["train_samples_per_second"], "test_accuracy": test_accuracy(model),
                         "seconds": seconds}
        print(name, results[name], flush=True)

    results["ratio_vs_trainer_fp32"] = results["tuneforge"]["samples_per_s"] / results["trainer_fp32"]["samples_per_s"]
    print(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
