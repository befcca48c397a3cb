"""Causal LM's section of report.html: sample generations side by side (prompt, reference, base, tuned; for
preference pairs the chosen and the rejected answer beside them)."""
from __future__ import annotations

import html


def report_details(m: dict) -> list[str]:
    parts = []  # every metric is in the summary table above (summary_rows)
    if m.get("samples"):
        pairs = m.get("kind") == "preference"
        columns = [("prompt", "prompt"), ("reference", "chosen" if pairs else "reference")] \
            + ([("rejected", "rejected")] if pairs else []) + [("base_zero_shot", "base model"), ("model", "tuned model")]
        parts.append("<h2>Sample generations (test prompts)</h2><p>Greedy decoding, at most "
                     f"{m.get('max_new_tokens')} new tokens; the untuned model with the same "
                     f"{'chat template' if m.get('chat_template') else 'prompt format'}.</p>")
        cells = "".join(
            "<tr>" + "".join(f"<td style='vertical-align:top;white-space:pre-wrap'>{html.escape(str(s.get(k) or '-'))}</td>"
                             for k, _ in columns) + "</tr>"
            for s in m["samples"])
        head = "".join(f"<th>{title}</th>" for _, title in columns)
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
    return parts
