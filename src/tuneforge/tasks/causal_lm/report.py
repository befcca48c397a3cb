"""Causal LM's section of report.html: sample generations side by side (prompt, reference, base, tuned)."""
from __future__ import annotations

import html


def report_details(m: dict) -> list[str]:
    parts = []  # every metric is in the summary table above (summary_rows)
    if m.get("samples"):
        parts.append("<h2>Sample generations (test prompts)</h2><p>Greedy decoding, at most "
                     f"{m.get('max_new_tokens')} new tokens; the untuned model with the same "
                     f"{'chat template' if m.get('chat_template') else 'prompt format'}.</p>")
        cells = "".join(
            "<tr>" + "".join(f"<td style='vertical-align:top;white-space:pre-wrap'>{html.escape(str(s.get(k) or '-'))}</td>"
                             for k in ("prompt", "reference", "base_zero_shot", "model")) + "</tr>"
            for s in m["samples"])
        parts.append("<table><thead><tr><th>prompt</th><th>reference</th><th>base model</th><th>tuned model</th></tr></thead>"
                     f"<tbody>{cells}</tbody></table>")
    return parts
