"""Hostile input to every data reader: valid files cut short, wrong encodings, random bytes, wrong types where
strings go, missing columns, huge fields. Each case must end in a clean load or a TuneforgeError (the CLI prints
it and exits 2), never in another exception. The cases are seeded (the same ones every run) and go through the
entry point the pipeline uses, the task's `prepare(cfg)` from the registry (then its `label_space`, as the pipeline
does before loading a model); the counts are printed (`pytest -s`).

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -s tests/test_data_fuzz.py
"""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import random
import subprocess
import sys
import traceback
from pathlib import Path

import pandas as pd
import pytest

from tuneforge.config import parse_config
from tuneforge.errors import DataError, TuneforgeError
from tuneforge.tasks.behaviour import get_task

CASES = 40  # per reader; the whole file stays well under a minute on 2 cores
WORDS = "the film was café naïve très good bad awful lovely über dull plot ünïcödé 東京 😀 actor scene".split()
HOSTILE = [0, -1, 3.5, float("nan"), float("inf"), True, None, [], ["a", 1], {"a": 1}, [[["deep"]]], "", " ", "null",
           "NaN", "None", "[1, 2]", '{"x": 1}', "\x00", "\ud800 lone", "a\u2028b", "\ufeff", 10 ** 30, "x" * 5000]


def _text(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 9)))


def _hostile(rng: random.Random):
    if rng.random() < 0.08:
        return "word " * rng.randint(25_000, 45_000)  # 125k-225k chars: over data.max_text_chars
    return rng.choice(HOSTILE)


# --- valid files, one generator per reader: (records, serialise(records) -> bytes) ---------------------------

def _cls_records(rng):
    return [{"text": _text(rng) + f" {i}", "label": rng.choice(["pos", "neg"])} for i in range(rng.randint(12, 30))]


def _tok_records(rng):
    out = []
    for i in range(rng.randint(12, 30)):
        tokens = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))] + [f"w{i}"]
        tags = [rng.choice(["O", "O", "B-PER", "B-LOC"]) for _ in tokens]
        tags = [("I-" + tags[k - 1][2:]) if k and tags[k - 1] != "O" and t != "O" and rng.random() < 0.5 else t
                for k, t in enumerate(tags)]
        out.append({"tokens": tokens, "tags": tags})
    return out


def _span_records(rng):
    out = []
    for i in range(rng.randint(12, 30)):
        name = rng.choice(["Ada", "Paris", "Grace", "東京"])
        text = f"{_text(rng)} {name} {_text(rng)} {i}"
        start = text.index(name)
        out.append({"text": text, "spans": [{"start": start, "end": start + len(name), "label": rng.choice(["PER", "LOC"])}]})
    return out


def _chat_records(rng):
    out = []
    for i in range(rng.randint(12, 30)):
        msgs = [{"role": "user", "content": _text(rng) + f" {i}?"}, {"role": "assistant", "content": _text(rng)}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": "be brief"})
        out.append({"messages": msgs})
    return out


def _pair_records(rng):
    return [{"prompt": _text(rng) + f" {i}?", "completion": _text(rng)} for i in range(rng.randint(12, 30))]


def _lm_text_records(rng):
    return [{"text": _text(rng, 20) + f" {i}"} for i in range(rng.randint(12, 30))]


def _jsonl(records, rng) -> bytes:
    ascii_only = rng.random() < 0.5
    lines = [json.dumps(r, ensure_ascii=ascii_only) if isinstance(r, dict) else str(r) for r in records]
    return ("\n".join(lines) + "\n").encode("utf-8", errors="surrogatepass")


def _csv(records, rng) -> bytes:
    header = list(dict.fromkeys(k for r in records if isinstance(r, dict) for k in r))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in records:
        cells = [r.get(k, "") for k in header] if isinstance(r, dict) else [str(r)]
        w.writerow([c if isinstance(c, str) else json.dumps(c) for c in cells])
    return buf.getvalue().encode("utf-8", errors="surrogatepass")


SEPARATORS = ["\t", " ", "  "]


def _conll(records, rng) -> bytes:
    lines = ["-DOCSTART- -X- O O", ""] if rng.random() < 0.3 else []
    for r in records:
        if not isinstance(r, dict):
            lines += [str(r), ""]
            continue
        for tok, tag in zip(r.get("tokens") or [], r.get("tags") or []):
            lines.append(f"{tok}{rng.choice(SEPARATORS)}{tag}")
        lines.append("")
    return "\n".join(lines).encode("utf-8", errors="surrogatepass")


def _tok_csv(records, rng) -> bytes:  # CSV cells hold the tokens / tags / spans as JSON
    return _csv([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} if isinstance(r, dict) else r
                 for r in records], rng)


