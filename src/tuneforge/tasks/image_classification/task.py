"""Image classification behind the task contract: images in class folders (or a table of paths) -> a vision
model with a new head, scored by accuracy / macro-F1 against majority, pixel-logistic and frozen-probe baselines,
served from base64 or multipart uploads. Metrics, CIs, significance, calibration and slices are text
classification's (the same metrics.json keys)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.tasks.classification.labels import LabelSpace
from tuneforge.tasks.classification.task import ClassificationTask
from tuneforge.tasks.image_classification.images import brightness
from tuneforge.tasks.image_classification.spec import SPEC

SIZE_EDGES = [0, 32**2, 64**2, 128**2, 224**2, 512**2, 1024**2, 2048**2, 10**12]  # pixels (width x height)


@dataclass(frozen=True)
class ImageSpace(LabelSpace):
    """The labels, and how the run feeds images to the model: resolution, normalisation, training augmentation."""
    image_size: int = 224
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    augment: tuple[str, ...] = ()
    loads_with: str = "transformers"  # what loads the exported model outside tuneforge: transformers, or PyTorch (Lite)


class ImageClassificationTask(ClassificationTask):
    name = "image-classification"
    model_class = "AutoModelForImageClassification"
    peft_task_type = None  # peft has no image task type: LoRA on the targets, the head trained in full (lora_head)

    def __init__(self):
        self._space: ImageSpace | None = None  # the run's, for collate (set by encode and load_model on every process)

    # --- model reference and data ---
    def resolve_model(self, ref: str):
        from tuneforge.tasks.image_classification.model import convert_lite, lite_reference

        variant = lite_reference(ref)
        return convert_lite(variant) if variant else super().resolve_model(ref)

    def _model_size(self, cfg) -> tuple[int, bool]:
        from tuneforge.tasks.image_classification.model import model_image_size

        return model_image_size(self.resolve_model(cfg.model.name)[0])

    def prepare(self, cfg):
        from tuneforge.errors import ConfigError
        from tuneforge.tasks.image_classification.data import prepare_images

        size, resizable = self._model_size(cfg)
        if cfg.task.image_size and not resizable and cfg.task.image_size != size:
            raise ConfigError(f"task.image_size is {cfg.task.image_size}, and {cfg.model.name} takes {size}x{size} "
                              "images only (a vision transformer's position embeddings)",
                              fix=f"set task.image_size: {size} or null")
        return prepare_images(cfg, size, resizable)

    def audit_sections(self, cfg, data, tokenizer, max_length: int) -> dict:
        from tuneforge.models.device import resolve_device, resolve_precision
        from tuneforge.tasks.image_classification.audit import sections
        from tuneforge.tasks.image_classification.baselines import frozen_features

        features = None
        if cfg.audit.label_issues and not cfg.task.multi_label:  # the frozen pre-trained features: what a model sees, where thumbnails see pixels
            space = self.label_space(cfg, data)
            device = resolve_device("auto")  # as training's: a GPU where there is one
            model = self.load_model(self.resolve_model(cfg.model.name)[0], space, cfg.train.seed, cfg.model.trust_remote_code)
            frozen_features(model.to(device), data.splits, space.mean, space.std, cfg.eval.batch_size,
                            resolve_precision(cfg.train.precision, device)[0])
            features = cfg.model.name
        return sections(data.splits, cfg.audit, cfg.data.seed, data.report["image_size"], cfg.task.min_side, features,
                        cfg.task.multi_label)

    def load_tokenizer(self, model_dir: Path):
        """The image processor (its mean and std normalise; the export saves it for plain transformers)."""
        from transformers import AutoImageProcessor

        from tuneforge.tasks.image_classification.model import image_processor

        try:
            return AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError):
            return image_processor(224, [0.5] * 3, [0.5] * 3)

    def label_space(self, cfg, data) -> ImageSpace:
        import json

        from tuneforge.tasks.image_classification.model import is_lite

        model_dir = self.resolve_model(cfg.model.name)[0]
        pre = model_dir / "preprocessor_config.json"
        norm = json.loads(pre.read_text()) if pre.is_file() else {}
        return ImageSpace(tuple(data.labels), cfg.task.multi_label, cfg.task.threshold, data.report["image_size"],
                          tuple(norm.get("image_mean", [0.5] * 3)), tuple(norm.get("image_std", [0.5] * 3)),
                          tuple(cfg.task.augment), "pytorch" if is_lite(model_dir) else "transformers")

    def describe_space(self, label_space: ImageSpace) -> str:
        return f"{len(label_space.labels)} labels, images at {label_space.image_size}x{label_space.image_size}"

    def token_lengths(self, cfg, tokenizer, data) -> dict:
        """Values per image (S x S x 3): what the cost estimate scales with, the same for every row."""
        size = data.report["image_size"]
        return {name: np.full(len(ex), size * size * 3) for name, ex in data.splits.items()}

    def max_length(self, cfg, train_lengths, tokenizer, model_dir: Path) -> tuple[int, str]:
        return int(train_lengths[0]) if len(train_lengths) else 0, "pixel values per image at the working resolution"

    def encode(self, cfg, tokenizer, label_space: ImageSpace, splits, max_length: int) -> tuple[dict, dict]:
        """(cached uint8 pixels per split, flattened, one row per image; class ids per split)."""
        self._space = label_space
        ids = {name: [p.reshape(-1) for p in ex.extras["pixels"]] for name, ex in splits.items()}
        return ids, {name: label_space.encode(ex.labels) for name, ex in splits.items()}

    # --- model and training ---
    def load_model(self, model_dir: Path, label_space: ImageSpace, seed: int, trust_remote_code: bool = False):
        from tuneforge.tasks.image_classification.model import load_image_model

        self._space = label_space
        return load_image_model(model_dir, label_space.labels, label_space.image_size, seed, trust_remote_code,
                                label_space.problem_type)

    def lora_targets(self):
        return ["query", "value", "q_proj", "v_proj"]  # a vision transformer's attention, as transformers 4 and 5 name it

    def lora_head(self) -> list[str]:
        return ["classifier"]

    def collate(self, examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
        """A training batch: the cached images, augmented (task.augment) and normalised, and their class ids."""
        import torch

        from tuneforge.tasks.image_classification.augment import augment_batch
        from tuneforge.tasks.image_classification.predictor import normalised

        space = self._space
        s = space.image_size
        pixels = np.stack([np.asarray(e["input_ids"]).reshape(s, s, 3) for e in examples])
        pixels = augment_batch(pixels, space.augment, np.random.default_rng(int(pixels[:, 0, 0, 0].sum()) + len(pixels)))
        return {"pixel_values": normalised(pixels, list(space.mean), list(space.std)),
                "labels": torch.from_numpy(np.asarray([e["labels"] for e in examples],  # multi-label: multi-hot
                                                      dtype=np.float32 if space.multi_label else np.int64))}

    def validator(self, cfg, label_space: ImageSpace, tokenizer, max_length: int, val_ids: list, y_val: np.ndarray,
                  pad_id: int, precision: str):
        from tuneforge.tasks.classification.labels import main_metric
        from tuneforge.tasks.image_classification.predictor import image_logits

        s = label_space.image_size
        pixels = [p.reshape(s, s, 3) for p in val_ids]

        def validate(model) -> dict:
            logits = image_logits(model, pixels, label_space.mean, label_space.std, cfg.eval.batch_size, precision)
            pred = label_space.decide(label_space.probabilities(logits))
            if label_space.multi_label:  # binary cross-entropy of each label, as the model's loss
                x = logits.astype(np.float64)
                loss = float((np.logaddexp(0, x) - x * y_val).mean()) if len(y_val) else 0.0
            else:
                z = logits - logits.max(axis=1, keepdims=True)
                log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
                loss = float(-log_p[np.arange(len(y_val)), y_val].mean()) if len(y_val) else 0.0
            return {"val_loss": loss, f"val_{cfg.eval.metric}": main_metric(label_space, cfg.eval.metric, y_val, pred)}

        return validate

    # --- baselines ---
    def baselines(self, cfg, label_space: ImageSpace, splits, ids: dict, y: dict, model, pad_id: int, precision: str) -> dict:
        from tuneforge.tasks.image_classification.baselines import baseline_predictions

        return baseline_predictions(cfg, label_space, splits, y, model, precision)

    # --- export, predictor, evaluation ---
    def export(self, cfg, model_dir: Path, tokenizer, label_space: ImageSpace) -> None:
        """The image processor at the working resolution (what pipeline("image-classification") resizes to)."""
        from tuneforge.tasks.image_classification.model import image_processor

        image_processor(label_space.image_size, list(label_space.mean), list(label_space.std)).save_pretrained(str(model_dir))

    def settings(self, cfg, max_length: int, label_space: ImageSpace | None = None) -> dict:
        return {"task": self.name, "image_size": label_space.image_size if label_space else 224,
                "max_pixels": cfg.task.max_pixels, "loads_with": label_space.loads_with if label_space else "transformers",
                "threshold": cfg.task.threshold}

    def onnx_inputs(self, predictor) -> tuple[dict, dict]:
        """Two normalised images at the model's size; the batch axis free (the size is the run's)."""
        import torch

        x = torch.randn(2, 3, predictor.image_size, predictor.image_size, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": x}, {"pixel_values": {0: "batch"}}

    def export_outputs(self, predictor, test, batch_size: int) -> tuple[list, list]:
        """Each test image's logits and label(s)."""
        from tuneforge.tasks.image_classification.predictor import image_logits

        logits = image_logits(predictor.model, test.extras["pixels"], predictor.mean, predictor.std, batch_size,
                              "fp32", predictor.device)
        return list(logits), list(predictor.space.names(predictor.space.decide(predictor.space.probabilities(logits))))

    def load_predictor(self, model_dir: Path, device="cpu", precision: str = "fp32"):
        from tuneforge.tasks.image_classification.predictor import ImagePredictor

        return ImagePredictor.load(Path(model_dir), device, precision)

    def evaluate(self, cfg, label_space: ImageSpace, splits, y: dict, predictor, baselines: dict) -> tuple[dict, dict]:
        """(metrics.json content, the test outputs: probabilities and image sizes for the drift reference)."""
        from tuneforge.tasks.classification.evaluate import evaluate_all
        from tuneforge.tasks.image_classification.report import gallery

        test = splits.test
        probs = predictor.probabilities(test.extras["pixels"], cfg.eval.batch_size)
        result = evaluate_all(label_space, cfg, splits, y, probs, baselines)
        result["gallery"] = gallery(test, y["test"], probs, label_space)
        sizes = [w * h for w, h in zip(test.extras["width"], test.extras["height"])]
        return result, {"probabilities": probs, "sizes": sizes, "brightness": [brightness(p) for p in test.extras["pixels"]]}

    def reference_profile(self, predictor, inputs: list, outputs: dict) -> dict:
        from tuneforge.drift import NO_LABEL, profile_of

        names = list(predictor.space.labels) + ([NO_LABEL] if predictor.space.multi_label else [])
        return profile_of(outputs["sizes"], predictor.results(outputs["probabilities"]), names, SIZE_EDGES, {name: (edges, outputs[name]) for name, edges in SPEC.input_measures.items()})

    # --- predict and serve ---
    def read_inputs(self, values: list[str], path: Path | None, column: str | None, run_dir: Path) -> list[Path]:
        from tuneforge.tasks.image_classification.inputs import read_inputs

        return read_inputs(values, path, column, run_dir)

    def check_inputs(self, items: list[str], settings) -> str | None:
        from tuneforge.tasks.image_classification.inputs import check_inputs

        return check_inputs(items, settings)

    def input_size(self, item) -> int:
        from tuneforge.tasks.image_classification.inputs import pixel_count

        return pixel_count(item)

    def measure_input(self, item) -> dict[str, float]:
        from tuneforge.tasks.image_classification.inputs import measures

        return measures(item)

    def parse_upload(self, body: bytes, content_type: str) -> dict | None:
        from tuneforge.tasks.image_classification.inputs import parse_multipart

        return parse_multipart(body, content_type)

    def report_details(self, metrics: dict) -> list[str]:
        from tuneforge.tasks.image_classification.report import gallery_html

        return [*super().report_details(metrics), *gallery_html(metrics.get("gallery") or {})]

    def card_facts(self, data_report: dict, model_settings: dict) -> dict:
        from tuneforge.tasks.image_classification.report import how_to_load

        size = model_settings.get("image_size", data_report.get("image_size"))
        return {"variant": "multi-label" if data_report.get("multi_label") else None,
                "load": how_to_load(size, model_settings.get("loads_with", "transformers")),
                "inputs": f"Images are made RGB and stretched to {size}x{size} pixels: fine detail smaller than that "
                          "resolution allows is lost, and very wide or tall images are distorted."}

    def load_hint(self, model_dir: Path) -> str:
        from tuneforge.tasks.image_classification.model import is_lite

        if is_lite(model_dir):
            return f"plain PyTorch as {model_dir / 'README.md'} says (not plain transformers), or tuneforge predict"
        return f"pipeline('image-classification', model='{model_dir}')"

    def intended_use(self, metrics: dict) -> str:
        return ("Classifying images like those it was trained on (see the data summary) into the labels above. It is\n"
                "not meant for other kinds of image, cameras or label sets, nor for medical or other decisions about\n"
                "people without a human review: look at the gallery of mistakes and the slice results first.")


TASK = ImageClassificationTask()
