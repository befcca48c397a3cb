"""Image classification's audit checks: class balance (as for text), image outliers (tiny, extreme aspect), mixed
colour modes, and likely label errors (confident learning on out-of-fold probabilities of a linear model on the
pre-trained model's frozen features, or on small greyscale thumbnails when there are none). Duplicates and leakage
are the generic checks, on pixel hashes and thumbnail similarity."""
from __future__ import annotations

from collections import Counter

import numpy as np

from tuneforge.config import AuditConfig
from tuneforge.data.audit import row_positions, row_ref
from tuneforge.data.split import Splits
from tuneforge.tasks.classification.audit import class_balance


def thumbnails(pixels: list[np.ndarray], side: int = 16) -> np.ndarray:
    """(N, side*side) greyscale thumbnails in [0, 1]: the features of pixel_logreg and the label-error check."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(p).convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32)
                     .ravel() / 255.0 for p in pixels]) if pixels else np.zeros((0, side * side), dtype=np.float32)


def sections(splits: Splits, cfg: AuditConfig, seed: int, image_size: int, min_side: int, features: str | None = None,
             multi_label: bool = False) -> dict:
    """`features`: the name of the model whose frozen features each split's extras["features"] holds, if any."""
    resize_note = f"images are resized to {image_size}x{image_size}, not truncated"
    return {"truncation": {"severity": "info", "skipped": resize_note},
            "long_texts": {"severity": "info", "skipped": "no texts"},
            "outliers": outliers(splits, min_side),
            "image_modes": modes(splits),
            "class_balance": class_balance(splits, multi_label, cfg),
            "label_issues": ({"severity": "info", "skipped": "multi-label data", "rows": []} if multi_label
                             else label_issues(splits, cfg, seed, features))}


def outliers(splits: Splits, min_side: int) -> dict:
    rows = []
    for name, ex in splits.items():
        for k, (w, h) in enumerate(zip(ex.extras["width"], ex.extras["height"])):
            reason = None
            if min(w, h) < min_side:
                reason = f"tiny ({w}x{h} px; task.min_side {min_side})"
            elif max(w, h) / max(min(w, h), 1) > 4:
                reason = f"extreme aspect ratio ({w}x{h}): stretched to a square it is distorted"
            if reason:
                rows.append({**row_ref(splits, name, k), "image": ex.texts[k], "reason": reason})
    sides = [min(w, h) for _, ex in splits.items() for w, h in zip(ex.extras["width"], ex.extras["height"])]
    return {"severity": "warning" if rows else "info", "rows": rows, "median_short_side": float(np.median(sides)),
            "summary": f"{len(rows)} tiny or extreme-aspect images" if rows else "none"}


def modes(splits: Splits) -> dict:
    counts = Counter(m for _, ex in splits.items() for m in ex.extras["mode"])
    mixed = len(counts) > 1
    return {"severity": "info", "counts": dict(counts),
            "summary": ("mixed colour modes " if mixed else "one colour mode ")
            + ", ".join(f"{m} {n}" for m, n in counts.most_common()) + " (all made RGB)"}


def label_issues(splits: Splits, cfg: AuditConfig, seed: int, features: str | None = None) -> dict:
    """cleanlab's find_label_issues on out-of-fold probabilities of logistic regression on the frozen model's
    features (extras["features"], reduced to 128 principal components), else on 16x16 thumbnails."""
    if not cfg.label_issues:
        return {"severity": "info", "skipped": "audit.label_issues is off", "rows": []}
    import warnings

    with warnings.catch_warnings():  # importing cleanlab resets the process's warning filters
        from cleanlab.filter import find_label_issues
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    where = row_positions(splits)
    if features:
        x = np.stack([f for _, ex in splits.items() for f in ex.extras["features"]])
        k = min(128, *x.shape)
        clf = make_pipeline(StandardScaler(), PCA(k, whiten=True, random_state=seed), LogisticRegression(max_iter=500, C=0.1))
        on = f"the frozen features of {features} ({k} principal components)"
    else:
        x = thumbnails([p for _, ex in splits.items() for p in ex.extras["pixels"]])
        clf, on = LogisticRegression(max_iter=300, C=0.5), "16x16 thumbnails (a weak model: treat the list as where to look)"
    given = [lab for _, ex in splits.items() for lab in ex.labels]
    classes = sorted(set(given))
    y = np.array([classes.index(lab) for lab in given])
    folds = min(cfg.label_issue_folds, int(np.bincount(y).min()))
    if folds < 2 or len(classes) < 2:
        return {"severity": "info", "skipped": "a class has fewer than 2 images", "rows": []}
    probs = cross_val_predict(clf, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed), method="predict_proba")
    ranked = find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    texts = [t for _, ex in splits.items() for t in ex.texts]
    rows = [{**row_ref(splits, *where[i]), "image": texts[i], "given": classes[y[i]],
             "suggested": classes[int(probs[i].argmax())], "confidence_in_given": round(float(probs[i, y[i]]), 4)}
            for i in ranked]
    share = len(rows) / max(len(y), 1)
    return {"severity": "warning" if share > 0.02 else "info", "share": round(share, 4), "rows": rows,
            "method": f"cleanlab find_label_issues, {folds}-fold out-of-fold logistic regression on {on}"}
