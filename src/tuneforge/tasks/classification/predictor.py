"""Load an exported model directory and predict labels with probabilities.

Used by `tuneforge predict`, by the final test evaluation (so the reported metrics are exactly what
the exported model gives) and by serving. Plain transformers, safetensors only; fp32 on the CPU unless
asked otherwise (serving picks the device and precision the hardware runs fastest).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuneforge.artifacts import SETTINGS_KEY  # threshold, max_length in model/config.json
from tuneforge.errors import ModelNotFoundError
from tuneforge.models.device import resolve_device, resolve_precision
from tuneforge.models.infer import encode, pad_id_of, predict_logits
from tuneforge.tasks.classification.labels import LabelSpace


@dataclass
class Predictor:
    model: object
    tokenizer: object
    space: LabelSpace
    max_length: int
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @classmethod
    def load(cls, model_dir: Path, device: str | torch.device = "cpu", precision: str = "fp32") -> "Predictor":
        """`device`: cpu, cuda[:N] or auto (a GPU when there is one); `precision`: fp32, bf16, fp16 or auto
        (what the hardware runs fastest: bf16 on a bf16 GPU or an AMX CPU, fp16 on an older GPU, else fp32)."""
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
        device = resolve_device(device)
        precision, _ = resolve_precision(precision, device)
        model.to(device).eval()
        return cls(model, tokenizer, space, int(extra.get("max_length", 512)), device, precision)

    def probabilities(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        ids = encode(self.tokenizer, texts, self.max_length)
        logits = predict_logits(self.model, ids, pad_id_of(self.tokenizer), batch_size, self.precision, self.device)
        return self.space.probabilities(logits)

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        return self.results(self.probabilities(texts, batch_size))

    def results(self, probs: np.ndarray) -> list[dict]:
        """Each row's label (multi-label: the list of labels) and the probabilities of all labels."""
        names = self.space.names(self.space.decide(probs))
        return [{"label": name, "probabilities": dict(zip(self.space.labels, map(float, p)))}
                for name, p in zip(names, probs)]
