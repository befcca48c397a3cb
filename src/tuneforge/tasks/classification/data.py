"""Text classification's data: a table with a text column and a label column (single or multi-label),
validated row by row and cleaned, then split by the generic data stage (tuneforge/data/prepare.py)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from tuneforge.config import DataConfig
from tuneforge.tasks.classification.spec import ClassificationTaskConfig
from tuneforge.data.clean import NULL_WORDS, CleanResult, Examples, cut_long, dedupe, is_null
from tuneforge.data.load import detect_format, file_sha256, read_table, resolve_path
from tuneforge.data.prepare import PreparedData, assemble, held_out_files
from tuneforge.errors import DataError, shown


def _require_columns(df: pd.DataFrame, cfg: DataConfig, path: Path, extra: list[str]) -> None:
    wanted = [("text", cfg.text_column, "set data.text_column (or --text-column) to one of them"),
              ("label", cfg.label_column, "set data.label_column (or --label-column) to one of them")]
    wanted += [("slice", col, "fix eval.slices: it names data columns whose groups get their own metrics") for col in extra]
    for role, col, fix in wanted:
        if col not in df.columns:
            raise DataError(f"{role} column '{col}' not found; the columns are: {', '.join(map(str, df.columns))}",
                            path=path, column=col, fix=fix)


def _text_of(value, i: int, cfg: DataConfig, path: Path) -> str | None:
    """The text of a cell, or None if the row must be dropped as invalid (drop_invalid)."""
    problem = None
    if is_null(value):
        problem = "text is missing (null/NaN)"
    elif not isinstance(value, str):
        problem = f"text is a {type(value).__name__} ({shown(value)}), not a string"
    elif value.strip().lower() in NULL_WORDS:
        problem = f"text is the placeholder {value.strip()!r}, a sign of a missing value exported as text"
    if problem is None:
        return value
    if cfg.drop_invalid:
        return None
    raise DataError(problem, path=path, row=i, column=cfg.text_column,
                    fix="fill in or remove that row, or set data.drop_invalid: true to drop such rows (they are reported)")


def _label_of(value, i: int, cfg: DataConfig, task: ClassificationTaskConfig, path: Path):
    """str (single-label), tuple of str (multi-label), or None if missing."""
    if hasattr(value, "tolist") and not isinstance(value, str):  # Parquet lists arrive as numpy arrays
        value = value.tolist()
    if is_null(value) or (isinstance(value, str) and not value.strip()):
        return None
    if task.multi_label:
        parts = value if isinstance(value, (list, tuple)) else str(value).split(cfg.label_separator)
        labels = tuple(sorted({str(p).strip() for p in parts if str(p).strip()}))
        return labels or None
    if isinstance(value, (list, tuple, dict)):
        raise DataError(f"label is a {type(value).__name__}; single-label classification needs one label per row",
                        path=path, row=i, column=cfg.label_column,
                        fix="set task.multi_label: true for rows with several labels")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def clean(df: pd.DataFrame, cfg: DataConfig, task: ClassificationTaskConfig, path: Path, extra_columns: list[str] = (),
          as_given: bool = False) -> CleanResult:
    """Validated rows; duplicates and texts with conflicting labels removed unless `as_given` (a held-out file the
    user supplies is scored as it is: its duplicates are reported by the audit, not removed)."""
    _require_columns(df, cfg, path, list(extra_columns))
    extra_values = {c: ["" if is_null(v) else str(v) for v in df[c].tolist()] for c in extra_columns}
    source = str(path)
    removed: list[dict] = []
    long_texts: list[dict] = []
    texts, labels, rows = [], [], []
    keep = set(cfg.keep_labels) if cfg.keep_labels else None

    def drop(i: int, reason: str, detail: str = "") -> None:
        removed.append({"file": source, "row": i, "reason": reason, "detail": detail})

    for i, (raw_text, raw_label) in enumerate(zip(df[cfg.text_column].tolist(), df[cfg.label_column].tolist())):
        text = _text_of(raw_text, i, cfg, path)
        if text is None:
            drop(i, "invalid_text", "missing or non-string text (data.drop_invalid)")
            continue
        text = cut_long(text.strip(), cfg.max_text_chars, long_texts, source, i, cfg.text_column)
        label = _label_of(raw_label, i, cfg, task, path)
        if not text:
            drop(i, "empty_text")
            continue
        if label is None:
            drop(i, "missing_label")
            continue
        if keep is not None:
            outside = [lab for lab in (label if task.multi_label else (label,)) if lab not in keep]
            if outside:
                drop(i, "label_not_kept", f"label {outside[0]!r} not in data.keep_labels")
                continue
        texts.append(text)
        labels.append(label)
        rows.append(i)

    extras = {c: [vals[i] for i in rows] for c, vals in extra_values.items()}
    examples = Examples(texts, labels, rows, source, extras)
    if not as_given:
        examples, dup_removed = dedupe(examples, normalised=cfg.dedupe == "normalised")
        removed.extend(dup_removed)
    removed.sort(key=lambda r: r["row"])
    return CleanResult(examples, rows_read=len(df), removed=removed, long_texts=long_texts)


def check_usable(ex: Examples, removed: list[dict], path: Path, cfg: DataConfig, multi_label: bool) -> None:
    """Stop early on data that cannot train a classifier."""
    if len(ex) == 0:
        reasons = pd.Series([r["reason"] for r in removed]).value_counts().to_dict() if removed else {}
        raise DataError(f"no rows left after cleaning (removed: {reasons or 'none; the file has no data rows'})",
                        path=path, column=cfg.text_column,
                        fix="check data.text_column / data.label_column / data.keep_labels against the file")
    classes = {lab for labs in ex.labels for lab in labs} if multi_label else set(ex.labels)
    if len(classes) < 2:
        only = next(iter(classes))
        raise DataError(f"only one class ({only!r}) after cleaning; a classifier needs at least two",
                        path=path, column=cfg.label_column,
                        fix="check data.label_column, or add rows of the other classes")


def _class_counts(labels: list, multi_label: bool) -> dict[str, int]:
    flat = [lab for labs in labels for lab in labs] if multi_label else labels
    return dict(sorted(Counter(flat).items()))


def _load_clean(ref: str, cfg: DataConfig, task: ClassificationTaskConfig, extra_columns: list[str], as_given: bool = False):
    path = resolve_path(ref)
    df = read_table(path, cfg.format, cfg.encoding, sheet=cfg.sheet)
    result = clean(df, cfg, task, path, extra_columns, as_given)
    check_usable(result.examples, result.removed, path, cfg, task.multi_label)
    info = {"path": str(path), "format": detect_format(path, cfg.format), "sha256": file_sha256(path),
            "rows_read": result.rows_read, "rows_kept": len(result.examples)}
    return result, info


def prepare_data(cfg: DataConfig, task: ClassificationTaskConfig, extra_columns: list[str] = (),
                 near_duplicate_threshold: float = 0.8, leakage: str = "drop") -> PreparedData:
    """Table data (a text column and a label column): read, clean, split. `extra_columns` (e.g. eval.slices)
    travel with the rows without being model inputs. Held-out files (data.val_path, data.test_path) are taken as
    given; `leakage` is audit.leakage."""
    main, main_info = _load_clean(cfg.path, cfg, task, list(extra_columns))
    files, removed, long_texts = [main_info], list(main.removed), list(main.long_texts)
    held = {}
    for role, ref in held_out_files(cfg).items():
        result, info = _load_clean(ref, cfg, task, list(extra_columns), as_given=True)
        files.append({**info, "role": role})
        removed += result.removed
        long_texts += result.long_texts
        held[role] = result.examples
    report = {"multi_label": task.multi_label, "long_texts": long_texts}
    return assemble(main.examples, held, files, removed, cfg, near_duplicate_threshold, report,
                    lambda labels: _class_counts(labels, task.multi_label), leakage=leakage)


