"""End-to-end runs of the real pipeline on a tiny random model and a few dozen rows."""
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from tuneforge.config import parse_config
from tuneforge.tasks.classification.predictor import Predictor
from tuneforge.pipeline import run
from tuneforge.training import loop

from conftest import make_rows


def _run(base_config, write_csv, n=80, **sections):
    cfg = parse_config(base_config(write_csv(make_rows(n)), **sections))
    return cfg, run(cfg)


def _held_out_rows(n: int, seed: int = 1, offset: int = 200) -> list[dict]:
    """Rows for a separate test file: new word draws, and index suffixes (200+) the training rows never use, so no
    test row copies or nearly copies a training row (the audit would block the run)."""
    rows = make_rows(n, seed=seed)
    for i, r in enumerate(rows):
        r["text"] = r["text"].rsplit(" ", 1)[0] + f" {offset + i}"
    return rows


def _metrics_from_confusion(matrix: list[list[int]], labels: list[str]) -> tuple[float, float]:
    """Accuracy and macro-F1 by scikit-learn, from the (true, predicted) pairs a confusion matrix stands for."""
    pairs = [(labels[t], labels[p]) for t, row in enumerate(matrix) for p, count in enumerate(row) for _ in range(count)]
    y_true, y_pred = zip(*pairs)
    return accuracy_score(y_true, y_pred), f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)


@pytest.mark.parametrize("method", ["full", "frozen", "lora"])
def test_each_method_produces_a_loadable_model_that_predicts_like_tuneforge(base_config, write_csv, method):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    extra = {"frozen_layers": 1} if method == "frozen" else {}
    # training data 45 pos / 25 neg; a separate test file 6 pos / 14 neg, so the majority baseline (the training
    # split's majority class) scores differently from the test split's own majority class
    train_rows = [r for i, r in enumerate(make_rows(90)) if r["label"] == "pos" or i < 50]
    held = _held_out_rows(40)
    test_rows = [r for r in held if r["label"] == "neg"][:14] + [r for r in held if r["label"] == "pos"][:6]
    raw = base_config(write_csv(train_rows), train={"method": method, **extra})
    raw["data"]["test_path"] = str(write_csv(test_rows, "test.csv"))
    cfg = parse_config(raw)
    metrics = run(cfg)
    out = Path(cfg.output.dir)
    for name in ("metrics.json", "config.yaml", "data_report.json", "run.json", "model/model.safetensors",
                 "model/config.json", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not list((out / "model").glob("*.bin")) and not (out / "checkpoint").exists()

    saved = json.loads((out / "metrics.json").read_text())
    labels = ["neg", "pos"]
    texts_test, y_test = [r["text"] for r in test_rows], [r["label"] for r in test_rows]
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")

    # the model's test metrics, recomputed by scikit-learn from plain-transformers predictions on the test file
    with torch.no_grad():
        test_logits = model(**tok(texts_test, padding=True, return_tensors="pt")).logits
    y_model = [model.config.id2label[i] for i in test_logits.argmax(-1).tolist()]
    scored = saved["test"]["model"]
    assert scored["n"] == len(test_rows)
    assert scored["accuracy"] == pytest.approx(accuracy_score(y_test, y_model), abs=1e-12)
    assert scored["macro_f1"] == pytest.approx(f1_score(y_test, y_model, labels=labels, average="macro"), abs=1e-12)
    assert scored["confusion_matrix"]["matrix"] == confusion_matrix(y_test, y_model, labels=labels).tolist()
    ci = scored["ci"]
    assert ci["low"] <= scored["macro_f1"] <= ci["high"]

    # majority: the training split's most frequent class (pos), scored on the test file
    assert metrics["labels"] == labels
    assert Counter(r["label"] for r in train_rows).most_common(1)[0][0] == "pos"
    y_majority = ["pos"] * len(test_rows)
    majority = saved["test"]["baselines"]["majority"]
    assert majority["accuracy"] == pytest.approx(6 / 20)  # the share of pos in the test split
    assert majority["macro_f1"] == pytest.approx(f1_score(y_test, y_majority, labels=labels, average="macro", zero_division=0))
    # the learned baselines: scored on the test file's 14 neg / 6 pos rows, metrics consistent with their confusion matrix
    for b in ("tfidf_logreg", "frozen_probe"):
        m = saved["test"]["baselines"][b]
        matrix = m["confusion_matrix"]["matrix"]
        assert [sum(row) for row in matrix] == [14, 6], b
        acc, f1 = _metrics_from_confusion(matrix, labels)
        assert m["accuracy"] == pytest.approx(acc, abs=1e-12) and m["macro_f1"] == pytest.approx(f1, abs=1e-12), b

    # plain transformers, no tuneforge code: same predictions as `tuneforge predict`
    texts = ["good great film", "awful dull plot", "the story was very flat", "lovely moving scenes"]
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    plain = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    mine = Predictor.load(out / "model").predict(texts)
    assert [r["label"] for r in mine] == plain
    np.testing.assert_allclose([r["probabilities"][plain[0]] for r in mine[:1]],
                               torch.softmax(logits, -1)[0].max().item(), rtol=1e-4)
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_the_signal_is_learned_and_baselines_are_on_the_same_split(base_config, write_csv):
    cfg, metrics = _run(base_config, write_csv, n=120, train={"method": "full", "epochs": 6})
    assert metrics["test"]["model"]["accuracy"] >= 0.9  # sentiment words decide the label
    assert metrics["test"]["baselines"]["majority"]["accuracy"] == pytest.approx(0.5)
    n = metrics["test"]["model"]["n"]
    assert all(b["n"] == n for b in metrics["test"]["baselines"].values())


def test_frozen_layers_do_not_change(base_config, write_csv, tiny_model_dir):
    cfg, _ = _run(base_config, write_csv, train={"method": "frozen", "frozen_layers": 1})
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(cfg.output.dir + "/model/model.safetensors"))
    for key, value in before.items():
        tuned = after["bert." + key] if "bert." + key in after else after[key]
        if key.startswith(("embeddings.", "encoder.layer.0.")):
            assert torch.equal(value, tuned), key
    assert not torch.equal(before["encoder.layer.1.output.dense.weight"], after["bert.encoder.layer.1.output.dense.weight"])


