"""The fragments of report.html that report code of every layer builds its sections from (the run's page, the
search's section, each task's sections): plots as inline PNG, figures, tables and number formats. It imports nothing
from tuneforge, so it sits below all of them."""
from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_BLUE, _GREY, _RED = "#2563eb", "#9ca3af", "#dc2626"


def png(fig) -> str:
    """A matplotlib figure as a data: URL (PNG), the figure closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def img(src: str, alt: str) -> str:
    """A figure: the image and its caption (`alt`, escaped)."""
    return f'<figure><img src="{src}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def table(header: list[str], rows: list[list]) -> str:
    """An HTML table, every cell escaped; cells holding a number align right."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{_align(c)}>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _align(cell) -> str:
    """Numbers align right, words left."""
    try:
        float(str(cell).split(" - ")[0])
        return ' class="n"'
    except ValueError:
        return ""


def fmt_metric(x) -> str:
    """A metric to 4 decimals, or "-" where there is none."""
    return "-" if x is None else f"{x:.4f}"


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
    return png(fig)


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
    return png(fig)


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
    return png(fig)


def plot_calibration(cal: dict) -> tuple[str, str]:
    fig, ax = plt.subplots(figsize=(4, 4))
    bins = [b for b in cal["bins"] if b["n"]]
    ax.plot([0, 1], [0, 1], "--", color=_GREY, label="perfectly calibrated")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color=_BLUE, label="model")
    ax.set_xlabel("confidence"), ax.set_ylabel("accuracy"), ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_title(f"reliability (ECE {cal['ece']:.3f})"), ax.legend(frameon=False, loc="upper left")
    reliability = png(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    h = cal["confidence_histogram"]
    ax.bar(h["edges"][:-1], h["counts"], width=h["edges"][1] - h["edges"][0], align="edge", color=_BLUE)
    ax.set_xlabel("confidence of the predicted label"), ax.set_ylabel("test rows"), ax.set_title("confidence histogram")
    ax.spines[["top", "right"]].set_visible(False)
    return reliability, png(fig)


def plot_slice(column: str, s: dict) -> str:
    groups = list(s["groups"])
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(groups) + 1.2))
    vals = [s["groups"][g][s["metric"]] for g in groups]
    colours = [_RED if s["between"] and g == s["between"]["worst"] and s["warning"] else _BLUE for g in groups]
    ax.barh(range(len(groups)), vals, color=colours)
    ax.set_yticks(range(len(groups)), [f"{g} (n={s['groups'][g]['n']})" for g in groups]), ax.invert_yaxis()
    ax.set_xlim(0, 1), ax.set_xlabel(f"test {s['metric']}"), ax.set_title(f"slice: {column} (largest gap {s['largest_gap']:.3f})")
    ax.spines[["top", "right"]].set_visible(False)
    return png(fig)
