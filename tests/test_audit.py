"""The data audit on data with injected problems (the issue's targets), and its contract in `run`."""
import json
import random

import pandas as pd
import pytest

from tuneforge.cli import main
from tuneforge.config import AuditConfig, DataConfig
from tuneforge.tasks.classification.spec import ClassificationTaskConfig
from tuneforge.data.audit import audit
from tuneforge.data.neardup import near_pairs, normalise
from tuneforge.tasks.classification.data import prepare_data
from tuneforge.tasks.classification.audit import sections

VOCAB = [f"w{i}" for i in range(3000)]
POS, NEG = ["good", "great", "superb", "lovely"], ["bad", "awful", "dull", "boring"]


def _text(rng, label):
    words = rng.sample(VOCAB, rng.randint(8, 14)) + rng.sample(POS if label == "pos" else NEG, 2)
    rng.shuffle(words)
    return " ".join(words)


def _vary_case_punct(rng, text):
    words = text.split()
    words = [w.upper() if rng.random() < 0.4 else w.capitalize() for w in words]
    return ", ".join(" ".join(words[i:i + 3]) for i in range(0, len(words), 3)) + "!!"


@pytest.fixture
def injected(tmp_path):
    """600 clean train rows and 150 test rows; then 5% flipped labels, 50 test rows copied into train,
    30 train rows copied with changed case and punctuation."""
    rng = random.Random(1)
    train = [{"text": _text(rng, lab), "label": lab} for lab in ["pos", "neg"] * 300]
    test = [{"text": _text(rng, lab), "label": lab} for lab in ["pos", "neg"] * 75]
    flipped = rng.sample(range(len(train)), 30)
    for i in flipped:
        train[i]["label"] = "neg" if train[i]["label"] == "pos" else "pos"
    originals = rng.sample([i for i in range(len(train)) if i not in flipped], 30)
    copied_test = rng.sample(range(len(test)), 50)
    train += [dict(test[i]) for i in copied_test]                                   # rows 600..649
    train += [{"text": _vary_case_punct(rng, train[i]["text"]), "label": train[i]["label"]} for i in originals]  # 650..679
    pd.DataFrame(train).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(test).to_csv(tmp_path / "test.csv", index=False)
    return {"dir": tmp_path, "flipped": flipped, "copies": list(range(600, 650)), "near": list(range(650, 680)),
            "originals": originals, "copied_test": copied_test}


