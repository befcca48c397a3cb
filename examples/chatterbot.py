"""Write chatterbot-corpus's English dialogues (a PyPI package of YAML files) as chat JSONL for the causal-LM demo.

    python examples/chatterbot.py examples/data/assistant.jsonl     # then: tuneforge run examples/assistant.yaml

Each conversation becomes one `messages` row: its lines alternate user / assistant, ending with the assistant
(a trailing user line is dropped). The package is read as files, never imported.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import yaml

# everyday small talk in the bot's voice; coding and tech_support (long, template-heavy answers) and trivia
# (facts no test split can check a model on without having trained on them) are left out
CATEGORIES = ("ai", "botprofile", "computers", "emotion", "food", "gossip", "greetings", "health", "history", "humor",
              "literature", "money", "movies", "politics", "psychology", "science", "sports")
MAX_TURNS = 8  # one scripted "conversation" runs to 72 lines


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "english"


def conversations(categories=CATEGORIES) -> list[list[dict]]:
    out = []
    for name in categories:
        doc = yaml.safe_load((corpus_dir() / f"{name}.yml").read_text(encoding="utf-8"))
        for conv in doc.get("conversations") or []:
            lines = [str(x).strip() for x in conv if x is not None and str(x).strip()]
            lines = lines[: min(len(lines) // 2 * 2, MAX_TURNS)]
            if lines:
                out.append([{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(lines)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", nargs="?", default="examples/data/assistant.jsonl")
    args = ap.parse_args()
    rows = conversations()
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for messages in rows:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    print(f"{len(rows)} conversations written to {path}")


if __name__ == "__main__":
    main()
