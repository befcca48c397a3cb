"""The task registry: one entry per task, each a folder under tasks/ that supplies what differs per task
(reading rows, targets, the model and its head, validation scores, baselines, test metrics, the predictor,
the drift profile, any serving routes of its own). The stages (data, split, audit, training loop, report,
serving) call that interface.

An entry names `module:attribute`; it is imported when first used (torch stays out of `--help`), and
checked then: a bad entry fails loudly, naming it. An unknown task name is an error listing the known ones.
"""
from __future__ import annotations

import importlib

from tuneforge.errors import ConfigError

TASKS: dict[str, str] = {
    "text-classification": "tuneforge.tasks.classification:TASK",
    "token-classification": "tuneforge.tasks.token_classification:TASK",
    "causal-lm": "tuneforge.tasks.causal_lm:TASK",
}

_REQUIRED = ("name", "prepare", "load_tokenizer", "audit_sections", "label_space", "encode", "load_model", "baselines", "validator", "evaluate",
             "load_predictor", "settings", "reference_profile", "label_names", "observe", "summary_rows",
             "describe_space", "prediction_table", "report_details", "peft_task_type", "model_class",
             "token_lengths", "max_length", "lora_targets", "training_loss", "selection", "export", "intended_use",
             "mount_routes", "search_space", "test_subset")


def get_task(name: str):
    """The task object registered under `name`."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}", fix=f"task.type must be one of: {', '.join(sorted(TASKS))}")
    module, _, attr = TASKS[name].partition(":")
    task = getattr(importlib.import_module(module), attr)
    missing = [m for m in _REQUIRED if not hasattr(task, m)]
    if missing or task.name != name:
        raise RuntimeError(f"task registry entry {name!r} -> {TASKS[name]} is broken: "
                           f"missing {missing or 'nothing'}, name {getattr(task, 'name', None)!r}")
    return task
