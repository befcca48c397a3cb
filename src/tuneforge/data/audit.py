"""Data audit: know the data before spending compute.

Generic checks, each with a severity (info / warning / blocking) and the rows involved: duplicates
within a split, leakage between splits, truncation against the tokenizer, outlier inputs and texts cut to
data.max_text_chars on reading; each task adds its own through its `audit_sections` (class balance and likely
label errors, for a task with labels). Rows are 0-based data rows of the file they come from. Rows that cleaning
removed are listed once, under `cleaning`.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from tuneforge.config import AuditConfig
from tuneforge.data.neardup import DuplicateGraph, duplicate_graph
from tuneforge.data.prepare import HELD_OUT_COPY
from tuneforge.data.split import Splits

SEVERITIES = ("info", "warning", "blocking")


def _worst(*levels: str) -> str:
    return max(levels, key=SEVERITIES.index, default="info")


def row_positions(splits: Splits) -> list[tuple[str, int]]:
    """(split name, position in it) of every row, in the order the audit numbers them."""
    return [(name, k) for name, ex in splits.items() for k in range(len(ex))]


def row_ref(splits: Splits, name: str, k: int) -> dict:
    """Where a row is, as a finding names it: its split, file and row as the user numbers it."""
    ex = dict(splits.items())[name]
    return {"split": name, "file": ex.source, "row": ex.rows[k]}


def duplicates_and_leakage(splits: Splits, cfg: AuditConfig, graph: DuplicateGraph | None = None) -> tuple[dict, dict]:
    """Duplicate groups within a split, and leakage (the same or near-same text in two splits).

    `graph` is the run's duplicate graph (computed once, when the data was split); without it, or at
    another threshold, the links are computed here."""
    where = row_positions(splits)
    if graph is None or graph.threshold != cfg.near_duplicate_threshold:
        texts = [t for _, ex in splits.items() for t in ex.texts]
        graph = duplicate_graph(texts, [(ex.source, r) for _, ex in splits.items() for r in ex.rows],
                                cfg.near_duplicate_threshold)
    node_of = graph.node_of()
    by_name = dict(splits.items())
    position = {node_of[(by_name[name].source, by_name[name].rows[k])]: i for i, (name, k) in enumerate(where)}
    dup_exact, dup_near, leaks = [], [], []
    for nodes in graph.exact:
        group = [position[n] for n in nodes if n in position]
        if len(group) < 2:
            continue
        refs = [row_ref(splits, *where[i]) for i in group]
        if len({r["split"] for r in refs}) > 1:
            leaks.append({"kind": "exact", "similarity": 1.0, "rows": refs})
        else:
            dup_exact.append({"split": refs[0]["split"], "rows": refs})
    for a, b, sim in graph.near:
        if a not in position or b not in position:
            continue
        refs = [row_ref(splits, *where[position[a]]), row_ref(splits, *where[position[b]])]
        entry = {"kind": "near", "similarity": round(sim, 4), "rows": refs}
        (leaks if refs[0]["split"] != refs[1]["split"] else dup_near).append(entry)
    n_dup = sum(len(g["rows"]) - 1 for g in dup_exact) + len(dup_near)
    duplicates = {"severity": "warning" if n_dup else "info", "normalised_exact": dup_exact, "near": dup_near,
                  "threshold": cfg.near_duplicate_threshold, "measure": graph.similarity, "rows_affected": n_dup}
    # drop: copies of held-out rows never reach training, so a leak that involves training is a fault (blocking);
    # one between the user's own validation and test files is theirs to know (a warning)
    with_training = any(r["split"] == "train" for g in leaks for r in g["rows"])
    leak_sev = "info" if not leaks else ("blocking" if cfg.leakage == "block" or (cfg.leakage == "drop" and with_training)
                                         else "warning")
    leaked_rows = sorted({(r["split"], r["file"], r["row"]) for g in leaks for r in g["rows"] if r["split"] != "train"})
    # test rows whose copy sits in training: with audit.leakage allow, the test metrics are also given without them
    in_training = sorted({(r["file"], r["row"]) for g in leaks if any(x["split"] == "train" for x in g["rows"])
                          for r in g["rows"] if r["split"] == "test"})
    leakage = {"severity": leak_sev, "groups": leaks, "mode": cfg.leakage, "allowed": cfg.leakage != "block",
               "held_out_rows_leaked": len(leaked_rows),
               "test_rows_in_training": [{"file": f, "row": r} for f, r in in_training]}
    return duplicates, leakage


def decontamination(removed: list[dict], mode: str) -> dict:
    """Training rows left out because they copy a row of the user's validation or test file (audit.leakage: drop),
    each with the held-out row it matches."""
    rows = [r for r in removed if r["reason"] == HELD_OUT_COPY]
    if not rows:
        return {"severity": "info", "mode": mode, "rows": [],
                "summary": "no training row copies a held-out row" if mode == "drop" else f"audit.leakage: {mode}"}
    kinds = Counter(r["matches"]["kind"] for r in rows)
    against = sorted({f"{'test' if r['matches']['split'] == 'test' else 'validation'} file {r['matches']['file']}" for r in rows})
    return {"severity": "warning", "mode": mode, "rows": rows, "count": len(rows),
            "summary": f"{len(rows)} training rows left out as copies of held-out rows ({kinds.get('exact', 0)} exact, "
                       f"{kinds.get('near', 0)} near) of the {', '.join(against)}"}


def truncation(splits: Splits, token_lengths: dict[str, np.ndarray], max_length: int) -> dict:
    """`token_lengths`: each split's tokens per row before truncation."""
    out, sev = {}, "info"
    for name, ex in splits.items():
        lengths = np.asarray(token_lengths[name], dtype=np.int64)
        over = lengths > max_length
        lost = (lengths[over] - max_length) if over.any() else np.zeros(0)
        out[name] = {"rows": int(len(lengths)), "truncated": int(over.sum()),
                     "share": float(over.mean()) if len(lengths) else 0.0,
                     "mean_tokens_lost": float(lost.mean()) if len(lost) else 0.0,
                     "max_tokens": int(lengths.max()) if len(lengths) else 0,
                     "p95_tokens": int(np.percentile(lengths, 95)) if len(lengths) else 0,
                     "truncated_rows": [ex.rows[k] for k in np.flatnonzero(over)[:200].tolist()]}
        if out[name]["share"] > 0.05:
            sev = "warning"
    return {"severity": sev, "max_length": max_length, "splits": out}


