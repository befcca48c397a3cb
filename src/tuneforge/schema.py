"""The base of every config section (`config.py` and each task's own section in `tasks/<task>/spec.py`): unknown
keys are rejected, assignments validated. It imports nothing of tuneforge, so a task's spec and the config can
both build on it without importing each other."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
