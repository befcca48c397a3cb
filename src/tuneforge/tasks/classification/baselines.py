"""Cheap baselines every fine-tuned model must beat, scored on the same test split.

- majority: the most frequent training class (multi-label: every label on more than half the rows);
- tfidf_logreg: word 1-2-gram TF-IDF + logistic regression;
- frozen_probe: the pre-trained encoder, frozen, mean-pooled, with a trained linear (logistic) head.
The logistic regressions pick their regularisation C on the validation split, never on test.
"""
from __future__ import annotations

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from tuneforge.tasks.classification.labels import LabelSpace, main_metric

_C_GRID = (0.1, 1.0, 10.0)


def majority(space: LabelSpace, y_train: np.ndarray, n_test: int) -> np.ndarray:
    if space.multi_label:
        freq = y_train.mean(axis=0)
        row = (freq > 0.5).astype(np.int64)
        if not row.any():
            row[int(freq.argmax())] = 1
        return np.tile(row, (n_test, 1))
    counts = np.bincount(y_train[y_train >= 0], minlength=len(space.labels))
    return np.full(n_test, int(counts.argmax()), dtype=np.int64)


def _fit_linear(space: LabelSpace, metric: str, x_train, y_train, x_val, y_val, seed: int):
    """Logistic regression with C chosen on validation; returns the fitted model."""
    best, best_score = None, -np.inf
    for c in _C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        if space.multi_label:
            clf = OneVsRestClassifier(clf)
        keep = slice(None) if space.multi_label else y_train >= 0
        clf.fit(x_train[keep], y_train[keep])
        score = main_metric(space, metric, y_val, _predict(space, clf, x_val))
        if score > best_score:
            best, best_score = clf, score
    return best


def _predict(space: LabelSpace, clf, x) -> np.ndarray:
    if space.multi_label:
        return (clf.predict_proba(x) >= space.threshold).astype(np.int64)
    # LogisticRegression's classes_ are the label ids seen in training
    return clf.classes_[clf.predict_proba(x).argmax(axis=1)].astype(np.int64)


def _single_class(space: LabelSpace, y: np.ndarray) -> bool:
    return not space.multi_label and len(np.unique(y[y >= 0])) < 2


def tfidf_logreg(space: LabelSpace, metric: str, texts: dict[str, list[str]], y: dict[str, np.ndarray], seed: int) -> np.ndarray:
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, max_features=200_000)
    x_train = vec.fit_transform(texts["train"])
    if _single_class(space, y["train"]):
        return majority(space, y["train"], len(texts["test"]))
    clf = _fit_linear(space, metric, x_train, y["train"], vec.transform(texts["val"]), y["val"], seed)
    return _predict(space, clf, vec.transform(texts["test"]))


def frozen_probe(space: LabelSpace, metric: str, features: dict[str, np.ndarray], y: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """`features` are the frozen encoder's mean-pooled embeddings; y['train'] matches features['train'] rows."""
    if _single_class(space, y["train"]):
        return majority(space, y["train"], len(features["test"]))
    mu, sd = features["train"].mean(0), features["train"].std(0) + 1e-6
    z = {k: (v - mu) / sd for k, v in features.items()}
    clf = _fit_linear(space, metric, z["train"], y["train"], z["val"], y["val"], seed)
    return _predict(space, clf, z["test"])
