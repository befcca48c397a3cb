"""Text classification (binary, multi-class, multi-label): targets, probabilities, decisions, metrics."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, multilabel_confusion_matrix,
                             precision_recall_fscore_support)


@dataclass(frozen=True)
class LabelSpace:
    labels: tuple[str, ...]
    multi_label: bool
    threshold: float = 0.5

    @property
    def problem_type(self) -> str:
        return "multi_label_classification" if self.multi_label else "single_label_classification"

    def encode(self, labels: list) -> np.ndarray:
        """Class ids (int64), or a multi-hot matrix (float32) for multi-label. Unknown labels map to -1 / nothing."""
        index = {lab: i for i, lab in enumerate(self.labels)}
        if not self.multi_label:
            return np.array([index.get(lab, -1) for lab in labels], dtype=np.int64)
        out = np.zeros((len(labels), len(self.labels)), dtype=np.float32)
        for r, labs in enumerate(labels):
            for lab in labs:
                if lab in index:
                    out[r, index[lab]] = 1.0
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float64)
        if self.multi_label:
            return 1.0 / (1.0 + np.exp(-logits))
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class ids for single-label; a 0/1 matrix for multi-label."""
        if self.multi_label:
            return (probs >= self.threshold).astype(np.int64)
        return probs.argmax(axis=1)

    def names(self, decisions: np.ndarray) -> list:
        if self.multi_label:
            return [[self.labels[j] for j in np.flatnonzero(row)] for row in decisions]
        return [self.labels[i] for i in decisions]


def metrics(space: LabelSpace, y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy (subset accuracy for multi-label), macro-F1, per-class P/R/F1/support, confusion matrix."""
    k = len(space.labels)
    ids = list(range(k))
    if space.multi_label:
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
        confusion = {lab: m.tolist() for lab, m in zip(space.labels, multilabel_confusion_matrix(y_true, y_pred))}
        macro = f1_score(y_true, y_pred, average="macro", zero_division=0)
    else:
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
        confusion = confusion_matrix(y_true, y_pred, labels=ids).tolist()
        macro = f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(macro),
        "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, lab in enumerate(space.labels)},
        "confusion_matrix": {"labels": list(space.labels), "matrix": confusion},
        "n": int(len(y_true)),
    }


def main_metric(space: LabelSpace, name: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Accuracy or macro-F1 in plain numpy (same values as scikit-learn, zero_division=0); fast for bootstrap."""
    if space.multi_label:
        if name == "accuracy":
            return float((y_true == y_pred).all(axis=1).mean())
        tp = (y_true * y_pred).sum(axis=0)
        fp = ((1 - y_true) * y_pred).sum(axis=0)
        fn = (y_true * (1 - y_pred)).sum(axis=0)
    else:
        if name == "accuracy":
            return float((y_true == y_pred).mean())
        k = len(space.labels)
        valid = y_true >= 0
        cm = np.bincount(y_true[valid] * k + y_pred[valid], minlength=k * k).reshape(k, k)
        tp = np.diag(cm)
        fp = cm.sum(axis=0) - tp + np.bincount(y_pred[~valid], minlength=k)  # unseen true labels: always wrong
        fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(len(tp), dtype=float), where=denom > 0)
    return float(f1.mean())


def bootstrap_ci(space: LabelSpace, name: str, y_true: np.ndarray, y_pred: np.ndarray,
                 samples: int, seed: int = 0, level: float = 0.95) -> dict | None:
    """Percentile bootstrap interval of the main metric over test rows."""
    if samples <= 0 or len(y_true) == 0:
        return None
    rng = np.random.default_rng(seed)
    n = len(y_true)
    stats = np.empty(samples)
    for b in range(samples):
        idx = rng.integers(0, n, n)
        stats[b] = main_metric(space, name, y_true[idx], y_pred[idx])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"metric": name, "level": level, "low": float(lo), "high": float(hi), "samples": samples}
