"""One writer per output folder: `run`, `tune` and `audit` hold OUT/.tuneforge.lock while they work.

    with output_lock(Path("runs/sentiment"), "tuneforge run examples/sentiment.yaml"):
        run(cfg)

The lock is an flock on that file (LOCK_NB: a second writer never waits), so the OS drops it when its process
dies, however it dies (kill -9, out of memory). The file holds the holder's pid, host, start time and command as
JSON: a second writer exits 2 naming them. A clean exit removes the file; one left by a dead process is stale
exactly when its flock can be taken, and is then taken over with a one-line notice. The file is not part of the
run: `artifacts.reset_output_dir` keeps it and `check_output_dir` ignores it.

Who locks:
- `run`, `audit` and a search on its own study: exclusively.
- Workers of one study on external storage (`tune --storage`) may share OUT: each holds the lock *shared*, so they
  run side by side while a `run`, an `audit` or a search of its own into that OUT is refused. Which worker trains
  the best trial and writes the final run stays decided by search.py's `.finalizing` folder (os.mkdir is atomic).
- `run --nproc N`: the launcher holds the lock and names OUT in TUNEFORGE_OUTPUT_LOCK; the torchrun processes it
  starts inherit that and skip (rank 0 asking for its own launcher's lock would fail). Under a bare torchrun rank 0
  alone locks; the launchers of machines other than machine 0 do not lock (their processes write nothing).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from tuneforge.artifacts import LOCK_FILE
from tuneforge.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; one writer per folder is then the user's to keep
    fcntl = None

HELD_ENV = "TUNEFORGE_OUTPUT_LOCK"  # the resolved OUT a parent process holds the lock of, for the processes it starts


@contextmanager
def output_lock(out: Path, command: str, *, shared: bool = False, skip: bool = False):
    """Hold the lock of `out` (created if missing, and removed again at the end if nothing but the lock was put
    in it) for the block; OutputError (exit 2) naming the holder when another process holds it."""
    out = Path(out)
    key = str(out.resolve())
    if skip or fcntl is None or os.environ.get(HELD_ENV) == key or os.environ.get("RANK", "0") != "0" or out.is_file():
        yield  # (a file: check_output_dir names that problem)
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the output directory {out}: {err.strerror or err}",
                          fix="choose a writable --output / output.dir") from None
    fd = None
    previous = os.environ.get(HELD_ENV)
    try:
        fd = _acquire(out / LOCK_FILE, out, command, shared)
        os.environ[HELD_ENV] = key
        yield
    finally:
        if previous is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = previous
        if fd is not None:
            _release(fd, out / LOCK_FILE)
        if created:
            try:
                out.rmdir()  # an input error before anything was written leaves no folder behind
            except OSError:
                pass


def _acquire(path: Path, out: Path, command: str, shared: bool) -> int:
    for _ in range(20):  # only a holder removing the file as this process opened it makes another round
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        exclusive = _flock(fd, fcntl.LOCK_EX)
        if not exclusive and not (shared and _flock(fd, fcntl.LOCK_SH)):
            holder = _read(fd)
            os.close(fd)
            raise OutputError(f"{out} is in use by another tuneforge process: {_describe(holder)}",
                              fix="wait for it to finish (or stop it), or choose another --output / output.dir")
        if not _same_file(fd, path):
            os.close(fd)
            continue
        if exclusive:
            stale = _read(fd)
            if stale is not None:
                print(f"notice: {out}: taking over the lock left by {_describe(stale)}, which no longer runs",
                      file=sys.stderr, flush=True)
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "command": command, "shared": shared}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            # workers of a shared study: exclusive only while writing who holds it (the change is not atomic: a
            # writer slipping in between is refused to this worker, never let in beside it)
            if shared and not _flock(fd, fcntl.LOCK_SH):
                holder = _read(fd)
                os.close(fd)
                raise OutputError(f"{out} is in use by another tuneforge process: {_describe(holder)}",
                                  fix="wait for it to finish (or stop it), or choose another --output / output.dir")
        return fd
    raise OutputError(f"cannot lock {path}: it keeps being replaced", fix="run the command again")


def _release(fd: int, path: Path) -> None:
    """The last holder removes the file (a worker of a shared study that others still hold leaves it)."""
    try:
        if _flock(fd, fcntl.LOCK_EX) and _same_file(fd, path):
            path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def _flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict | None:
    """The holder's record; None for an empty file, {} for one that is not a record."""
    data = os.pread(fd, 65536, 0)
    if not data.strip():
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that left no record"
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    if holder.get("command"):
        who += f" (`{holder['command']}`)"
    if holder.get("shared"):
        who += ", with any other workers of its search"
    return who
