"""Read token-classification data (CoNLL, JSONL, CSV, .xlsx) into BIO-tagged `Sentence`s, with a note of every repair.

Three layouts are read:

- **CoNLL** (`.conll`, `.txt`, `.iob`, optionally `.gz`/`.bz2`/`.xz`): one token per line, columns split on
  tabs or spaces, the token in the first column and its tag in the last (columns between, e.g. POS tags, are
  ignored); blank or whitespace-only lines (a lone tab too) end a sentence; `-DOCSTART-` lines are skipped.
- **JSONL** rows with a `tokens` and a `tags` list of the same length, or
- **JSONL / CSV** rows with a `text` and its character `spans` (`[{"start", "end", "label"}]`, a JSON string in
  a CSV cell): the text is cut into words and single punctuation marks, and the tokens a span overlaps are
  tagged `B-`/`I-LABEL`. (CSV rows may hold `tokens` / `tags` too, as JSON lists.) An Excel sheet (`.xlsx`,
  `.xlsm`; the first one, or `sheet`) is read as a CSV with the same columns.

Tags in IO, BIO (IOB2), IOB1 or BIOES (BILOU) are all turned into BIO; `scheme="auto"` tells them apart
from the whole file's tags. An `I-X` that cannot continue an entity (after `O`, after another type, at the
start of a sentence; in BIOES also `E-X`, or `I-X` after `E-X`) is repaired to `B-X` and reported, or, with
`strict=True`, refused. Rows are 0-based (data rows; CoNLL: sentences), lines 1-based.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.load import (decode_text, parse_json, read_bytes, read_csv_text, read_table, resolve_path,
                                 split_compression, split_lines)
from tuneforge.errors import ConfigError, DataError, shown
from tuneforge.tasks.token_classification.sentence import Sentence

__all__ = ["read_sentences", "detect_token_format", "detect_scheme", "tokenize_words", "FORMATS", "SCHEMES"]

FORMATS = ("conll", "jsonl", "csv", "xlsx")
_SUFFIX_FORMAT = {".conll": "conll", ".txt": "conll", ".iob": "conll",
                  ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".xlsx": "xlsx", ".xlsm": "xlsx"}
# What each `scheme` name means; the values are the four schemes converted.
SCHEMES = {"auto": "auto", "bio": "bio", "iob2": "bio", "io": "io", "iob1": "iob1",
           "bioes": "bioes", "iobes": "bioes", "bilou": "bioes"}
_PREFIXES = {"io": {"I"}, "bio": {"B", "I"}, "iob1": {"B", "I"}, "bioes": {"B", "I", "E", "S", "L", "U"}}
_SCHEME_TITLE = {"io": "IO", "bio": "BIO", "iob1": "IOB1", "bioes": "BIOES"}
_TAG = re.compile(r"([BIESLU])-(\S+)\Z")
_WORD = re.compile(r"\w+|[^\w\s]")
_COLUMNS = re.compile(r"[ \t]+")
_TAG_FIX = ("tag every token O or PREFIX-TYPE, e.g. B-PER / I-PER (IO, IOB1 and BIOES/BILOU prefixes "
            "E-, S-, L-, U- are read too)")


@dataclass
class _Tagged:
    """A sentence as read, tags not yet checked against a scheme nor converted."""

    tokens: list[str]
    tags: list[str]
    row: int
    line: int | None                      # 1-based line of the sentence (CoNLL: first token; JSONL: the row)
    token_lines: list[int] | None = None  # CoNLL only: each token's line
    kind: str = "conll"                   # conll | jsonl | csv: how messages locate a token


def tokenize_words(text: str) -> list[tuple[str, int, int]]:
    """Words (runs of letters, digits, _) and single punctuation marks, each with its (start, end) in `text`."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def detect_token_format(path: Path, fmt: str = "auto") -> str:
    """conll, jsonl, csv or xlsx: `fmt` if given, else by the suffix (before any .gz/.bz2/.xz)."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ConfigError(f"unknown token-classification data format '{fmt}'",
                              fix=f"use one of auto, {', '.join(FORMATS)}")
        return fmt
    suffix, _ = split_compression(path)
    if suffix not in _SUFFIX_FORMAT:
        raise DataError(f"cannot tell the token-classification format from the suffix '{suffix or '(none)'}'",
                        path=path, fix="name the file .conll/.txt/.iob (CoNLL), .jsonl, .csv or .xlsx, or set the format "
                                       f"({', '.join(FORMATS)})")
    return _SUFFIX_FORMAT[suffix]


def detect_scheme(tag_sequences) -> str:
    """The tagging scheme of a file's tag sequences: 'bioes', 'io', 'iob1' or 'bio'.

    Any E-/S-/L-/U- prefix: BIOES (BILOU). No B- at all: IO. Some entity starting with I- (at the sentence
    start, after O or after another type) while every B- follows an I-/B- of its own type: IOB1. Else BIO.
    """
    seen_b = i_starts = False
    b_only_inside = True
    for tags in tag_sequences:
        prev_prefix, prev_type = None, None
        for tag in tags:
            m = _TAG.match(tag)
            prefix, typ = (m.group(1), m.group(2)) if m else (None, None)
            if prefix in ("E", "S", "L", "U"):
                return "bioes"
            continues = prev_prefix in ("B", "I") and prev_type == typ
            if prefix == "B":
                seen_b = True
                if not continues:
                    b_only_inside = False
            elif prefix == "I" and not continues:
                i_starts = True
            prev_prefix, prev_type = prefix, typ
    if not seen_b:
        return "io"
    return "iob1" if i_starts and b_only_inside else "bio"


def read_sentences(path: Path, *, fmt: str = "auto", scheme: str = "auto", strict: bool = False,
                   text_column: str = "text", tokens_column: str = "tokens", tags_column: str = "tags",
                   spans_column: str = "spans", encoding: str = "utf-8",
                   sheet: str | int | None = None) -> tuple[list[Sentence], list[dict]]:
    """The file's sentences with BIO tags, and the repairs made on the way.

    Each repair is {"file", "row" (0-based sentence / data row), "line" (1-based file line or None),
    "token" (index in the sentence), "from", "to", "reason"}. For tag repairs "from"/"to" are the tag read
    and the BIO tag given; for a span whose boundary cuts a token, the span's text and the text of the
    tokens tagged. Sentences with no tokens are skipped (a JSONL/CSV row so skipped gets a note).
    Raises DataError (file, row or line, what is wrong, how to fix it) for anything it cannot read.
    `sheet` (.xlsx only): a sheet name or 0-based index; None = the first sheet.
    """
    path = resolve_path(path) if isinstance(path, str) else Path(path)
    fmt = detect_token_format(path, fmt)
    scheme_key = str(scheme).lower()
    if scheme_key not in SCHEMES:
        raise ConfigError(f"unknown tagging scheme '{scheme}'", fix=f"use one of {', '.join(SCHEMES)}")
    scheme = SCHEMES[scheme_key]
    columns = (text_column, tokens_column, tags_column, spans_column)
    if fmt == "xlsx":  # cells read as a CSV's are (strings), then the CSV row reader
        items = _parse_rows(read_table(path, "xlsx", sheet=sheet), path, columns)
    else:
        text = _load_text(path, fmt, encoding)
        if fmt == "conll":
            items = _parse_conll(text, path)
        elif fmt == "jsonl":
            items = _parse_jsonl(text, path, columns)
        else:
            items = _parse_rows(read_csv_text(text, path), path, columns)

    tagged = [it for it, _ in items if isinstance(it, _Tagged)]
    for it in tagged:
        _check_tags(it, path, scheme)
    used = scheme if scheme != "auto" else detect_scheme(it.tags for it in tagged)

    sentences, repairs = [], []
    for it, notes in items:
        if it is None:              # a row with no tokens: only its note
            repairs.extend(notes)
            continue
        if isinstance(it, _Tagged):
            tags, notes = _to_bio(it, path, used, strict)
            it = Sentence(tokens=it.tokens, tags=tags, source=str(path), row=it.row, line=it.line)
        sentences.append(it)
        repairs.extend(notes)
    if not sentences:
        raise DataError("the file holds no sentences (no tokens)", path=path,
                        fix="point the data path at a file with tagged tokens")
    return sentences, repairs


# --- reading the file ---------------------------------------------------------------------------------------

def _load_text(path: Path, fmt: str, encoding: str) -> str:
    if not path.exists():
        raise DataError("file does not exist", path=path,
                        fix="check the data path (relative paths start from the current directory)")
    if path.is_dir():
        raise DataError("is a directory, not a data file", path=path,
                        fix="point the data path at a CoNLL, JSONL or CSV file")
    data = read_bytes(path)
    if fmt == "conll":  # rows of CoNLL are sentences, not lines: report the line only
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise DataError(f"line {line}: text is not valid {encoding} (byte 0x{data[err.start:err.start + 1].hex() or 'end'})",
                            path=path, fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or set the "
                                           "encoding to its real one") from None
        except UnicodeError as err:  # codecs such as idna raise the base class, without a position
            raise DataError(f"text is not valid {encoding} ({err})", path=path,
                            fix="re-save the file as UTF-8 or set the encoding to its real one") from None
        except LookupError:
            raise DataError(f"unknown encoding '{encoding}'", path=path,
                            fix="set the encoding to e.g. utf-8 or latin-1") from None
    else:
        text = decode_text(data, path, encoding, header_lines=1 if fmt == "csv" else 0)
    return text[1:] if text.startswith("\ufeff") else text  # a byte-order mark is not part of the first token


def _parse_conll(text: str, path: Path) -> list[tuple[_Tagged, list]]:
    items: list[tuple[_Tagged, list]] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def flush():
        if tokens:
            items.append((_Tagged(list(tokens), list(tags), row=len(items), line=lines[0],
                                  token_lines=list(lines), kind="conll"), []))
        tokens.clear(), tags.clear(), lines.clear()

    for number, raw in enumerate(split_lines(text), start=1):
        if not raw.strip():       # blank, spaces or a lone tab: end of sentence
            flush()
            continue
        cols = _COLUMNS.split(raw.strip(" \t\r\f\v"))
        if cols[0] == "-DOCSTART-":
            flush()
            continue
        if len(cols) < 2:
            raise DataError(f"line {number}: token {shown(cols[0])} has no tag column (the line holds one column)",
                            path=path, fix="write each token and its tag on one line, separated by a tab or spaces "
                                           "(the tag in the last column); separate sentences with a blank line")
        tokens.append(cols[0])
        tags.append(cols[-1])
        lines.append(number)
    flush()
    return items


def _parse_jsonl(text: str, path: Path, columns) -> list:
    items, row = [], 0
    for number, raw in enumerate(split_lines(text), start=1):
        if not raw.strip():
            continue
        try:
            obj = parse_json(raw)
        except ValueError as err:
            raise DataError(f"line {number} is not valid JSON ({err})", path=path, row=row,
                            fix="each line must hold one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"line {number} holds a {type(obj).__name__}, not a JSON object", path=path, row=row,
                            fix='write one object per line, e.g. {"tokens": ["Ada", "Lovelace"], '
                                '"tags": ["B-PER", "I-PER"]}')
        items.append(_read_row(obj, path, row, number, "jsonl", columns))
        row += 1
    return items


def _parse_rows(df, path: Path, columns) -> list:
    """The rows of a CSV (or an .xlsx sheet, read the same way: every cell a string)."""
    records = df.to_dict(orient="records")
    return [_read_row(rec, path, i, None, "csv", columns) for i, rec in enumerate(records)]


def _read_row(obj: dict, path: Path, row: int, line: int | None, kind: str, columns):
    """One JSONL/CSV row: (_Tagged or Sentence or None, repairs)."""
    text_column, tokens_column, tags_column, spans_column = columns
    at = f"line {line}: " if line is not None else ""
    if tokens_column in obj or tags_column in obj:
        for col in (tokens_column, tags_column):
            if col not in obj:
                other = tokens_column if col == tags_column else tags_column
                raise DataError(f"{at}field '{col}' is missing (the row has '{other}')",
                                path=path, row=row, column=col,
                                fix=f"give every row both '{tokens_column}' and '{tags_column}' lists, "
                                    "or set tokens_column / tags_column")
        tokens = _string_list(obj[tokens_column], path, row, at, tokens_column, kind)
        tags = _string_list(obj[tags_column], path, row, at, tags_column, kind)
        if len(tokens) != len(tags):
            raise DataError(f"{at}'{tokens_column}' has {len(tokens)} tokens but '{tags_column}' has {len(tags)} tags",
                            path=path, row=row, column=tags_column, fix="give exactly one tag per token")
        for i, tok in enumerate(tokens):
            if not tok.strip():
                raise DataError(f"{at}token {i} is empty or whitespace", path=path, row=row, column=tokens_column,
                                fix="remove empty tokens (and their tags)")
        if not tokens:
            return None, [_note(path, row, line, None, None, None, "no tokens: row skipped")]
        return _Tagged(tokens, tags, row=row, line=line, kind=kind), []
    if text_column in obj or spans_column in obj:
        for col in (text_column, spans_column):
            if col not in obj:
                raise DataError(f"{at}field '{col}' is missing", path=path, row=row, column=col,
                                fix=f"give every row a '{text_column}' and its '{spans_column}' "
                                    '(e.g. [{"start": 0, "end": 3, "label": "PER"}], [] for none), '
                                    "or set text_column / spans_column")
        return _spans_sentence(obj[text_column], obj[spans_column], path, row, line, kind, columns)
    have = ", ".join(map(str, obj)) or "(none)"
    raise DataError(f"{at}the row has neither '{tokens_column}' + '{tags_column}' nor '{text_column}' + "
                    f"'{spans_column}' (it has: {have})", path=path, row=row,
                    fix="set tokens_column / tags_column or text_column / spans_column to the fields holding them")


def _json_cell(value, path, row, at, column, kind):
    """A CSV cell holding JSON (empty: an empty list); other values pass through."""
    if not isinstance(value, str) or kind != "csv" and not value.lstrip().startswith(("[", "{")):
        return value
    if not value.strip():
        return []
    try:
        return parse_json(value)
    except ValueError as err:
        raise DataError(f"{at}the cell is not valid JSON ({err})", path=path, row=row, column=column,
                        fix='write a JSON list in the cell, e.g. [{"start": 0, "end": 3, "label": "PER"}]') from None


def _string_list(value, path, row, at, column, kind) -> list[str]:
    value = _json_cell(value, path, row, at, column, kind)
    if value is None:
        value = []
    if not isinstance(value, list):
        raise DataError(f"{at}'{column}' holds a {type(value).__name__}, not a list", path=path, row=row, column=column,
                        fix=f"write '{column}' as a JSON list of strings")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise DataError(f"{at}item {i} of '{column}' is a {type(v).__name__} ({shown(v)}), not a string", path=path,
                            row=row, column=column, fix=f"write every item of '{column}' as a JSON string")
    return value


# --- text + character spans ---------------------------------------------------------------------------------

def _span_fields(span, k, path, row, at, column):
    if isinstance(span, dict):
        missing = [key for key in ("start", "end", "label") if key not in span]
        if missing:
            raise DataError(f"{at}span {k} lacks {', '.join(missing)} ({shown(span)})", path=path, row=row, column=column,
                            fix='write each span as {"start": 0, "end": 3, "label": "PER"}')
        start, end, label = span["start"], span["end"], span["label"]
    elif isinstance(span, (list, tuple)) and len(span) == 3:
        start, end, label = span
    else:
        raise DataError(f"{at}span {k} is not an object with start, end and label ({shown(span)})", path=path, row=row,
                        column=column, fix='write each span as {"start": 0, "end": 3, "label": "PER"}')
    for name, v in (("start", start), ("end", end)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise DataError(f"{at}span {k}: {name} is {shown(v)}, not an integer", path=path, row=row, column=column,
                            fix="give start and end as character offsets (integers, end exclusive)")
    if not isinstance(label, str) or not label or any(c.isspace() for c in label):
        raise DataError(f"{at}span {k}: label {shown(label)} is not a non-empty name without spaces", path=path, row=row,
                        column=column, fix="give each span a label such as PER or ORG")
    if label == "O" or _TAG.match(label):  # B-O or B-B-PER would follow: no entity type
        raise DataError(f"{at}span {k}: label {shown(label)} is a tag, not an entity type", path=path, row=row,
                        column=column, fix="give the entity type alone (PER, not B-PER; O is the outside tag)")
    return start, end, label


def _spans_sentence(text, spans, path, row, line, kind, columns):
    text_column, _, _, spans_column = columns
    at = f"line {line}: " if line is not None else ""
    if not isinstance(text, str):
        raise DataError(f"{at}'{text_column}' holds a {type(text).__name__}, not a string", path=path, row=row,
                        column=text_column, fix="write the text as a string")
    words = tokenize_words(text)
    if not words:
        raise DataError(f"{at}the text is empty (no words)", path=path, row=row, column=text_column,
                        fix="remove the row or give it its text")
    spans = _json_cell(spans, path, row, at, spans_column, kind)
    if spans is None:
        spans = []
    if not isinstance(spans, list):
        raise DataError(f"{at}'{spans_column}' holds a {type(spans).__name__}, not a list of spans", path=path,
                        row=row, column=spans_column,
                        fix='write the spans as a JSON list, e.g. [{"start": 0, "end": 3, "label": "PER"}]')
    parsed = []
    for k, span in enumerate(spans):
        start, end, label = _span_fields(span, k, path, row, at, spans_column)
        if start >= end:
            raise DataError(f"{at}span {k} ({label}) has start {start} >= end {end}", path=path, row=row,
                            column=spans_column, fix="end is exclusive and must be greater than start")
        if start < 0 or end > len(text):
            raise DataError(f"{at}span {k} ({label}, {start}-{end}) lies outside the text (length {len(text)})",
                            path=path, row=row, column=spans_column,
                            fix="give character offsets into the text (0 <= start < end <= its length)")
        parsed.append((start, end, label, k))
    parsed.sort()
    for a, b in zip(parsed, parsed[1:]):
        if b[0] < a[1]:
            raise DataError(f"{at}spans {a[3]} ({a[2]}, {a[0]}-{a[1]}) and {b[3]} ({b[2]}, {b[0]}-{b[1]}) overlap",
                            path=path, row=row, column=spans_column,
                            fix="a token carries one entity: remove or shorten one of the overlapping spans")

    tags = ["O"] * len(words)
    repairs = []
    starts, ends = [s for _, s, _ in words], [e for _, _, e in words]  # both increasing: words do not overlap
    for start, end, label, k in parsed:
        hit = list(range(bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)))  # s < end and e > start
        if not hit:
            raise DataError(f"{at}span {k} ({label}, {start}-{end}: {shown(text[start:end])}) covers no word", path=path,
                            row=row, column=spans_column, fix="point the span at the entity's words")
        cut = [i for i in (hit[0], hit[-1]) if words[i][1] < start or words[i][2] > end]
        free = [i for i in hit if tags[i] == "O"]
        if cut:
            tagged_text = text[words[free[0]][1]:words[free[-1]][2]] if free else ""
            repairs.append(_note(path, row, line, cut[0], text[start:end], tagged_text, "span boundary inside a token"))
        if not free:  # its only token(s) already carry the span before it
            repairs.append(_note(path, row, line, hit[0], text[start:end], "",
                                 "span lies inside a token tagged for the span before it: dropped"))
            continue
        tags[free[0]] = f"B-{label}"
        for i in free[1:]:
            tags[i] = f"I-{label}"
    sentence = Sentence(tokens=[w for w, _, _ in words], tags=tags, source=str(path), row=row, line=line,
                        text=text, offsets=[(s, e) for _, s, e in words])
    return sentence, repairs


# --- tags ---------------------------------------------------------------------------------------------------

def _note(path, row, line, token, old, new, reason) -> dict:
    return {"file": str(path), "row": row, "line": line, "token": token, "from": old, "to": new, "reason": reason}


def _where(it: _Tagged, i: int) -> tuple[str, int | None]:
    """How a message locates token i: its text prefix and the DataError row."""
    if it.kind == "conll":
        return f"line {it.token_lines[i]}: ", None
    if it.kind == "jsonl":
        return f"line {it.line}, token {i}: ", it.row
    return f"token {i}: ", it.row


def _check_tags(it: _Tagged, path: Path, scheme: str) -> None:
    allowed = _PREFIXES.get(scheme)
    for i, tag in enumerate(it.tags):
        if tag == "O":
            continue
        m = _TAG.match(tag)
        if m is None or _TAG.match(m.group(2)) or m.group(2) == "O":  # B-B-PER, B-O: a tag where the type should be
            at, row = _where(it, i)
            raise DataError(f"{at}token {shown(it.tokens[i])} has tag {shown(tag)}, which is neither O nor PREFIX-TYPE",
                            path=path, row=row, fix=_TAG_FIX)
        if allowed is not None and m.group(1) not in allowed:
            at, row = _where(it, i)
            raise DataError(f"{at}token {shown(it.tokens[i])} has tag {shown(tag)}, but the {_SCHEME_TITLE[scheme]} scheme "
                            f"has no {m.group(1)}- prefix", path=path, row=row,
                            fix="set the scheme to auto (or the file's real one), or fix the tag")


def _to_bio(it: _Tagged, path: Path, scheme: str, strict: bool) -> tuple[list[str], list[dict]]:
    out, repairs = [], []
    open_type = None          # the type an I- may continue, or None
    prev = None
    for i, tag in enumerate(it.tags):
        if tag == "O":
            out.append("O")
            open_type, prev = None, tag
            continue
        prefix, typ = _TAG.match(tag).groups()
        if prefix in ("S", "U"):
            new, open_type = f"B-{typ}", None
        elif prefix == "B":
            new, open_type = f"B-{typ}", typ
        else:  # I, E, L: continue the open entity of this type, or start one
            if open_type == typ:
                new = f"I-{typ}"
            else:
                new = f"B-{typ}"
                if scheme in ("bio", "bioes"):   # in IO and IOB1 an I- that starts an entity is just that
                    where = "at the start of the sentence" if prev is None else f"after {prev}"
                    reason = f"invalid transition: {tag} {where} (an entity must start with B-{typ})"
                    if strict:
                        at, row = _where(it, i)
                        raise DataError(f"{at}token {shown(it.tokens[i])} is tagged {tag} {where}: invalid in "
                                        f"{_SCHEME_TITLE[scheme]}, where an entity starts with B-{typ}",
                                        path=path, row=row,
                                        fix=f"tag it B-{typ} (or fix the tag before it), or use strict: false to "
                                            f"repair such tags to B-")
                    line = it.token_lines[i] if it.token_lines else it.line
                    repairs.append(_note(path, it.row, line, i, tag, new, reason))
            open_type = None if prefix in ("E", "L") else typ
        out.append(new)
        prev = tag
    return out, repairs
