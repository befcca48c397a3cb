"""Seq2seq's own audit checks: targets cut by max_target_length (the model would learn to stop early and be scored
against text it never saw), and targets that copy their source (nothing to learn but copying)."""
from __future__ import annotations


def sections(data, target_lengths: dict, max_target_length: int, why: str) -> dict:
    splits, severity = {}, "info"
    for name, ex in data.splits.items():
        lengths = target_lengths[name]
        over = [k for k, n in enumerate(lengths) if n > max_target_length]
        splits[name] = {"rows": len(ex), "truncated": len(over), "max_tokens": max(lengths, default=0),
                        "truncated_rows": [ex.rows[k] for k in over[:200]]}
        if over:
            severity = "warning"
    summary = "; ".join(f"{k} {v['truncated']} of {v['rows']} over {max_target_length} tokens" for k, v in splits.items())
    out = {"target_truncation": {"severity": severity, "max_target_length": max_target_length, "why": why,
                                 "splits": splits, "file": data.splits.train.source,
                                 "summary": f"targets cut: {summary} (task.max_target_length: {why})"}}
    train = data.splits.train
    copies = [train.rows[k] for k, (s, t) in enumerate(zip(train.texts, train.labels)) if s.strip() == t.strip()]
    share = len(copies) / max(len(train), 1)
    out["target_copies_source"] = {
        "severity": "warning" if share > 0.2 else "info", "rows": copies[:200], "share": share,
        "summary": f"{len(copies)} training targets ({share:.1%}) equal their source" if copies else
                   "none: no training target equals its source"}
    return out
