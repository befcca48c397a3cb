"""The task registry: one entry per task, each a folder under tasks/ whose `spec.py` holds its facts (`TaskSpec`:
config section, metrics and their direction, baselines, defaults, flags, card metadata) and whose `task.py` holds
`TASK`, its behaviour (`Task`, tasks/spec.py; loaded by tasks/behaviour.py). The stages (data, split, audit,
training loop, report, serving) read the spec and call the behaviour; none of them names a task.

Facts sit low (the config builds its `task` section from them; pydantic, no torch), behaviour high (it uses the
config, the data and model layers): this module names only the specs, so nothing it imports leads back to the
config. A bad entry fails loudly, naming it; an unknown task name is an error listing the known ones.
"""
from __future__ import annotations

import importlib

from tuneforge.errors import ConfigError

TASKS: dict[str, str] = {
    "text-classification": "tuneforge.tasks.classification.spec:SPEC",
    "token-classification": "tuneforge.tasks.token_classification.spec:SPEC",
    "causal-lm": "tuneforge.tasks.causal_lm.spec:SPEC",
    "image-classification": "tuneforge.tasks.image_classification.spec:SPEC",
    "seq2seq": "tuneforge.tasks.seq2seq.spec:SPEC",
}
DEFAULT_TASK = "text-classification"  # a config or command line that names no task


def _load(ref: str):
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"task registry entry {ref} is broken: {err}") from err


def get_spec(name: str):
    """The facts of the task registered under `name`."""
    from tuneforge.tasks.spec import TaskSpec

    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}", fix=f"task.type must be one of: {', '.join(sorted(TASKS))}")
    spec = _load(TASKS[name])
    if not isinstance(spec, TaskSpec) or spec.name != name:
        raise RuntimeError(f"task registry entry {name!r} -> {TASKS[name]} is broken: not a TaskSpec named {name!r}")
    return spec


def all_specs() -> list:
    return [get_spec(name) for name in TASKS]
