"""The data stage end to end: files in, clean stratified splits and `data_report.json` content out."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tuneforge.config import DataConfig, ClassificationTaskConfig
from tuneforge.data.clean import Examples, check_usable, clean
from tuneforge.data.load import detect_format, file_sha256, read_table, resolve_path
from tuneforge.data.neardup import DuplicateGraph, duplicate_graph
from tuneforge.data.split import Splits, content_hash, split


@dataclass
class PreparedData:
    splits: Splits
    labels: list[str]
    report: dict
    duplicates: DuplicateGraph  # shared with the audit: MinHash runs once per run


def _class_counts(labels: list, multi_label: bool) -> dict[str, int]:
    flat = [lab for labs in labels for lab in labs] if multi_label else labels
    return dict(sorted(Counter(flat).items()))


def _load_clean(ref: str, cfg: DataConfig, task: ClassificationTaskConfig, extra_columns: list[str]):
    path = resolve_path(ref)
    df = read_table(path, cfg.format, cfg.encoding)
    result = clean(df, cfg, task, path, extra_columns)
    check_usable(result.examples, result.removed, path, cfg, task.multi_label)
    info = {"path": str(path), "format": detect_format(path, cfg.format), "sha256": file_sha256(path),
            "rows_read": result.rows_read, "rows_kept": len(result.examples)}
    return result, info


def prepare_data(cfg: DataConfig, task: ClassificationTaskConfig, extra_columns: list[str] = (),
                 near_duplicate_threshold: float = 0.8) -> PreparedData:
    """Table data (a text column and a label column): read, clean, split. `extra_columns` (e.g. eval.slices)
    travel with the rows without being model inputs."""
    main, main_info = _load_clean(cfg.path, cfg, task, list(extra_columns))
    files, removed = [main_info], list(main.removed)
    test = None
    if cfg.test_path:
        test_result, test_info = _load_clean(cfg.test_path, cfg, task, list(extra_columns))
        files.append(test_info)
        removed += test_result.removed
        test = test_result.examples
    report = {"multi_label": task.multi_label}
    return assemble(main.examples, test, files, removed, cfg, near_duplicate_threshold, report,
                    lambda labels: _class_counts(labels, task.multi_label))


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
