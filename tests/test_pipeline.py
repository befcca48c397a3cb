"""End-to-end runs of the real pipeline on a tiny random model and a few dozen rows."""
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuneforge.config import parse_config
from tuneforge.models.predictor import Predictor
from tuneforge.pipeline import run
from tuneforge.training import loop

from conftest import make_rows


def _run(base_config, write_csv, n=80, **sections):
    cfg = parse_config(base_config(write_csv(make_rows(n)), **sections))
    return cfg, run(cfg)


@pytest.mark.parametrize("method", ["full", "frozen", "lora"])
def test_each_method_produces_a_loadable_model_that_predicts_like_tuneforge(base_config, write_csv, method):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    extra = {"frozen_layers": 1} if method == "frozen" else {}
    cfg, metrics = _run(base_config, write_csv, train={"method": method, **extra})
    out = cfg.output.dir
    from pathlib import Path

    out = Path(out)
    for name in ("metrics.json", "config.yaml", "data_report.json", "run.json", "model/model.safetensors",
                 "model/config.json", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not list((out / "model").glob("*.bin")) and not (out / "checkpoint").exists()

    saved = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1"):
        assert 0 <= saved["test"]["model"][key] <= 1
        for b in ("majority", "tfidf_logreg", "frozen_probe"):
            assert 0 <= saved["test"]["baselines"][b][key] <= 1
    ci = saved["test"]["model"]["ci"]
    assert ci["low"] <= saved["test"]["model"]["macro_f1"] <= ci["high"]

    # plain transformers, no tuneforge code: same predictions as `tuneforge predict`
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
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
    preds = Predictor.load(tmp_path / "out" / "model").predict(["good great film"])
    assert isinstance(preds[0]["label"], list) and set(preds[0]["probabilities"]) == {"long", "neg", "pos"}


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


def test_test_split_is_not_used_for_model_choice(base_config, write_csv, monkeypatch):
    """Early stopping and best-weight choice read validation only: poisoning test labels changes nothing before evaluation."""
    seen = []
    real = loop.evaluate

    def spy(model, data, *args, **kwargs):
        seen.append(len(data.ids))
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", spy)
    cfg, metrics = _run(base_config, write_csv, n=110, data={"val_fraction": 0.1, "test_fraction": 0.3})
    report = json.loads(open(cfg.output.dir + "/data_report.json").read())
    assert seen and set(seen) == {report["splits"]["val"]["rows"]}


def test_run_json_records_provenance(base_config, write_csv):
    cfg, _ = _run(base_config, write_csv)
    info = json.loads(open(cfg.output.dir + "/run.json").read())
    assert info["seed"] == {"split": 42, "train": 42}
    assert {"torch", "transformers", "python"} <= set(info["versions"])
    assert info["data"]["splits"]["test"] == json.loads(open(cfg.output.dir + "/data_report.json").read())["test_sha256"]
    assert info["durations_s"]["train"] > 0 and info["hardware"]["cpu_count"] >= 1
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
    """Two CPU processes (gloo): each trains on its share of the batches, rank 0 alone writes the run."""
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
    # 48 training rows at batch 8 = 6 batches; two processes take 3 each, so 3 steps per epoch
    assert info["steps"] == 6
    assert proc.stdout.count("test split: model vs baselines") == 1
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()
