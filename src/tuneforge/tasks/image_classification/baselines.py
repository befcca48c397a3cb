"""The cheap baselines an image model must beat: majority class, logistic regression on 16x16 greyscale
thumbnails (pixel_logreg), and a logistic head on the pre-trained model's frozen pooled features (frozen_probe)."""
from __future__ import annotations

import numpy as np
import torch

from tuneforge.tasks.classification import baselines as bl
from tuneforge.tasks.image_classification.audit import thumbnails
from tuneforge.tasks.image_classification.predictor import over_batches


def pooled_features(model, pixels: list[np.ndarray], mean, std, batch_size: int, precision: str) -> np.ndarray:
    """The frozen pre-trained model's pooled features: its own `features` (EfficientNet-Lite), else the last hidden
    state averaged over positions (patch tokens of a ViT, the feature map of a conv net)."""
    def pooled(x: torch.Tensor) -> torch.Tensor:
        if hasattr(model, "features"):
            return model.features(x)
        h = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        return h.mean(dim=1) if h.dim() == 3 else h.mean(dim=(2, 3))

    out = over_batches(model, pixels, mean, std, batch_size, precision, pooled)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)  # an empty split


def frozen_features(model, splits, mean, std, batch_size: int, precision: str) -> None:
    """Each split's pooled features of the frozen pre-trained `model`, into its extras["features"] (one per row):
    the audit's label-error check and the frozen_probe baseline share them, so they are computed once."""
    for _, ex in splits.items():
        ex.extras["features"] = list(pooled_features(model, ex.extras["pixels"], mean, std, batch_size, precision))


def baseline_predictions(cfg, space, splits, y: dict, model, precision: str) -> dict[str, np.ndarray]:
    predictions = {}
    metric, seed = cfg.eval.metric, cfg.train.seed
    for name in cfg.eval.baselines:
        if name == "majority":
            predictions[name] = bl.majority(space, y["train"], len(y["test"]))
        elif name == "pixel_logreg":
            feats = {k: thumbnails(ex.extras["pixels"]) for k, ex in splits.items()}
            predictions[name] = bl.frozen_probe(space, metric, feats, y, seed)
        elif name == "frozen_probe":
            train = splits.train.extras["pixels"]
            n = len(train) if not cfg.eval.probe_train_rows else min(cfg.eval.probe_train_rows, len(train))
            rows = np.random.default_rng(seed).permutation(len(train))[:n]
            if "features" not in splits.train.extras:
                frozen_features(model, splits, space.mean, space.std, cfg.eval.batch_size, precision)
            feats = {k: np.stack(ex.extras["features"]) if ex.extras["features"] else np.zeros((0, 1), np.float32)
                     for k, ex in splits.items()}
            feats["train"] = feats["train"][rows]
            predictions[name] = bl.frozen_probe(space, metric, feats, {**y, "train": y["train"][rows]}, seed)
    return predictions