def _parquet(records, rng) -> bytes:
    buf = io.BytesIO()
    pd.DataFrame([r for r in records if isinstance(r, dict)]).to_parquet(buf)
    return buf.getvalue()


# name: (task, file suffix, records, serialise)
READERS = {
    "classification-csv": ("text-classification", ".csv", _cls_records, _csv),
    "classification-jsonl": ("text-classification", ".jsonl", _cls_records, _jsonl),
    "classification-parquet": ("text-classification", ".parquet", _cls_records, _parquet),
    "token-conll": ("token-classification", ".conll", _tok_records, _conll),
    "token-jsonl-tags": ("token-classification", ".jsonl", _tok_records, _jsonl),
    "token-jsonl-spans": ("token-classification", ".jsonl", _span_records, _jsonl),
    "token-csv-spans": ("token-classification", ".csv", _span_records, _tok_csv),
    "causal-chat-jsonl": ("causal-lm", ".jsonl", _chat_records, _jsonl),
    "causal-pair-jsonl": ("causal-lm", ".jsonl", _pair_records, _jsonl),
    "causal-text-jsonl": ("causal-lm", ".jsonl", _lm_text_records, _jsonl),
}


# --- mutations -----------------------------------------------------------------------------------------------

def _fields(records) -> list[str]:
    return sorted({k for r in records if isinstance(r, dict) for k in r})


def _mutate_records(rng: random.Random, records: list, parquet: bool) -> str:
    """One change of the rows in place; its name."""
    kind = rng.choice(["wrong_type", "wrong_type", "nested", "missing_field", "missing_column", "huge", "few_rows",
                       "all_same", "extra_field", "not_an_object"])
    rows = [r for r in records if isinstance(r, dict)]
    field = rng.choice(_fields(records))
    if kind == "wrong_type":
        for r in rng.sample(rows, rng.randint(1, 3)):
            r[field] = _hostile(rng)
        if parquet:  # one type per Parquet column: give the whole column the hostile type
            value = _hostile(rng)
            for r in rows:
                r[field] = value
    elif kind == "nested":  # a wrong value inside a list (a token, a span, a message)
        r = rng.choice(rows)
        if isinstance(r.get(field), list) and r[field]:
            k = rng.randrange(len(r[field]))
            item = r[field][k]
            if isinstance(item, dict) and item:
                item[rng.choice(sorted(item))] = _hostile(rng)
                if rng.random() < 0.3:
                    item.pop(rng.choice(sorted(item)), None)
            else:
                r[field][k] = _hostile(rng)
        else:
            r[field] = [_hostile(rng)]
    elif kind == "missing_field":
        for r in rng.sample(rows, rng.randint(1, len(rows))):
            r.pop(field, None)
    elif kind == "missing_column":
        for r in rows:
            r.pop(field, None)
    elif kind == "huge":
        r = rng.choice(rows)
        value = r.get(field)
        if isinstance(value, list) and value and isinstance(value[0], dict) and "content" in value[0]:
            value[-1]["content"] = "word " * 30_000
        elif isinstance(value, list) and value and isinstance(value[0], str):
            value[0] = "x" * 150_000
        else:
            r[field] = "word " * 30_000
    elif kind == "few_rows":
        del records[rng.randint(1, 3):]
    elif kind == "all_same":
        records[:] = [json.loads(json.dumps(rows[0])) for _ in records]
    elif kind == "extra_field":
        rng.choice(rows)[rng.choice(["", "0", "label.1", "\u2028"])] = _hostile(rng)
    elif kind == "not_an_object" and not parquet:
        records.insert(rng.randrange(len(records) + 1), rng.choice(["[1, 2]", "3", '"text"', "null", "{", "}"]))
    return kind


