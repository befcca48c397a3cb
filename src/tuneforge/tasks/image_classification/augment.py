"""Training-only augmentation of cached uint8 images (N, S, S, 3), in numpy: random resized crop (70-100% of the
area, aspect 3/4-4/3, back to S x S), horizontal flip, small brightness/contrast jitter. task.augment names which."""
from __future__ import annotations

import numpy as np


def _crop_resize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    s = img.shape[0]
    area = rng.uniform(0.7, 1.0) * s * s
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w = int(round(min(s, np.sqrt(area * aspect))))
    h = int(round(min(s, np.sqrt(area / aspect))))
    x, y = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
    return np.asarray(Image.fromarray(img[y:y + h, x:x + w]).resize((s, s), Image.BILINEAR))


def augment_batch(pixels: np.ndarray, kinds: tuple[str, ...], rng: np.random.Generator) -> np.ndarray:
    if not kinds:
        return pixels
    out = pixels.copy()
    for k in range(len(out)):
        if "crop" in kinds:
            out[k] = _crop_resize(out[k], rng)
        if "flip" in kinds and rng.random() < 0.5:
            out[k] = out[k][:, ::-1]
    if "jitter" in kinds:
        x = out.astype(np.float32)
        brightness = rng.uniform(0.9, 1.1, size=(len(x), 1, 1, 1))
        contrast = rng.uniform(0.9, 1.1, size=(len(x), 1, 1, 1))
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        out = np.clip((x - mean) * contrast + mean * brightness, 0, 255).astype(np.uint8)
    return out