def test_multi_label_end_to_end(base_config, tmp_path):
    rows = []
    for r in make_rows(90):
        labels = [r["label"]] + (["long"] if len(r["text"].split()) > 6 else [])
        rows.append({"text": r["text"], "label": labels})
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = parse_config(base_config(path, task={"multi_label": True}))
    metrics = run(cfg)
    assert metrics["labels"] == ["long", "neg", "pos"]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["good great film", "awful dull plot", "the story was very flat and the plot quite dull 7"]
    preds = Predictor.load(tmp_path / "out" / "model").predict(texts)
    # independent sigmoid of the plain-transformers logits; the label set is every label at or above 0.5
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "model")
    with torch.no_grad():
        sig = torch.sigmoid(model(**tok(texts, padding=True, return_tensors="pt")).logits).numpy()
    names = [model.config.id2label[i] for i in range(3)]
    assert names == ["long", "neg", "pos"]
    for pred, row in zip(preds, sig):
        assert pred["label"] == [n for n, p in zip(names, row) if p >= 0.5]
        np.testing.assert_allclose([pred["probabilities"][n] for n in names], row, rtol=1e-4, atol=1e-6)


def test_resume_after_interruption_finishes_like_an_uninterrupted_run(base_config, write_csv, tmp_path, monkeypatch):
    path = write_csv(make_rows(80))
    raw = base_config(path, train={"method": "full", "checkpoint_every": 1})
    straight = run(parse_config({**raw, "output": {"dir": str(tmp_path / "straight")}}))

    real_step = loop._optimizer_step
    calls = {"n": 0}

    def interrupt_at_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_optimizer_step", interrupt_at_5)
    cfg = parse_config({**raw, "output": {"dir": str(tmp_path / "resumed")}})
    with pytest.raises(loop.TrainingInterrupted, match="--resume"):
        run(cfg)
    assert (tmp_path / "resumed" / "checkpoint" / "state.json").is_file()
    assert not (tmp_path / "resumed" / "run.json").exists()
    monkeypatch.setattr(loop, "_optimizer_step", real_step)

    resumed = run(cfg, resume=True)
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["resumed"] is True
    assert resumed["validation"]["best_step"] == straight["validation"]["best_step"]
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_changed_config(base_config, write_csv, tmp_path, monkeypatch):
    from tuneforge.errors import OutputError

    raw = base_config(write_csv(make_rows(60)), train={"method": "full"})
    monkeypatch.setattr(loop, "_optimizer_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(loop.TrainingInterrupted):
        run(parse_config(raw))
    raw["train"]["learning_rate"] = 1e-3
    with pytest.raises(OutputError, match="differs"):
        run(parse_config(raw), resume=True)


def test_test_split_is_not_used_for_model_choice(base_config, write_csv, tmp_path):
    """Early stopping and best-weight choice read validation only: two runs on the same training file and seed, one
    with the test file's labels all flipped, choose the same model; only the test metrics move."""
    train_path = write_csv(make_rows(110))
    test_rows = _held_out_rows(40)
    flip = {"pos": "neg", "neg": "pos"}
    poisoned_rows = [{**r, "label": flip[r["label"]]} for r in test_rows]
    runs = {}
    for name, rows in (("true", test_rows), ("poisoned", poisoned_rows)):
        raw = base_config(train_path, train={"method": "full", "epochs": 6, "eval_every": 3})
        raw["data"]["test_path"] = str(write_csv(rows, f"test_{name}.csv"))
        raw["output"]["dir"] = str(tmp_path / name)
        runs[name] = run(parse_config(raw))
    true, poisoned = runs["true"], runs["poisoned"]

    # the poison reached the test split, and only the test split
    reports = {name: json.loads((tmp_path / name / "data_report.json").read_text()) for name in runs}
    for split in ("train", "val"):
        assert reports["true"]["splits"][split]["sha256"] == reports["poisoned"]["splits"][split]["sha256"]
    assert reports["true"]["splits"]["test"]["sha256"] != reports["poisoned"]["splits"]["test"]["sha256"]
    # model choice: every validation row, the best step and the exported weights are identical
    assert true["validation"]["history"] == poisoned["validation"]["history"]
    # a choice was made: the kept weights are an earlier step's, not simply the last step's
    assert true["validation"]["best_step"] < true["validation"]["history"][-1]["step"]
    for key in ("best", "best_step", "stopped_early"):
        assert true["validation"][key] == poisoned["validation"][key], key
    a = load_file(str(tmp_path / "true" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "poisoned" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # ... while the test metrics moved: the same predictions scored against flipped binary labels, every right
    # answer becomes wrong and back
    assert true["test"]["model"]["accuracy"] != pytest.approx(0.5)
    assert poisoned["test"]["model"]["accuracy"] == pytest.approx(1 - true["test"]["model"]["accuracy"])


def test_run_json_records_provenance(base_config, write_csv):
    cfg, metrics = _run(base_config, write_csv)
    info = json.loads(open(cfg.output.dir + "/run.json").read())
    assert info["seed"] == {"split": 42, "train": 42}
    assert {"torch", "transformers", "python"} <= set(info["versions"])
    assert info["data"]["splits"]["test"] == json.loads(open(cfg.output.dir + "/data_report.json").read())["test_sha256"]
    durations = info["durations_s"]
    assert 0 < durations["train"] <= durations["total"] == metrics["cost"]["actual"]["seconds_total"]
    assert info["hardware"]["cpu_count"] == os.cpu_count() and info["hardware"]["torch_threads"] == torch.get_num_threads()
    assert yaml.safe_load(open(cfg.output.dir + "/config.yaml"))["train"]["seed"] == 42


def test_early_stopping_and_gradient_accumulation(base_config, write_csv):
    # learning rate ~0: the validation metric never improves, so patience 1 stops at the second evaluation
    cfg, metrics = _run(base_config, write_csv, train={"method": "full", "learning_rate": 1e-12, "eval_every": 1,
                                                        "early_stopping_patience": 1, "epochs": 5})
    history = metrics["validation"]["history"]
    assert metrics["validation"]["stopped_early"] and len(history) == 2 and history[-1]["step"] == 2
    # 48 training rows at batch 8 = 6 micro-batches per epoch; accumulating 3 of them makes 2 steps per epoch
    cfg, metrics = _run(base_config, write_csv, train={"method": "full", "grad_accum": 3, "epochs": 2, "eval_every": 100},
                        output={"overwrite": True})
    assert metrics["validation"]["history"][-1]["step"] == 4


def test_same_code_runs_under_torchrun_with_two_processes(base_config, write_csv, tmp_path):
    """Two CPU processes (gloo): each trains on its share of every batch, rank 0 alone writes the run."""
    import os
    import subprocess
    import sys

    cfg_path = tmp_path / "ddp.yaml"
    raw = base_config(write_csv(make_rows(80)), train={"method": "full", "epochs": 2})
    raw["output"]["dir"] = str(tmp_path / "ddp")
    cfg_path.write_text(yaml.safe_dump(raw))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(port), "-m", "tuneforge", "run", str(cfg_path)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    # 48 training rows at batch 8 = 6 batches an epoch; each process takes half of every batch, so the global
    # batch and the steps are what one process trains: 6 a epoch, 12 in all
    assert info["steps"] == 12
    assert proc.stdout.count("test split: model vs baselines") == 1
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()
