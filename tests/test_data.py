import json

import pandas as pd
import pytest

from tuneforge.config import DataConfig
from tuneforge.tasks.classification.spec import ClassificationTaskConfig
from tuneforge.data.load import read_table
from tuneforge.tasks.classification.data import prepare_data
from tuneforge.data.split import content_hash
from tuneforge.errors import DataError

from conftest import make_rows


def _prepare(path, multi_label=False, **data):
    return prepare_data(DataConfig(path=str(path), **data), ClassificationTaskConfig(multi_label=multi_label))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "csv.gz"])
def test_formats_read_the_same_rows(tmp_path, fmt):
    rows = make_rows(40)
    df = pd.DataFrame(rows)
    path = tmp_path / f"d.{fmt}"
    if fmt.startswith("csv"):
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    out = read_table(path)
    assert out["text"].tolist() == df["text"].tolist()


def test_cleaning_records_every_removed_row_with_its_reason(write_csv):
    rows = make_rows(40)
    rows[3]["text"] = "   "                                 # empty
    rows.append(dict(rows[5]))                              # exact duplicate of row 5 -> row 40
    rows.append({**rows[7], "label": "pos" if rows[7]["label"] == "neg" else "neg"})  # conflicting -> row 41
    rows[9]["text"] = "  " + rows[9]["text"] + "  "         # trimmed, kept
    data = _prepare(write_csv(rows))
    removed = {(r["row"], r["reason"]) for r in data.report["removed"]}
    assert removed == {(3, "empty_text"), (40, "duplicate"), (7, "conflicting_labels"), (41, "conflicting_labels")}
    kept = [t for _, ex in data.splits.items() for t in ex.texts]
    assert rows[9]["text"].strip() in kept
    assert len(kept) == 42 - 4
    assert data.report["removed_counts"] == {"empty_text": 1, "duplicate": 1, "conflicting_labels": 2}


def test_normalised_dedupe_folds_case_and_punctuation(write_csv):
    rows = make_rows(20)
    rows.append({**rows[2], "text": rows[2]["text"].upper() + " !!"})
    data = _prepare(write_csv(rows))
    assert [(r["row"], r["reason"]) for r in data.report["removed"]] == [(20, "duplicate")]
    assert _prepare(write_csv(rows), dedupe="exact").report["removed"] == []


def test_split_is_stratified_repeatable_and_hashed(write_csv):
    path = write_csv(make_rows(100))
    a, b = _prepare(path), _prepare(path)
    assert a.report["test_sha256"] == b.report["test_sha256"] == content_hash(a.splits.test)
    counts = a.report["splits"]["test"]["class_counts"]
    assert counts == {"neg": 5, "pos": 5}  # 10% of 100, stratified
    all_texts = [set(ex.texts) for _, ex in a.splits.items()]
    assert not (all_texts[0] & all_texts[2]) and not (all_texts[1] & all_texts[2])
    other = _prepare(path, seed=7)
    assert other.report["test_sha256"] != a.report["test_sha256"]


def test_test_file_replaces_the_carved_split(write_csv):
    data = _prepare(write_csv(make_rows(60)), test_path=str(write_csv(make_rows(10, seed=5), "test.csv")))
    assert data.report["test_source"] == "file"
    assert len(data.splits.test) == 10
    assert len(data.splits.train) + len(data.splits.val) == 60


def test_multi_label_rows(tmp_path):
    rows = [{"text": f"row {i}", "label": ["a", "b"] if i % 3 == 0 else (["a"] if i % 3 == 1 else ["b"])} for i in range(30)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = _prepare(path, multi_label=True)
    assert data.labels == ["a", "b"]
    assert ("a", "b") in data.splits.train.labels


def test_keep_labels_drops_other_rows(write_csv):
    rows = make_rows(40) + [{"text": "a plot summary", "label": "plot", "topic": "a"}]
    data = _prepare(write_csv(rows), keep_labels=["pos", "neg"])
    assert {(r["row"], r["reason"]) for r in data.report["removed"]} == {(40, "label_not_kept")}


# --- bad input: a DataError naming the file, the row and the column, with a fix ---

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        _prepare(tmp_path / "nope.csv")
    assert "nope.csv" in str(err.value) and err.value.fix


def test_unknown_format(tmp_path):
    path = tmp_path / "data.ods"
    path.write_text("x")
    with pytest.raises(DataError, match="unknown data format '.ods'"):
        _prepare(path)


def test_missing_column_lists_the_columns(write_csv):
    with pytest.raises(DataError) as err:
        _prepare(write_csv(make_rows(10)), text_column="review")
    assert "column 'review'" in str(err.value) and "text, label, topic" in str(err.value)


def test_null_text_names_the_row(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = make_rows(10)
    rows[6]["text"] = None
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError) as err:
        _prepare(path)
    assert err.value.row == 6 and err.value.column == "text" and "d.jsonl" in str(err.value)
    data = _prepare(path, drop_invalid=True)  # the escape hatch drops and reports it
    assert {"row": 6, "reason": "invalid_text"}.items() <= data.report["removed"][0].items()


def test_nan_placeholder_text_in_csv(write_csv):
    rows = make_rows(10)
    rows[4]["text"] = "NaN"
    with pytest.raises(DataError, match="placeholder") as err:
        _prepare(write_csv(rows))
    assert err.value.row == 4


def test_non_utf8_names_the_row(tmp_path):
    path = tmp_path / "latin.csv"
    lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in make_rows(10)]
    lines[5] = "caf\xe9 good great,pos"
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DataError, match="not valid utf-8") as err:
        _prepare(path)
    assert err.value.row == 4  # line 6 of the file = data row 4 after the header
    assert "iconv" in err.value.fix


def test_empty_after_cleaning(write_csv):
    with pytest.raises(DataError, match="no rows left after cleaning"):
        _prepare(write_csv([{"text": " ", "label": "pos"}, {"text": "", "label": "neg"}]))


def test_single_class(write_csv):
    rows = [r for r in make_rows(20) if r["label"] == "pos"]
    with pytest.raises(DataError, match="only one class"):
        _prepare(write_csv(rows))


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON") as err:
        _prepare(path)
    assert err.value.row == 1
