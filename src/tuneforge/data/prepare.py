"""The generic half of the data stage: a task's examples in, the duplicate graph, decontamination against the
user's own held-out files, leak-free group-aware splits and the `data_report.json` content out. Each task reads
its own files (tasks/<task>/data.py).

A validation or test file the user supplies is taken as given (its duplicates are reported, not removed, so its
score compares with anyone else's on the same file). Training rows that copy one of its rows (the audit's own
test: the same text after normalisation, or Jaccard >= audit.near_duplicate_threshold) are handled by
`audit.leakage`: `drop` leaves them out of training, each listed with the held-out row it matches; `block` keeps
them and the audit stops the run; `allow` trains on them and the test metrics are also given on the clean rows."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tuneforge.config import DataConfig
from tuneforge.data.clean import Examples
from tuneforge.data.neardup import DuplicateGraph, duplicate_graph
from tuneforge.data.split import Splits, content_hash, split

HELD_OUT_COPY = "held_out_copy"  # the removal reason of a training row left out as a copy of a held-out row
HELD_OUT_ROLES = ("val", "test")


@dataclass
class PreparedData:
    splits: Splits
    labels: list[str]
    report: dict
    duplicates: DuplicateGraph  # shared with the audit: MinHash runs once per run


def held_out_files(cfg: DataConfig) -> dict[str, str]:
    """The held-out files the user supplies, by role: {"val": data.val_path, "test": data.test_path} (those set)."""
    return {role: ref for role, ref in (("val", cfg.val_path), ("test", cfg.test_path)) if ref}


def held_out_matches(graph: DuplicateGraph, main_nodes: int) -> dict[int, dict]:
    """For each row of the data file (nodes 0..main_nodes-1) that copies a held-out row (the nodes after): the
    closest such row, as {"node", "kind" (exact | near), "similarity"}; exact copies first, then the most similar."""
    best: dict[int, dict] = {}

    def offer(node: int, other: int, kind: str, similarity: float) -> None:
        current = best.get(node)
        if current is None or (similarity, kind == "exact") > (current["similarity"], current["kind"] == "exact"):
            best[node] = {"node": other, "kind": kind, "similarity": similarity}

    for group in graph.exact:
        held = [n for n in group if n >= main_nodes]
        if held:
            for n in group:
                if n < main_nodes:
                    offer(n, held[0], "exact", 1.0)
    for a, b, sim in graph.near:
        if (a < main_nodes) != (b < main_nodes):
            mine, other = (a, b) if a < main_nodes else (b, a)
            offer(mine, other, "near", round(sim, 4))
    return best


def _decontaminate(main: Examples, graph: DuplicateGraph, roles: dict[str, tuple[str, int]], mode: str,
                   threshold: float) -> tuple[list[int], list[dict]]:
    """(the data file's rows kept for training, the removal records) under audit.leakage `mode`. `roles` maps a
    held-out node's (file, row) to its split name."""
    matches = held_out_matches(graph, len(main))
    if mode != "drop" or not matches:
        return list(range(len(main))), []
    removed = []
    for k in sorted(matches):
        m = matches[k]
        file, row = graph.keys[m["node"]]
        split_name = roles[(file, row)]
        what = graph.exact_means if m["kind"] == "exact" else \
            f"a near copy ({graph.similarity} {m['similarity']:.2f} >= {threshold})"
        removed.append({"file": main.source, "row": main.rows[k], "reason": HELD_OUT_COPY,
                        "detail": f"{what} of {'test' if split_name == 'test' else 'validation'} row {row} of {file}; "
                                  "left out of training (audit.leakage: drop)",
                        "matches": {"split": split_name, "file": file, "row": row, "kind": m["kind"],
                                    "similarity": m["similarity"]}})
    return [k for k in range(len(main)) if k not in matches], removed


def assemble(main: Examples, held: dict[str, Examples], files: list[dict], removed: list[dict], cfg: DataConfig,
             near_duplicate_threshold: float, report: dict, class_counts, strata: list[str] | None = None,
             leakage: str = "drop", find_duplicates=None) -> PreparedData:
    """The generic half of the data stage, for any task's examples: the duplicate graph (once), decontamination
    against the held-out files (`held`: "val" and/or "test" Examples the user supplied, taken as given), the
    group-aware split, and the data report. Rows of the data file that are duplicates or near duplicates (Jaccard
    >= `near_duplicate_threshold`, as the audit counts them) stay together in one split. `class_counts(labels)`
    counts a split's labels (classes, entity types); `strata` is the task's stratification key per row of `main`;
    `leakage` is audit.leakage (see the module docstring). `find_duplicates(examples, keys, threshold)` builds the
    duplicate graph over the rows of main and the held-out files in that order (default: texts, normalised and
    MinHashed; a task whose inputs are not text passes its own)."""
    held = {role: ex for role, ex in held.items() if ex is not None}
    parts = [main] + [held[r] for r in HELD_OUT_ROLES if r in held]
    keys = [(ex.source, r) for ex in parts for r in ex.rows]
    if find_duplicates is None:
        graph = duplicate_graph([t for ex in parts for t in ex.texts], keys, near_duplicate_threshold)
    else:
        graph = find_duplicates(parts, keys, near_duplicate_threshold)
    roles = {(held[r].source, row): r for r in HELD_OUT_ROLES if r in held for row in held[r].rows}
    kept, copies = _decontaminate(main, graph, roles, leakage, near_duplicate_threshold)
    if copies:
        main = main.subset(kept)
        strata = [strata[k] for k in kept] if strata is not None else None
    groups = graph.components(kept)
    splits = split(main, cfg.val_fraction, cfg.test_fraction, cfg.seed, test=held.get("test"), val=held.get("val"),
                   groups=groups, strata=strata)

    removed = sorted(removed + copies, key=lambda r: (r["file"], r["row"]))
    labels = sorted(class_counts(splits.train.labels))
    report = {
        "files": files,
        **report,
        "labels": labels,
        "removed_counts": dict(Counter(r["reason"] for r in removed)),
        "removed": removed,
        "stratified": splits.stratified,
        "test_source": "file" if "test" in held else "carved",
        "val_source": "file" if "val" in held else "carved",
        # training rows left out because they copy a row of the user's own validation or test file
        "decontamination": {"mode": leakage, "rows_left_out": len(copies),
                            "against": {r: held[r].source for r in held},
                            "by_kind": dict(Counter(c["matches"]["kind"] for c in copies))},
        # near-duplicate groups of the data file, each kept whole in one split (leak-free by construction)
        "duplicate_groups": {**splits.groups, "threshold": near_duplicate_threshold},
        "splits": {name: {"rows": len(ex), "class_counts": class_counts(ex.labels),
                          "sha256": content_hash(ex)} for name, ex in splits.items()},
    }
    report["test_sha256"] = report["splits"]["test"]["sha256"]
    unseen = sorted(set(class_counts(splits.test.labels)) - set(labels))
    if unseen:
        report["warnings"] = [f"test labels never seen in training: {unseen}; those rows can never be predicted right"]
    return PreparedData(splits=splits, labels=labels, report=report, duplicates=graph)
