"""A task's behaviour: `TASK` of the `task` module beside its spec (tasks/<folder>/task.py), loaded when first
used and checked against the `Task` protocol. Above the registry of specs: the behaviour imports the config and the
data and model layers, which import the specs, so the two live apart (no import cycle, tests/test_imports.py)."""
from __future__ import annotations

import importlib

from tuneforge.tasks import TASKS, get_spec
from tuneforge.tasks.spec import Task


def behaviour_module(name: str) -> str:
    """`tuneforge.tasks.<folder>.task`, for the task whose spec is `tuneforge.tasks.<folder>.spec`."""
    return TASKS[name].partition(":")[0].rpartition(".")[0] + ".task"


def get_task(name: str):
    """The behaviour of the task registered under `name` (an object satisfying tasks.spec.Task)."""
    get_spec(name)  # an unknown or broken entry fails here, naming it
    ref = behaviour_module(name) + ":TASK"
    try:
        task = importlib.import_module(ref.partition(":")[0]).TASK
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"task {name!r}: {ref} is broken: {err}") from err
    wanted = [m for m in vars(Task) if not m.startswith("_")] + list(Task.__annotations__)
    missing = [m for m in wanted if not hasattr(task, m)]
    if missing or task.name != name:
        raise RuntimeError(f"task {name!r}: {ref} does not satisfy tasks.spec.Task: "
                           f"missing {missing or 'nothing'}, name {getattr(task, 'name', None)!r}")
    return task
