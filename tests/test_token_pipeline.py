"""Token classification end to end on a tiny random BERT: the real pipeline on a few hundred sentences,
the exported model under plain transformers, predict and serve."""
import json
import random

import pytest
from fastapi.testclient import TestClient

from tuneforge.cli import main
from tuneforge.config import parse_config
from tuneforge.pipeline import run

FILLER = "the film movie plot story scenes was is a and very quite".split()


def _sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    """Filler words, "actor N" (N < 40 is a person) and "scenes N M" (100 <= N, M < 140: a place). The numbers
    recur across sentences, so even a 2-layer random model learns them within seconds."""
    tokens, tags = [], []
    for _ in range(rng.randint(1, 3)):
        words = rng.sample(FILLER, rng.randint(1, 3))
        tokens += words
        tags += ["O"] * len(words)
        kind = rng.random()
        if kind < 0.4:
            tokens += ["actor", str(rng.randrange(40))]
            tags += ["O", "B-PER"]
        elif kind < 0.7:
            tokens += ["scenes", str(rng.randrange(100, 140)), str(rng.randrange(100, 140))]
            tags += ["O", "B-LOC", "I-LOC"]
    return tokens, tags


def _write_conll(path, n, seed):
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- O O", ""]
    for _ in range(n):
        tokens, tags = _sentence(rng)
        lines += [f"{t}\t{g}" for t, g in zip(tokens, tags)] + ["\t"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("ner")
    data = _write_conll(d / "train.conll", 300, seed=0)
    cfg = parse_config({"task": {"type": "token-classification"},
                        "data": {"path": str(data), "val_fraction": 0.15, "test_fraction": 0.2},
                        "model": {"name": str(tiny_model_dir), "max_length": 16},  # long sentences need windows
                        "train": {"method": "full", "epochs": 20, "batch_size": 16, "learning_rate": 5e-3,
                                  "early_stopping_patience": 0},
                        "eval": {"bootstrap_samples": 50}, "output": {"dir": str(d / "out")}})
    metrics = run(cfg)
    return d / "out", metrics


def test_the_pipeline_learns_entities_and_reports_them_against_the_baselines(token_run):
    out, metrics = token_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["main_metric"] == "f1"
    model = saved["test"]["model"]
    assert set(model["per_type"]) == {"LOC", "PER"}
    assert model["f1"] >= 0.85  # measured 0.89; the gazetteer misses place pairs it never saw
    assert model["f1"] > saved["test"]["baselines"]["gazetteer"]["f1"]
    assert model["ci"]["low"] <= model["f1"] <= model["ci"]["high"]
    assert saved["test"]["baselines"]["majority"]["f1"] == 0.0
    assert set(saved["test"]["baselines"]) == {"majority", "gazetteer", "crf"}
    audit = json.loads((out / "audit.json").read_text())
    assert audit["leakage"]["severity"] == "info"
    assert sum(s["need_windows"] for s in audit["truncation"]["splits"].values()) > 0  # windows were needed
    assert json.loads((out / "run.json").read_text())["task"]["model_class"] == "AutoModelForTokenClassification"
    assert "Per entity type" in (out / "report.html").read_text()


def test_plain_transformers_pipeline_finds_the_same_entities(token_run):
    from transformers import pipeline

    out, _ = token_run
    from tuneforge.tasks.token_classification.task import EntityPredictor

    texts = ["the film actor 12 was very", "a story and scenes 110 121 is quite", "movie actor 7 and scenes 108 119"]
    ours = [r["entities"] for r in EntityPredictor.load(out / "model").predict(texts)]
    plain = pipeline("token-classification", model=str(out / "model"), aggregation_strategy="simple")(texts)
    assert any(ours)  # the comparison is about real entities
    for mine, theirs in zip(ours, plain):
        assert [(e["entity_group"], e["start"], e["end"]) for e in mine] == \
               [(e["entity_group"], e["start"], e["end"]) for e in theirs]
        assert [round(e["score"], 4) for e in mine] == pytest.approx([float(e["score"]) for e in theirs], abs=1e-4)


def test_predict_prints_entities_with_offsets(token_run, capsys):
    out, _ = token_run
    text = "the film actor 12 was very"
    assert main(["predict", str(out), "--text", text, "--json"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["text"] == text
    found = line["entities"]
    assert [(e["entity_group"], e["word"]) for e in found] == [("PER", "12")]
    assert text[found[0]["start"]:found[0]["end"]] == "12"


def test_serving_returns_entities_and_counts_them_per_type(token_run, tmp_path):
    from tuneforge.serving.app import ServeSettings, create_app, run_predictor
    from tuneforge.serving.monitor import load_reference

    from collections import Counter

    from tuneforge.tasks.token_classification.task import EntityPredictor

    out, _ = token_run
    texts = ["movie actor 7 and scenes 108 119", "the plot", "a actor 3 and actor 30 was"]
    direct = EntityPredictor.load(out / "model").predict(texts)
    settings = ServeSettings(run_dir=out, api_key="k", monitor_url=f"sqlite:///{tmp_path / 'log.sqlite'}")
    with TestClient(create_app(settings, run_predictor(out), reference=load_reference(out))) as c:
        r = c.post("/v1/predict", json={"texts": texts}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200
        preds = r.json()["predictions"]
        text = c.get("/metrics").text
    assert preds == direct  # the same entities, offsets and scores as the predictor
    counts = Counter(e["entity_group"] for p in preds for e in p["entities"])
    counts["(none)"] = sum(1 for p in preds if not p["entities"])
    assert counts["PER"] >= 1 and counts["(none)"] == 1  # the plot has no entity
    for label, n in counts.items():
        assert f'tuneforge_predicted_label_total{{label="{label}"}} {float(n)}' in text


def test_bad_token_data_is_a_clear_error_naming_file_and_line(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.conll"
    bad.write_text("the\tO\nactor\tO\n12\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: token-classification\ndata: {{path: {bad}}}\nmodel: {{name: {tiny_model_dir}}}\n"
                   f"output: {{dir: {tmp_path / 'out'}}}\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 3" in err and "'12'" in err
    assert not (tmp_path / "out").exists()


def test_quick_start_takes_a_conll_file_with_no_column_flags(tmp_path, tiny_model_dir, capsys):
    data = _write_conll(tmp_path / "train.conll", 120, seed=1)
    args = ["run", "--task", "token-classification", "--data", str(data), "--model", str(tiny_model_dir),
            "--output", str(tmp_path / "out"), "--epochs", "1"]
    assert main(args) == 0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["main_metric"] == "f1" and set(saved["test"]["baselines"]) == {"majority", "gazetteer", "crf"}
    assert "entity F1" in capsys.readouterr().out


def test_drift_watches_entities_per_text(token_run, tmp_path):
    from tuneforge.serving.app import ServeSettings, create_app, run_predictor
    from tuneforge.serving.monitor import load_reference

    out, _ = token_run
    import yaml
    from rich.console import Console

    from tuneforge.pipeline import prepare

    # traffic like the reference's: 200 draws from the run's own test texts (the reference profiles the model's
    # predictions on them; fresh sentences from the generator differ from that 59-row split by chance, PSI ~0.25)
    cfg = parse_config(yaml.safe_load((out / "config.yaml").read_text()), "config.yaml")
    test_texts = prepare(cfg, Console(quiet=True)).data.splits.test.texts
    rng = random.Random(7)
    like_training = rng.choices(test_texts, k=200)
    crowded = [" ".join(f"actor {n}" for n in range(k, k + 6)) for k in range(0, 120, 2)]  # six people a text
    reports = {}
    for name, texts in (("same", like_training), ("crowded", crowded)):
        settings = ServeSettings(run_dir=out, api_key="k", monitor_url=f"sqlite:///{tmp_path / name}.sqlite")
        with TestClient(create_app(settings, run_predictor(out), reference=load_reference(out))) as c:
            for i in range(0, len(texts), 20):
                assert c.post("/v1/predict", json={"texts": texts[i:i + 20]}, headers={"Authorization": "Bearer k"}).status_code == 200
            reports[name] = c.get("/v1/monitor", headers={"Authorization": "Bearer k"}).json()
    assert set(reports["same"]["signals"]) == {"length", "label", "confidence", "count"}
    assert not reports["same"]["signals"]["count"]["drift"], reports["same"]["signals"]["count"]
    assert reports["crowded"]["signals"]["count"]["drift"] and reports["crowded"]["status"] == "drift"


def test_a_model_folder_copied_out_of_its_run_still_knows_its_task(token_run, tmp_path, capsys):
    import shutil

    out, _ = token_run
    copied = shutil.copytree(out / "model", tmp_path / "elsewhere")
    assert main(["predict", str(copied), "--text", "the film actor 12 was very", "--json"]) == 0
    assert "entities" in json.loads(capsys.readouterr().out.splitlines()[0])


def test_task_flag_over_a_config_takes_the_other_tasks_defaults(tmp_path):
    import argparse

    from tuneforge.cli import _config_from_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {path: x.conll}\neval: {bootstrap_samples: 10}\n")
    args = argparse.Namespace(config=str(cfg), data=None, task="token-classification", text_column=None, label_column=None,
                              val_data=None, leakage=None,
                              test_data=None, model=None, output=None, method=None, epochs=None, multi_label=False,
                              overwrite=False)
    parsed = _config_from_args(args)
    assert (parsed.task.type, parsed.eval.metric, parsed.eval.bootstrap_samples) == ("token-classification", "f1", 10)


def test_onnx_export_tags_every_test_sentence_alike_and_serves_the_same_entities(token_run, tmp_path):
    """`tuneforge export --format onnx` checks itself on the test split (word logits and tags); then ONNX Runtime on
    a batch and width the export never saw, against transformers; and `--runtime onnx` serves the same entities."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForTokenClassification

    from tuneforge.serving.app import ServeSettings, create_app, run_predictor
    from tuneforge.serving.monitor import load_reference
    from tuneforge.tasks.token_classification.task import EntityPredictor

    out, _ = token_run
    assert main(["export", str(out), "--format", "onnx"]) == 0
    record = json.loads((out / "run.json").read_text())["exports"]["onnx"]
    test_rows = json.loads((out / "data_report.json").read_text())["splits"]["test"]["rows"]
    assert record["check"]["passed"] and record["check"]["rows"] == test_rows and record["check"]["label_agreement"] == 1.0
    ids = torch.randint(5, 100, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    session = ort.InferenceSession(str(out / "export" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = AutoModelForTokenClassification.from_pretrained(out / "model").eval()(input_ids=ids, attention_mask=mask).logits
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    texts = ["movie actor 7 and scenes 108 119", "the plot", "a actor 3 and actor 30 was"]
    direct = EntityPredictor.load(out / "model").predict(texts)
    settings = ServeSettings(run_dir=out, api_key="k", monitor_url=f"sqlite:///{tmp_path / 'log.sqlite'}")
    with TestClient(create_app(settings, run_predictor(out, runtime="onnx"), reference=load_reference(out))) as c:
        preds = c.post("/v1/predict", json={"texts": texts}, headers={"Authorization": "Bearer k"}).json()["predictions"]
    assert [[(e["entity_group"], e["start"], e["end"]) for e in p["entities"]] for p in preds] == \
        [[(e["entity_group"], e["start"], e["end"]) for e in d["entities"]] for d in direct]
