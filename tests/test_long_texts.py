"""Huge texts: one over data.max_text_chars is cut to it on reading, in every task, and the audit lists it (long_texts)
by file, row and field, so a 10 MB cell can neither stall tokenising nor go unnoticed."""
import json

from rich.console import Console

from conftest import make_rows
from tuneforge.cli import main
from tuneforge.config import parse_config
from tuneforge.tasks.behaviour import get_task

TEN_MB = 10_000_000


def test_a_10mb_text_is_flagged_by_row_and_cut_before_tokenising(tmp_path, write_csv, base_config, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    from tuneforge.pipeline import prepare

    rows = make_rows(60)
    rows[7]["text"] = "good " * (TEN_MB // 5 - 1) + "great"  # 10,000,000 characters
    raw = base_config(write_csv(rows))
    cap = parse_config(raw).data.max_text_chars
    seen = []
    original = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text or []))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    prep = prepare(parse_config(raw), Console(quiet=True))
    assert seen and max(seen) <= cap < TEN_MB  # the audit's token lengths and the training encoding
    section = prep.audit["long_texts"]
    assert section["severity"] == "warning" and "row 7 (text, 10,000,000 chars)" in section["summary"]
    assert [(r["row"], r["field"], r["chars"], r["kept"]) for r in section["rows"]] == [(7, "text", TEN_MB, cap)]
    assert prep.audit["summary"]["checks"]["long_texts"] == "warning"

    out = tmp_path / "audit-out"  # the same through `tuneforge audit`, into audit.json
    args = ["audit", "--data", raw["data"]["path"], "--text-column", "text", "--label-column", "label",
            "--model", raw["model"]["name"], "--output", str(out)]
    assert main(args) == 0
    assert json.loads((out / "audit.json").read_text())["long_texts"]["rows"][0]["row"] == 7


def test_short_texts_leave_the_check_quiet(tmp_path, write_csv):
    cfg = parse_config({"data": {"path": str(write_csv(make_rows(30)))}})
    data = get_task(cfg.task.type).prepare(cfg)
    assert data.report["long_texts"] == []


def test_token_classification_cuts_a_long_sentence_at_a_word(tmp_path):
    lines = []
    for i in range(30):
        lines += ["Ada\tB-PER", "met\tO", f"w{i}\tO", ""]
    lines[4:4] = [f"w{k}\tO" for k in range(600)] + ["x" * 3000 + "\tO", ""]  # sentence 1: 600 words, then a huge token
    lines += ["y" * 5000 + "\tB-LOC", ""]                                          # a single 5,000-char word
    path = tmp_path / "d.conll"
    path.write_text("\n".join(lines))
    cfg = parse_config({"task": {"type": "token-classification"}, "data": {"path": str(path), "max_text_chars": 1000}})
    data = get_task(cfg.task.type).prepare(cfg)
    cuts = {r["row"]: r for r in data.report["long_texts"]}
    assert set(cuts) == {1, 31} and cuts[1]["field"] == "tokens" and cuts[1]["kept"] <= 1000
    every = [ex for _, ex in data.splits.items()]
    assert max(len(t) for ex in every for t in ex.texts) <= 1000
    assert max(len(" ".join(toks)) for ex in every for toks in ex.extras["tokens"]) <= 1000
    huge = next(ex.labels[k] for ex in every for k, r in enumerate(ex.rows) if r == 31)
    assert huge == ("B-LOC",)  # the word is cut, its tag kept


def test_causal_lm_cuts_a_long_message_and_text(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(30)]
    rows[4]["messages"][1]["content"] = "long " * 1000
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = parse_config({"task": {"type": "causal-lm"}, "data": {"path": str(path), "max_text_chars": 1000}})
    data = get_task(cfg.task.type).prepare(cfg)
    assert [(r["row"], r["field"], r["chars"]) for r in data.report["long_texts"]] == [(4, "messages[1].content", 5000)]
    assert max(len(m["content"]) for _, ex in data.splits.items() for msgs in ex.extras["messages"] for m in msgs) <= 1000

    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i} " + ("word " * 400 if i == 9 else "short")}) for i in range(30)))
    cfg = parse_config({"task": {"type": "causal-lm"}, "data": {"path": str(path), "max_text_chars": 1000}})
    data = get_task(cfg.task.type).prepare(cfg)
    assert [(r["row"], r["field"]) for r in data.report["long_texts"]] == [(9, "text")]
    assert max(len(t) for _, ex in data.splits.items() for t in ex.extras["text"]) <= 1000
