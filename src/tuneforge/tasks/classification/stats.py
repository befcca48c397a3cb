"""Statistics beside the point metrics: significance against a baseline, calibration, slice gaps."""
from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from tuneforge.tasks.classification.labels import LabelSpace, main_metric


def _correct(space: LabelSpace, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    return (y_true == y_pred).all(axis=1) if space.multi_label else (y_true == y_pred)


def mcnemar(space: LabelSpace, y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict:
    """Exact McNemar test on the rows where exactly one of the two is right (two-sided binomial)."""
    a, b = _correct(space, y_true, pred_a), _correct(space, y_true, pred_b)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)
    return {"test": "mcnemar_exact", "only_model_right": only_a, "only_baseline_right": only_b, "p_value": p}


def paired_bootstrap(space: LabelSpace, metric: str, y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
                     samples: int, seed: int = 0) -> dict:
    """95% interval of metric(a) - metric(b) over the same resampled rows, and the share of resamples where a <= b."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    diffs = np.empty(max(samples, 1))
    for s in range(len(diffs)):
        idx = rng.integers(0, n, n)
        diffs[s] = main_metric(space, metric, y_true[idx], pred_a[idx]) - main_metric(space, metric, y_true[idx], pred_b[idx])
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return {"test": "paired_bootstrap", "metric": metric, "diff": main_metric(space, metric, y_true, pred_a) -
            main_metric(space, metric, y_true, pred_b), "low": float(lo), "high": float(hi),
            "p_value": float((diffs <= 0).mean())}


def calibration(space: LabelSpace, y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict:
    """Reliability bins and expected calibration error of the top-label confidence
    (multi-label: every label's probability as its own binary prediction)."""
    if space.multi_label:
        conf = np.where(probs >= space.threshold, probs, 1 - probs).ravel()
        correct = ((probs >= space.threshold).astype(int) == y_true.astype(int)).ravel()
    else:
        conf = probs.max(axis=1)
        correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            gap = abs(conf[m].mean() - correct[m].mean())
            ece += m.mean() * gap
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(m.sum()),
                          "confidence": float(conf[m].mean()), "accuracy": float(correct[m].mean())})
        else:
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": 0, "confidence": None, "accuracy": None})
    hist, _ = np.histogram(conf, bins=20, range=(0, 1))
    return {"ece": float(ece), "bins": table, "confidence_histogram": {"edges": np.linspace(0, 1, 21).tolist(),
                                                                       "counts": hist.tolist()}}


def slice_metrics(space: LabelSpace, metric: str, y_true: np.ndarray, y_pred: np.ndarray, groups: list,
                  max_gap: float, min_rows: int) -> dict:
    """Per-group accuracy and main metric; the largest gap in the main metric between groups with enough rows."""
    out = {}
    keys = np.array([str(g) for g in groups])
    for g in sorted(set(keys)):
        m = keys == g
        out[g] = {"n": int(m.sum()), "accuracy": main_metric(space, "accuracy", y_true[m], y_pred[m]),
                  metric: main_metric(space, metric, y_true[m], y_pred[m])}
    sized = {g: v for g, v in out.items() if v["n"] >= min_rows}
    gap, worst = 0.0, None
    if len(sized) >= 2:
        hi = max(sized, key=lambda g: sized[g][metric])
        lo = min(sized, key=lambda g: sized[g][metric])
        gap, worst = sized[hi][metric] - sized[lo][metric], {"best": hi, "worst": lo}
    return {"groups": out, "metric": metric, "largest_gap": float(gap), "between": worst, "min_rows": min_rows,
            "warning": bool(gap > max_gap), "max_gap": max_gap,
            "small_groups": sorted(g for g, v in out.items() if v["n"] < min_rows)}
