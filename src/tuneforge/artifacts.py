"""The output directory: its states (empty, unfinished, finished), atomic writes, and run provenance."""
from __future__ import annotations

import json
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

from tuneforge.errors import OutputError

CHECKPOINT = "checkpoint"
FINISHED_MARKER = "run.json"
SETTINGS_KEY = "tuneforge"  # extra block in model/config.json: the task's settings (max_length, ...); transformers ignores it


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run (or unrelated files) before any work starts."""
    if resume:
        if not (out / CHECKPOINT / "state.json").is_file():
            raise OutputError(f"nothing to resume in {out}: no checkpoint", fix="run without --resume to start a new run")
        return
    if not out.exists() or overwrite:
        return
    if out.is_file():
        raise OutputError(f"output path {out} is a file", fix="choose a directory with --output / output.dir")
    if (out / FINISHED_MARKER).is_file():
        raise OutputError(f"{out} already holds a finished run", fix="pass --overwrite to replace it, or choose another --output")
    if (out / CHECKPOINT).exists() or (out / "config.yaml").is_file():
        raise OutputError(f"{out} holds an unfinished run", fix="pass --resume to continue it, or --overwrite to start over")
    if any(p.name != "audit.json" for p in out.iterdir()):
        raise OutputError(f"{out} is not empty and holds no tuneforge run", fix="choose an empty or new --output directory")


def reset_output_dir(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def replace_dir(staging: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


def run_task_type(out: Path) -> str:
    """The task of a finished run (OUT or OUT/model): from the model's config.json (so a model folder copied
    out of its run still knows it), else the run's config.yaml; runs that predate both are text classification."""
    import yaml

    for model_dir in (out / "model", out):
        cfg = model_dir / "config.json"
        if cfg.is_file():
            task = (json.loads(cfg.read_text()).get(SETTINGS_KEY) or {}).get("task")
            if task:
                return task
    for path in (out / "config.yaml", out.parent / "config.yaml"):
        if path.is_file():
            return (yaml.safe_load(path.read_text()).get("task") or {}).get("type") or "text-classification"
    return "text-classification"


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
