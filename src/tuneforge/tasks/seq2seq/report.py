"""The seq2seq section of report.html: test rows side by side (source, reference, untuned, tuned)."""
from __future__ import annotations

import html


def report_details(m: dict) -> list[str]:
    parts = []  # every metric is in the summary table above (summary_rows)
    if m.get("truncated_generations"):
        parts.append(f"<p>{m['truncated_generations']} test generations reached max_new_tokens ({m.get('max_new_tokens')}) "
                     "before their end token: raise task.max_new_tokens if the targets run longer.</p>")
    if m.get("samples"):
        how = "greedy decoding" if (m.get("num_beams") or 1) == 1 else f"beam search ({m['num_beams']} beams)"
        parts.append(f"<h2>Sample generations (test rows)</h2><p>{how}, at most {m.get('max_new_tokens')} new tokens"
                     + (f"; each source prefixed with <code>{html.escape(m['prefix'])}</code>" if m.get("prefix") else "")
                     + ".</p>")
        cells = "".join(
            "<tr>" + "".join(f"<td style='vertical-align:top;white-space:pre-wrap'>{html.escape(str(s.get(k) or '-'))}</td>"
                             for k in ("source", "reference", "untuned", "model")) + "</tr>"
            for s in m["samples"])
        parts.append("<table><thead><tr><th>source</th><th>reference</th><th>untuned model</th><th>tuned model</th></tr>"
                     f"</thead><tbody>{cells}</tbody></table>")
    return parts
