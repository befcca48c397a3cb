"""The search space of `tuneforge tune`: dotted config keys (train.learning_rate, train.lora.r, ...) mapped to Optuna
distributions; the config's own values as the first trial; and each trial's config, validated again with
parse_config so the schema's bounds and cross-checks hold for every combination."""
from __future__ import annotations

import copy
import math
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from tuneforge.config import LoraConfig, ParamRange, RunConfig, TrainConfig, parse_config
from tuneforge.errors import ConfigError

Space = dict[str, "ParamRange | list"]


def resolve_space(cfg: RunConfig, task, n_layers: int | None, epochs: float | None = None) -> tuple[Space, str]:
    """(space, where it came from): tune.space, or the task's default for this config, model and the run's own
    epochs."""
    if cfg.tune.space is not None:
        raw, source = cfg.tune.space, "tune.space"
    else:
        raw, source = task.search_space(cfg, n_layers, epochs), f"the {task.name} default space"
    space = {key: _normalise(key, spec) for key, spec in raw.items()}
    if not space:
        raise ConfigError("the search space is empty", fix="name at least one key under tune.space, e.g. "
                          "train.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}")
    for key, spec in space.items():
        _check_values(key, spec)
    return space, source


def _normalise(key: str, spec) -> ParamRange | list:
    if isinstance(spec, ParamRange):
        return spec
    if isinstance(spec, dict):
        try:
            return ParamRange.model_validate(spec)
        except ValidationError as err:
            raise ConfigError(f"tune.space.{key}: " + "; ".join(e["msg"] for e in err.errors())) from None
    if isinstance(spec, (list, tuple)) and spec:
        return list(spec)
    raise ConfigError(f"tune.space.{key} must be a range {{low, high, log, step}} or a list of choices, not {spec!r}")


def _field(key: str):
    """The pydantic field a dotted tunable key names (train.X or train.lora.X)."""
    parts = key.split(".")
    model = LoraConfig if parts[1] == "lora" else TrainConfig
    return model.model_fields[parts[-1]]


def _check_values(key: str, spec) -> None:
    """Each bound and each choice must be a valid value of its field on its own (bounds, types); combinations are
    checked per trial, where a failing one is pruned with the reason."""
    field = _field(key)
    adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)
    for v in spec if isinstance(spec, list) else [spec.low, spec.high]:
        try:
            adapter.validate_python(v)
        except ValidationError as err:
            raise ConfigError(f"tune.space.{key}: {v!r} is not a valid {key}: {err.errors()[0]['msg']}",
                              fix="keep the range or the choices within the key's bounds (src/tuneforge/config.py)") from None
    if isinstance(spec, ParamRange) and _wants_int(field) and not spec.is_int:
        raise ConfigError(f"tune.space.{key} is an integer setting: give low and high (and step) as integers")


def _wants_int(field) -> bool:
    ann = field.annotation
    return ann is int or getattr(ann, "__args__", ()) in ((int, type(None)),)


def config_value(cfg: RunConfig, key: str):
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def default_params(cfg: RunConfig, space: Space, *, n_train: int, n_layers: int | None, widen: bool) -> tuple[Space, dict]:
    """(space, the config's own values as trial parameters). A key the config leaves to the data (null) takes the
    value the run would resolve; `widen` (the task's default space) stretches a range or adds a choice so the
    config's value fits, while a user's space that leaves it out is an error: trial 0 runs the defaults."""
    from tuneforge.training.loop import epochs_for, patience_for, plan_steps

    resolved = {  # the rules the pipeline applies to null, restated (fit: frozen_layers; loop: epochs, patience)
        "train.epochs": lambda: epochs_for(n_train, cfg.train),
        "train.frozen_layers": lambda: (n_layers or 0) // 2,
        "train.early_stopping_patience": lambda: patience_for(cfg.train, *plan_steps(n_train, cfg.train)[::2]),
    }
    space, params = dict(space), {}
    for key, spec in space.items():
        value = config_value(cfg, key)
        if value is None and not (isinstance(spec, list) and None in spec) and key in resolved:
            value = resolved[key]()
        if widen:
            spec = space[key] = _widen(spec, value)
        if not _contains(spec, value):
            raise ConfigError(f"tune.space.{key} does not contain the config's own value {value!r}: the first trial "
                              "runs the config as it is, so the search can only match or beat it",
                              fix=f"widen tune.space.{key} to include {value!r}, or set {key} in the config to a value inside it")
        params[key] = int(value) if isinstance(spec, ParamRange) and spec.is_int else value
    return space, params


def _contains(spec, value) -> bool:
    if isinstance(spec, list):
        return value in spec
    if value is None or isinstance(value, bool):
        return False
    if spec.is_int and not float(value).is_integer():
        return False
    return spec.low <= value <= spec.high


def _widen(spec, value):
    if _contains(spec, value) or value is None:
        return spec
    if isinstance(spec, list):
        return [*spec, value]
    as_int = spec.is_int and float(value).is_integer()
    low, high = min(spec.low, value), max(spec.high, value)
    cast = int if as_int else float
    return ParamRange(low=cast(low), high=cast(high), log=spec.log and low > 0,
                      step=spec.step if as_int == spec.is_int else None)


def distribution(spec):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(spec, list):
        return CategoricalDistribution(spec)
    if spec.is_int:
        return IntDistribution(spec.low, spec.high, log=spec.log, step=spec.step or 1)
    return FloatDistribution(float(spec.low), float(spec.high), log=spec.log,
                             step=None if spec.step is None else float(spec.step))


def spec_json(space: Space) -> dict:
    return {k: list(v) if isinstance(v, list) else v.model_dump(exclude_none=True) for k, v in space.items()}


def suggest(trial, space: Space) -> dict:
    """The trial's values, drawn by the study's sampler (or fixed, for an enqueued trial such as the defaults)."""
    params = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, spec)
        elif spec.is_int:
            params[key] = trial.suggest_int(key, spec.low, spec.high, step=spec.step or 1, log=spec.log)
        else:
            params[key] = trial.suggest_float(key, float(spec.low), float(spec.high), log=spec.log,
                                              step=None if spec.step is None else float(spec.step))
    return params


def trial_config(cfg: RunConfig, params: dict, *, output_dir: str | None = None, source: str = "trial") -> RunConfig:
    """The config with the trial's values, validated again (ConfigError when the combination breaks a check)."""
    raw = copy.deepcopy(cfg.model_dump())
    for key, value in params.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    if output_dir is not None:
        raw["output"]["dir"] = output_dir
    return parse_config(raw, source)


def fmt_value(value) -> str:
    if isinstance(value, float) and value and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.4g}" if not math.isnan(value) else "nan"
    return str(value)
