"""Where a training step's time goes, per task: torch.profiler on the real pipeline's steps (#26).

    python bench/profile_steps.py                       # every task's example config
    python bench/profile_steps.py examples/sentiment.yaml --steps 8

Each config runs through `tuneforge.pipeline.run` as `tuneforge run` would (its data, task, model, method and
precision; baselines off, output in a temporary directory), with the training loop wrapped: after `--warmup` steps
(and one more to start the profiler) the CPU profiler records `--steps` steps, then the run is stopped (nothing after training is of interest here).

The summary sorts each op's *self* time (what the op itself ran, not its children) into kinds: matmuls and
convolutions (the FLOPs the utilisation counts), attention, elementwise and norms, dtype casts and copies, the
loss, dropout, embeddings, the optimizer and clipping, and what no op accounts for: Python, the autograd engine's
bookkeeping and the profiler's own cost per op (so the profiled step is slower than an unprofiled one; the shares,
not the milliseconds, are the figure). Written to bench/results_profile_steps.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = ["examples/sentiment.yaml", "examples/entities.yaml", "examples/tweet_entities.yaml",
                   "examples/poster_quotes.yaml", "examples/tweet_entities_seq2seq.yaml", "examples/fashion_mnist.yaml"]

# op name -> kind, first match wins (self time: a Linear's time lands on its mm/addmm, a cast's on copy_)
KINDS = [
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "aten::_softmax", "aten::softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::linear",
                "aten::matmul", "mkldnn_convolution", "convolution", "aten::_convolution", "mkldnn_linear")),
    ("optimizer", ("adam", "_foreach", "clip_grad", "aten::norm", "linalg_vector_norm", "zero_")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("dropout", ("dropout", "bernoulli", "random_", "bitwise_and")),
    ("embedding", ("embedding",)),
    ("cast/copy", ("aten::copy_", "aten::_to_copy", "aten::to", "clone", "contiguous", "aten::cat", "aten::stack",
                   "index", "aten::fill_", "aten::zeros", "aten::empty", "aten::ones", "aten::full")),
    ("elementwise/norm", ("aten::add", "aten::mul", "aten::div", "aten::sub", "silu", "gelu", "relu", "tanh", "sigmoid",
                          "rsqrt", "pow", "mean", "aten::sum", "layer_norm", "rms_norm", "aten::neg", "aten::exp",
                          "where", "aten::max", "masked_fill", "aten::sqrt", "threshold", "aten::cos", "aten::sin",
                          "batch_norm", "pool")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other ops"


class Done(Exception):
    """Raised from inside the training loop once the profiled steps are recorded."""


def profile_config(path: str, warmup: int, steps: int, workdir: Path) -> dict:
    import torch
    import yaml
    from rich.console import Console
    from torch.profiler import ProfilerActivity, profile, schedule

    from tuneforge import pipeline
    from tuneforge.config import parse_config
    from tuneforge.training import loop

    raw = yaml.safe_load((ROOT / path).read_text())
    raw.setdefault("eval", {})["baselines"] = []
    raw.setdefault("output", {})["dir"] = str(workdir / Path(path).stem)
    data = raw.get("data", {})
    for key in ("path", "test_path"):
        if isinstance(data.get(key), str) and ":" not in data[key] and not Path(data[key]).is_absolute():
            data[key] = str(ROOT / data[key])
    if ":" not in data["path"] and not Path(data["path"]).exists():
        return {"skipped": f"{data['path']} is missing: write it first (the Makefile's demo target for it does)"}
    cfg = parse_config(raw, path)
    step_seconds: list[float] = []
    real_train = loop.train
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=warmup, warmup=1, active=steps))
    info: dict = {}

    def train(model, train_data, *args, progress=None, **kwargs):
        info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info["weights"] = sum(p.numel() for p in model.parameters())
        info["precision"] = kwargs.get("precision")
        last = [time.perf_counter()]

        def step(done, total, row):
            if row is not None:
                return
            now = time.perf_counter()
            step_seconds.append(now - last[0])
            last[0] = now
            prof.step()
            if done >= warmup + 1 + steps:
                raise Done

        prof.start()
        try:
            return real_train(model, train_data, *args, progress=step, **kwargs)
        finally:
            prof.stop()

    loop.train = train
    console = Console(file=open(os.devnull, "w"))
    t0 = time.perf_counter()
    try:
        pipeline.run(cfg, console=console)
    except Done:
        pass
    finally:
        loop.train = real_train
    if not step_seconds:
        return {"error": "the run ended before its first training step"}
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    profiled = step_seconds[warmup + 1: warmup + 1 + steps]
    unprofiled = sorted(step_seconds[1:warmup] or step_seconds[:1])  # the first step sets kernels up
    step_us = 1e6 * sum(profiled) / len(profiled)
    by_kind: dict[str, float] = {}
    for e in events:
        if e.self_cpu_time_total > 0 and not e.key.startswith(("Optimizer.", "autograd::engine")):
            k = kind_of(e.key)
            by_kind[k] = by_kind.get(k, 0.0) + e.self_cpu_time_total / steps
    unaccounted = max(0.0, step_us - sum(by_kind.values()))
    by_kind["no op (Python, autograd, profiler)"] = unaccounted
    top = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)[:12]
    return {"config": path, "task": cfg.task.type, "model": cfg.model.name, "method": cfg.train.method,
            "precision": info.get("precision"), "trainable_parameters": info.get("trainable"),
            "weights": info.get("weights"), "batch_size": cfg.train.batch_size,
            "profiled_steps": len(profiled), "step_ms": step_us / 1000,
            "unprofiled_step_ms": 1000 * unprofiled[len(unprofiled) // 2],
            "kinds_ms": {k: round(v / 1000, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "kinds_share": {k: round(v / step_us, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": e.key, "kind": kind_of(e.key), "self_ms_per_step": round(e.self_cpu_time_total / steps / 1000, 2),
                         "calls_per_step": e.count // steps} for e in top],
            "wall_seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    ap.add_argument("--warmup", type=int, default=4, help="steps run unprofiled first (kernels set up; their median time is the unprofiled step)")
    ap.add_argument("--steps", type=int, default=5, help="steps profiled")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tuneforge.models.device import cpu_info

    hw = cpu_info()
    print(f"CPU: {hw['model']}; amx_bf16 {hw['amx_bf16']}, avx512_bf16 {hw['avx512_bf16']}; torch threads "
          f"{hw['torch_threads']}", flush=True)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results_profile_steps.json"
    results = {"cpu": hw, "warmup": args.warmup, "steps": args.steps, "profiles": {}}
    with tempfile.TemporaryDirectory(prefix="tuneforge_profile_") as tmp:
        for path in args.configs:
            print(f"--- {path}", flush=True)
            try:
                r = profile_config(path, args.warmup, args.steps, Path(tmp))
            except Exception as err:  # one config's failure loses nothing else
                r = {"error": f"{type(err).__name__}: {err}"}
            results["profiles"][path] = r
            harness.write_json(out, results)
            print(json.dumps({k: v for k, v in r.items() if k != "top_ops"}), flush=True)
            for op in r.get("top_ops", [])[:8]:
                print(f"    {op['self_ms_per_step']:9.2f} ms  {op['calls_per_step']:5d}x  {op['kind']:<18} {op['op']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