def _prepared_and_audit(tmp_path, dedupe="exact", **audit_cfg):
    acfg = AuditConfig(**audit_cfg)
    cfg = DataConfig(path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"), dedupe=dedupe)
    data = prepare_data(cfg, ClassificationTaskConfig(), leakage=acfg.leakage)
    return data, audit(data.splits, data.report["removed"], None, 32, acfg, task_sections=sections(data.splits, False, acfg, 0))


def _audit(tmp_path, dedupe="exact", **audit_cfg):
    return _prepared_and_audit(tmp_path, dedupe, **audit_cfg)[1]


def _rows_in(groups, file_name):
    return {r["row"] for g in groups for r in g["rows"] if r["file"].endswith(file_name)}


def test_injected_problems_are_found(injected):
    report = _audit(injected["dir"], leakage="block")
    leak = report["leakage"]
    assert leak["severity"] == "blocking"
    leaked_train_rows = _rows_in([g for g in leak["groups"] if g["kind"] == "exact"], "train.csv")
    assert set(injected["copies"]) <= leaked_train_rows            # every copied row
    dup_groups = report["duplicates"]["normalised_exact"] + report["duplicates"]["near"] + leak["groups"]
    found_near = set(injected["near"]) & _rows_in(dup_groups, "train.csv")
    assert len(found_near) >= 0.9 * len(injected["near"])           # >= 90% of the near-copies
    top = {r["row"] for r in report["label_issues"]["least_confident_10pct"] if r["file"].endswith("train.csv")}
    assert len(set(injected["flipped"]) & top) >= len(injected["flipped"]) / 2  # half the flips in the top 10%
    flagged = {r["row"] for r in report["label_issues"]["rows"] if r["file"].endswith("train.csv")}
    assert len(set(injected["flipped"]) & flagged) >= 10
    assert set(report) >= {"leakage", "duplicates", "label_issues", "truncation", "class_balance"}


def test_normalised_cleaning_reports_near_copies_once(injected):
    """With the default cleaning, case/punctuation copies are dropped before the split, each reported once."""
    report = _audit(injected["dir"], dedupe="normalised", leakage="block")
    dropped = [r for r in report["cleaning"]["removed"] if r["reason"] == "duplicate"]
    assert {r["row"] for r in dropped} == set(injected["near"])
    audited = _rows_in(report["duplicates"]["normalised_exact"] + report["duplicates"]["near"] + report["leakage"]["groups"], "train.csv")
    assert not audited & set(injected["near"])
    assert set(injected["copies"]) <= _rows_in(report["leakage"]["groups"], "train.csv")  # across files: still leakage


def test_clean_data_has_no_leakage_or_duplicates(injected):
    df = pd.read_csv(injected["dir"] / "train.csv").iloc[:600]
    df.to_csv(injected["dir"] / "train.csv", index=False)
    report = _audit(injected["dir"])
    assert report["leakage"]["groups"] == [] and report["leakage"]["severity"] == "info"
    assert report["duplicates"]["rows_affected"] == 0


def test_allow_leakage_downgrades_to_warning(injected):
    for alias in ({"allow_leakage": True}, {"leakage": "allow"}):
        data, report = _prepared_and_audit(injected["dir"], **alias)
        assert report["leakage"]["severity"] == "warning" and report["leakage"]["mode"] == "allow"
        assert len(data.splits.train) + len(data.splits.val) == 680  # nothing left out: it trains on the copies
        in_training = {r["row"] for r in report["leakage"]["test_rows_in_training"]}
        copy_of = dict(zip(injected["copies"], injected["copied_test"]))
        trained = {copy_of[r] for r in data.splits.train.rows if r in copy_of}  # some copies land in validation
        assert len(trained) > 30 and in_training == trained  # what the clean-subset metrics leave out


def test_default_leaves_copies_of_test_rows_out_of_training_and_keeps_the_test_file_whole(injected):
    data, report = _prepared_and_audit(injected["dir"])
    left_out = [r for r in data.report["removed"] if r["reason"] == "held_out_copy"]
    # each of the 50 copied rows, matched to the very test row it copies
    assert {r["row"]: r["matches"]["row"] for r in left_out} == dict(zip(injected["copies"], injected["copied_test"]))
    assert all(r["matches"]["split"] == "test" and r["matches"]["kind"] == "exact" for r in left_out)
    assert data.report["decontamination"]["rows_left_out"] == 50
    assert len(data.splits.test) == 150 and len(data.splits.train) + len(data.splits.val) == 630
    assert report["leakage"]["groups"] == [] and report["leakage"]["severity"] == "info"
    assert report["decontamination"]["severity"] == "warning" and report["decontamination"]["count"] == 50
    assert not any(r["reason"] == "held_out_copy" for r in report["cleaning"]["removed"])  # listed once


def test_near_copies_of_test_rows_are_left_out_too(tmp_path):
    rng = random.Random(3)
    test = [{"text": _text(rng, lab), "label": lab} for lab in ["pos", "neg"] * 20]
    train = [{"text": _text(rng, lab), "label": lab} for lab in ["pos", "neg"] * 100]
    # row 200: test row 7 (30 words) with its last word swapped: 57 of 61 word 1-2-grams shared (Jaccard 0.93)
    test[7]["text"] = " ".join(rng.sample(VOCAB, 28) + ["good", "great"])
    near = test[7]["text"].split()
    near[-1] = "swapped"
    train += [{"text": " ".join(near), "label": test[7]["label"]}, {"text": _text(rng, "pos"), "label": "pos"}]
    pd.DataFrame(train).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(test).to_csv(tmp_path / "test.csv", index=False)
    data, report = _prepared_and_audit(tmp_path)
    left_out = [r for r in data.report["removed"] if r["reason"] == "held_out_copy"]
    assert [(r["row"], r["matches"]["row"], r["matches"]["kind"]) for r in left_out] == [(200, 7, "near")]
    assert left_out[0]["matches"]["similarity"] == pytest.approx(57 / 61, abs=1e-4)


def test_a_test_file_is_scored_as_given_with_its_duplicates_reported(tmp_path):
    rng = random.Random(4)
    train = [{"text": _text(rng, lab), "label": lab} for lab in ["pos", "neg"] * 100]
    test = [{"text": _text(rng, lab), "label": lab} for lab in ["pos", "neg"] * 20]
    test += [dict(test[0]), {"text": test[1]["text"].upper(), "label": test[1]["label"]}]  # an exact and a case copy
    pd.DataFrame(train).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(test).to_csv(tmp_path / "test.csv", index=False)
    data, report = _prepared_and_audit(tmp_path, dedupe="normalised")
    assert len(data.splits.test) == 42 and data.splits.test.rows == list(range(42))
    assert not [r for r in data.report["removed"] if r["file"].endswith("test.csv")]
    test_dups = [g for g in report["duplicates"]["normalised_exact"] if g["split"] == "test"]
    assert sorted(sorted(r["row"] for r in g["rows"]) for g in test_dups) == [[0, 40], [1, 41]]


def test_normalise_and_near_pairs():
    assert normalise("  The Film, was GREAT!! ") == normalise("the film was great")
    base = " ".join(f"w{i}" for i in range(20))
    texts = [base, base.replace("w7", "x7"), " ".join(f"v{i}" for i in range(20))]
    pairs = near_pairs([normalise(t) for t in texts], 0.7)
    assert [(a, b) for a, b, _ in pairs] == [(0, 1)]
    # 39 word 1-2-grams each; swapping w7 changes 1 word and 2 bigrams: 36 shared of 42
    assert pairs[0][2] == pytest.approx(36 / 42)


def test_truncation_class_balance_and_outliers(tmp_path, tiny_model_dir):
    from tuneforge.models.load import load_tokenizer

    rows = [{"text": " ".join(["good"] * (40 if i < 5 else 4)) + f" {i}", "label": "pos" if i % 10 else "neg"} for i in range(100)]
    rows.append({"text": "$$$ ### 123 456 !!!", "label": "pos"})
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    data = prepare_data(DataConfig(path=str(tmp_path / "d.csv")), ClassificationTaskConfig())
    from tuneforge.models.infer import token_lengths

    tok = load_tokenizer(tiny_model_dir)
    lengths = {n: token_lengths(tok, ex.texts) for n, ex in data.splits.items()}
    report = audit(data.splits, [], lengths, 32, AuditConfig(), task_sections=sections(data.splits, False, AuditConfig(), 0))
    trunc = report["truncation"]["splits"]
    assert sum(s["truncated"] for s in trunc.values()) == 5
    assert all(s["max_tokens"] <= 43 for s in trunc.values())
    balance = report["class_balance"]
    assert balance["severity"] == "warning" and any("'neg'" in p for p in balance["problems"])
    assert [r["row"] for r in report["outliers"]["rows"]] == [100]


def test_audit_command_and_run_refusal(injected, tiny_model_dir, capsys):
    d = injected["dir"]
    quick = ["--data", str(d / "train.csv"), "--text-column", "text", "--label-column", "label",
             "--test-data", str(d / "test.csv"), "--model", str(tiny_model_dir), "--leakage", "block",
             "--output", str(d / "out")]
    assert main(["audit", *quick]) == 3
    report = json.loads((d / "out" / "audit.json").read_text())
    assert report["summary"]["worst"] == "blocking"
    capsys.readouterr()
    assert main(["run", *quick[:-1], str(d / "run")]) == 3
    err = capsys.readouterr().err
    assert "train.csv row 6" in err and "audit.leakage: drop" in err and "Traceback" not in err
    assert not (d / "run").exists()
