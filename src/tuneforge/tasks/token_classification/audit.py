"""Token classification's audit checks: entity types too rare to learn or test, inconsistent tagging (one
surface string with several types, or tagged in one sentence and left O in another), tags repaired on
reading, and the windows long sentences need (they are split, never truncated)."""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from tuneforge.config import AuditConfig
from tuneforge.tasks.token_classification.sentence import entities

_MAX_SURFACE = 6  # words: longer entities are not looked for untagged elsewhere


def sections(data, tokenizer, max_length: int, stride: int, cfg: AuditConfig) -> dict:
    splits = data.splits
    return {"entity_types": entity_types(splits, cfg), "inconsistent_tagging": inconsistent_tagging(splits),
            "tag_repairs": tag_repairs(data.report.get("scheme_repairs", [])),
            "truncation": windows_needed(splits, tokenizer, max_length)}


def entity_types(splits, cfg: AuditConfig) -> dict:
    counts = {name: dict(sorted(Counter(k for tags in ex.labels for k, _, _ in entities(list(tags))).items()))
              for name, ex in splits.items()}
    problems = []
    for kind in sorted(set().union(*counts.values())):
        if counts["train"].get(kind, 0) < cfg.min_train_rows_per_class:
            problems.append(f"type {kind!r} has {counts['train'].get(kind, 0)} training entities (< {cfg.min_train_rows_per_class}): too few to learn")
        if counts["test"].get(kind, 0) < cfg.min_test_rows_per_class:
            problems.append(f"type {kind!r} has {counts['test'].get(kind, 0)} test entities (< {cfg.min_test_rows_per_class}): too few to test")
    summary = "; ".join(problems[:3]) + (f"; +{len(problems) - 3} more" if len(problems) > 3 else "") if problems \
        else f"train {counts['train']}"
    return {"severity": "warning" if problems else "info", "counts": counts, "problems": problems, "summary": summary}


def inconsistent_tagging(splits) -> dict:
    """Surface strings (an entity's words, case kept) tagged with several types, or left untagged elsewhere."""
    types: dict[tuple, Counter] = defaultdict(Counter)
    where: dict[tuple, list] = defaultdict(list)
    for name, ex in splits.items():
        for k, (tokens, tags) in enumerate(zip(ex.extras["tokens"], ex.labels)):
            for kind, s, e in entities(list(tags)):
                surface = tuple(tokens[s:e])
                types[surface][kind] += 1
                where[surface].append({"split": name, "file": ex.source, "row": ex.rows[k], "type": kind})
    mixed = [{"text": " ".join(s), "types": dict(c), "rows": where[s][:10]} for s, c in types.items() if len(c) > 1]
    untagged: Counter = Counter()
    example: dict[tuple, dict] = {}
    for name, ex in splits.items():
        for k, (tokens, tags) in enumerate(zip(ex.extras["tokens"], ex.labels)):
            for n in range(1, _MAX_SURFACE + 1):
                for s in range(0, len(tokens) - n + 1):
                    surface = tuple(tokens[s:s + n])
                    if surface in types and all(t == "O" for t in tags[s:s + n]):
                        untagged[surface] += 1
                        example.setdefault(surface, {"split": name, "file": ex.source, "row": ex.rows[k]})
    missed = [{"text": " ".join(s), "tagged": sum(types[s].values()), "untagged": n, "example": example[s]}
              for s, n in untagged.most_common(200)]
    share = len(mixed) / max(len(types), 1)
    return {"severity": "warning" if mixed or missed else "info", "mixed_types": mixed, "tagged_and_untagged": missed,
            "share_of_surfaces_with_several_types": round(share, 4),
            "summary": f"{len(mixed)} strings tagged with several types; {len(untagged)} strings tagged in one place "
                       f"and O in another"}


def tag_repairs(repairs: list[dict]) -> dict:
    return {"severity": "warning" if repairs else "info", "repairs": repairs[:500], "count": len(repairs),
            "summary": f"{len(repairs)} invalid tag transitions repaired on reading (task.strict: true refuses them)"
            if repairs else "no invalid tag transitions"}


def windows_needed(splits, tokenizer, max_length: int) -> dict:
    """Sentences longer than max_length sub-words: they are split into overlapping windows, never cut."""
    out = {}
    for name, ex in splits.items():
        tokens = ex.extras["tokens"]
        lengths = np.array([len(x) for x in tokenizer(tokens, is_split_into_words=True, truncation=False,
                                                      verbose=False)["input_ids"]]) if tokens else np.zeros(0, int)
        long = np.flatnonzero(lengths > max_length)
        out[name] = {"rows": int(len(lengths)), "need_windows": int(len(long)), "max_tokens": int(lengths.max()) if len(lengths) else 0,
                     "rows_needing_windows": [ex.rows[k] for k in long[:200].tolist()]}
    summary = "; ".join(f"{k} {v['need_windows']} of {v['rows']} over {max_length} sub-words (windowed)" for k, v in out.items())
    return {"severity": "info", "max_length": max_length, "splits": out, "summary": summary}
