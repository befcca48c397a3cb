"""The generic half of the data stage: a task's examples in, the duplicate graph, leak-free group-aware
splits and the `data_report.json` content out. Each task reads its own files (tasks/<task>/data.py)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tuneforge.config import DataConfig
from tuneforge.data.clean import Examples
from tuneforge.data.neardup import DuplicateGraph, duplicate_graph
from tuneforge.data.split import Splits, content_hash, split


@dataclass
class PreparedData:
    splits: Splits
    labels: list[str]
    report: dict
    duplicates: DuplicateGraph  # shared with the audit: MinHash runs once per run


def assemble(main: Examples, test: Examples | None, files: list[dict], removed: list[dict], cfg: DataConfig,
             near_duplicate_threshold: float, report: dict, class_counts, strata: list[str] | None = None) -> PreparedData:
    """The generic half of the data stage, for any task's examples: the duplicate graph (once), the
    group-aware split, and the data report. Rows of the data file that are duplicates or near duplicates
    (Jaccard >= `near_duplicate_threshold`, as the audit counts them) stay together in one split; a test
    file given by the user is taken as it is. `class_counts(labels)` counts a split's labels (classes,
    entity types); `strata` is the task's stratification key per row of `main`."""
    parts = [main] + ([test] if test is not None else [])
    graph = duplicate_graph([t for ex in parts for t in ex.texts],
                            [(ex.source, r) for ex in parts for r in ex.rows], near_duplicate_threshold)
    groups = graph.components(list(range(len(main))))
    splits = split(main, cfg.val_fraction, cfg.test_fraction, cfg.seed, test=test, groups=groups, strata=strata)

    labels = sorted(class_counts(splits.train.labels))
    report = {
        "files": files,
        **report,
        "labels": labels,
        "removed_counts": dict(Counter(r["reason"] for r in removed)),
        "removed": removed,
        "stratified": splits.stratified,
        "test_source": "file" if test is not None else "carved",
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
