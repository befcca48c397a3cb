"""Text classification's audit checks: class balance and likely label errors (confident learning on
out-of-fold TF-IDF probabilities). The generic checks are in tuneforge/data/audit.py."""
from __future__ import annotations

from collections import Counter

import numpy as np

from tuneforge.config import AuditConfig
from tuneforge.data.audit import row_positions, row_ref
from tuneforge.data.split import Splits


def sections(splits: Splits, multi_label: bool, cfg: AuditConfig, seed: int) -> dict:
    return {"label_issues": label_issues(splits, multi_label, cfg, seed),
            "class_balance": class_balance(splits, multi_label, cfg)}


def class_balance(splits: Splits, multi_label: bool, cfg: AuditConfig) -> dict:
    counts = {}
    for name, ex in splits.items():
        flat = [lab for labs in ex.labels for lab in labs] if multi_label else ex.labels
        counts[name] = dict(sorted(Counter(flat).items()))
    train = counts["train"]
    problems = []
    for label in sorted(set().union(*counts.values())):
        if train.get(label, 0) < cfg.min_train_rows_per_class:
            problems.append(f"class {label!r} has {train.get(label, 0)} training rows (< {cfg.min_train_rows_per_class}): too few to learn")
        if counts["test"].get(label, 0) < cfg.min_test_rows_per_class:
            problems.append(f"class {label!r} has {counts['test'].get(label, 0)} test rows (< {cfg.min_test_rows_per_class}): too few to test")
    ratio = max(train.values()) / max(min(train.values()), 1)
    if ratio > cfg.max_imbalance_ratio:
        problems.append(f"largest/smallest class ratio in train is {ratio:.1f} (> {cfg.max_imbalance_ratio:g}): prefer macro-F1")
    return {"severity": "warning" if problems else "info", "counts": counts, "imbalance_ratio": round(ratio, 3),
            "problems": problems}


def label_issues(splits: Splits, multi_label: bool, cfg: AuditConfig, seed: int) -> dict:
    """Confident learning (cleanlab) on out-of-fold probabilities of TF-IDF + a linear model, all splits."""
    if multi_label or not cfg.label_issues:
        why = "multi-label data" if multi_label else "audit.label_issues is off"
        return {"severity": "info", "skipped": why, "rows": []}
    import warnings

    with warnings.catch_warnings():  # importing cleanlab runs warnings.filterwarnings("ignore"): every warning of the
        from cleanlab.filter import find_label_issues  # process would vanish, the run log's included
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    where = row_positions(splits)
    texts = [t for _, ex in splits.items() for t in ex.texts]
    given = [lab for _, ex in splits.items() for lab in ex.labels]
    classes = sorted(set(given))
    y = np.array([classes.index(lab) for lab in given])
    per_class = np.bincount(y)
    folds = min(cfg.label_issue_folds, int(per_class.min()))
    if folds < 2:
        return {"severity": "info", "skipped": "a class has fewer than 2 rows", "rows": []}
    x = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=300_000).fit_transform(texts)
    clf = SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=30, tol=1e-4, random_state=seed)
    probs = cross_val_predict(clf, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed), method="predict_proba")
    ranked = find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    rows = [{**row_ref(splits, *where[i]), "given": classes[y[i]], "suggested": classes[int(probs[i].argmax())],
             "confidence_in_given": round(float(probs[i, y[i]]), 4)} for i in ranked]
    share = len(rows) / max(len(y), 1)
    # the least-confident 10% of all rows, most suspect first: where a reviewer should start
    least = np.argsort(probs[np.arange(len(y)), y], kind="stable")[: max(1, len(y) // 10)]
    return {"severity": "warning" if share > 0.02 else "info", "method": "cleanlab find_label_issues, "
            f"{folds}-fold out-of-fold TF-IDF + logistic SGD", "share": round(share, 4), "rows": rows,
            "least_confident_10pct": [row_ref(splits, *where[i]) for i in least]}
