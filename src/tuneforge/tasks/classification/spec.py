"""Text classification's facts: its config section, metrics, baselines and flags (no torch here)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from tuneforge.schema import Section
from tuneforge.tasks.spec import Flag, TaskSpec


class ClassificationTaskConfig(Section):
    """task.type: text-classification: one label (or several) per text."""
    type: Literal["text-classification"] = "text-classification"
    multi_label: bool = Field(False, description="Each row may carry several labels (sigmoid head).")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Multi-label: probability above which a label is predicted.")


class ClassPrediction(BaseModel):
    """One prediction of /v1/predict: the label (multi-label: the labels chosen) and every label's probability."""
    label: str | list[str]
    probabilities: dict[str, float]


SPEC = TaskSpec(
    name="text-classification",
    export_formats=("onnx",),
    config=ClassificationTaskConfig,
    summary="one label (or several) per text",
    metrics={"macro_f1": "max", "accuracy": "max"},
    selectable=("macro_f1", "accuracy"),
    baselines=("majority", "tfidf_logreg", "frozen_probe"),
    pipeline_tag="text-classification",
    card_metrics={"accuracy": {"type": "accuracy"},
                  "macro_f1": {"type": "f1", "name": "macro-F1", "args": {"average": "macro"}}},
    quick_start_flags=("--text-column", "--label-column"),  # what `run --data F` needs
    flags=(Flag("--multi-label", "multi_label", True, "rows may carry several labels"),),
    response=ClassPrediction,
    input_help="a text to predict (repeatable)",
)
