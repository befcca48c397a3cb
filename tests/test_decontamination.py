"""A validation or test file the user supplies is taken as given; training rows that copy one of its rows are left
out of training (audit.leakage: drop), block the run, or are trained on with the test metrics also given on the
clean rows (allow). The same for every task."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from conftest import make_rows
from test_causal_lm_pipeline import _write_jsonl, pair_rows
from test_token_pipeline import _sentence

from tuneforge.config import parse_config
from tuneforge.pipeline import run


def _conll(path: Path, sentences) -> Path:
    lines = []
    for tokens, tags in sentences:
        lines += [f"{t}\t{g}" for t, g in zip(tokens, tags)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_token_classification_leaves_out_copied_sentences_and_scores_the_test_file_whole(tmp_path):
    from tuneforge.tasks.behaviour import get_task

    rng = random.Random(0)
    train = [_sentence(rng) for _ in range(120)]
    test = [_sentence(rng) for _ in range(30)]
    boiler = (["Scorers", ":"], ["O", "O"])
    train += [test[3], test[3], boiler]          # rows 120, 121 copy test sentence 3; row 122 is boilerplate ...
    test += [boiler, boiler]                     # ... that the test file holds twice (rows 30, 31)
    cfg = parse_config({"task": {"type": "token-classification"},
                        "data": {"path": str(_conll(tmp_path / "train.txt", train)),
                                 "test_path": str(_conll(tmp_path / "test.txt", test))}})
    data = get_task("token-classification").prepare(cfg)
    left_out = {r["row"]: (r["matches"]["row"], r["matches"]["kind"]) for r in data.report["removed"]
                if r["reason"] == "held_out_copy"}
    assert left_out == {120: (3, "exact"), 122: (30, "exact")}
    assert {r["row"]: r["reason"] for r in data.report["removed"]}[121] == "duplicate"  # of row 120, cleaned first
    assert data.splits.test.rows == list(range(32))  # as given: its duplicate boilerplate kept
    trained = set(data.splits.train.rows) | set(data.splits.val.rows)
    assert not trained & {120, 121, 122}


def test_causal_lm_leaves_out_copied_prompts_whatever_the_answer(tmp_path):
    from tuneforge.tasks.behaviour import get_task

    train, test = pair_rows(150, seed=0), pair_rows(40, seed=9)
    train.append({"prompt": test[5]["prompt"], "completion": "another answer"})   # row 150: same prompt
    test[6]["prompt"] = " ".join(f"word{k}" for k in range(30))
    train.append({"prompt": test[6]["prompt"] + " please", "completion": "x"})   # row 151: 59 of 61 word 1-2-grams
    test.append(dict(test[0]))                                                    # the test file repeats a row
    cfg = parse_config({"task": {"type": "causal-lm"},
                        "data": {"path": str(_write_jsonl(tmp_path / "train.jsonl", train)),
                                 "test_path": str(_write_jsonl(tmp_path / "test.jsonl", test))}})
    data = get_task("causal-lm").prepare(cfg)
    left_out = {r["row"]: r["matches"]["row"] for r in data.report["removed"] if r["reason"] == "held_out_copy"}
    assert left_out.get(150) == 5
    near = [r["matches"] for r in data.report["removed"] if r["row"] == 151]
    assert near == [{"split": "test", "file": str(tmp_path / "test.jsonl"), "row": 6, "kind": "near",
                     "similarity": round(59 / 61, 4)}]
    assert len(data.splits.test) == 41


def test_block_refuses_and_allow_scores_the_clean_test_rows_too(base_config, write_csv, tmp_path):
    """allow trains on the copies; metrics.json also holds the test metrics on the rows with no copy in training,
    equal to scikit-learn's on the model's own predictions for those rows."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    import torch

    from tuneforge.errors import AuditBlocked

    rows = make_rows(120)
    test_rows = make_rows(40, seed=7)
    for i, r in enumerate(test_rows):
        r["text"] = r["text"].rsplit(" ", 1)[0] + f" {500 + i}"
    copied = [0, 1, 2, 3, 4, 5, 6, 7]
    train_rows = rows + [dict(test_rows[i]) for i in copied]
    raw = base_config(write_csv(train_rows), train={"method": "full", "epochs": 2})
    raw["data"]["test_path"] = str(write_csv(test_rows, "test.csv"))

    with pytest.raises(AuditBlocked):
        run(parse_config({**raw, "audit": {"leakage": "block"}, "output": {"dir": str(tmp_path / "blocked")}}))
    assert not (tmp_path / "blocked" / "model").exists()

    cfg = parse_config({**raw, "audit": {"leakage": "allow"}, "output": {"dir": str(tmp_path / "allowed")}})
    metrics = run(cfg)
    data_report = json.loads((tmp_path / "allowed" / "data_report.json").read_text())
    assert data_report["decontamination"]["rows_left_out"] == 0
    audit = json.loads((tmp_path / "allowed" / "audit.json").read_text())
    in_training = {r["row"] for r in audit["leakage"]["test_rows_in_training"]}
    assert in_training and in_training <= set(copied)
    clean = metrics["test_without_training_copies"]
    assert clean["rows"] == 40 - len(in_training) and clean["rows_left_out"] == len(in_training)

    out = tmp_path / "allowed" / "model"
    model, tok = AutoModelForSequenceClassification.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    keep = [i for i in range(40) if i not in in_training]
    texts, gold = [test_rows[i]["text"] for i in keep], [test_rows[i]["label"] for i in keep]
    with torch.no_grad():
        pred = [model.config.id2label[i] for i in model(**tok(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()]
    assert clean["test"]["model"]["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert clean["test"]["model"]["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-12)
    majority = clean["test"]["baselines"]["majority"]
    assert majority["n"] == len(keep)
    assert "Test rows not in training" in (tmp_path / "allowed" / "report.html").read_text()


def test_a_validation_file_is_taken_as_given(base_config, write_csv, tmp_path):
    from tuneforge.tasks.behaviour import get_task

    rows, val_rows = make_rows(100), make_rows(20, seed=3)
    for i, r in enumerate(val_rows):
        r["text"] = r["text"].rsplit(" ", 1)[0] + f" {700 + i}"
    raw = base_config(write_csv(rows + [dict(val_rows[2])]))
    raw["data"]["val_path"] = str(write_csv(val_rows, "val.csv"))
    cfg = parse_config(raw)
    data = get_task(cfg.task.type).prepare(cfg)
    assert data.splits.val.rows == list(range(20)) and data.report["val_source"] == "file"
    assert len(data.splits.train) + len(data.splits.test) == 100  # row 100 (the copy of val row 2) left out
    assert [(r["row"], r["matches"]["split"], r["matches"]["row"]) for r in data.report["removed"]
            if r["reason"] == "held_out_copy"] == [(100, "val", 2)]
