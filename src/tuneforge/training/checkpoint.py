"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint holds the trainable weights (frozen ones are reloaded from the pre-trained model),
the best weights so far, the optimizer and scheduler state, RNG states and the loop counters.
It is written to a temporary folder and renamed, so an interruption never leaves half of one: a process killed
between the two renames (the old checkpoint aside, the new one in its place) leaves the old one complete beside, and
--resume takes that (`trusted_checkpoint`). The temporary folder is never read.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.errors import OutputError


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, **state) -> None:
    """Save (see _save_checkpoint). A write error (disk full) is an OutputError naming the folder; the temporary
    folder is removed and the previous checkpoint stays complete (as `directory`, or `directory`.old)."""
    from tuneforge.artifacts import writing

    try:
        with writing(directory):
            _save_checkpoint(directory, **state)
    except BaseException:
        shutil.rmtree(directory.with_name(directory.name + ".tmp"), ignore_errors=True)
        raise


def _save_checkpoint(directory: Path, *, trainable: dict, best: dict | None, optimizer, scheduler, counters: dict,
                     rank_rng: dict | None = None) -> None:
    """`rank_rng`: with several processes, each one's random state (`torch.rank<r>`, `cuda.rank<r>`), so that each
    resumes its own dropout stream."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if best is not None:
        save_file({k: v.contiguous().cpu() for k, v in best.items()}, str(tmp / "best.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    rng.update(rank_rng or {})
    save_file(rng, str(tmp / "rng.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    (tmp / "state.json").write_text(json.dumps({"counters": counters, "optimizer": opt_meta, "scheduler": sched}, indent=1))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():  # complete: only a finished temporary folder is ever renamed to it
        shutil.rmtree(old, ignore_errors=True)  # left half-deleted by a save killed in its last line
        directory.rename(old)
    tmp.rename(directory)  # until this rename the previous checkpoint is `old`, complete
    shutil.rmtree(old, ignore_errors=True)


def trusted_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint to resume from: `directory`, or `<directory>.old` where a save was killed between
    its two renames; None when there is none (the temporary folder of a killed save is never trusted)."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def load_checkpoint(directory: Path, *, optimizer, scheduler, rank: int = 0) -> tuple[dict, dict | None, dict]:
    """(trainable weights, best weights or None, counters); restores optimizer, scheduler and RNG in place (the
    random state this process `rank` saved, where the run had several)."""
    found = trusted_checkpoint(directory)
    if found is None:
        raise OutputError(f"no checkpoint to resume from in {directory}",
                          fix="run without --resume to start a new run")
    directory = found
    meta = json.loads((directory / "state.json").read_text())
    trainable = load_file(str(directory / "trainable.safetensors"))
    best_path = directory / "best.safetensors"
    best = load_file(str(best_path)) if best_path.is_file() else None
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), meta["optimizer"]))
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng = load_file(str(directory / "rng.safetensors"))
    if rank == 0 or f"torch.rank{rank}" in rng:  # a process the saved run did not have keeps its own fresh stream
        torch.set_rng_state(rng.get(f"torch.rank{rank}", rng["torch"]))
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda") and "." not in k)]
        if f"cuda.rank{rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"], torch.cuda.current_device())
        elif states and rank == 0:
            torch.cuda.set_rng_state_all(states)
    return trainable, best, meta["counters"]
