"""Stratified train / validation / test split, with content hashes so a frozen test split can be checked."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

from sklearn.model_selection import train_test_split

from tuneforge.data.clean import Examples


@dataclass
class Splits:
    train: Examples
    val: Examples
    test: Examples
    stratified: bool

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


def _cut(ex: Examples, fraction: float, seed: int) -> tuple[Examples, Examples, bool]:
    idx = list(range(len(ex)))
    strata = _strata(ex.labels)
    try:
        keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strata)
        stratified = strata is not None
    except ValueError:  # too few rows per class for the requested held-out size
        keep, held = train_test_split(idx, test_size=fraction, random_state=seed)
        stratified = False
    return ex.subset(sorted(keep)), ex.subset(sorted(held)), stratified


def split(ex: Examples, val_fraction: float, test_fraction: float, seed: int, test: Examples | None = None) -> Splits:
    """Carve test (unless given) then validation out of `ex`; the same data and seed give the same splits."""
    stratified = True
    if test is None:
        ex, test, stratified = _cut(ex, test_fraction, seed)
        val_fraction = val_fraction / (1.0 - test_fraction)  # share of the whole, not of the remainder
    train, val, s2 = _cut(ex, val_fraction, seed + 1)
    return Splits(train=train, val=val, test=test, stratified=stratified and s2)
