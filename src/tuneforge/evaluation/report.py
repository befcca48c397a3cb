"""`report.html`: one self-contained page (plots inlined as PNG) built only from a run's stored JSON,
so `tuneforge report OUTPUT` can rebuild it at any time without the model or the data.

    tuneforge report runs/sentiment
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from tuneforge.errors import OutputError
from tuneforge.html import fmt_metric, img, plot_learning_curves, plot_vs_baselines, table


def _decontamination_section(section: dict | None, clean: dict | None) -> list[str]:
    """The training rows left out as copies of held-out rows (audit.leakage: drop), each beside the row it matches;
    or, with audit.leakage: allow, the test metrics on the rows without a copy in training."""
    parts = []
    if section and section.get("rows"):
        rows = section["rows"]
        shown = [[r["file"], r["row"], f"{r['matches']['split']} {r['matches']['file']} row {r['matches']['row']}",
                  r["matches"]["kind"], f"{r['matches']['similarity']:.2f}"] for r in rows[:100]]
        more = f"<p>... and {len(rows) - 100} more (audit.json, data_report.json).</p>" if len(rows) > 100 else ""
        parts.append(f"<h3>Left out of training: {len(rows)} copies of held-out rows</h3><p>Your held-out files are "
                     "scored as given; these training rows copy one of their rows (audit.leakage: drop).</p>"
                     + table(["file", "row", "copies", "kind", "similarity"], shown) + more)
    if clean and clean.get("test"):
        key = clean["main_metric"]
        rows = [["fine-tuned model", fmt_metric(clean["test"]["model"].get(key))]]
        rows += [[n, fmt_metric(b.get(key))] for n, b in clean["test"]["baselines"].items()]
        parts.append(f"<h3>Test rows not in training ({clean['rows']} of {clean['rows'] + clean['rows_left_out']})</h3>"
                     f"<p class=\"warn\">audit.leakage: allow trained on copies of {clean['rows_left_out']} test rows; "
                     f"on the others: {html.escape(clean.get('promotion_reason', ''))}</p>" + table(["", key], rows))
    return parts


def _load(out: Path, name: str) -> dict:
    path = out / name
    if not path.is_file():
        raise OutputError(f"{path} is missing", fix="pass the output directory of a finished `tuneforge run`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_run(out: Path, run: dict | None = None) -> tuple[dict, dict, dict, dict | None]:
    """(metrics, data report, run info, audit or None) of a finished run; `run`: the run info of one finishing
    (its run.json is written after the report)."""
    audit = _load(out, "audit.json") if (out / "audit.json").is_file() else None
    return _load(out, "metrics.json"), _load(out, "data_report.json"), run or _load(out, "run.json"), audit


def build_report(out: Path, run: dict | None = None) -> Path:
    """Write OUT/report.html from OUT/metrics.json, data_report.json, run.json (or `run`) and audit.json; the task of
    the run supplies its table rows and its own sections (per class or per type, confusion, ...)."""
    from tuneforge import artifacts
    from tuneforge.artifacts import run_task_type
    from tuneforge.tasks import get_spec
    from tuneforge.tasks.behaviour import get_task

    m, data, run, audit = load_run(out, run)
    key = m["main_metric"]
    test = m["test"]
    parts = [f"<h1>tuneforge run: {html.escape(run['model']['reference'])}</h1>",
             f'<p class="verdict {"ok" if m.get("promoted") else "no"}">{"PROMOTED" if m.get("promoted") else "NOT PROMOTED"}: '
             f'{html.escape(m.get("promotion_reason", ""))}</p>']
    parts.append("<h2>Model vs baselines (test split)</h2>" + img(plot_vs_baselines(test, key), f"test {key}: model vs baselines"))
    task_type = run_task_type(out)
    task = get_task(task_type)
    header, rows = task.summary_rows(m)
    parts.append(table(["", *header], rows))
    details = task.report_details(m)
    if m["validation"]["history"]:
        details.insert(1 if m.get("significance") else 0,
                       "<h2>Learning curves</h2>" + img(plot_learning_curves(m["validation"]["history"], key), "loss and validation metric"))
    parts += details
    if (out / "search.json").is_file():  # the run is a search's best trial (tuneforge tune)
        from tuneforge.tuning.report import search_section

        parts.append(search_section(out))
    parts.append("<h2>Data</h2>" + table(["split", "rows", get_spec(task_type).counted, "sha256"],
                 [[k, v["rows"], ", ".join(f"{c}: {n}" for c, n in v["class_counts"].items()), v["sha256"][:16]] for k, v in data["splits"].items()]))
    if audit:
        from tuneforge.data.audit import summarise

        parts.append("<h2>Data audit</h2>" + table(["check", "severity", "finding"],
                     [[k, v["severity"], summarise(k, v)] for k, v in audit.items() if k != "summary"]))
        parts += _decontamination_section(audit.get("decontamination"), m.get("test_without_training_copies"))
    cost = m.get("cost", {})
    if cost:
        est = cost["estimated"]
        parts.append(f"<h2>Cost</h2><p>whole run estimated {est['seconds_total']:.0f} s (training {est['seconds_train']:.0f} s), "
                     f"actual {cost['actual']['seconds_total']:.0f} s (training {run['durations_s'].get('train', 0):.0f} s); "
                     f"training {cost['actual']['train_samples_per_second']:.1f} samples/s on {html.escape(run['hardware']['cpu'])} "
                     f"({html.escape(run['precision'])}).</p>"
                     + table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in run["durations_s"].items() if k != "total"]))
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tuneforge report</title>
<style>body{{font:15px/1.45 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#111}}
table{{border-collapse:collapse;margin:.5em 0 1em}}td,th{{border-bottom:1px solid #e5e7eb;padding:.25em .8em;text-align:left}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}}img{{max-width:100%}}figure{{margin:.5em 0}}figcaption{{color:#6b7280;font-size:13px}}
.row{{display:flex;gap:1em;flex-wrap:wrap}}.verdict{{font-weight:600;padding:.5em .8em;border-radius:6px}}
.ok{{background:#dcfce7}}.no{{background:#fee2e2}}.warn{{color:#b91c1c}}</style></head><body>
{''.join(parts)}</body></html>"""
    path = out / "report.html"
    artifacts.write_text(path, page)
    return path
