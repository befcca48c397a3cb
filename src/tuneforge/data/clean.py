"""Validate rows against the task and clean them, recording every removed row and why.

Removal reasons (the vocabulary the audit shares): empty_text, missing_label, invalid_text,
label_not_kept, duplicate, conflicting_labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tuneforge.config import DataConfig, ClassificationTaskConfig
from tuneforge.errors import DataError

_NULL_WORDS = {"nan", "none", "null", "<na>"}


@dataclass
class Examples:
    """Clean rows of one file or split. `rows` are 0-based data-row indices in `source`."""

    texts: list[str]
    labels: list  # str per row, or a tuple of str per row for multi-label
    rows: list[int]
    source: str
    extras: dict[str, list] = field(default_factory=dict)  # columns that are not model inputs (eval.slices)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "Examples":
        return Examples([self.texts[i] for i in idx], [self.labels[i] for i in idx], [self.rows[i] for i in idx],
                        self.source, {k: [v[i] for i in idx] for k, v in self.extras.items()})


@dataclass
class CleanResult:
    examples: Examples
    rows_read: int
    removed: list[dict] = field(default_factory=list)


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


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
    if _is_null(value):
        problem = "text is missing (null/NaN)"
    elif not isinstance(value, str):
        problem = f"text is a {type(value).__name__} ({value!r}), not a string"
    elif value.strip().lower() in _NULL_WORDS:
        problem = f"text is the placeholder {value.strip()!r}, a sign of a missing value exported as text"
    if problem is None:
        return value
    if cfg.drop_invalid:
        return None
    raise DataError(problem, path=path, row=i, column=cfg.text_column,
                    fix="fill in or remove that row, or set data.drop_invalid: true to drop such rows (they are reported)")


def _label_of(value, i: int, cfg: DataConfig, task: ClassificationTaskConfig, path: Path):
    """str (single-label), tuple of str (multi-label), or None if missing."""
    if _is_null(value) or (isinstance(value, str) and not value.strip()):
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


def clean(df: pd.DataFrame, cfg: DataConfig, task: ClassificationTaskConfig, path: Path, extra_columns: list[str] = ()) -> CleanResult:
    _require_columns(df, cfg, path, list(extra_columns))
    extra_values = {c: ["" if _is_null(v) else str(v) for v in df[c].tolist()] for c in extra_columns}
    source = str(path)
    removed: list[dict] = []
    texts, labels, rows = [], [], []
    keep = set(cfg.keep_labels) if cfg.keep_labels else None

    def drop(i: int, reason: str, detail: str = "") -> None:
        removed.append({"file": source, "row": i, "reason": reason, "detail": detail})

    for i, (raw_text, raw_label) in enumerate(zip(df[cfg.text_column].tolist(), df[cfg.label_column].tolist())):
        text = _text_of(raw_text, i, cfg, path)
        if text is None:
            drop(i, "invalid_text", "missing or non-string text (data.drop_invalid)")
            continue
        text = text.strip()
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
    examples, dup_removed = _dedupe(Examples(texts, labels, rows, source, extras), normalised=cfg.dedupe == "normalised")
    removed.extend(dup_removed)
    removed.sort(key=lambda r: r["row"])
    return CleanResult(examples, rows_read=len(df), removed=removed)


def _dedupe(ex: Examples, normalised: bool) -> tuple[Examples, list[dict]]:
    """Drop duplicates (keep the first) and every row of a text seen with different labels."""
    from tuneforge.data.neardup import normalise

    by_text: dict[str, list[int]] = {}
    for k, text in enumerate(ex.texts):
        by_text.setdefault(normalise(text) if normalised else text, []).append(k)
    keep, removed = [], []
    for ks in by_text.values():
        if len({ex.labels[k] for k in ks}) > 1:
            where = ", ".join(f"{ex.rows[k]}={ex.labels[k]!r}" for k in ks)
            removed += [{"file": ex.source, "row": ex.rows[k], "reason": "conflicting_labels",
                         "detail": f"same text with different labels (rows {where})"} for k in ks]
            continue
        keep.append(ks[0])
        removed += [{"file": ex.source, "row": ex.rows[k], "reason": "duplicate",
                     "detail": f"same {'normalised ' if normalised else ''}text and label as row {ex.rows[ks[0]]}"} for k in ks[1:]]
    keep.sort()
    return ex.subset(keep), removed


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
