"""`report.html`: one self-contained page (plots inlined as PNG) built only from a run's stored JSON,
so `tuneforge report OUTPUT` can rebuild it at any time without the model or the data.

    tuneforge report runs/sentiment
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tuneforge.errors import OutputError  # noqa: E402

_BLUE, _GREY, _RED = "#2563eb", "#9ca3af", "#dc2626"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(src: str, alt: str) -> str:
    return f'<figure><img src="{src}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def plot_learning_curves(history: list[dict], metric: str) -> str:
    if f"val_{metric}" not in history[0]:  # the validation may score another metric than the test (causal LM: loss)
        metric = next((k[4:] for k in history[0] if k.startswith("val_") and k != "val_loss"), "loss")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [h["step"] for h in history]
    ax1.plot(steps, [h["train_loss"] for h in history], "o-", color=_GREY, label="train loss")
    ax1.plot(steps, [h["val_loss"] for h in history], "o-", color=_BLUE, label="validation loss")
    ax1.set_xlabel("optimizer step"), ax1.set_title("loss"), ax1.legend(frameon=False)
    ax2.plot(steps, [h[f"val_{metric}"] for h in history], "o-", color=_BLUE)
    ax2.set_xlabel("optimizer step"), ax2.set_title(f"validation {metric}")
    for ax in (ax1, ax2):
        ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def plot_vs_baselines(test: dict, metric: str) -> str:
    rows = [("fine-tuned model", test["model"])] + list(test["baselines"].items())
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1))
    for y, (name, m) in enumerate(rows):
        ci = m.get("ci")
        err = [[m[metric] - ci["low"]], [ci["high"] - m[metric]]] if ci else None
        ax.barh(y, m[metric], xerr=err, color=_BLUE if y == 0 else _GREY, capsize=4)
        ax.text((ci["high"] if ci else m[metric]) * 1.01 + 0.01, y, f"{m[metric]:.3f}", va="center")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows]), ax.invert_yaxis()
    top = max(max((m.get("ci") or {}).get("high", m[metric]), m[metric]) for _, m in rows)
    ax.set_xlim(0, 1.15 if top <= 1 else top * 1.2), ax.set_xlabel(f"test {metric} (bars: 95% bootstrap CI)")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def plot_confusion(cm: dict) -> str | None:
    """A square matrix over cm["labels"], or rows x columns over cm["rows"] (true) and cm["columns"] (predicted)."""
    matrix = cm["matrix"]
    if isinstance(matrix, dict):  # multi-label: one 2x2 per label, shown as a table instead
        return None
    rows, columns = cm.get("rows", cm.get("labels")), cm.get("columns", cm.get("labels"))
    fig, ax = plt.subplots(figsize=(1.0 * len(columns) + 2.5, 1.0 * len(rows) + 2))
    ax.imshow(matrix, cmap="Blues")
    top = max(max(r) for r in matrix) or 1
    for i in range(len(rows)):
        for j in range(len(columns)):
            ax.text(j, i, matrix[i][j], ha="center", va="center", color="white" if matrix[i][j] > top / 2 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right"), ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title("confusion matrix (test)")
    return _png(fig)


def plot_calibration(cal: dict) -> tuple[str, str]:
    fig, ax = plt.subplots(figsize=(4, 4))
    bins = [b for b in cal["bins"] if b["n"]]
    ax.plot([0, 1], [0, 1], "--", color=_GREY, label="perfectly calibrated")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color=_BLUE, label="model")
    ax.set_xlabel("confidence"), ax.set_ylabel("accuracy"), ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_title(f"reliability (ECE {cal['ece']:.3f})"), ax.legend(frameon=False, loc="upper left")
    reliability = _png(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    h = cal["confidence_histogram"]
    ax.bar(h["edges"][:-1], h["counts"], width=h["edges"][1] - h["edges"][0], align="edge", color=_BLUE)
    ax.set_xlabel("confidence of the predicted label"), ax.set_ylabel("test rows"), ax.set_title("confidence histogram")
    ax.spines[["top", "right"]].set_visible(False)
    return reliability, _png(fig)


def plot_slice(column: str, s: dict) -> str:
    groups = list(s["groups"])
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(groups) + 1.2))
    vals = [s["groups"][g][s["metric"]] for g in groups]
    colours = [_RED if s["between"] and g == s["between"]["worst"] and s["warning"] else _BLUE for g in groups]
    ax.barh(range(len(groups)), vals, color=colours)
    ax.set_yticks(range(len(groups)), [f"{g} (n={s['groups'][g]['n']})" for g in groups]), ax.invert_yaxis()
    ax.set_xlim(0, 1), ax.set_xlabel(f"test {s['metric']}"), ax.set_title(f"slice: {column} (largest gap {s['largest_gap']:.3f})")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{_num(c)}>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(cell) -> str:
    """Numbers align right, words left."""
    try:
        float(str(cell).split(" - ")[0])
        return ' class="n"'
    except ValueError:
        return ""


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


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
                     + _table(["file", "row", "copies", "kind", "similarity"], shown) + more)
    if clean and clean.get("test"):
        key = clean["main_metric"]
        rows = [["fine-tuned model", _f(clean["test"]["model"].get(key))]]
        rows += [[n, _f(b.get(key))] for n, b in clean["test"]["baselines"].items()]
        parts.append(f"<h3>Test rows not in training ({clean['rows']} of {clean['rows'] + clean['rows_left_out']})</h3>"
                     f"<p class=\"warn\">audit.leakage: allow trained on copies of {clean['rows_left_out']} test rows; "
                     f"on the others: {html.escape(clean.get('promotion_reason', ''))}</p>" + _table(["", key], rows))
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
    from tuneforge.tasks import get_spec, get_task

    m, data, run, audit = load_run(out, run)
    key = m["main_metric"]
    test = m["test"]
    parts = [f"<h1>tuneforge run: {html.escape(run['model']['reference'])}</h1>",
             f'<p class="verdict {"ok" if m.get("promoted") else "no"}">{"PROMOTED" if m.get("promoted") else "NOT PROMOTED"}: '
             f'{html.escape(m.get("promotion_reason", ""))}</p>']
    parts.append("<h2>Model vs baselines (test split)</h2>" + _img(plot_vs_baselines(test, key), f"test {key}: model vs baselines"))
    task = get_task(run_task_type(out))
    header, rows = task.summary_rows(m)
    parts.append(_table(["", *header], rows))
    details = task.report_details(m)
    if m["validation"]["history"]:
        details.insert(1 if m.get("significance") else 0,
                       "<h2>Learning curves</h2>" + _img(plot_learning_curves(m["validation"]["history"], key), "loss and validation metric"))
    parts += details
    if (out / "search.json").is_file():  # the run is a search's best trial (tuneforge tune)
        from tuneforge.tuning.report import search_section

        parts.append(search_section(out))
    parts.append("<h2>Data</h2>" + _table(["split", "rows", get_spec(run_task_type(out)).counted, "sha256"],
                 [[k, v["rows"], ", ".join(f"{c}: {n}" for c, n in v["class_counts"].items()), v["sha256"][:16]] for k, v in data["splits"].items()]))
    if audit:
        from tuneforge.data.audit import summarise

        parts.append("<h2>Data audit</h2>" + _table(["check", "severity", "finding"],
                     [[k, v["severity"], summarise(k, v)] for k, v in audit.items() if k != "summary"]))
        parts += _decontamination_section(audit.get("decontamination"), m.get("test_without_training_copies"))
    cost = m.get("cost", {})
    if cost:
        est = cost["estimated"]
        parts.append(f"<h2>Cost</h2><p>whole run estimated {est['seconds_total']:.0f} s (training {est['seconds_train']:.0f} s), "
                     f"actual {cost['actual']['seconds_total']:.0f} s (training {run['durations_s'].get('train', 0):.0f} s); "
                     f"training {cost['actual']['train_samples_per_second']:.1f} samples/s on {html.escape(run['hardware']['cpu'])} "
                     f"({html.escape(run['precision'])}).</p>"
                     + _table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in run["durations_s"].items() if k != "total"]))
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
