"""Token classification's sections of report.html: metrics per entity type and the confusion of types."""
from __future__ import annotations

from tuneforge.html import fmt_metric, img, plot_confusion, table


def report_details(m: dict) -> list[str]:
    model = m["test"]["model"]
    parts = ["<h2>Per entity type (test, strict entity match)</h2>" + table(
        ["type", "precision", "recall", "F1", "support"],
        [[t, fmt_metric(v["precision"]), fmt_metric(v["recall"]), fmt_metric(v["f1"]), v["support"]]
         for t, v in model["per_type"].items()])]
    confusion = m.get("type_confusion")
    if confusion:
        parts.append("<p>Rows: each gold entity's type; columns: the type predicted on exactly its span, or (missed) "
                     "when no entity is predicted there. Row (none): predicted entities matching no gold span, by their "
                     "predicted type.</p>")
        parts.append(img(plot_confusion(confusion), "confusion of entity types (test)"))
    return parts
