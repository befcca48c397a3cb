"""Score the fine-tuned model and the baselines on the same test split; the content of metrics.json."""
from __future__ import annotations

import numpy as np

from tuneforge.config import RunConfig
from tuneforge.data.split import Splits
from tuneforge.evaluation import baselines as bl
from tuneforge.tasks.classification import LabelSpace, bootstrap_ci, metrics


def _scored(space: LabelSpace, cfg: RunConfig, y_test: np.ndarray, pred: np.ndarray) -> dict:
    m = metrics(space, y_test, pred)
    m["ci"] = bootstrap_ci(space, cfg.eval.metric, y_test, pred, cfg.eval.bootstrap_samples, seed=cfg.train.seed)
    return m


def evaluate_all(space: LabelSpace, cfg: RunConfig, splits: Splits, y: dict[str, np.ndarray],
                 test_probs: np.ndarray, probe_features: dict | None) -> dict:
    y_test = y["test"]
    model_pred = space.decide(test_probs)
    predictions = {}
    for name in cfg.eval.baselines:
        if name == "majority":
            predictions[name] = bl.majority(space, y["train"], len(y_test))
        elif name == "tfidf_logreg":
            texts = {k: ex.texts for k, ex in splits.items()}
            predictions[name] = bl.tfidf_logreg(space, cfg.eval.metric, texts, y, cfg.train.seed)
        elif name == "frozen_probe" and probe_features is not None:
            rows = probe_features["train_rows"]
            feats = {k: probe_features[k] for k in ("train", "val", "test")}
            ys = {"train": y["train"][rows], "val": y["val"], "test": y_test}
            predictions[name] = bl.frozen_probe(space, cfg.eval.metric, feats, ys, cfg.train.seed)
    result = {
        "main_metric": cfg.eval.metric,
        "labels": list(space.labels),
        "test": {"model": _scored(space, cfg, y_test, model_pred),
                 "baselines": {name: _scored(space, cfg, y_test, pred) for name, pred in predictions.items()}},
    }
    key = cfg.eval.metric
    best_baseline = max((m[key] for m in result["test"]["baselines"].values()), default=-np.inf)
    result["beats_baselines"] = bool(result["test"]["model"][key] > best_baseline)
    result["best_baseline"] = max(result["test"]["baselines"], key=lambda n: result["test"]["baselines"][n][key], default=None)
    return result
