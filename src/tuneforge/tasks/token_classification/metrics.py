"""Entity-level metrics for BIO (IOB2) tag sequences, strict matching throughout.

An entity is (type, first token, last token + 1) as `sentence.entities` reads it: it starts at a B- tag and
runs over the I- tags of the same type that follow. A predicted entity counts as correct only when a gold
entity has the same type, start and end (seqeval's `mode="strict"` with `scheme=IOB2`, which reads the
sequences the same way: an I- tag with no B- before it starts no entity).

- `entity_metrics`: micro precision/recall/F1 and per-type scores, computed by seqeval;
- `sentence_counts` / `f1_from_counts`: the same micro F1 from per-sentence (tp, predicted, gold) counts,
  in numpy, so that `bootstrap_f1_ci` can resample sentences fast;
- `type_confusion`: which type the model gave each gold entity's exact span (for the report).
"""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np

from tuneforge.tasks.token_classification.sentence import entities

MISSED = "(missed)"
NONE = "(none)"


def _check(gold: list[list[str]], pred: list[list[str]]) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")


def entity_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Strict IOB2 entity scores by seqeval (zero_division=0).

    Returns {"f1", "precision", "recall"} (micro over all entities), "per_type": {TYPE: {"precision",
    "recall", "f1", "support"}} for every type found in gold or predictions (support: gold entities of the
    type), "n_sentences" and "n_entities" (gold entities)."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    _check(gold, pred)
    gold = [list(s) for s in gold]
    pred = [list(s) for s in pred]
    n_entities = sum(len(entities(s)) for s in gold)
    out = {"f1": 0.0, "precision": 0.0, "recall": 0.0, "per_type": {},
           "n_sentences": len(gold), "n_entities": n_entities}
    if not any(any(t != "O" for t in s) for s in gold + pred):
        return out  # no entity anywhere: seqeval's macro average would warn on an empty mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    micro = report.pop("micro avg")
    for key in ("macro avg", "weighted avg"):
        report.pop(key, None)
    out.update(f1=float(micro["f1-score"]), precision=float(micro["precision"]), recall=float(micro["recall"]))
    out["per_type"] = {
        kind: {"precision": float(r["precision"]), "recall": float(r["recall"]),
               "f1": float(r["f1-score"]), "support": int(r["support"])}
        for kind, r in sorted(report.items())
    }
    return out


def sentence_counts(gold: list[list[str]], pred: list[list[str]]) -> np.ndarray:
    """(n_sentences, 3) int64: per sentence, true positives (same type, start and end), predicted entities,
    gold entities."""
    _check(gold, pred)
    counts = np.zeros((len(gold), 3), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gold, pred)):
        ge, pe = entities(g), entities(p)
        # entities() never yields the same (type, start, end) twice, so a set intersection counts matches
        counts[i] = (len(set(ge).intersection(pe)) if ge and pe else 0), len(pe), len(ge)
    return counts


def f1_from_counts(counts: np.ndarray) -> float:
    """Micro F1 = 2 tp / (predicted + gold) over the rows of `sentence_counts`; 0 when there are none."""
    tp, n_pred, n_gold = np.asarray(counts, dtype=np.int64).reshape(-1, 3).sum(axis=0)
    denom = n_pred + n_gold
    return float(2 * tp / denom) if denom > 0 else 0.0


def bootstrap_f1_ci(counts: np.ndarray, samples: int = 1000, seed: int = 0, level: float = 0.95) -> dict | None:
    """Percentile bootstrap interval of the micro entity F1, resampling sentences (rows of `counts`).

    Returns {"metric": "f1", "level", "low", "high", "samples"}, or None when samples <= 0 or there are no
    sentences. Deterministic for a seed."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, 3)
    n = len(counts)
    if samples <= 0 or n == 0:
        return None
    rng = np.random.default_rng(seed)
    stats = np.empty(samples)
    chunk = max(1, min(samples, 2_000_000 // n))  # bound the (chunk, n) index array to ~16 MB
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        idx = rng.integers(0, n, (size, n))
        tp = counts[idx, 0].sum(axis=1)
        denom = counts[idx, 1].sum(axis=1) + counts[idx, 2].sum(axis=1)
        stats[start:start + size] = np.divide(2 * tp, denom, out=np.zeros(size), where=denom > 0)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"metric": "f1", "level": level, "low": float(lo), "high": float(hi), "samples": samples}


def type_confusion(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-type confusion on exact spans; rows are gold types, columns predicted types.

    Each gold entity counts once in its type's row: in the column of the type of the predicted entity with
    exactly the same span, or in column "(missed)" when no predicted entity has that span (partly overlapping
    predictions count as missed). Each predicted entity whose span matches no gold entity counts once in its
    type's column, row "(none)"; `spurious` gives those by predicted type (row "(none)" as a dict).

    Returns {"rows": gold types (sorted) + ["(none)"], "columns": predicted types (sorted) + ["(missed)"],
    "matrix": [[...]] (rows x columns), "spurious": {TYPE: n}}. Every type row holds its gold entities and every
    type column its predicted ones, so none is empty; only the cell ((none), (missed)) is zero by construction.
    A row sums to the gold entities of its type, a column to the predicted entities of its type."""
    _check(gold, pred)
    cells: Counter = Counter()
    gold_kinds: set[str] = set()
    pred_kinds: set[str] = set()
    for g, p in zip(gold, pred):
        by_span = {(s, e): k for k, s, e in entities(p)}
        gold_spans = set()
        for k, s, e in entities(g):
            gold_kinds.add(k)
            gold_spans.add((s, e))
            cells[k, by_span.get((s, e), MISSED)] += 1
        for (s, e), k in by_span.items():
            pred_kinds.add(k)
            if (s, e) not in gold_spans:
                cells[NONE, k] += 1
    rows = sorted(gold_kinds) + [NONE]
    columns = sorted(pred_kinds) + [MISSED]
    matrix = [[int(cells[r, c]) for c in columns] for r in rows]
    spurious = {k: int(cells[NONE, k]) for k in sorted(pred_kinds) if cells[NONE, k]}
    return {"rows": rows, "columns": columns, "matrix": matrix, "spurious": spurious}
