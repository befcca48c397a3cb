"""Load an exported image model and predict labels with probabilities, from files, bytes, base64 or cached
pixels: used by `tuneforge predict`, the final test evaluation and serving alike."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuneforge.artifacts import SETTINGS_KEY
from tuneforge.errors import ModelNotFoundError
from tuneforge.models.device import resolve_device, resolve_precision
from tuneforge.tasks.classification.labels import LabelSpace
from tuneforge.tasks.image_classification.images import decode_base64, open_rgb, resized


def normalised(pixels: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32, scaled to [0, 1] and normalised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def over_batches(model, pixels: list[np.ndarray] | np.ndarray, mean, std, batch_size: int, precision: str,
                 output, device: torch.device | None = None) -> list[np.ndarray]:
    """`output(x)` of each batch of cached (S, S, 3) uint8 images, normalised, in order (autocast to `precision`;
    the model is left in eval mode)."""
    device = device or next(model.parameters()).device
    model.eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    out = []
    for i in range(0, len(pixels), batch_size):
        x = normalised(np.stack(pixels[i:i + batch_size]), mean, std).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out.append(output(x).float().cpu().numpy())
    return out


def image_logits(model, pixels: list[np.ndarray] | np.ndarray, mean, std, batch_size: int = 64, precision: str = "fp32",
                 device: torch.device | None = None) -> np.ndarray:
    """Logits of cached (S, S, 3) uint8 images, in order; the model is left in eval mode."""
    out = over_batches(model, pixels, mean, std, batch_size, precision, lambda x: model(pixel_values=x).logits, device)
    return np.concatenate(out) if out else np.zeros((0, model.config.num_labels), dtype=np.float32)


@dataclass
class ImagePredictor:
    model: object
    space: LabelSpace
    image_size: int
    mean: list[float]
    std: list[float]
    max_pixels: int
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @classmethod
    def load(cls, model_dir: Path, device: str | torch.device = "cpu", precision: str = "fp32") -> "ImagePredictor":
        from tuneforge.tasks.image_classification.model import load_exported

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
            raise ModelNotFoundError(f"{model_dir} is not a tuneforge model directory (config.json + model.safetensors)",
                                     fix="pass the output directory of a finished `tuneforge run`")
        model = load_exported(model_dir)
        cfg = model.config
        extra = getattr(cfg, SETTINGS_KEY, None) or {}
        pre = json.loads((model_dir / "preprocessor_config.json").read_text()) \
            if (model_dir / "preprocessor_config.json").is_file() else {}
        labels = tuple(cfg.id2label[i] for i in range(cfg.num_labels))
        device = resolve_device(device)
        precision, _ = resolve_precision(precision, device)
        model.to(device).eval()
        space = LabelSpace(labels, cfg.problem_type == "multi_label_classification", extra.get("threshold", 0.5))
        return cls(model, space, int(extra.get("image_size", 224)),
                   list(pre.get("image_mean", [0.5] * 3)), list(pre.get("image_std", [0.5] * 3)),
                   int(extra.get("max_pixels", 40_000_000)), device, precision)

    def pixels(self, item) -> np.ndarray:
        """(S, S, 3) uint8 of one input: cached pixels, a file (Path), encoded bytes, or a base64 string."""
        if isinstance(item, np.ndarray):
            return item
        data = item.read_bytes() if isinstance(item, Path) else item if isinstance(item, bytes) else decode_base64(item)
        return resized(open_rgb(data, self.max_pixels), self.image_size)

    def probabilities(self, items: list, batch_size: int = 64) -> np.ndarray:
        pixels = [self.pixels(x) for x in items]
        logits = image_logits(self.model, pixels, self.mean, self.std, batch_size, self.precision, self.device)
        return self.space.probabilities(logits)

    def predict(self, items: list, batch_size: int = 64) -> list[dict]:
        return self.results(self.probabilities(items, batch_size))

    def results(self, probs: np.ndarray) -> list[dict]:
        names = self.space.names(self.space.decide(probs))
        return [{"label": name, "probabilities": dict(zip(self.space.labels, map(float, p)))}
                for name, p in zip(names, probs)]
