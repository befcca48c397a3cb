"""OUTPUT/run.log: everything a run, search or audit printed, plus the libraries' warnings and log records, which stay
off the terminal (scikit-learn's repeated ConvergenceWarning, transformers' load reports and progress bars).

    with run_log(out) as console:       # cli.py: run, tune, audit
        run(cfg, console=console)

At the end the terminal gets at most one line about them ("3 library warnings (ConvergenceWarning x3): OUT/run.log").
The log is written when the command ends, however it ends, if the output folder exists by then: an input error
found before anything was written leaves no folder behind, and so no log either.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

from rich.console import Console

LOG_FILE = "run.log"
_LIBRARY_LOGGERS = ("transformers", "optuna", "accelerate", "peft", "datasets", "torch", "urllib3", "filelock",
                    "httpx", "sklearn", "cleanlab")


class _Records(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.DEBUG)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a record that cannot be formatted must not fail the run
            pass


# Output that is not a terminal (a log file, CI, `| tee`) has no width: rich would squeeze tables into 80 columns and
# cut metric names and digits ("perpl…", "0.97…"). Tables keep their natural width there, and lines are not wrapped.
UNBOUNDED_WIDTH = 1000


def make_console(*, quiet: bool = False, record: bool = False, stderr: bool = False) -> Console:
    """A rich console for the command's own output: a terminal's width on a terminal, else wide enough for every
    table and line whole."""
    console = Console(quiet=quiet, record=record, stderr=stderr)
    if not console.is_terminal:
        console.width = UNBOUNDED_WIDTH
    return console


@contextlib.contextmanager
def run_log(out: Path, *, quiet: bool | None = None, stderr: bool = False):
    """A console for the command; library warnings and log records captured; OUT/run.log written at the end.
    `quiet` (default: a torchrun process other than rank 0) prints nothing and writes no log; `stderr` puts the
    console on standard error (`--json` keeps standard output for the figures)."""
    if quiet is None:
        quiet = int(os.environ.get("RANK", "0")) != 0
    console = make_console(quiet=quiet, record=not quiet, stderr=stderr)
    if quiet:
        yield console
        return
    lines: list[str] = []
    kinds: Counter[str] = Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        kinds[category.__name__] += 1
        lines.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {category.__name__} {filename}:{lineno}: {message}")

    handler = _Records(lines)
    root = logging.getLogger()
    saved = [(name, logging.getLogger(name).propagate, list(logging.getLogger(name).handlers))
             for name in _LIBRARY_LOGGERS]
    hf = _quiet_hf()
    with warnings.catch_warnings():
        warnings.showwarning = show
        root.addHandler(handler)
        for name in _LIBRARY_LOGGERS:  # their own stderr handlers off; their records come to the log
            lib = logging.getLogger(name)
            lib.handlers, lib.propagate = [], True
        try:
            yield console
        finally:
            root.removeHandler(handler)
            for name, propagate, handlers in saved:
                lib = logging.getLogger(name)
                lib.propagate, lib.handlers = propagate, handlers
            hf()
            _write(out, console, lines, kinds)


def _quiet_hf():
    """transformers' and huggingface_hub's progress bars off (they write to stderr, outside logging); a restorer."""
    restore = []
    try:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            restore.append(hf_logging.enable_progress_bar)
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
    except ImportError:
        pass
    return lambda: [f() for f in restore]


def _write(out: Path, console: Console, lines: list[str], kinds: Counter) -> None:
    from tuneforge.artifacts import LOCK_FILE

    if not out.is_dir() or all(p.name == LOCK_FILE for p in out.iterdir()):  # nothing written (the lock is no output)
        return
    text = console.export_text(clear=True)
    body = f"# {time.strftime('%Y-%m-%d %H:%M:%S')} tuneforge {' '.join(sys.argv[1:])}\n{text}"
    if lines:
        body += "\n# library warnings and log records\n" + "\n".join(lines) + "\n"
    path = out / LOG_FILE
    try:
        with path.open("a", encoding="utf-8") as f:  # appended: a resumed run's log follows the interrupted one's
            f.write(body)
    except OSError:
        return  # the log is a courtesy: failing to write it must not turn a finished run into a failed one
    if kinds:
        n = sum(kinds.values())
        what = ", ".join(f"{k} x{v}" for k, v in kinds.most_common(3))
        print(f"{n} library warning{'s' if n != 1 else ''} ({what}): {path}", file=sys.stderr)
