"""The output directory: its states (empty, unfinished, finished), atomic writes, and run provenance."""
from __future__ import annotations

import errno
import json
import os
import platform
import shutil
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from tuneforge.tasks import DEFAULT_TASK
from tuneforge.errors import OutputError

CHECKPOINT = "checkpoint"
FINISHED_MARKER = "run.json"
LOCK_FILE = ".tuneforge.lock"  # held by the one process writing the folder (lock.py); never part of the run
SETTINGS_KEY = "tuneforge"  # extra block in model/config.json: the task's settings (max_length, ...); transformers ignores it


PREPARED = "prepared.json"  # what the data stage settled (split hashes, max_length): a resume checks the data against it
BASELINES = "baselines.json"  # the baselines' test outputs, kept so that a resume does not score them again


def resume_point(out: Path) -> str:
    """Where `--resume` continues a run in `out`: "checkpoint" (training resumes at its last checkpoint), "start" (a
    run killed before its first checkpoint: training starts over, the data, audit and baselines already done are
    kept) or "nothing" (no run started here: it runs from the beginning)."""
    # CHECKPOINT.old: a save killed between its two renames leaves the previous checkpoint there, complete
    # (training/checkpoint.py: trusted_checkpoint)
    if any((out / name / "state.json").is_file() for name in (CHECKPOINT, CHECKPOINT + ".old")):
        return "checkpoint"
    if (out / "config.yaml").is_file():
        return "start"
    return "nothing"


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run (or unrelated files) before any work starts."""
    if resume:
        if (out / FINISHED_MARKER).is_file():
            raise OutputError(f"nothing to resume: {out} holds a finished run",
                              fix="pass --overwrite to run it again, or choose another --output")
        if out.is_file():
            raise OutputError(f"output path {out} is a file", fix="choose a directory with --output / output.dir")
        if resume_point(out) == "nothing" and out.is_dir() and any(
                p.name not in ("audit.json", LOCK_FILE, "run.log") for p in out.iterdir()):
            raise OutputError(f"{out} holds no tuneforge run to resume", fix="choose the output directory of the run")
        return
    if not out.exists() or overwrite:
        return
    if out.is_file():
        raise OutputError(f"output path {out} is a file", fix="choose a directory with --output / output.dir")
    if (out / FINISHED_MARKER).is_file():
        raise OutputError(f"{out} already holds a finished run", fix="pass --overwrite to replace it, or choose another --output")
    if (out / CHECKPOINT).exists() or (out / "config.yaml").is_file():
        raise OutputError(f"{out} holds an unfinished run", fix="pass --resume to continue it, or --overwrite to start over")
    if any(p.name not in ("audit.json", LOCK_FILE) for p in out.iterdir()):
        raise OutputError(f"{out} is not empty and holds no tuneforge run", fix="choose an empty or new --output directory")


def reset_output_dir(out: Path) -> None:
    """Empty `out` for a new run, keeping the lock file of the process that holds it."""
    with writing(out):
        if out.is_file() or out.is_symlink():
            out.unlink()
        for p in out.iterdir() if out.exists() else ():
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        out.mkdir(parents=True, exist_ok=True)


# --- every artifact is written under a temporary name and renamed into place: a reader (or a run killed half-way)
# sees the old version or the new one, never half of one; an OS error becomes an OutputError naming the file ---

@contextmanager
def writing(path: Path):
    """Turn an OS error while writing `path` (disk full, permissions, a read-only mount) into an OutputError."""
    try:
        yield
    except OSError as err:
        where = path.parent
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = (f"disk full? free space on the disk holding {where} (`df -h {where}`), then run the command "
                   "again (an interrupted run: with --resume, its checkpoint is kept)")
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"make {where} writable (permissions, a read-only mount), or choose another --output"
        else:
            fix = f"check the disk holding {where}, then run the command again"
        raise OutputError(f"cannot write {path}: {err.strerror or err}", fix=fix) from err


def _put(tmp: Path, data: bytes) -> None:
    """`data` into `tmp`, on disk (fsync) before the rename makes it visible."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        try:
            _put(tmp, data)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def write_json(path: Path, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode("utf-8"))


def to_json(value):
    """`value` (dicts, lists, numbers, strings and numpy arrays, nested) as plain JSON data; numpy arrays are kept
    as {"__ndarray__": values, "dtype": ...} so that from_json gives them back as they were (no pickle)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def from_json(value):
    """The inverse of to_json."""
    import numpy as np

    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=value["dtype"]).reshape(value["shape"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def replace_dir(staging: Path, final: Path) -> None:
    """`staging`, complete, in place of `final`: the old `final` is renamed aside first and removed last, so a
    crash in between leaves it whole as FINAL.old (recover_dir puts it back)."""
    old = final.with_name(final.name + ".old")
    recover_dir(final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Put FINAL.old back where a replace_dir was killed between its two renames."""
    old = final.with_name(final.name + ".old")
    if old.is_dir() and not final.exists():
        old.rename(final)


@contextmanager
def staged_dir(final: Path):
    """A folder the block builds under FINAL.tmp (the block creates it), renamed into place whole when the block
    ends without error, removed when it fails; an OS error becomes an OutputError naming `final`."""
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with writing(final):
            yield staging
            replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_task_type(out: Path) -> str:
    """The task of a finished run (OUT or OUT/model): from the model's config.json (so a model folder copied
    out of its run still knows it), else the run's config.yaml; runs that predate both are the default task's."""
    import yaml

    for model_dir in (out / "model", out):
        cfg = model_dir / "config.json"
        if cfg.is_file():
            task = (json.loads(cfg.read_text()).get(SETTINGS_KEY) or {}).get("task")
            if task:
                return task
    for path in (out / "config.yaml", out.parent / "config.yaml"):
        if path.is_file():
            return (yaml.safe_load(path.read_text()).get("task") or {}).get("type") or DEFAULT_TASK
    return DEFAULT_TASK


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("tuneforge", "torch", "transformers", "peft", "accelerate", "tokenizers", "scikit-learn", "numpy", "pandas"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def hardware() -> dict:
    import torch

    from tuneforge.models.device import cpu_name

    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