def outliers(splits: Splits) -> dict:
    rows = []
    all_lengths = np.array([len(t) for _, ex in splits.items() for t in ex.texts])
    median = float(np.median(all_lengths)) if len(all_lengths) else 0.0
    long_cut = max(10 * median, float(np.percentile(all_lengths, 99.9)) if len(all_lengths) else 0.0, 200.0)
    for name, ex in splits.items():
        for k, text in enumerate(ex.texts):
            letters = sum(ch.isalpha() for ch in text)
            reason = None
            if letters < 2:
                reason = "no words (fewer than 2 letters)"
            elif letters / len(text) < 0.4:
                reason = f"mostly non-letters ({letters / len(text):.0%} letters)"
            elif len(text) > long_cut:
                reason = f"very long ({len(text)} chars; median {median:.0f})"
            if reason:
                rows.append({**row_ref(splits, name, k), "reason": reason})
    return {"severity": "warning" if rows else "info", "rows": rows, "median_chars": median}


def long_texts(cuts: list[dict]) -> dict:
    """Texts longer than data.max_text_chars, cut to it on reading (`cuts`: the data report's long_texts, each
    {file, row, field, chars, kept}): the model never sees their tail, and one such row could stall a run."""
    if not cuts:
        return {"severity": "info", "rows": [], "summary": "none over data.max_text_chars"}
    shown = ", ".join(f"row {c['row']} ({c['field']}, {c['chars']:,} chars)" for c in cuts[:5])
    more = f" and {len(cuts) - 5} more" if len(cuts) > 5 else ""
    return {"severity": "warning", "rows": cuts[:500], "count": len(cuts),
            "summary": f"{len(cuts)} texts over data.max_text_chars, cut to it before tokenising: {shown}{more}"}


def audit(splits: Splits, removed: list[dict], token_lengths: dict[str, np.ndarray] | None, max_length: int,
          cfg: AuditConfig, duplicates_graph: DuplicateGraph | None = None, task_sections: dict | None = None,
          cut_texts: list[dict] | None = None) -> dict:
    """The generic checks, with the task's own (`task_sections`: name -> section with a severity) among them.
    `token_lengths`: tokens per row of each split before truncation (None: the truncation check is skipped);
    `cut_texts`: the texts cut to data.max_text_chars on reading (the data report's long_texts)."""
    duplicates, leakage = duplicates_and_leakage(splits, cfg, duplicates_graph)
    report = {
        "leakage": leakage,
        "duplicates": duplicates,
        "truncation": truncation(splits, token_lengths, max_length) if token_lengths is not None else
        {"severity": "info", "skipped": "no tokenizer"},
        "outliers": outliers(splits),
        "long_texts": long_texts(cut_texts or []),
        "decontamination": decontamination(removed, cfg.leakage),
        "cleaning": {"severity": "info", "removed": [r for r in removed if r["reason"] != HELD_OUT_COPY],
                     "counts": dict(Counter(r["reason"] for r in removed if r["reason"] != HELD_OUT_COPY))},
    }
    report.update(task_sections or {})  # a task's section may replace a generic one (windows instead of truncation)
    levels = {name: section["severity"] for name, section in report.items()}
    report["summary"] = {"worst": _worst(*levels.values()), "checks": levels}
    return report


def summarise(name: str, s: dict) -> str:
    """One line saying what a check of the audit found."""
    if s.get("skipped"):
        return f"skipped: {s['skipped']}"
    if s.get("summary"):  # a task's own check says what it found
        return s["summary"]
    if name == "leakage":
        return f"{len(s['groups'])} groups, {s['held_out_rows_leaked']} held-out rows leaked" if s["groups"] else "none"
    if name == "duplicates":
        return f"{len(s['normalised_exact'])} normalised-exact groups, {len(s['near'])} near pairs ({s.get('measure', 'Jaccard')} >= {s['threshold']})"
    if name == "label_issues":
        return f"{len(s['rows'])} likely label errors ({s['share']:.1%})"
    if name == "truncation":
        return "; ".join(f"{k} {v['truncated']} of {v['rows']} over {s['max_length']} tokens" for k, v in s["splits"].items())
    if name == "class_balance":
        return "; ".join(s["problems"]) or f"train {s['counts']['train']}, ratio {s['imbalance_ratio']:.2f}"
    if name == "outliers":
        return f"{len(s['rows'])} rows (empty-ish, non-text or very long)"
    if name == "cleaning":
        return ", ".join(f"{k} {v}" for k, v in s["counts"].items()) or "nothing removed"
    return ""
