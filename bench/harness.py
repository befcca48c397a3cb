"""What the side-by-side benches share: run each contender in turn, keep every finished run's figures on
disk as soon as it ends, and record (not raise) a run that fails, so one crash loses nothing else."""
from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Callable


def attempt(results: dict, name: str, fn: Callable[[], dict], save: Callable[[], None],
            update: Callable[[], None], hide: tuple[str, ...] = ("traceback",)) -> dict:
    """Run `fn`, store its figures (or its error) under results["runs"][name], refresh the comparisons, save."""
    print(f"--- {name}", flush=True)
    try:
        r = fn()
    except Exception as err:  # keep the other runs' figures; say what broke
        traceback.print_exc()
        r = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}
        results["failed"].append(name)
    results["runs"][name] = r
    update()
    save()
    print(name, json.dumps({k: v for k, v in r.items() if k not in hide}), flush=True)
    return r


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # a crash mid-write never leaves a torn file


def output_path(out: str | None, smoke: bool, smoke_name: str, default: Path) -> Path:
    """Where a bench writes its results: --out, else a file in the temp folder for a smoke run, else `default`."""
    import tempfile

    if out:
        return Path(out)
    return Path(tempfile.gettempdir()) / smoke_name if smoke else default


def recorder(path: Path, results: dict, compare: Callable[[dict], dict]) -> tuple[Callable[[], None], Callable[[], None]]:
    """(save, update) for `attempt`: write `results` to `path`; refresh results["comparison"] from its runs."""
    def save() -> None:
        write_json(path, results)

    def update() -> None:
        results["comparison"] = compare(results["runs"])

    return save, update
