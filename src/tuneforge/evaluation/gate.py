"""The promotion gate, for every task: the model is `promoted` only if its main test metric clears the best
baseline's by `eval.gate.min_margin` and (by default) the lower bound of its 95% CI is above it too."""
from __future__ import annotations

import numpy as np

from tuneforge.config import RunConfig


def best_baseline(result: dict, key: str) -> str | None:
    scored = result["test"]["baselines"]
    return max(scored, key=lambda n: scored[n][key], default=None)


def beats_baselines(result: dict, key: str) -> bool:
    best = best_baseline(result, key)
    return bool(result["test"]["model"][key] > (result["test"]["baselines"][best][key] if best else -np.inf))


def gate(result: dict, cfg: RunConfig) -> dict:
    """`promoted` and the reason, from eval.gate against the best baseline on the test split."""
    g, key = cfg.eval.gate, cfg.eval.metric
    model = result["test"]["model"]
    best = result["best_baseline"]
    if best is None:
        return {"promoted": True, "promotion_reason": "no baselines configured; nothing to clear"}
    base = result["test"]["baselines"][best][key]
    margin = model[key] - base
    reasons = []
    if margin < g.min_margin:
        reasons.append(f"{key} {model[key]:.4f} beats {best} ({base:.4f}) by {margin:+.4f}, less than the required {g.min_margin:+.4f}")
    if g.ci_lower_above_baseline and model.get("ci") and model["ci"]["low"] <= base:
        reasons.append(f"the 95% CI lower bound {model['ci']['low']:.4f} is not above {best} ({base:.4f})")
    if reasons:
        return {"promoted": False, "promotion_reason": "; ".join(reasons)}
    return {"promoted": True, "promotion_reason": f"{key} {model[key]:.4f} beats {best} ({base:.4f}) by {margin:+.4f}"
            + (" and the CI lower bound is above it" if g.ci_lower_above_baseline else "")}
