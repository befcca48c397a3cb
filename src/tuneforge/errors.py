"""Errors a user can hit: each names what is wrong (file, row, field) and how to fix it.

The CLI prints them without a traceback and exits with `exit_code`.
"""
from __future__ import annotations


class TuneforgeError(Exception):
    """A problem with the user's input or environment, not a bug in tuneforge."""

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\nFix: {fix}")


class ConfigError(TuneforgeError):
    """The run configuration is invalid."""


class DataError(TuneforgeError):
    """The data file cannot be read or does not fit the task."""

    def __init__(self, message: str, *, path=None, row: int | None = None,
                 column: str | None = None, fix: str | None = None):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        prefix = (", ".join(where) + ": ") if where else ""
        self.path, self.row, self.column = path, row, column
        super().__init__(prefix + message, fix=fix)


class ModelNotFoundError(TuneforgeError):
    """A model reference resolves to neither a local directory nor an installed package."""


class OutputError(TuneforgeError):
    """The output directory is in a state the requested action cannot use."""


class AuditBlocked(TuneforgeError):
    """The data audit found a blocking problem (leakage between splits); training would give false scores."""

    exit_code = 3


def shown(value, limit: int = 60) -> str:
    """A data value as a message quotes it: its repr, cut to `limit` characters (a 10 MB cell or a list nested
    900 deep stays one short line)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict = 3, limit, limit, 6, 4
    text = r.repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."
