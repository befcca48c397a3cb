"""The promotion gate, for every task: the model is `promoted` only if its main test metric clears the best
baseline's by `eval.gate.min_margin` and (by default) the lower bound of its 95% CI is above it too. For a metric
where lower is better (perplexity; the task's spec says which way each metric points) "clears" reads the other
way: below the best baseline by the margin, the CI's upper bound below it too. The pipeline applies it once, after
the task's test evaluation, for every task."""
from __future__ import annotations

from tuneforge.config import RunConfig

from tuneforge.tasks.spec import Direction


def _sign(direction: Direction) -> int:
    return -1 if direction == "min" else 1


def best_baseline(result: dict, key: str, direction: Direction) -> str | None:
    scored = {n: m for n, m in result["test"]["baselines"].items() if m.get(key) is not None}
    return max(scored, key=lambda n: _sign(direction) * scored[n][key], default=None)


def beats_baselines(result: dict, key: str, direction: Direction) -> bool:
    best = best_baseline(result, key, direction)
    if best is None:
        return True
    return bool(_sign(direction) * (result["test"]["model"][key] - result["test"]["baselines"][best][key]) > 0)


def judge(result: dict, cfg: RunConfig, direction: Direction) -> dict:
    """`result` (a task's test evaluation) with `best_baseline`, `beats_baselines`, `promoted` and the reason."""
    key = result["main_metric"]
    result["best_baseline"] = best_baseline(result, key, direction)
    result["beats_baselines"] = beats_baselines(result, key, direction)
    result.update(gate(result, cfg, direction))
    return result


def gate(result: dict, cfg: RunConfig, direction: Direction) -> dict:
    """`promoted` and the reason, from eval.gate against the best baseline on the test split."""
    g, key = cfg.eval.gate, result.get("main_metric") or cfg.eval.metric
    model = result["test"]["model"]
    best = result["best_baseline"]
    if best is None:
        return {"promoted": True, "promotion_reason": "no baselines configured; nothing to clear"}
    base = result["test"]["baselines"][best][key]
    sign = _sign(direction)
    margin = sign * (model[key] - base)  # > 0: better than the baseline, whichever way the metric points
    ci = model.get("ci")
    ci = ci.get(key) if isinstance(ci, dict) and key in ci else ci  # one CI, or one per metric
    reasons = []
    if margin < g.min_margin:
        reasons.append(f"{key} {model[key]:.4f} beats {best} ({base:.4f}) by {margin:+.4f}, less than the required {g.min_margin:+.4f}")
    if g.ci_lower_above_baseline and ci:
        bound, side = (ci["low"], "lower") if sign > 0 else (ci["high"], "upper")
        if sign * (bound - base) <= 0:
            reasons.append(f"the 95% CI {side} bound {bound:.4f} is not {'above' if sign > 0 else 'below'} {best} ({base:.4f})")
    if reasons:
        return {"promoted": False, "promotion_reason": "; ".join(reasons)}
    return {"promoted": True, "promotion_reason": f"{key} {model[key]:.4f} beats {best} ({base:.4f}) by {margin:+.4f}"
            + ((" and the CI lower bound is above it" if sign > 0 else " and the CI upper bound is below it")
               if g.ci_lower_above_baseline else "")}
