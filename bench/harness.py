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


def run_utilisation(run: Path | dict) -> dict:
    """A tuneforge run's own utilisation (its output directory's run.json, or that file read): its model FLOP/s and
    their share of this CPU's measured matmul peak at the run's precision, as the contender's figures; {} for a run
    that has none."""
    info = run if isinstance(run, dict) else json.loads((Path(run) / "run.json").read_text())
    util = info.get("utilisation") or {}
    if not util.get("achieved_flops_per_second"):
        return {}
    return {"model_flops_per_s": util["achieved_flops_per_second"], "peak_flops_per_s": util["peak_flops_per_second"],
            "share_of_peak": util["share_of_peak"]}


def same_work_utilisation(run: dict, reference: dict | None, rate_key: str) -> dict:
    """A peer's model FLOP/s from a tuneforge run that does the same model work per unit of `rate_key` (the same
    model, method, data and lengths): the reference's FLOPs per unit (its model FLOP/s / its rate) x the peer's
    rate, beside the same peak. Model FLOPs utilisation counts the model's work, not what an implementation adds
    or saves, so both contenders are measured by one count. {} without a usable reference."""
    if not reference or "error" in reference or not reference.get("model_flops_per_s") or not run.get(rate_key):
        return {}
    flops = reference["model_flops_per_s"] / reference[rate_key] * run[rate_key]
    return {"model_flops_per_s": flops, "peak_flops_per_s": reference["peak_flops_per_s"],
            "share_of_peak": flops / reference["peak_flops_per_s"], "flops_counted_on": "the tuneforge run of the same work"}


def utilisation_text(r: dict) -> str:
    """' 272 GFLOP/s = 33% of peak' for a printed line, '' without the figures."""
    if not r.get("model_flops_per_s"):
        return ""
    return f"  {r['model_flops_per_s'] / 1e9:.0f} GFLOP/s = {r['share_of_peak']:.0%} of the {r['peak_flops_per_s'] / 1e9:.0f} peak"


def counted_flops_per_token(model, data, idx, pad_id: int, precision: str, loss_fn, collate,
                            reference_forward: bool = False) -> float:
    """The model's FLOPs per trained token, counted on one forward + backward of batch `idx` (tuneforge's counter:
    training/cost.py counted_flops); `reference_forward`: plus one forward alone, a preference loss's frozen
    reference model. The count's dropout draws and gradients leave the training that follows as it was."""
    import torch

    from tuneforge.training.cost import counted_flops

    cpu = torch.device("cpu")
    rng = torch.get_rng_state()
    flops = counted_flops(model, data, idx, pad_id, cpu, precision, loss_fn, collate)
    if reference_forward:
        flops += counted_flops(model, data, idx, pad_id, cpu, precision, loss_fn, collate, backward=False)
    torch.set_rng_state(rng)
    model.zero_grad(set_to_none=True)
    return flops / sum(len(data.ids[i]) for i in idx)


def counted_utilisation(out: dict, flops_per_unit: float | None, rate_key: str, peak: float | None) -> dict:
    """A contender's figures with its model FLOP/s (the counted FLOPs per unit of `rate_key` x its rate) and their
    share of the measured peak; unchanged without a count."""
    if flops_per_unit and peak:
        out["model_flops_per_s"] = flops_per_unit * out[rate_key]
        out["peak_flops_per_s"] = peak
        out["share_of_peak"] = out["model_flops_per_s"] / peak
    return out


def measured_as(fn: Callable[[], dict], results: dict, reference: str, rate_key: str) -> Callable[[], dict]:
    """`fn` (a peer's run) with its utilisation from the tuneforge run `reference` of the same work
    (same_work_utilisation), for `attempt`."""
    def run() -> dict:
        r = fn()
        return {**r, **same_work_utilisation(r, results["runs"].get(reference), rate_key)}
    return run
