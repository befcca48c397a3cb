"""Score the fine-tuned model and the baselines on the same test split; the content of metrics.json."""
from __future__ import annotations

import numpy as np

from tuneforge.config import RunConfig
from tuneforge.data.split import Splits
from tuneforge.evaluation.gate import best_baseline
from tuneforge.tasks.classification.spec import SPEC
from tuneforge.tasks.classification import baselines as bl
from tuneforge.tasks.classification.stats import calibration, mcnemar, paired_bootstrap, slice_metrics
from tuneforge.tasks.classification.labels import LabelSpace, bootstrap_ci, main_metric, metrics


def _val_loss(space: LabelSpace, logits: np.ndarray, targets: np.ndarray) -> float:
    import torch

    if space.multi_label:
        t = torch.from_numpy(targets)
        return float(torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), t))
    valid = targets >= 0
    return float(torch.nn.functional.cross_entropy(torch.from_numpy(logits[valid]), torch.from_numpy(targets[valid])))


def validation_scores(model, space: LabelSpace, metric: str, ids: list[list[int]], targets: np.ndarray, pad_id: int,
                      batch_size: int, precision: str) -> dict:
    """Validation loss and the main metric of `model` (the training loop's early stopping and model choice)."""
    from tuneforge.models.infer import predict_logits

    logits = predict_logits(model, ids, pad_id, batch_size, precision)
    pred = space.decide(space.probabilities(logits))
    return {"val_loss": _val_loss(space, logits, targets), f"val_{metric}": main_metric(space, metric, targets, pred)}


def _scored(space: LabelSpace, cfg: RunConfig, y_test: np.ndarray, pred: np.ndarray) -> dict:
    m = metrics(space, y_test, pred)
    m["ci"] = bootstrap_ci(space, cfg.eval.metric, y_test, pred, cfg.eval.bootstrap_samples, seed=cfg.train.seed)
    return m


def baseline_predictions(space: LabelSpace, cfg: RunConfig, splits: Splits, y: dict[str, np.ndarray],
                         probe_features: dict | None) -> dict[str, np.ndarray]:
    """Each configured baseline's test predictions; they do not depend on the fine-tuned model, so the run
    computes them before training (their cost is then measured, not guessed, when the run is estimated)."""
    predictions = {}
    for name in cfg.eval.baselines:
        if name == "majority":
            predictions[name] = bl.majority(space, y["train"], len(y["test"]))
        elif name == "tfidf_logreg":
            texts = {k: ex.texts for k, ex in splits.items()}
            predictions[name] = bl.tfidf_logreg(space, cfg.eval.metric, texts, y, cfg.train.seed)
        elif name == "frozen_probe" and probe_features is not None:
            rows = probe_features["train_rows"]
            feats = {k: probe_features[k] for k in ("train", "val", "test")}
            ys = {"train": y["train"][rows], "val": y["val"], "test": y["test"]}
            predictions[name] = bl.frozen_probe(space, cfg.eval.metric, feats, ys, cfg.train.seed)
    return predictions


def evaluate_all(space: LabelSpace, cfg: RunConfig, splits: Splits, y: dict[str, np.ndarray],
                 test_probs: np.ndarray, predictions: dict[str, np.ndarray]) -> dict:
    """The model's test metrics beside the baselines' (`predictions`, from `baseline_predictions`)."""
    y_test = y["test"]
    model_pred = space.decide(test_probs)
    result = {
        "main_metric": cfg.eval.metric,
        "labels": list(space.labels),
        "test": {"model": _scored(space, cfg, y_test, model_pred),
                 "baselines": {name: _scored(space, cfg, y_test, pred) for name, pred in predictions.items()}},
    }
    key = cfg.eval.metric
    best = best_baseline(result, key, SPEC.direction(key))  # the significance tests are against it
    if best is not None:
        result["significance"] = {
            "against": best,
            "mcnemar": mcnemar(space, y_test, model_pred, predictions[best]),
            "paired_bootstrap": paired_bootstrap(space, key, y_test, model_pred, predictions[best],
                                                 cfg.eval.bootstrap_samples, seed=cfg.train.seed),
        }
    result["calibration"] = calibration(space, y_test, test_probs)
    result["slices"] = {col: slice_metrics(space, key, y_test, model_pred, splits.test.extras[col],
                                           cfg.eval.slice_max_gap, cfg.eval.slice_min_rows) for col in cfg.eval.slices}
    return result
