"""Group-aware, stratified train / validation / test split, with content hashes so a frozen test split can be checked.

Rows that are exact (after normalisation) or near duplicates of each other form a group, and a group
lands whole in one split: templated messages, reviews posted twice or report templates scattered across
train and test would inflate the test score (the audit calls it leakage). Within that constraint each
label keeps its share in every split. scikit-learn's StratifiedGroupKFold only cuts 1/k fractions, so
the cut is written here: groups in seeded random order, taken into the held-out split per stratum while
that brings the stratum closer to its target size.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tuneforge.data.clean import Examples
from tuneforge.errors import DataError


@dataclass
class Splits:
    train: Examples
    val: Examples
    test: Examples
    stratified: bool
    groups: dict = field(default_factory=dict)  # near-duplicate groups kept whole: counts and sizes

    def items(self):
        return (("train", self.train), ("val", self.val), ("test", self.test))


def content_hash(ex: Examples) -> str:
    """Order-independent hash of (text, label) pairs: equal for the same split however it was read."""
    lines = sorted(json.dumps([t, list(lab) if isinstance(lab, tuple) else lab], ensure_ascii=False)
                   for t, lab in zip(ex.texts, ex.labels))
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _strata(labels: list) -> list | None:
    """Stratification key per row, or None when some class is too small to stratify on."""
    keys = ["|".join(lab) if isinstance(lab, tuple) else lab for lab in labels]
    if min(Counter(keys).values()) < 2 and isinstance(labels[0], tuple):
        keys = [lab[0] if lab else "" for lab in labels]  # multi-label: fall back to the first label
    return keys if min(Counter(keys).values()) >= 2 else None


def _group_cut(ex: Examples, groups: np.ndarray, fraction: float, seed: int) -> tuple[Examples, Examples, bool]:
    """Hold out about `fraction` of the rows, whole groups only, each stratum (label) in proportion."""
    strata = _strata(ex.extras["_stratum"] if "_stratum" in ex.extras else ex.labels)
    row_stratum = strata if strata is not None else ["all"] * len(ex)
    members: dict[int, list[int]] = {}
    for k, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(k)
    # a group's stratum is its most common row stratum (near-duplicates rarely disagree on the label)
    group_stratum = {g: Counter(row_stratum[k] for k in ks).most_common(1)[0][0] for g, ks in members.items()}
    rng = np.random.default_rng(seed)
    ids = list(members)
    order = [ids[i] for i in rng.permutation(len(ids))]
    stratum_rows = Counter(row_stratum)
    held: list[int] = []
    for stratum in sorted(stratum_rows):
        target, taken = fraction * stratum_rows[stratum], 0
        for g in order:
            size = len(members[g])
            if group_stratum[g] == stratum and abs(taken + size - target) < abs(taken - target):
                held += members[g]
                taken += size
    if not held:  # tiny data: hold out the smallest group rather than nothing
        held = min(members.values(), key=len)
    if len(ex) < 2:
        raise DataError(f"{len(ex)} row left in {ex.source} to split into training and validation",
                        path=ex.source, fix="add rows: validation and test are carved out of the data file")
    if len(held) == len(ex):
        raise DataError(f"all {len(ex)} rows of {ex.source} are near-duplicates of one another, so no split can keep "
                        "training and held-out rows apart", path=ex.source,
                        fix="add varied rows, or raise audit.near_duplicate_threshold")
    held_set = set(held)
    keep = [k for k in range(len(ex)) if k not in held_set]
    return ex.subset(keep), ex.subset(sorted(held)), strata is not None


def _group_stats(groups: np.ndarray) -> dict:
    sizes = np.bincount(groups) if len(groups) else np.zeros(0, dtype=int)
    multi = sizes[sizes > 1]
    return {"kept_together": int(len(multi)), "rows_in_groups": int(multi.sum()),
            "largest": int(multi.max()) if len(multi) else 0,
            "sizes": {str(s): int(c) for s, c in sorted(Counter(multi.tolist()).items())}}


def split(ex: Examples, val_fraction: float, test_fraction: float, seed: int, test: Examples | None = None,
          groups: np.ndarray | None = None, strata: list[str] | None = None, val: Examples | None = None) -> Splits:
    """Carve test (unless given) then validation (unless given) out of `ex`; the same data and seed give the same
    splits. A given split is taken as it is.

    `groups` gives each row of `ex` a group id (rows sharing one are duplicates and stay in one split);
    None treats every row as its own group. `strata` is the key each row is stratified on (the task's;
    default: the label)."""
    groups = np.arange(len(ex)) if groups is None else np.asarray(groups)
    stats = _group_stats(groups)
    extras = {**ex.extras, "_group": groups.tolist()} | ({"_stratum": list(strata)} if strata is not None else {})
    ex = Examples(ex.texts, ex.labels, ex.rows, ex.source, extras)
    stratified = True
    if test is None:
        ex, test, stratified = _group_cut(ex, np.asarray(ex.extras["_group"]), test_fraction, seed)
        val_fraction = val_fraction / (1.0 - test_fraction)  # share of the whole, not of the remainder
    if val is None:
        train, val, s2 = _group_cut(ex, np.asarray(ex.extras["_group"]), val_fraction, seed + 1)
    else:
        if len(ex) == 0:
            raise DataError(f"no rows left in {ex.source} to train on", path=ex.source,
                            fix="add rows to the data file (audit.leakage: drop leaves out copies of held-out rows)")
        train, s2 = ex, True
    for part in (train, val, test):
        part.extras.pop("_group", None)
        part.extras.pop("_stratum", None)
    return Splits(train=train, val=val, test=test, stratified=stratified and s2, groups=stats)
