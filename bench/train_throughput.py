"""Training throughput: tuneforge against a plain Hugging Face `Trainer`, on the same model, data,
split, batch size (32), epochs (1), max_length and dynamic padding. Every run is on the CPU and
they run one after another in this one process, never two at once.

    .venv/bin/python bench/train_throughput.py                   # the full bench -> bench/results_train_throughput.json
    .venv/bin/python bench/train_throughput.py --rows 0          # the whole training split (slow on 2 cores)
    .venv/bin/python bench/train_throughput.py --rows 64 --val-rows 64 --test-rows 64 --out /tmp/tt.json   # smoke test
    .venv/bin/python bench/train_throughput.py --trainer-bf16    # also the bf16 Trainer where the CPU lacks fast bf16
    .venv/bin/python bench/train_throughput.py --trainer-bf16 off   # the fp32 Trainer only
    .venv/bin/python bench/train_throughput.py --set frozen_layers=2 --skip-full --skip-trainer   # try settings

The runs (the `runs` key of the JSON; the same figures also sit at its top level, as before):
  tuneforge        tuneforge's default recipe (method frozen: embeddings + half the layers fixed, lr 2e-4,
                   length-grouped batches, precision `auto`)
  tuneforge_full   tuneforge with train.method full (every weight, its default lr 5e-5), precision `auto`
  trainer_fp32     plain `Trainer`, its defaults (full fine-tune, lr 5e-5, no length grouping), fp32
  trainer_bf16     the same with bf16=True. Run by default when the CPU has a fast bf16 path (AMX or
                   avx512_bf16, as tuneforge's `auto` precision decides); elsewhere bf16 is emulated and
                   far slower than fp32, so it is skipped and the JSON says why (`--trainer-bf16` forces it)

Every run trains 1 epoch: tuneforge's runs get epochs: 1 set explicitly (its own default, epochs: null, picks the
passes by data size: 7 for 3,000 rows), so all sides see the same rows once. `--set epochs=N` changes only
tuneforge's side and so breaks the like-for-like (likewise batch_size).

The comparisons: tuneforge default / the Trainer at its best precision (the faster Trainer run), and
tuneforge full / the Trainer at the same precision as tuneforge full; each with both test accuracies.

samples/s of the training loop, evaluation excluded for all: tuneforge's are summed optimizer-step
times (batch collation included); the Trainer's headline figure is its own `train_samples_per_second`
(its whole `train()` call: set-up and data loading included). `step_samples_per_s` also times only the
Trainer's optimizer steps (from `on_step_begin` to `on_step_end`, batch fetching excluded), which
slightly favours the Trainer; the `*_step_timed` ratios use it. Test accuracy is scored in fp32 for all.

The results JSON is rewritten after every run, so a run that fails or a crash later loses nothing; a
failed run is recorded with its error and the rest still run (the exit status is then 1).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import harness  # bench/harness.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results_train_throughput.json"
DEFAULT_ROWS = 3000
BATCH_SIZE = 32  # the Trainer's; tuneforge's train.batch_size default is the same
EPOCHS = 1


def cpu_info() -> dict:
    from tuneforge.models.device import cpu_info as info

    return info()


def parse_sets(pairs: list[str]) -> dict:
    out = {}
    for kv in pairs:
        if "=" not in kv:
            raise SystemExit(f"--set/--set-full expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def trainer_sampling(targs) -> str:
    """How the Trainer orders its batches (transformers 5: train_sampling_strategy; 4.x: group_by_length)."""
    strategy = getattr(targs, "train_sampling_strategy", None)
    return strategy or ("group_by_length" if getattr(targs, "group_by_length", False) else "random")


def compare(runs: dict, tf_name: str, tr_name: str | None, missing_why: str | None = None) -> dict:
    a, b = runs.get(tf_name), (runs.get(tr_name) if tr_name else None)
    if not a or "error" in a or not b or "error" in b:
        return {"tuneforge_run": tf_name, "trainer_run": tr_name, "ratio": None,
                "why": missing_why or "a run is missing or failed"}
    return {"tuneforge_run": tf_name, "trainer_run": tr_name,
            "ratio": a["samples_per_s"] / b["samples_per_s"],
            "ratio_step_timed": a["samples_per_s"] / b["step_samples_per_s"] if b["step_samples_per_s"] else None,
            "tuneforge_samples_per_s": a["samples_per_s"], "trainer_samples_per_s": b["samples_per_s"],
            "trainer_step_samples_per_s": b["step_samples_per_s"],
            "tuneforge_test_accuracy": a["test_accuracy"], "trainer_test_accuracy": b["test_accuracy"],
            "accuracy_difference": a["test_accuracy"] - b["test_accuracy"],
            "precisions": [a["precision"], b["precision"]]}


def comparisons(runs: dict, trainer_precisions: list[str], full_precision: str | None) -> dict:
    """tuneforge default vs the faster Trainer run; tuneforge full vs the Trainer at its precision; default vs fp32."""
    ok_trainers = [n for n in runs if n.startswith("trainer_") and "error" not in runs[n]]
    best = max(ok_trainers, key=lambda n: runs[n]["samples_per_s"]) if ok_trainers else None
    comps = {"default_vs_trainer_best": {**compare(runs, "tuneforge", best),
                                         "trainer_best_is": "the faster of the Trainer runs that finished"}}
    if full_precision is not None:
        why = None if full_precision in trainer_precisions else f"no Trainer run at tuneforge full's precision ({full_precision})"
        comps["full_vs_trainer_full_same_precision"] = compare(runs, "tuneforge_full", f"trainer_{full_precision}", why)
    comps["default_vs_trainer_fp32"] = compare(runs, "tuneforge", "trainer_fp32")
    return comps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", "--train-rows", dest="rows", type=int, default=DEFAULT_ROWS,
                    help=f"training rows, a fixed random subset (default {DEFAULT_ROWS}); 0 = the whole training split")
    ap.add_argument("--val-rows", type=int, default=0,
                    help="validation rows tuneforge evaluates on once, at the end (outside its timing); 0 = all")
    ap.add_argument("--test-rows", type=int, default=0, help="test rows every run is scored on; 0 = all")
    ap.add_argument("--trainer-bf16", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                    help="the bf16 Trainer run: auto (default) = when the CPU has a fast bf16 path; "
                         "on (the bare flag) = always; off = never")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train.* default for tuneforge's default run, e.g. --set frozen_layers=3")
    ap.add_argument("--set-full", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train.* default for tuneforge's full run (method stays full)")
    ap.add_argument("--skip-full", action="store_true", help="no tuneforge full run")
    ap.add_argument("--skip-trainer", action="store_true", help="only tuneforge's side (for trying settings)")
    ap.add_argument("--out", default=None,
                    help=f"results JSON; default {DEFAULT_OUT.relative_to(ROOT)} at the default sizes, and a file in "
                         f"{tempfile.gettempdir()} for a smaller run (so a smoke test never overwrites the committed figures)")
    args = ap.parse_args()
    smaller = 0 < args.rows < DEFAULT_ROWS or args.val_rows > 0 or args.test_rows > 0
    if args.out:
        out_path = Path(args.out)
    elif smaller:
        out_path = Path(tempfile.gettempdir()) / f"tuneforge_train_throughput_{args.rows}rows.json"
    else:
        out_path = DEFAULT_OUT

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import accelerate
    import transformers
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    from tuneforge.config import load_config
    from tuneforge.tasks.classification.data import prepare_data
    from tuneforge.models.infer import encode, pad_id_of, predict_logits
    from tuneforge.models.load import apply_method, load_tokenizer, quiet_transformers
    from tuneforge.tasks.classification.model import load_classifier
    from tuneforge.models.resolve import resolve_model
    from tuneforge.tasks.classification.labels import LabelSpace
    from tuneforge.tasks.behaviour import get_task
    from tuneforge.training import cost
    from tuneforge.training.loop import TrainData, default_collate, default_loss, train
    from tuneforge.models.device import resolve_precision

    hf_logging.set_verbosity_error()
    cpu = torch.device("cpu")
    cfg = load_config(ROOT / "examples" / "sentiment.yaml")  # the data and model sections; train.* are the defaults
    TrainConfig = type(cfg.train)
    # epochs fixed to the Trainer's (tuneforge's own default may pick the passes by data size), unless --set says so
    default_cfg = TrainConfig(**{"epochs": EPOCHS, **parse_sets(args.set)})
    full_cfg = TrainConfig(**{"epochs": EPOCHS, **parse_sets(args.set_full), "method": "full"}) if not args.skip_full else None

    # --- hardware, and which Trainer precisions to run ---
    hw = cpu_info()
    auto_precision, auto_why = resolve_precision("auto", cpu)
    print(f"CPU: {hw['model']}; amx_bf16 {'yes' if hw['amx_bf16'] else 'no'}, avx512_bf16 "
          f"{'yes' if hw['avx512_bf16'] else 'no'}; torch threads {hw['torch_threads']} "
          f"({hw['usable_cpus']} usable CPUs); auto precision: {auto_precision} ({auto_why})", flush=True)
    tf_precisions = {"tuneforge": resolve_precision(default_cfg.precision, cpu)}
    if full_cfg is not None:
        tf_precisions["tuneforge_full"] = resolve_precision(full_cfg.precision, cpu)
    trainer_precisions, trainer_note = [], "skipped (--skip-trainer)"
    if not args.skip_trainer:
        trainer_precisions = ["fp32"]
        if args.trainer_bf16 == "on":
            trainer_precisions.append("bf16")
            trainer_note = "fp32 and bf16 (--trainer-bf16)" + ("" if hw["fast_bf16"] else
                           "; this CPU has no AMX/avx512_bf16, so bf16 is emulated and slow here")
        elif args.trainer_bf16 == "off":
            trainer_note = "fp32 only (--trainer-bf16 off)"
        elif auto_precision == "bf16":
            trainer_precisions.append("bf16")
            trainer_note = f"fp32 and bf16: {auto_why}, so the bf16 Trainer is the fair peer"
        else:
            trainer_note = (f"fp32 only: {auto_why} (no AMX / avx512_bf16 in /proc/cpuinfo); bf16 here would be "
                            "emulated, far slower than fp32, so tuneforge's auto precision is fp32 too")
        tf_full_precision = tf_precisions.get("tuneforge_full", ("fp32",))[0]
        if tf_full_precision == "bf16" and "bf16" not in trainer_precisions and args.trainer_bf16 != "off":
            trainer_precisions.append("bf16")  # tuneforge full was set to bf16: compare it at the same precision
            trainer_note += "; bf16 added to match tuneforge full's precision"
        print(f"Trainer precisions: {trainer_note}", flush=True)

    # --- data: the same rows for every run ---
    data = prepare_data(cfg.data, cfg.task)
    ex = {"train": data.splits.train, "val": data.splits.val, "test": data.splits.test}
    for k, n, seed in (("train", args.rows, 0), ("val", args.val_rows, 1), ("test", args.test_rows, 2)):
        if n and n < len(ex[k]):
            ex[k] = ex[k].subset(np.random.default_rng(seed).permutation(len(ex[k]))[:n])
    model_dir = resolve_model(cfg.model.name)
    tok = load_tokenizer(model_dir)
    space = LabelSpace(tuple(data.labels), False)
    ids = {k: encode(tok, e.texts, cfg.model.max_length) for k, e in ex.items()}
    y = {k: space.encode(e.labels) for k, e in ex.items()}
    pad = pad_id_of(tok)

    def test_accuracy(model) -> float:
        pred = predict_logits(model, ids["test"], pad).argmax(1)  # fp32, as a user's load scores it
        return float((pred == y["test"]).mean())

    results: dict = {
        "status": "running",
        "train_rows": len(ids["train"]), "val_rows": len(ids["val"]), "test_rows": len(ids["test"]),
        "torch_threads": hw["torch_threads"],
        "cpu": hw,
        "auto_precision": {"precision": auto_precision, "why": auto_why},
        "setup": {"model": cfg.model.name, "data": cfg.data.path, "max_length": cfg.model.max_length,
                  "batch_size": BATCH_SIZE, "epochs": EPOCHS, "padding": "dynamic (to the longest in the batch)",
                  "device": "cpu", "runs": "sequential, one process"},
        "trainer_precisions": trainer_precisions, "trainer_precision_note": trainer_note,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__},
        "runs": {}, "comparisons": {}, "failed": [],
    }
    if len(ids["train"]) < DEFAULT_ROWS or smaller:
        results["note"] = "smaller than the bench's default size: a smoke test, not a measurement"

    def update_comparisons() -> None:
        full_precision = tf_precisions["tuneforge_full"][0] if full_cfg is not None else None
        results["comparisons"] = comparisons(results["runs"], trainer_precisions, full_precision)
        results["ratio_vs_trainer_fp32"] = results["comparisons"]["default_vs_trainer_fp32"]["ratio"]  # as before

    def save() -> None:
        harness.write_json(out_path, results)

    def attempt(name: str, fn) -> None:
        r = harness.attempt(results, name, fn, save, update_comparisons, hide=("traceback",))
        results[name] = r  # top-level too, where earlier versions of this bench put them

    # --- utilisation (#26): model FLOPs per trained position, counted on one forward+backward of 32 training rows
    # (the method's own work: frozen layers without their backward), times each run's real tokens per second, beside
    # this CPU's measured matmul peak at the run's precision; the same count serves every run of the same method
    mean_tokens = float(np.mean([len(x) for x in ids["train"]]))
    flops_cache: dict = {}
    peaks: dict = {}

    def flops_per_position(model, method: str, precision: str) -> float:
        key = (method, precision)
        if key not in flops_cache:
            idx = np.arange(32)
            width = max(len(ids["train"][i]) for i in idx)
            counted = cost.counted_flops(model, TrainData(ids["train"], y["train"]), idx, pad, torch.device("cpu"),
                                         precision, default_loss, default_collate)
            model.zero_grad(set_to_none=True)
            flops_cache[key] = counted / (len(idx) * width)
        return flops_cache[key]

    def utilisation(samples_per_s: float, method: str, precision: str, model) -> dict:
        if precision not in peaks:
            peaks[precision] = cost.matmul_flops(precision)
        achieved = flops_per_position(model, method, precision) * mean_tokens * samples_per_s
        return {"model_flops_per_s": achieved, "peak_flops_per_s": peaks[precision],
                "share_of_peak": achieved / peaks[precision]}

    # --- tuneforge ---
    def run_tuneforge(name: str, tcfg) -> dict:
        precision, why = tf_precisions[name]
        AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer before may have set another precision
        model = apply_method(load_classifier(model_dir, space, tcfg.seed), tcfg)
        acc = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=True)
        tcfg.early_stopping_patience = 0
        tcfg.eval_every = 10**9  # evaluate once, at the end, outside the timing (the Trainer evaluates never)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            validate = get_task("text-classification").validator(cfg, space, tok, cfg.model.max_length,
                                                                 ids["val"], y["val"], pad, precision)
            r = train(model, TrainData(ids["train"], y["train"]), validate, tcfg, cfg.eval,
                      accelerator=acc, precision=precision, pad_id=pad, checkpoint_dir=Path(tmp) / "ckpt", resume=False)
            wall = time.perf_counter() - t0
        raw = acc.unwrap_model(model)
        return {**utilisation(r.samples_per_second, tcfg.method, precision, raw),
                "samples_per_s": r.samples_per_second, "step_samples_per_s": r.samples_per_second,
                "test_accuracy": test_accuracy(raw), "method": tcfg.method,
                **({"frozen_layers": len(raw._tuneforge_frozen) - 1} if hasattr(raw, "_tuneforge_frozen") else {}),
                "learning_rate": tcfg.learning_rate, "batch_size": tcfg.batch_size, "epochs": tcfg.epochs,
                "epochs_run": r.samples / len(ids["train"]),
                "sampling": "group_by_length" if tcfg.group_by_length else "random", "precision": precision, "precision_why": why,
                "trainable_parameters": sum(p.numel() for p in raw.parameters() if p.requires_grad),
                "steps": r.steps, "samples": r.samples, "seconds": r.train_seconds,
                "wall_seconds_incl_final_val_eval": wall}

    # --- plain Trainer, its defaults: full fine-tune, batch 32, dynamic padding ---
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids["train"])

        def __getitem__(self, i):
            return {"input_ids": ids["train"][i], "labels": int(y["train"][i])}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.steps, self._t0 = 0.0, 0, None

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds += time.perf_counter() - self._t0
            self.steps += 1

    def run_trainer(precision: str) -> dict:
        torch.manual_seed(42)
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=len(space.labels),
                                                                       local_files_only=True)
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as tmp:
            # use_cpu=True: without it, bf16=True asks for a bf16 GPU and raises on a CPU-only machine
            targs = TrainingArguments(output_dir=tmp, num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH_SIZE,
                                      bf16=precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
                                      logging_strategy="no", disable_tqdm=True)
            trainer = Trainer(model=model, args=targs, train_dataset=Rows(), data_collator=DataCollatorWithPadding(tok),
                              callbacks=[timer])
            t0 = time.perf_counter()
            out = trainer.train()
            wall = time.perf_counter() - t0
        samples = len(ids["train"]) * EPOCHS
        return {**utilisation(out.metrics["train_samples_per_second"], "full", precision, model.train()),
                "samples_per_s": out.metrics["train_samples_per_second"],
                "step_samples_per_s": samples / timer.seconds if timer.seconds else 0.0,
                "test_accuracy": test_accuracy(model), "method": "full", "learning_rate": targs.learning_rate,
                "batch_size": BATCH_SIZE, "epochs": EPOCHS, "sampling": trainer_sampling(targs),
                "precision": precision, "steps": timer.steps, "samples": samples,
                "seconds": out.metrics["train_runtime"], "step_seconds": timer.seconds, "wall_seconds": wall}

    try:
        attempt("tuneforge", lambda: run_tuneforge("tuneforge", default_cfg))
        if full_cfg is not None:
            attempt("tuneforge_full", lambda: run_tuneforge("tuneforge_full", full_cfg))
        for p in trainer_precisions:
            attempt(f"trainer_{p}", lambda p=p: run_trainer(p))
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
    hw = results["cpu"]
    print(f"\n{results['train_rows']} training rows, {results['test_rows']} test rows, batch {BATCH_SIZE}, "
          f"{EPOCHS} epoch; CPU {hw['model']} (amx_bf16 {hw['amx_bf16']}, avx512_bf16 {hw['avx512_bf16']}), "
          f"torch threads {hw['torch_threads']}")
    print(f"Trainer: {results['trainer_precision_note']}")
    print(f"{'run':<16}{'method':<8}{'precision':<10}{'samples/s':>10}{'step-timed':>12}{'test acc':>10}"
          f"{'GFLOP/s':>10}{'of peak':>9}")
    for name, r in results["runs"].items():
        if "error" in r:
            print(f"{name:<16}FAILED: {r['error']}")
            continue
        print(f"{name:<16}{r['method']:<8}{r['precision']:<10}{r['samples_per_s']:>10.1f}"
              f"{r['step_samples_per_s']:>12.1f}{r['test_accuracy']:>10.4f}"
              f"{r.get('model_flops_per_s', 0) / 1e9:>10.0f}{r.get('share_of_peak', 0):>9.0%}")
    for name, c in results["comparisons"].items():
        if c["ratio"] is None:
            print(f"{name}: n/a ({c['why']})")
        else:
            print(f"{name}: {c['tuneforge_run']} / {c['trainer_run']} = {c['ratio']:.2f}x "
                  f"(step-timed {c['ratio_step_timed'] or 0:.2f}x); test accuracy {c['tuneforge_test_accuracy']:.4f} vs "
                  f"{c['trainer_test_accuracy']:.4f} ({c['accuracy_difference']:+.4f})")


if __name__ == "__main__":
    sys.exit(main())
