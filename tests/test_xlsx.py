"""Excel .xlsx data: read as a CSV of the same cells is (rows, row numbers, errors), any sheet by name or index, and
a clear DataError for a missing sheet or a file that is not a workbook. Every workbook is written here with openpyxl."""
import csv
import json
import shutil

import openpyxl
import pandas as pd
import pytest

from tuneforge.config import DataConfig
from tuneforge.tasks.causal_lm.spec import CausalLMTaskConfig
from tuneforge.tasks.classification.spec import ClassificationTaskConfig
from tuneforge.data.load import read_table
from tuneforge.errors import DataError
from tuneforge.tasks.causal_lm.data import read_conversations
from tuneforge.tasks.classification.data import prepare_data
from tuneforge.tasks.token_classification.readers import read_sentences

from conftest import make_rows


def _write_xlsx(path, sheets: dict[str, list[list]]):
    """A workbook with these sheets, in this order; each a list of rows (the header first); None = an empty cell."""
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        for row in rows:
            sheet.append(row)
    book.save(path)
    return path


def _write_csv(path, rows: list[list]):
    """The same cells as a CSV: an empty cell is an empty field, any other value as Excel shows it."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["" if v is None else v for v in row] for row in rows])
    return path


def _table(records: list[dict]) -> list[list]:
    return [list(records[0])] + [list(r.values()) for r in records]


# Cells of every kind a sheet holds: text, whole and fractional numbers (stored as numbers, not text), an empty
# cell, a wholly blank row in the middle (kept: data row 3 is the sheet's row 5, as the user counts), unicode.
MIXED = [["text", "label", "stars", 2024],
         ["good film", "pos", 5, 1.5],
         ["bad film", "neg", 1, None],
         ["café déjà vu", "pos", 4, 0.25],
         [None, None, None, None],
         ["so so", None, 3, 7]]


def test_xlsx_reads_the_rows_a_csv_of_the_same_cells_reads(tmp_path):
    xlsx = _write_xlsx(tmp_path / "d.xlsx", {"Sheet1": MIXED})
    from_csv = read_table(_write_csv(tmp_path / "d.csv", MIXED))
    from_xlsx = read_table(xlsx)
    pd.testing.assert_frame_equal(from_xlsx, from_csv)
    assert list(from_xlsx.columns) == ["text", "label", "stars", "2024"]  # a number in the header is a name
    assert from_xlsx.iloc[3].tolist() == ["", "", "", ""] and from_xlsx.iloc[0].tolist() == ["good film", "pos", "5", "1.5"]
    xlsm = shutil.copy(xlsx, tmp_path / "d.xlsm")  # macro-enabled workbooks: the same reader
    pd.testing.assert_frame_equal(read_table(xlsm), from_csv)
    renamed = shutil.copy(xlsx, tmp_path / "d.bin")
    pd.testing.assert_frame_equal(read_table(renamed, "xlsx"), from_csv)


def test_classification_prepares_the_same_splits_from_xlsx_as_from_csv(tmp_path):
    table = _table(make_rows(60))
    task = ClassificationTaskConfig()
    from_csv = prepare_data(DataConfig(path=str(_write_csv(tmp_path / "d.csv", table))), task)
    from_xlsx = prepare_data(DataConfig(path=str(_write_xlsx(tmp_path / "d.xlsx", {"reviews": table}))), task)
    for name in ("train", "val", "test"):
        a, b = getattr(from_csv.splits, name), getattr(from_xlsx.splits, name)
        assert (a.texts, a.labels, a.rows) == (b.texts, b.labels, b.rows), name
    assert [f["format"] for f in from_xlsx.report["files"]] == ["xlsx"]


def test_a_sheet_by_name_or_index_and_the_first_by_default(tmp_path):
    table = _table(make_rows(40))
    notes = [["note"], ["read me first"]]
    path = _write_xlsx(tmp_path / "book.xlsx", {"notes": notes, "train": table})
    expected = read_table(_write_csv(tmp_path / "train.csv", table))
    pd.testing.assert_frame_equal(read_table(path, sheet="train"), expected)
    pd.testing.assert_frame_equal(read_table(path, sheet=1), expected)
    pd.testing.assert_frame_equal(read_table(path), read_table(_write_csv(tmp_path / "notes.csv", notes)))
    task = ClassificationTaskConfig()
    data = prepare_data(DataConfig(path=str(path), sheet="train"), task)  # data.sheet reaches the reader
    assert sorted(data.splits.train.rows + data.splits.val.rows + data.splits.test.rows) == list(range(40))
    with pytest.raises(DataError, match="text column 'text' not found; the columns are: note"):
        prepare_data(DataConfig(path=str(path)), task)  # the first sheet, without data.sheet


@pytest.mark.parametrize("sheet, message", [("Train", r"sheet 'Train' not found; the sheets are: 0: 'notes', 1: 'train'"),
                                            (2, r"sheet index 2 is out of range; the workbook has 2 sheet\(s\): "
                                                r"0: 'notes', 1: 'train'")])
def test_a_missing_sheet_lists_the_sheets(tmp_path, sheet, message):
    path = _write_xlsx(tmp_path / "book.xlsx", {"notes": [["a"]], "train": [["b"]]})
    with pytest.raises(DataError, match=message) as err:
        prepare_data(DataConfig(path=str(path), sheet=sheet), ClassificationTaskConfig())
    assert err.value.path == path and "data.sheet" in err.value.fix


def test_files_that_are_no_workbook_are_a_data_error(tmp_path):
    fake = tmp_path / "sales.xlsx"
    _write_csv(fake, _table(make_rows(5)))  # a CSV renamed
    with pytest.raises(DataError, match=r"not an Excel .xlsx workbook \(not a zip archive") as err:
        read_table(fake)
    assert err.value.path == fake and "data.format" in err.value.fix
    empty = tmp_path / "empty.xlsx"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="not an Excel .xlsx workbook"):
        read_table(empty)
    old = tmp_path / "old.xls"
    old.write_bytes(b"\xd0\xcf\x11\xe0")
    with pytest.raises(DataError, match="the old Excel format .xls is not read") as err:
        read_table(old)
    assert ".xlsx" in err.value.fix
    blank = _write_xlsx(tmp_path / "blank.xlsx", {"Sheet1": []})
    with pytest.raises(DataError, match="sheet 'Sheet1' is empty"):
        read_table(blank)


def _same_error(tmp_path, rows, read):
    """The DataError a CSV of `rows` raises and the one an .xlsx of them raises: (row, column, message less the
    file) must be the same; each names its own file."""
    errors = []
    for path in (_write_csv(tmp_path / "d.csv", rows), _write_xlsx(tmp_path / "d.xlsx", {"data": rows})):
        with pytest.raises(DataError) as err:
            read(path)
        assert err.value.path == path and str(err.value).startswith(f"file {path}, row ")
        errors.append((err.value.row, err.value.column, err.value.message.removeprefix(f"file {path}, "), err.value.fix))
    assert errors[0] == errors[1]
    return errors[1]


def test_a_bad_cell_names_file_row_and_column_as_in_a_csv(tmp_path):
    rows = make_rows(12)
    rows[7]["text"] = "NaN"  # a placeholder exported as text
    row, column, message, _ = _same_error(tmp_path, _table(rows),
                                          lambda p: prepare_data(DataConfig(path=str(p)), ClassificationTaskConfig()))
    assert (row, column) == (7, "text") and "placeholder 'NaN'" in message


def test_causal_lm_reads_xlsx_chats_and_names_a_bad_cell(tmp_path):
    task = CausalLMTaskConfig(type="causal-lm")
    chat = [{"role": "user", "content": "tell me cats"}, {"role": "assistant", "content": "cats fur"}]
    rows = [["messages"], [json.dumps(chat)], [json.dumps(chat[:1] + [{"role": "bot", "content": "no"}])]]
    convs, kind = read_conversations(_write_xlsx(tmp_path / "ok.xlsx", {"chats": rows[:2]}), task, "text", "auto", "utf-8")
    assert kind == "chat" and convs[0].messages == chat
    row, column, message, _ = _same_error(tmp_path, rows,
                                          lambda p: read_conversations(p, task, "text", "auto", "utf-8"))
    assert (row, column) == (1, "messages[1].role") and "'bot', not one of" in message


def test_token_classification_reads_xlsx_as_its_csv(tmp_path):
    spans = [["text", "spans"],
             ["Ada met Alan", json.dumps([{"start": 0, "end": 3, "label": "PER"}, {"start": 8, "end": 12, "label": "PER"}])],
             ["Paris is big", None],  # an empty cell: no entities, as in a CSV
             ["Tokens", json.dumps([])]]
    from_csv, _ = read_sentences(_write_csv(tmp_path / "s.csv", spans))
    from_xlsx, _ = read_sentences(_write_xlsx(tmp_path / "s.xlsx", {"Sheet": spans}))
    seen = [(s.tokens, s.tags, s.row, s.text, s.offsets) for s in from_xlsx]
    assert seen == [(s.tokens, s.tags, s.row, s.text, s.offsets) for s in from_csv]
    assert seen[0][:2] == (["Ada", "met", "Alan"], ["B-PER", "O", "B-PER"])
    tagged = [["tokens", "tags"], [json.dumps(["Ada", "Lovelace"]), json.dumps(["B-PER", "I-PER"])]]
    path = _write_xlsx(tmp_path / "t.xlsx", {"other": [["x"]], "tagged": tagged})
    assert [(s.tokens, s.tags) for s in read_sentences(path, sheet="tagged")[0]] == [(["Ada", "Lovelace"], ["B-PER", "I-PER"])]
    bad = spans[:2] + [["Paris is big", json.dumps([{"start": 0, "end": 99, "label": "LOC"}])]]
    row, column, message, _ = _same_error(tmp_path, bad, read_sentences)
    assert (row, column) == (1, "spans") and "lies outside the text" in message


def test_quick_start_and_predict_on_xlsx(capsys, tmp_path, tiny_model_dir):
    from tuneforge.cli import main

    rows = [{"review": r["text"], "sentiment": r["label"]} for r in make_rows(60)]
    data = _write_xlsx(tmp_path / "sales.xlsx", {"reviews": _table(rows)})
    out = tmp_path / "out"
    assert main(["run", "--data", str(data), "--text-column", "review", "--label-column", "sentiment",
                 "--model", str(tiny_model_dir), "--output", str(out), "--epochs", "1"]) == 0
    assert json.loads((out / "data_report.json").read_text())["files"][0]["format"] == "xlsx"
    texts = _write_xlsx(tmp_path / "texts.xlsx", {"Sheet": [["review"], ["lovely moving"], ["boring flat"]]})
    capsys.readouterr()
    assert main(["predict", str(out), "--input", str(texts), "--json"]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["lovely moving", "boring flat"]
    fake = _write_csv(tmp_path / "fake.xlsx", [["review"], ["x"]])
    assert main(["predict", str(out), "--input", str(fake)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: file {fake}: not an Excel .xlsx workbook") and "Traceback" not in err
