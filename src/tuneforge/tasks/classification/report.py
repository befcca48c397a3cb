"""Text classification's sections of report.html: significance, per-class metrics, confusion matrix,
calibration and slices."""
from __future__ import annotations

import html

from tuneforge.html import fmt_metric, img, plot_calibration, plot_confusion, plot_slice, table


def report_details(m: dict) -> list[str]:
    key, test, parts = m["main_metric"], m["test"], []
    sig = m.get("significance")
    if sig:
        mc, pb = sig["mcnemar"], sig["paired_bootstrap"]
        parts.append(f"<p>Against the best baseline, <b>{html.escape(sig['against'])}</b>: McNemar exact p = {mc['p_value']:.4g} "
                     f"({mc['only_model_right']} rows only the model gets right, {mc['only_baseline_right']} only the baseline); "
                     f"paired bootstrap {key} difference {pb['diff']:+.4f} (95% CI {pb['low']:+.4f} to {pb['high']:+.4f}).</p>")
    per_class = [[c, fmt_metric(v["precision"]), fmt_metric(v["recall"]), fmt_metric(v["f1"]), v["support"]]
                 for c, v in test["model"]["per_class"].items()]
    parts.append("<h2>Per class</h2>" + table(["class", "precision", "recall", "F1", "support"], per_class))
    cm = plot_confusion(test["model"]["confusion_matrix"])
    if cm:
        parts.append(img(cm, "confusion matrix"))
    if m.get("calibration"):
        rel, hist = plot_calibration(m["calibration"])
        parts.append("<h2>Calibration</h2><div class='row'>" + img(rel, "reliability diagram") + img(hist, "confidence histogram") + "</div>")
    for col, s in (m.get("slices") or {}).items():
        warn = (f"<p class='warn'>Gap of {s['largest_gap']:.3f} in {key} between {html.escape(s['between']['best'])} and "
                f"{html.escape(s['between']['worst'])} exceeds {s['max_gap']}.</p>") if s["warning"] else ""
        parts.append(f"<h2>Slice: {html.escape(col)}</h2>{warn}" + img(plot_slice(col, s), f"{key} by {col}")
                     + table(["group", "rows", "accuracy", key],
                             [[g, v["n"], fmt_metric(v["accuracy"]), fmt_metric(v[key])] for g, v in s["groups"].items()]))
    return parts
