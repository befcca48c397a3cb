"""Seq2seq data: a source and a target text per row, in JSONL/CSV/Parquet/Excel, the columns told by their names
(source/target, prompt/completion or input/output; task.source_column / target_column to name others), each row
checked (errors name the file, row and field), exact repeats dropped, then split by the generic data stage.
Duplicates and leakage are judged on the source: the same report in train and test is a leak whatever its summary."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from tuneforge.data.clean import Examples, cut_long, is_null
from tuneforge.data.load import detect_format, file_sha256, read_table, resolve_path
from tuneforge.errors import DataError, shown

COLUMN_PAIRS = (("source", "target"), ("prompt", "completion"), ("input", "output"))


def columns(found: list[str], task, path: Path) -> tuple[str, str]:
    """(source column, target column) of a file: the configured ones, else the first known pair present."""
    cols = [str(c) for c in found]
    if task.source_column or task.target_column:
        wanted = [c for c in (task.source_column, task.target_column) if c]
        pair = dict(COLUMN_PAIRS)
        source = task.source_column or next((s for s, t in COLUMN_PAIRS if t == task.target_column), "source")
        target = task.target_column or pair.get(source, "target")
        for c, key in ((source, "source_column"), (target, "target_column")):
            if c not in cols:
                raise DataError(f"column '{c}' not found; the columns are: {', '.join(cols) or 'none'}", path=path,
                                column=c, fix=f"set task.{key} to one of the file's columns" if c in wanted else
                                f"set task.{key} too")
        return source, target
    for source, target in COLUMN_PAIRS:  # a whole pair first: source + prompt + completion reads prompt/completion
        if source in cols and target in cols:
            return source, target
    for source, target in COLUMN_PAIRS:
        if source in cols or target in cols:
            missing = target if source in cols else source
            raise DataError(f"column '{missing}' not found beside '{source if source in cols else target}'; the columns "
                            f"are: {', '.join(cols)}", path=path, column=missing,
                            fix=f"seq2seq data needs both '{source}' and '{target}' (or set task.source_column / "
                                "task.target_column)")
    raise DataError(f"no seq2seq columns found; the columns are: {', '.join(cols) or 'none'}", path=path,
                    fix="give 'source' + 'target' columns (or prompt/completion, input/output; or set "
                        "task.source_column / task.target_column)")


def _text(value, path: Path, row: int, column: str) -> str:
    if is_null(value):
        raise DataError(f"{column} is missing (null)", path=path, row=row, column=column, fix="fill it in or remove the row")
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a CSV cell of digits: a text like any other
        else:
            raise DataError(f"{column} is a {type(value).__name__} ({shown(value, 40)}), not a text", path=path, row=row,
                            column=column, fix="write the field as a string")
    if not value.strip():
        raise DataError(f"{column} is empty", path=path, row=row, column=column,
                        fix="write the text, or remove the row")
    return value.strip()


def read_pairs(path: Path, task, fmt: str, encoding: str, max_chars: int | None, long_texts: list[dict],
               sheet=None) -> tuple[list[tuple[int, str, str]], tuple[str, str]]:
    """(row, source, target) per row of the file, and the columns read; a bad row stops with its file, row, field."""
    df = read_table(path, fmt, encoding, sheet=sheet)
    source_col, target_col = columns(list(df.columns), task, path)
    out = []
    for i, (s, t) in enumerate(zip(df[source_col].tolist(), df[target_col].tolist())):
        source, target = _text(s, path, i, source_col), _text(t, path, i, target_col)
        if max_chars is not None:
            source = cut_long(source, max_chars, long_texts, str(path), i, source_col)
            target = cut_long(target, max_chars, long_texts, str(path), i, target_col)
        out.append((i, source, target))
    if not out:
        raise DataError("the file holds no rows", path=path, fix="point data.path at a file with rows")
    return out, (source_col, target_col)


def _dedupe(rows: list[tuple[int, str, str]], source: str) -> tuple[list[tuple[int, str, str]], list[dict]]:
    """Exact repeats of a whole row are dropped (the first is kept); the same source with another target stays (both
    can be right) and the split keeps such rows together."""
    seen: dict[tuple[str, str], int] = {}
    kept, removed = [], []
    for r in rows:
        key = (r[1], r[2])
        if key in seen:
            removed.append({"file": source, "row": r[0], "reason": "duplicate", "detail": f"same source and target as row {seen[key]}"})
            continue
        seen[key] = r[0]
        kept.append(r)
    return kept, removed


def target_counts(labels: list[str], max_shown: int = 20) -> dict[str, int]:
    """A split's targets as the data report counts them: each distinct one when they are few, else how many."""
    counts = Counter(labels)
    if len(counts) <= max_shown:
        return dict(sorted(counts.items()))
    return {"(examples)": len(labels), "(distinct targets)": len(counts)}


def prepare(cfg):
    from tuneforge.data.prepare import assemble, held_out_files

    parts, files, removed, long_texts, used = {}, [], [], [], None
    for role, ref in {"main": cfg.data.path, **held_out_files(cfg.data)}.items():
        path = resolve_path(ref)
        rows, cols = read_pairs(path, cfg.task, cfg.data.format, cfg.data.encoding, cfg.data.max_text_chars, long_texts,
                                sheet=cfg.data.sheet)
        kept, dropped = _dedupe(rows, str(path)) if role == "main" else (rows, [])  # held-out files: as given
        parts[role] = Examples([s for _, s, _ in kept], [t for _, _, t in kept], [r for r, _, _ in kept], str(path))
        removed += dropped
        used = used or cols
        files.append({"path": str(path), "format": detect_format(path, cfg.data.format), "sha256": file_sha256(path),
                      "rows_read": len(rows), "rows_kept": len(kept), "columns": list(cols)}
                     | ({"role": role} if role != "main" else {}))
    main = parts.pop("main")
    return assemble(main, parts, files, removed, cfg.data, cfg.audit.near_duplicate_threshold,
                    {"columns": list(used), "long_texts": long_texts}, target_counts, strata=["all"] * len(main),
                    leakage=cfg.audit.leakage)
