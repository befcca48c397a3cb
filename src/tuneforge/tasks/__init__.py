"""The task registry: one entry per task, each a folder under tasks/ whose `spec.py` holds its facts (`TaskSpec`:
config section, metrics and their direction, baselines, defaults, flags, card metadata) and names the object that
supplies its behaviour (`Task`, tasks/spec.py). The stages (data, split, audit, training loop, report, serving) read
the spec and call the behaviour; none of them names a task.

Specs are light (pydantic, no torch) and imported when first asked for; the behaviour when first used, and checked
then: a bad entry fails loudly, naming it. An unknown task name is an error listing the known ones.
"""
from __future__ import annotations

import importlib

from tuneforge.errors import ConfigError

TASKS: dict[str, str] = {
    "text-classification": "tuneforge.tasks.classification.spec:SPEC",
    "token-classification": "tuneforge.tasks.token_classification.spec:SPEC",
    "causal-lm": "tuneforge.tasks.causal_lm.spec:SPEC",
}
DEFAULT_TASK = "text-classification"  # a config or command line that names no task


def _load(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


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


def get_task(name: str):
    """The behaviour of the task registered under `name` (an object satisfying tasks.spec.Task)."""
    from tuneforge.tasks.spec import Task

    spec = get_spec(name)
    task = _load(spec.behaviour)
    wanted = [m for m in vars(Task) if not m.startswith("_")] + list(Task.__annotations__)
    missing = [m for m in wanted if not hasattr(task, m)]
    if missing or task.name != name:
        raise RuntimeError(f"task {name!r}: {spec.behaviour} does not satisfy tasks.spec.Task: "
                           f"missing {missing or 'nothing'}, name {getattr(task, 'name', None)!r}")
    return task
