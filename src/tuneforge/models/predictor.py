"""Load an exported model directory and predict labels with probabilities.

Used by `tuneforge predict`, by the final test evaluation (so the reported metrics are exactly what
the exported model gives) and, later, by serving. Plain transformers, fp32, safetensors only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.errors import ModelNotFoundError
from tuneforge.models.infer import encode, pad_id_of, predict_logits
from tuneforge.tasks.classification import LabelSpace

SETTINGS_KEY = "tuneforge"  # extra block in config.json: threshold, max_length; plain transformers ignores it


@dataclass
class Predictor:
    model: object
    tokenizer: object
    space: LabelSpace
    max_length: int

    @classmethod
    def load(cls, model_dir: Path) -> "Predictor":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
            raise ModelNotFoundError(f"{model_dir} is not a tuneforge model directory (config.json + model.safetensors)",
                                     fix="pass the output directory of a finished `tuneforge run`")
        from tuneforge.models.load import quiet_transformers

        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True,
                                                                       use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        cfg = model.config
        extra = getattr(cfg, SETTINGS_KEY, None) or {}
        labels = tuple(cfg.id2label[i] for i in range(cfg.num_labels))
        space = LabelSpace(labels, cfg.problem_type == "multi_label_classification", extra.get("threshold", 0.5))
        model.eval()
        return cls(model, tokenizer, space, int(extra.get("max_length", 512)))

    def probabilities(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        ids = encode(self.tokenizer, texts, self.max_length)
        return self.space.probabilities(predict_logits(self.model, ids, pad_id_of(self.tokenizer), batch_size))

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        probs = self.probabilities(texts, batch_size)
        names = self.space.names(self.space.decide(probs))
        return [{"label": name, "probabilities": dict(zip(self.space.labels, map(float, p)))}
                for name, p in zip(names, probs)]
