"""Token classification's facts: its config section, metrics, baselines (no torch here)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from tuneforge.schema import Section
from tuneforge.tasks.spec import TaskSpec


class TokenClassificationTaskConfig(Section):
    """task.type: token-classification: one tag per word (entities, clauses, parties)."""
    type: Literal["token-classification"]
    scheme: Literal["auto", "bio", "iob1", "io", "bioes"] = Field(
        "auto", description="Tag scheme of the files (read and normalised to BIO); auto detects it.")
    strict: bool = Field(False, description="An invalid transition (I-X after O) is an error instead of being repaired and reported.")
    stride: int = Field(32, ge=0, description="Sub-words two windows share when a sentence is longer than max_length.")


class Entity(BaseModel):
    entity_group: str
    start: int          # character offsets in the text
    end: int
    word: str
    score: float


class EntityPrediction(BaseModel):
    """One prediction of /v1/predict: the entities found in the text."""
    entities: list[Entity]


SPEC = TaskSpec(
    name="token-classification",
    export_formats=("onnx",),
    config=TokenClassificationTaskConfig,
    summary="one tag per word: entities, clauses, parties",
    metrics={"f1": "max", "precision": "max", "recall": "max"},
    selectable=("f1",),
    baselines=("majority", "gazetteer", "crf"),
    pipeline_tag="token-classification",
    card_metrics={"f1": {"type": "f1", "name": "entity F1 (strict, micro)"}, "precision": {"type": "precision"},
                  "recall": {"type": "recall"}},
    counted="entity types",
    quick_start_flags=(),  # CoNLL / tokens+tags / text+spans files name their own fields
    response=EntityPrediction,
    input_help="a text to tag (repeatable)",
)
