"""Examples (the rows a task keeps, with where they came from) and the generic cleaning step every task
shares: duplicates after normalisation, and texts seen with conflicting targets. Each task validates and
reads its own rows (tasks/<task>/data.py).

Removal reasons (the vocabulary the audit shares): empty_text, missing_label, invalid_text,
label_not_kept, duplicate, conflicting_labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

NULL_WORDS = {"nan", "none", "null", "<na>"}  # a missing value exported as text ("NaN", "None", ...), any case


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
    long_texts: list[dict] = field(default_factory=list)  # texts cut to data.max_text_chars (see cut_long)


def cut_long(text: str, limit: int, notes: list[dict], file: str, row: int, field: str) -> str:
    """`text`, or its first `limit` characters when it is longer: the cut is noted in `notes` (the data report's
    `long_texts`, which the audit lists) so one 10 MB cell cannot stall tokenising."""
    if len(text) <= limit:
        return text
    notes.append({"file": file, "row": row, "field": field, "chars": len(text), "kept": limit})
    return text[:limit]


def is_null(value) -> bool:
    """A missing cell: None, NaN or pandas' NA."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def dedupe(ex: Examples, normalised: bool) -> tuple[Examples, list[dict]]:
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
