"""Causal LM's audit checks: the rendered template of the first examples with the trained tokens marked (the
dry run users ask for), truncation by max_length (completions cut, or cut entirely), texts cut into chunks,
and completions so few and short that the task is really classification."""
from __future__ import annotations

from collections import Counter

from tuneforge.tasks.causal_lm.encoding import IGNORE

MARK_OPEN, MARK_CLOSE = "[[", "]]"  # around the tokens the loss is on, in the preview
PREVIEW_EXAMPLES = 2


def marked(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The example decoded, with each run of trained tokens between [[ and ]]."""
    out, run, trained = [], [], False
    for t, lab in zip(ids, labels):
        on = lab != IGNORE
        if on != trained and run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if trained else text)
            run = []
        trained = on
        run.append(t)
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        out.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if trained else text)
    return "".join(out)


def sections(data, rendered: dict, tokenizer, max_length: int, template: bool, cfg) -> dict:
    """`rendered`: split -> per example, its encoded pieces (one, or a text's chunks)."""
    kind = data.report["kind"]
    train = rendered["train"]
    preview = [{"row": data.splits.train.rows[k], "rendered": marked(tokenizer, p[0].ids, p[0].labels)}
               for k, p in enumerate(train[:PREVIEW_EXAMPLES]) if p]
    out = {"template": {"severity": "info", "chat_template": template, "examples": preview,
                        "summary": (f"{'chat template' if template else 'no chat template (plain join)'}; the first "
                                    f"{len(preview)} training examples rendered in audit.json, trained tokens in "
                                    f"{MARK_OPEN} {MARK_CLOSE}"),
                        "display": "\n\n".join(f"row {p['row']}:\n{p['rendered']}" for p in preview)}}
    if kind == "text":
        chunks = {name: sum(len(p) for p in ex) for name, ex in rendered.items()}
        long = sum(len(p) > 1 for p in train)
        out["truncation"] = {"severity": "info", "max_length": max_length, "chunks": chunks, "texts_chunked": long,
                             "summary": f"nothing truncated: {long} training texts longer than {max_length} tokens are cut "
                                        f"into consecutive chunks ({chunks['train']} chunks in train)"}
        return out
    splits, cut_rows, sev = {}, [], "info"
    for name, ex in rendered.items():
        source = dict(data.splits.items())[name]
        lengths = [len(p[0].ids) for p in ex]
        over = [k for k, n in enumerate(lengths) if n > max_length]
        whole = [k for k in over if ex[k][0].prompt_len >= max_length]
        lost = [lengths[k] - max_length for k in over]
        splits[name] = {"rows": len(ex), "truncated": len(over), "completion_cut_entirely": len(whole),
                        "mean_tokens_lost": sum(lost) / len(lost) if lost else 0.0,
                        "max_tokens": max(lengths, default=0), "truncated_rows": [source.rows[k] for k in over[:200]]}
        cut_rows += [{"split": name, "file": source.source, "row": source.rows[k], "prompt_tokens": ex[k][0].prompt_len}
                     for k in whole]
        if len(ex) and len(over) / len(ex) > 0.05:
            sev = "warning"
    out["truncation"] = {"severity": sev, "max_length": max_length, "splits": splits,
                         "summary": "; ".join(f"{k} {v['truncated']} of {v['rows']} over {max_length} tokens (completion tail cut)"
                                              for k, v in splits.items())}
    out["completion_cut"] = {"severity": "blocking" if cut_rows else "info", "rows": cut_rows,
                             "summary": (f"{len(cut_rows)} rows whose prompt fills max_length {max_length}: no completion "
                                         "token left to learn or score (raise model.max_length or shorten them)")
                             if cut_rows else "none: every completion keeps tokens within max_length"}
    counts = Counter(data.splits.train.labels)
    short = sum(len(c.split()) <= 3 for c in data.splits.train.labels) / max(len(data.splits.train), 1)
    if len(counts) <= 20 and short > 0.9:
        out["closed_set"] = {"severity": "warning", "distinct_completions": len(counts),
                             "summary": (f"the completions take only {len(counts)} short values: this is classification; "
                                         "task text-classification trains a smaller, faster model for it (accuracy and "
                                         "macro-F1 are reported here too)")}
    return out
