"""Causal LM's sections of report.html: every metric beside the baselines, and sample generations side by side."""
from __future__ import annotations

import html

from tuneforge.evaluation.report import _f, _table


def report_details(m: dict) -> list[str]:
    test = m["test"]
    keys = [k for k in ("loss", "perplexity", "exact_match", "rouge_l", "chrf", "accuracy", "macro_f1") if k in test["model"]]
    rows = [[name] + [_f(s.get(k)) for k in keys] for name, s in [("fine-tuned model", test["model"])] + list(test["baselines"].items())]
    parts = ["<h2>All test metrics</h2>" + _table(["", *keys], rows)]
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
