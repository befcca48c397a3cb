"""What a task is, in two parts: `TaskSpec`, the facts the generic stages read (its config section, metrics and
their direction, baselines, defaults, flags, card metadata), and `Task`, the behaviour they call (reading rows,
encoding, the model, baselines, evaluation, the predictor, drift, serving routes). A task folder's `spec.py`
holds its `SPEC` and imports neither torch nor its behaviour; `task.py` beside it holds `TASK`, the object that
satisfies `Task` (loaded by tasks/behaviour.py when first used)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

Direction = Literal["max", "min"]


class TextsRequest(BaseModel):
    """The body of /v1/predict for a task that reads texts: {"texts": ["...", ...]}."""
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


@dataclass(frozen=True)
class Flag:
    """A command-line flag of the task's own on `run` and `audit`: `--name` sets task.`key` to `value`."""
    name: str
    key: str
    value: Any
    help: str

    @property
    def dest(self) -> str:
        """argparse's attribute for it: --no-chat-template -> no_chat_template."""
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class ServeOption:
    """A `serve` flag of the task's own: `--name N` puts N in ServeSettings.options[`key`] (`default` when not given;
    at least `minimum` when given)."""
    name: str
    key: str
    type: type
    default: Any
    help: str
    minimum: int | None = 1

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class TaskSpec:
    name: str                                  # task.type, and the registry's key
    config: type                               # the task's config section (a tuneforge.schema.Section)
    metrics: dict[str, Direction]              # every test metric it reports, and which way is better
    selectable: tuple[str | None, ...]         # eval.metric choices, the first the default (None: by the data)
    baselines: tuple[str, ...]                 # eval.baselines choices, all run by default
    summary: str                               # one line: what the task does (help texts, the card)
    pipeline_tag: str                          # the Hugging Face Hub pipeline tag of its exported model
    card_metrics: dict[str, dict] = field(default_factory=dict)  # metric -> the Hub model-index metric entry
    defaults: dict[str, dict] = field(default_factory=dict)       # config defaults that differ from the generic
    counted: str = "classes"                   # what a split's class_counts count (report and card headings)
    quick_start_flags: tuple[str, ...] = ()    # what `run --data F` must be given besides the file
    flags: tuple[Flag, ...] = ()               # its own flags on `run` and `audit`
    # what a prediction reads: one `input` (a text, an image), `predict --<input>` (repeatable) and /v1/predict's
    # `request` body, whose list field `inputs` holds them; `response` is the model of one prediction (OpenAPI docs)
    input: str = "text"
    inputs: str = "texts"
    request: type = TextsRequest
    response: type | None = None
    input_help: str = "an input to predict (repeatable)"
    serve_options: tuple[ServeOption, ...] = ()  # its own flags on `serve`
    # what the drift monitor watches of each input besides its size (`Task.measure_input` gives the values), with
    # the bin edges of each measure, e.g. {"brightness": (0, 32, ..., 256)}
    input_measures: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def request_example(self) -> str:
        return f'{{"{self.inputs}": ["..."]}}'

    def direction(self, metric: str) -> Direction:
        return self.metrics.get(metric, "max")


@runtime_checkable
class Task(Protocol):
    """The behaviour a task supplies; `tasks.base.TaskDefaults` gives what most tasks do alike."""
    name: str
    model_class: str
    peft_task_type: str

    # data
    def resolve_model(self, ref: str) -> tuple[Path, dict | None]: ...
    def prepare(self, cfg): ...
    def audit_sections(self, cfg, data, tokenizer, max_length: int) -> dict: ...
    def test_subset(self, splits, y: dict, baselines: dict, keep: list[int]): ...
    # model and training
    def load_tokenizer(self, model_dir: Path): ...
    def label_space(self, cfg, data): ...
    def describe_space(self, label_space) -> str: ...
    def label_names(self, predictor) -> list[str]: ...
    def token_lengths(self, cfg, tokenizer, data) -> dict: ...
    def max_length(self, cfg, train_lengths, tokenizer, model_dir: Path) -> tuple[int, str]: ...
    def encode(self, cfg, tokenizer, label_space, splits, max_length: int): ...
    def load_model(self, *args, **kwargs): ...
    def lora_targets(self): ...
    def lora_head(self) -> list[str] | None: ...
    def training_loss(self, cfg): ...
    def before_training(self, cfg, label_space, ids: dict, y: dict, model, pad_id: int, precision: str) -> None: ...
    def trained_baselines(self, cfg, label_space, ids: dict, y: dict, max_length: int) -> dict: ...
    def score_trained_baseline(self, cfg, name: str, label_space, splits, y: dict, model, pad_id: int) -> dict: ...
    def collate(self, examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict: ...
    def validator(self, *args, **kwargs): ...
    def selection(self, cfg) -> tuple[str, str]: ...
    def search_space(self, cfg, n_layers: int | None, epochs: float | None = None) -> dict: ...
    def export(self, cfg, model_dir: Path, tokenizer, label_space) -> None: ...
    # evaluation and report
    def baselines(self, *args, **kwargs): ...
    def evaluate(self, cfg, label_space, splits, y: dict, predictor, baselines: dict): ...
    def summary_rows(self, metrics: dict): ...
    def prediction_table(self, *args, **kwargs): ...
    def report_details(self, *args, **kwargs): ...
    def intended_use(self, metrics: dict) -> str: ...
    def card_facts(self, data_report: dict, model_settings: dict) -> dict: ...
    def load_hint(self, model_dir: Path) -> str: ...
    # predict and serving
    def read_inputs(self, values: list[str], path: Path | None, column: str | None, run_dir: Path) -> list: ...
    def check_inputs(self, items: list, settings) -> str | None: ...
    def input_size(self, item) -> int: ...
    def measure_input(self, item) -> dict[str, float]: ...
    def parse_upload(self, body: bytes, content_type: str) -> dict | None: ...
    def load_predictor(self, model_dir: Path, device="cpu", precision: str = "fp32"): ...
    def settings(self, *args, **kwargs): ...
    def reference_profile(self, predictor, inputs: list, outputs) -> dict: ...
    def observe(self, result: dict): ...
    def mount_routes(self, app, ctx) -> None: ...
