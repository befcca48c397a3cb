"""Image classification's own report sections: a grid of test images the model got wrong (thumbnail, true and
predicted label, confidence) and a few test images per class; and the model card's loading instructions."""
from __future__ import annotations

import base64
import html
import io

import numpy as np

THUMB = 64
MAX_WRONG = 24
PER_CLASS = 3


def _thumb(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).resize((THUMB, THUMB), Image.BILINEAR).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def gallery(test, y_test: np.ndarray, probs: np.ndarray, space) -> dict:
    """The most confident mistakes first, and the first few images of each class, with small PNG thumbnails (kept in
    metrics.json so `tuneforge report` rebuilds the page from the run's files). Multi-label: a mistake is any label
    wrong, labels shown joined by commas, confidence that of the least certain decision."""
    labels = space.labels
    pred = space.decide(probs)
    if space.multi_label:
        conf = np.where(pred == 1, probs, 1 - probs).min(axis=1)
        wrong_rows = (pred != y_test).any(axis=1)
        hot = y_test == 1
        true_names = [", ".join(n) or "(none)" for n in space.names(y_test.astype(np.int64))]
        pred_names = [", ".join(n) or "(none)" for n in space.names(pred)]
    else:
        conf = probs.max(axis=1)
        wrong_rows = pred != y_test
        hot = y_test[:, None] == np.arange(len(labels))[None, :]
        true_names = [labels[i] if i >= 0 else "?" for i in y_test]
        pred_names = space.names(pred)
    wrong = [k for k in np.argsort(-conf, kind="stable") if wrong_rows[k]][:MAX_WRONG]

    def item(k: int) -> dict:
        return {"image": test.texts[k], "true": true_names[k], "predicted": pred_names[k],
                "confidence": round(float(conf[k]), 4), "png": _thumb(test.extras["pixels"][k])}

    per_class = {lab: [item(int(k)) for k in np.flatnonzero(hot[:, c])[:PER_CLASS]] for c, lab in enumerate(labels[:30])}
    return {"wrong": [item(int(k)) for k in wrong], "wrong_total": int(wrong_rows.sum()), "per_class": per_class}


def _cell(it: dict) -> str:
    mark = "" if it["true"] == it["predicted"] else " class='warn'"
    return (f"<figure style='display:inline-block;margin:4px;text-align:center;font-size:11px'>"
            f"<img src='data:image/png;base64,{it['png']}' width='{THUMB}' height='{THUMB}' alt='{html.escape(it['image'])}'>"
            f"<figcaption{mark}>true {html.escape(it['true'])}<br>pred {html.escape(it['predicted'])} {it['confidence']:.2f}"
            f"</figcaption></figure>")


def gallery_html(g: dict) -> list[str]:
    if not g:
        return []
    parts = []
    if g.get("wrong"):
        parts.append(f"<h2>Mistakes</h2><p>{len(g['wrong'])} of the {g['wrong_total']} test images the model got wrong, "
                     "most confident first.</p><div>" + "".join(_cell(it) for it in g["wrong"]) + "</div>")
    else:
        parts.append("<h2>Mistakes</h2><p>None: every test image was classified right.</p>")
    rows = "".join(f"<h3>{html.escape(lab)}</h3><div>{''.join(_cell(it) for it in items)}</div>"
                   for lab, items in g.get("per_class", {}).items() if items)
    parts.append("<h2>Examples per class</h2>" + rows)
    return parts


def how_to_load(size: int, loads_with: str = "transformers") -> str:
    """The model card's "How to load": plain transformers for a transformers architecture; for EfficientNet-Lite
    (`loads_with` "pytorch": plain transformers cannot load it), plain PyTorch from its safetensors and config."""
    if loads_with == "transformers":
        return f"""```python
from transformers import pipeline
classify = pipeline("image-classification", model="PATH/TO/model")  # resizes to {size}x{size}
classify("photo.jpg")
```
or `tuneforge predict RUN_DIR --image photo.jpg`."""
    return f"""Plain transformers cannot load this model (EfficientNet-Lite is not a transformers architecture). In plain
PyTorch, with `pip install efficientnet-lite-pytorch safetensors`:
```python
import json, torch
from safetensors.torch import load_file
from efficientnet_lite_pytorch import EfficientNet
cfg = json.load(open("PATH/TO/model/config.json"))
net = EfficientNet.from_name(cfg["variant"], num_classes=len(cfg["id2label"]), image_size=cfg["image_size"])
net.load_state_dict({{k.removeprefix("efficientnet."): v for k, v in load_file("PATH/TO/model/model.safetensors").items()}})
net.eval()  # input: RGB resized to {size}x{size}, (x / 255 - image_mean) / image_std from preprocessor_config.json
```
or `tuneforge predict RUN_DIR --image photo.jpg`."""