def _mutate_bytes(rng: random.Random, data: bytes, suffix: str) -> tuple[bytes, str, str]:
    """One change of the file's bytes; (bytes, suffix, name)."""
    kind = rng.choice(["truncate", "truncate", "encoding", "random_bytes", "splice", "bom", "nul", "line_ends",
                       "compressed", "deep_nesting", "huge_number", "lone_surrogate", "raw_separator", "empty"])
    if kind == "truncate":
        return data[:rng.randrange(len(data) or 1)], suffix, kind
    if kind == "encoding":
        text = data.decode("utf-8", errors="surrogateescape")  # Parquet is binary: its bytes kept as escapes
        enc = rng.choice(["latin-1", "utf-16", "utf-16-le", "utf-32", "cp1252", "shift_jis"])
        return text.encode(enc, errors="replace"), suffix, f"{kind}:{enc}"
    if kind == "random_bytes":
        return rng.randbytes(rng.randint(1, 3000)), suffix, kind
    if kind == "splice":
        at = rng.randrange(len(data) or 1)
        return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at + rng.randint(0, 64):], suffix, kind
    if kind == "bom":
        return b"\xef\xbb\xbf" + data, suffix, kind
    if kind == "nul":
        at = rng.randrange(len(data) or 1)
        return data[:at] + b"\x00" * rng.randint(1, 4) + data[at:], suffix, kind
    if kind == "line_ends":
        return data.replace(b"\n", rng.choice([b"\r\n", b"\r"])), suffix, kind
    if kind == "compressed":
        ext, fn = rng.choice([(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)])
        packed = fn(data)
        cut = rng.random() < 0.7
        return (packed[:rng.randrange(len(packed))] if cut else packed), suffix + ext, f"{kind}{ext}{':cut' if cut else ''}"
    if suffix == ".parquet":
        return data[: len(data) // 2], suffix, "truncate"
    lines = data.split(b"\n")
    at = rng.randrange(len(lines))
    if kind == "deep_nesting":
        lines.insert(at, b"[" * rng.choice([50, 5_000, 200_000]))
    elif kind == "huge_number":
        lines.insert(at, b'{"text": 1' + b"7" * 6000 + b', "label": "pos", "tokens": ["a"], "tags": ["O"]}')
    elif kind == "lone_surrogate":
        lines[at] = lines[at].replace(b"a", b"\\ud83d", 1) if b'"' in lines[at] else b'{"text": "\\udc00"}'
    elif kind == "raw_separator":  # U+2028 / U+0085 inside a value are legal JSON: the row must still load
        lines[at] = lines[at].replace(b"e", "\u2028".encode(), 1).replace(b"a", "\u0085".encode(), 1)
    elif kind == "empty":
        return b"", suffix, kind
    return b"\n".join(lines), suffix, kind


def _case(rng: random.Random, reader: str, tmp: Path, k: int):
    task, suffix, make, serialise = READERS[reader]
    records = make(rng)
    changes = []
    if rng.random() < 0.6:
        changes.append(_mutate_records(rng, records, suffix == ".parquet"))
    try:
        data = serialise(records, rng)
    except Exception:  # pyarrow cannot store that mix: write the rows as the test's JSON instead
        data, changes = serialise(_cls_records(rng), rng), changes + ["(unwritable, reset)"]
    if not changes or rng.random() < 0.5:
        data, suffix, kind = _mutate_bytes(rng, data, suffix)
        changes.append(kind)
    path = tmp / f"{reader}-{k}{suffix}"
    path.write_bytes(data)
    raw = {"task": {"type": task}, "data": {"path": str(path), "val_fraction": 0.2, "test_fraction": 0.2}}
    if rng.random() < 0.2:
        raw["data"]["drop_invalid"] = True
    if task == "text-classification" and rng.random() < 0.2:
        raw["task"]["multi_label"] = True
    return parse_config(raw), "+".join(changes)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_hostile_files_load_or_raise_a_tuneforge_error(reader, tmp_path):
    rng = random.Random(f"fuzz-{reader}")
    outcomes = {"loaded": 0, "tuneforge_error": 0}
    tracebacks = []
    for k in range(CASES):
        cfg, changes = _case(rng, reader, tmp_path, k)
        try:
            task = get_task(cfg.task.type)
            task.label_space(cfg, task.prepare(cfg))  # as pipeline.prepare does, before any model is loaded
            outcomes["loaded"] += 1
        except TuneforgeError as err:
            assert "Traceback" not in str(err)
            outcomes["tuneforge_error"] += 1
        except Exception:  # noqa: BLE001 - the very thing this test looks for
            tracebacks.append(f"case {k} ({changes}, {cfg.data.path}):\n{traceback.format_exc(limit=-4)}")
    print(f"\n{reader}: {CASES} cases, {outcomes['loaded']} loaded, {outcomes['tuneforge_error']} tuneforge errors, "
          f"{len(tracebacks)} tracebacks")
    assert not tracebacks, "\n".join(tracebacks[:5])


# --- the real CLI: exit 2, the file named, no traceback ------------------------------------------------------

def _cli_cases(tmp: Path) -> list[tuple[str, list[str], Path]]:
    """One hostile file per format, each a traceback before it was fixed."""
    rng = random.Random(7)
    cases = []

    def write(name: str, data: bytes) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    good_csv = _csv(_cls_records(rng), rng)
    cases.append(("csv", ["--text-column", "text", "--label-column", "label"],
                  write("cut.csv.bz2", bz2.compress(good_csv)[:60])))                         # was ValueError
    cases.append(("jsonl", ["--text-column", "text", "--label-column", "label"],
                  write("bignum.jsonl", _jsonl(_cls_records(rng), rng) + b'{"text": 1' + b"7" * 6000 + b"}\n")))
    cases.append(("parquet", ["--text-column", "text", "--label-column", "label"],
                  write("half.parquet", _parquet(_cls_records(rng), rng)[:300])))
    bad_tag = _tok_records(rng)
    bad_tag[0]["tags"][0] = "B-O"                                                             # was ValueError in run
    cases.append(("conll", ["--task", "token-classification"], write("b-o.conll", _conll(bad_tag, rng))))
    cases.append(("token-jsonl", ["--task", "token-classification"],
                  write("deep.jsonl", _jsonl(_tok_records(rng), rng) + b"[" * 100_000 + b"\n")))  # was RecursionError
    spans = _span_records(rng)
    spans[1]["spans"] = "[" * 100_000  # the JSON cell of a CSV                                 # was RecursionError
    cases.append(("token-csv", ["--task", "token-classification"], write("deep.csv", _tok_csv(spans, rng))))
    packed = gzip.compress(_csv(_cls_records(rng), rng))
    cases.append(("csv.gz", ["--text-column", "text", "--label-column", "label"],
                  write("corrupt.csv.gz", packed[:10] + b"\xff" * 8 + packed[18:])))                # was zlib.error
    cases.append(("causal-jsonl", ["--task", "causal-lm"],
                  write("surrogate.jsonl", _jsonl(_chat_records(rng), rng) +
                        b'{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "x"}]}\n')))
    return cases


def test_cli_exits_2_without_a_traceback_on_hostile_files(tmp_path):
    cases = _cli_cases(tmp_path)
    for fmt, flags, path in cases:
        result = subprocess.run([sys.executable, "-m", "tuneforge", "audit", "--data", str(path), *flags,
                                 "--output", str(tmp_path / f"out-{fmt}")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (fmt, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (fmt, result.stderr[-2000:])
        assert path.name in result.stderr and "fix:" in result.stderr, (fmt, result.stderr[-2000:])
    print(f"\ncli: {len(cases)} hostile files ({', '.join(c[0] for c in cases)}): exit 2, no traceback")


# --- the readers' fixes, one by one ---------------------------------------------------------------------------

def _prepare(tmp_path: Path, name: str, data: bytes, task: str = "text-classification", **data_cfg):
    (tmp_path / name).write_bytes(data)
    cfg = parse_config({"task": {"type": task},
                        "data": {"path": str(tmp_path / name), "val_fraction": 0.2, "test_fraction": 0.2, **data_cfg}})
    return get_task(task).prepare(cfg)


def test_utf8_bom_and_raw_line_separators_still_load(tmp_path):
    rng = random.Random(3)
    rows = _cls_records(rng)
    rows[2]["text"] = "one\u2028two\u0085three"  # legal raw inside a JSON string; splitlines() cut the row there
    data = _prepare(tmp_path, "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    assert "one\u2028two\u0085three" in data.splits.train.texts + data.splits.val.texts + data.splits.test.texts
    data = _prepare(tmp_path, "excel.csv", b"\xef\xbb\xbf" + _csv(rows, rng))  # Excel's "CSV UTF-8"
    assert sum(len(ex) for _, ex in data.splits.items()) == len(rows)


@pytest.mark.parametrize("line, why", [
    (b'{"text": "a", "label": 1' + b"0" * 5000 + b"}", "4300 digits"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"text": "\\udfff x", "label": "pos"}', "lone surrogate"),
])
def test_hostile_json_lines_name_the_row(tmp_path, line, why):
    rows = _jsonl(_cls_records(random.Random(4)), random.Random(4)).splitlines()
    with pytest.raises(DataError, match=why) as err:
        _prepare(tmp_path, "d.jsonl", b"\n".join(rows[:3] + [line] + rows[3:]))
    assert err.value.row == 3 and "line 4" in err.value.message


def test_entity_type_o_is_refused_on_reading(tmp_path):
    rows = _span_records(random.Random(5))
    rows[0]["spans"][0]["label"] = "B-PER"
    with pytest.raises(DataError, match="is a tag, not an entity type") as err:
        _prepare(tmp_path, "s.jsonl", _jsonl(rows, random.Random(5)), task="token-classification")
    assert err.value.row == 0


def test_old_mac_line_ends_read_as_lines(tmp_path):
    rng = random.Random(6)
    data = _prepare(tmp_path, "cr.jsonl", _jsonl(_cls_records(rng), rng).replace(b"\n", b"\r"))
    assert sum(len(ex) for _, ex in data.splits.items()) > 10
    rows = _tok_records(rng)
    data = _prepare(tmp_path, "cr.conll", _conll(rows, rng).replace(b"\n", b"\r"), task="token-classification")
    assert sum(len(ex) for _, ex in data.splits.items()) == len(rows)  # not one line holding the whole file
