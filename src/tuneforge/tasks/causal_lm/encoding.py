"""Turn examples into token ids with the loss only on what the model should write, and pack them into rows.

- Pairs and chats go through the model's chat template when it has one (else a plain join): every assistant
  turn is trained, every other token is masked (-100). Each example ends with EOS (the template's end of turn
  counts when the tokenizer calls it EOS).
- Plain text is trained on every token and cut into consecutive chunks of max_length, never truncated.
- Packing: examples go into rows of max_length tokens, best fit decreasing; each keeps positions from 0, and the
  first label of each example is masked, so no example learns from the one before it in the row.
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]     # IGNORE where no loss
    prompt_len: int       # tokens before the (last) completion: what generation is given
    truncated: int = 0    # tokens cut off the end by max_length


def uses_template(tokenizer, wanted: bool) -> bool:
    return bool(wanted and getattr(tokenizer, "chat_template", None))


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        from tuneforge.errors import ModelNotFoundError

        raise ModelNotFoundError("the tokenizer has no EOS token", fix="use a causal-LM tokenizer that defines eos_token")
    return int(tokenizer.eos_token_id)


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


PLAIN_ROLES = {"system": "", "user": "User: ", "assistant": "Assistant: "}


def plain_prompt(messages: list[dict]) -> str:
    """Without a chat template, as text: a lone user message as it is (a pair's prompt); otherwise 'User: ...'
    lines ending 'Assistant: ' (the few-shot baseline's text; `plain_ids` is what training and generation use)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = [PLAIN_ROLES[m["role"]] + m["content"] for m in messages]
    return "\n".join(lines) + "\nAssistant: "


def plain_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Without a chat template, as tokens: a lone user message as it is (a pair's prompt); otherwise each turn
    tokenized on its own ('User: ...' lines; earlier answers end with EOS as they were trained), then
    'Assistant: '. Piece by piece, so the prefix of a longer conversation is the shorter one's tokens."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return list(tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"])
    ids: list[int] = []

    def piece(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=not ids)["input_ids"])

    for m in messages:
        if m["role"] == "assistant":
            ids += piece(PLAIN_ROLES["assistant"])
            ids += piece(m["content"]) + [eos_id(tokenizer)]
        else:
            ids += piece(PLAIN_ROLES[m["role"]] + m["content"] + "\n")
    return ids + piece(PLAIN_ROLES["assistant"])


def prompt_ids(tokenizer, messages: list[dict], template: bool) -> list[int]:
    """The tokens a model is given to write the next assistant turn (what generation starts from)."""
    if template:
        return _template_ids(tokenizer, messages, generation_prompt=True)
    return plain_ids(tokenizer, messages)


def encode_chat(tokenizer, messages: list[dict], template: bool) -> Encoded:
    """Ids and labels of a conversation: loss on each assistant turn (with its end-of-turn / EOS), nothing else."""
    eos = eos_id(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    prompt_len = 0
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k in turns:
        before = prompt_ids(tokenizer, messages[:k], template)
        if before[: len(ids)] != ids:
            from tuneforge.errors import ModelNotFoundError

            raise ModelNotFoundError("the chat template renders a conversation's start differently once it goes on, so the "
                                     "assistant's tokens cannot be told apart", fix="set task.chat_template: false")
        labels += [IGNORE] * (len(before) - len(ids))
        ids = list(before)
        prompt_len = len(ids)
        if template:
            full = _template_ids(tokenizer, messages[: k + 1], generation_prompt=False)
            answer = full[len(ids):]
        else:
            answer = list(tokenizer(messages[k]["content"], add_special_tokens=False)["input_ids"])
        if eos not in answer:
            answer.append(eos)
        ids += answer
        labels += answer
    return Encoded(ids, labels, prompt_len)


def encode_text(tokenizer, text: str, max_length: int) -> list[Encoded]:
    """A plain text, trained on every token, in consecutive chunks of at most max_length (the last ends with EOS)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"]) + [eos_id(tokenizer)]
    chunks = [ids[i: i + max_length] for i in range(0, len(ids), max_length)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:  # a lone EOS learns nothing (its first label is masked): give it
        chunks[-1] = ids[-2:]                     # the token before it as context
    return [Encoded(c, list(c), 0) for c in chunks if len(c) > 1]


def fit(enc: Encoded, max_length: int) -> Encoded:
    """Cut an example to max_length from the end (the audit reports what is lost; a prompt that does not fit is
    stopped before this)."""
    if len(enc.ids) <= max_length:
        return enc
    return Encoded(enc.ids[:max_length], enc.labels[:max_length], enc.prompt_len, len(enc.ids) - max_length)


def trainable(enc: Encoded) -> bool:
    """Whether any token is left to learn once the first label is masked (packing masks it)."""
    return any(lab != IGNORE for lab in enc.labels[1:])


def best_fit(lengths: list[int], capacity: int, enabled: bool = True) -> list[list[int]]:
    """Rows of item indices, best fit decreasing: each item goes into the fullest row it fits in. Disabled: one item a
    row, in order."""
    if not enabled:
        return [[k] for k in range(len(lengths))]
    rows: list[list[int]] = []
    free: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[k]
        fits = [r for r, room in enumerate(free) if room >= n]
        if fits:
            r = min(fits, key=lambda r: free[r])
            rows[r].append(k)
            free[r] -= n
        else:
            rows.append([k])
            free.append(capacity - n)
    return rows


def pack(examples: list[Encoded], max_length: int, enabled: bool = True) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(ids, labels, positions) per row of examples packed best fit decreasing. Disabled: one example a row
    (positions 0..n-1, padded per batch by the loop)."""
    ids, labels, positions = [], [], []
    for members in best_fit([len(e.ids) for e in examples], max_length, enabled):
        row_ids, row_labels, row_pos = [], [], []
        for k in members:
            e = examples[k]
            row_ids += e.ids
            row_labels += [IGNORE] + e.labels[1:]  # the first token is never predicted from the previous example
            row_pos += list(range(len(e.ids)))
        ids.append(row_ids)
        labels.append(row_labels)
        positions.append(row_pos)
    return ids, labels, positions


def packed_batch(batch: dict, positions: list[list[int]]) -> dict:
    """A training batch of packed rows (`batch`: padded input ids, attention mask, labels) with each row's position
    ids in place of the attention mask: transformers then builds a block-diagonal causal mask from the restarts,
    so the examples packed in a row never see each other. The padding continues as one more "example" (positions
    from 0) whose labels are all -100."""
    import torch

    width = batch["input_ids"].shape[1]
    position_ids = torch.zeros((len(positions), width), dtype=torch.long)
    for r, row in enumerate(positions):
        n = len(row)
        position_ids[r, :n] = torch.as_tensor(row, dtype=torch.long)
        position_ids[r, n:] = torch.arange(width - n)
    del batch["attention_mask"]
    batch["position_ids"] = position_ids
    batch["use_cache"] = False  # a cache would switch the packed mask off
    return batch
