"""Causal-LM data: prompt/completion pairs, OpenAI-style chats (`messages`), plain `text`, or preference pairs
(`chosen` / `rejected`, with a `prompt` or the turns they share), told apart by the columns present, validated
row by row (errors name the file, row and field), then split by the generic data stage. Duplicates and leakage
are judged on the prompt: the same question in train and test is a leak whatever the answers."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.clean import Examples, cut_long, is_null
from tuneforge.data.load import detect_format, file_sha256, parse_json, read_table, resolve_path
from tuneforge.errors import DataError, shown

ROLES = ("system", "user", "assistant")
KINDS = ("pair", "chat", "text", "preference")


@dataclass
class Conversation:
    """One example: `messages` (pair, chat and preference kinds: the completion is the last assistant turn; for a
    preference pair it is the chosen answer, and `rejected` the worse one) or `text`."""
    row: int
    kind: str
    messages: list[dict]
    text: str = ""
    rejected: str = ""

    @property
    def prompt(self) -> str:
        """What duplicates and leakage are judged on: the turns before the last answer, or the text."""
        if self.kind == "text":
            return self.text
        return "\n".join(m["content"] for m in self.messages[:-1] if m["role"] != "system") or self.messages[0]["content"]

    @property
    def completion(self) -> str:
        return "" if self.kind == "text" else self.messages[-1]["content"]


def detect_kind(columns: list[str], task, text_column: str, path: Path) -> str:
    """preference (chosen + rejected columns), pair (prompt + completion columns), chat (a messages column) or text
    (a text column)."""
    cols = set(map(str, columns))
    if task.chosen_column in cols or task.rejected_column in cols:
        missing = [c for c in (task.chosen_column, task.rejected_column) if c not in cols]
        if missing:
            other = task.rejected_column if missing[0] == task.chosen_column else task.chosen_column
            raise DataError(f"column '{missing[0]}' not found beside '{other}'; the columns are: {', '.join(sorted(cols))}",
                            path=path, column=missing[0], fix="preference data needs both a chosen and a rejected column "
                            "(or set task.chosen_column / task.rejected_column)")
        return "preference"
    if task.messages_column in cols:
        return "chat"
    if task.prompt_column in cols or task.completion_column in cols:
        missing = [c for c in (task.prompt_column, task.completion_column) if c not in cols]
        if missing:
            raise DataError(f"column '{missing[0]}' not found beside '{({task.prompt_column, task.completion_column} - set(missing)).pop()}'; "
                            f"the columns are: {', '.join(sorted(cols))}", path=path, column=missing[0],
                            fix="prompt/completion data needs both columns (or set task.prompt_column / task.completion_column)")
        return "pair"
    if text_column in cols:
        return "text"
    raise DataError(f"no causal-LM columns found; the columns are: {', '.join(sorted(cols)) or 'none'}", path=path,
                    fix=f"give '{task.prompt_column}' + '{task.completion_column}' (pairs), '{task.messages_column}' "
                        f"(chats: a list of {{role, content}}), '{text_column}' (plain text) or '{task.chosen_column}' + "
                        f"'{task.rejected_column}' (preference pairs) columns")


def _string(value, path: Path, row: int, field: str, allow_empty: bool = False) -> str:
    if is_null(value):
        raise DataError(f"{field} is missing (null)", path=path, row=row, column=field,
                        fix="fill it in or remove the row")
    if not isinstance(value, str):
        raise DataError(f"{field} is a {type(value).__name__} ({shown(value, 40)}), not a string", path=path, row=row,
                        column=field, fix="write the field as a JSON string")
    if not value.strip() and not allow_empty:
        raise DataError(f"{field} is empty", path=path, row=row, column=field,
                        fix="write the text the model should learn, or remove the row")
    return value


def _messages(value, path: Path, row: int, column: str, answer: bool = True, whole: bool = True) -> list[dict]:
    """A list of {role, content} messages; `answer`: ending with the assistant's turn (else: the turns before an
    answer, a preference pair's prompt); `whole`: a whole conversation, with a user turn (else: a preference side
    that follows its prompt)."""
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = parse_json(value)
        except ValueError as err:
            raise DataError(f"{column} is not a JSON list of messages ({err})", path=path, row=row, column=column,
                            fix='write [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]') from None
    if hasattr(value, "tolist"):  # Parquet lists arrive as numpy arrays
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{column} must be a non-empty list of {{role, content}} messages", path=path, row=row, column=column,
                        fix='write [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
    out = []
    for k, m in enumerate(value):
        where = f"{column}[{k}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} is a {type(m).__name__}, not a {{role, content}} object", path=path, row=row,
                            column=where, fix='each message is {"role": "user", "content": "..."}')
        if "role" not in m or is_null(m.get("role")):
            raise DataError(f"{where} has no role", path=path, row=row, column=f"{where}.role",
                            fix=f"give every message a role: one of {', '.join(ROLES)}")
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise DataError(f"{where}.role is {shown(m['role'])}, not one of {', '.join(ROLES)}", path=path, row=row,
                            column=f"{where}.role", fix=f"use the OpenAI roles: {', '.join(ROLES)}")
        content = _string(m.get("content"), path, row, f"{where}.content", allow_empty=m["role"] == "system")
        out.append({"role": m["role"], "content": content})
    if answer and out[-1]["role"] != "assistant":
        raise DataError(f"the conversation ends with a {out[-1]['role']} turn, not the assistant's", path=path, row=row,
                        column=column, fix="end each conversation with the assistant's answer (the text the model learns)")
    if not answer or not whole:
        return out
    if not any(m["role"] == "user" for m in out):
        raise DataError("the conversation has no user turn", path=path, row=row, column=column,
                        fix="put the user's message before the assistant's answer")
    if sum(m["role"] == "system" for m in out) > 1 or any(m["role"] == "system" for m in out[1:]):
        raise DataError("a system message may only come first", path=path, row=row, column=column,
                        fix="keep one system message, at the start of the conversation")
    return out


def read_conversations(path: Path, task, text_column: str, fmt: str, encoding: str, max_chars: int | None = None,
                       long_texts: list[dict] | None = None, sheet: str | int | None = None) -> tuple[list[Conversation], str]:
    """The file's examples and their kind; any bad row stops with its file, row and field. A prompt, completion,
    message or text longer than `max_chars` is cut to it, and noted in `long_texts`. `sheet`: of an .xlsx file."""
    df = read_table(path, fmt, encoding, sheet=sheet)
    kind = detect_kind(list(df.columns), task, text_column, path)
    out = []
    if kind == "chat":
        for i, value in enumerate(df[task.messages_column].tolist()):
            out.append(Conversation(i, kind, _messages(value, path, i, task.messages_column)))
    elif kind == "pair":
        for i, (p, c) in enumerate(zip(df[task.prompt_column].tolist(), df[task.completion_column].tolist())):
            prompt = _string(p, path, i, task.prompt_column)
            completion = _string(c, path, i, task.completion_column)
            out.append(Conversation(i, kind, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]))
    elif kind == "preference":
        prompts = df[task.prompt_column].tolist() if task.prompt_column in df.columns else [None] * len(df)
        for i, (p, c, r) in enumerate(zip(prompts, df[task.chosen_column].tolist(), df[task.rejected_column].tolist())):
            out.append(_preference(p, c, r, path, i, task))
    else:
        for i, t in enumerate(df[text_column].tolist()):
            out.append(Conversation(i, kind, [], _string(t, path, i, text_column)))
    if not out:
        raise DataError("the file holds no rows", path=path, fix="point data.path at a file with rows")
    if max_chars is not None:
        _cut_long(out, kind, task, text_column, max_chars, long_texts if long_texts is not None else [], str(path))
    return out, kind


def _is_messages(value) -> bool:
    """A list of messages (a list, a Parquet array, or JSON text of a list of objects), not an answer's text."""
    if isinstance(value, str):
        if not value.lstrip().startswith("[{"):
            return False
        try:
            value = parse_json(value)
        except ValueError:
            return False
    if hasattr(value, "tolist"):
        value = value.tolist()
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _answer_of(turns: list[dict], path: Path, row: int, column: str) -> str:
    """The one assistant message a preference side adds after the prompt's turns."""
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise DataError(f"{column} must add one assistant message after the prompt's turns; it adds "
                        f"{', '.join(m['role'] for m in turns) or 'nothing'}", path=path, row=row, column=column,
                        fix="give the shared turns as the prompt and one assistant answer on each side")
    return _string(turns[0]["content"], path, row, f"{column}[-1].content")


def _preference(prompt, chosen, rejected, path: Path, row: int, task) -> Conversation:
    """One preference pair: its prompt's turns, then the chosen answer; the rejected answer beside. Sides are strings
    or message lists (OpenAI format); without a prompt the prompt is what both sides share: their common leading
    turns, or (strings) their common leading words."""
    c_col, r_col, p_col = task.chosen_column, task.rejected_column, task.prompt_column
    lists = _is_messages(chosen), _is_messages(rejected)
    if lists[0] != lists[1]:
        raise DataError(f"{c_col} is {'a list of messages' if lists[0] else 'a string'} but {r_col} is "
                        f"{'a list of messages' if lists[1] else 'a string'}", path=path, row=row, column=r_col,
                        fix="write both answers the same way: two strings, or two lists of messages")
    have_prompt = prompt is not None and not is_null(prompt)
    if lists[0]:
        c_turns = _messages(chosen, path, row, c_col, whole=not have_prompt)
        r_turns = _messages(rejected, path, row, r_col, whole=not have_prompt)
        if have_prompt:
            turns = _messages(prompt, path, row, p_col, answer=False) if _is_messages(prompt) else \
                [{"role": "user", "content": _string(prompt, path, row, p_col)}]
            c_rest = c_turns[len(turns):] if c_turns[: len(turns)] == turns else c_turns
            r_rest = r_turns[len(turns):] if r_turns[: len(turns)] == turns else r_turns
        else:
            k = 0
            while k < min(len(c_turns), len(r_turns)) - 1 and c_turns[k] == r_turns[k]:
                k += 1
            turns, c_rest, r_rest = c_turns[:k], c_turns[k:], r_turns[k:]
        good, bad = _answer_of(c_rest, path, row, c_col), _answer_of(r_rest, path, row, r_col)
    else:
        good, bad = _string(chosen, path, row, c_col), _string(rejected, path, row, r_col)
        if have_prompt:
            turns = _messages(prompt, path, row, p_col, answer=False) if _is_messages(prompt) else \
                [{"role": "user", "content": _string(prompt, path, row, p_col)}]
        else:
            shared = os.path.commonprefix([good, bad])
            cut = max(shared.rfind(" "), shared.rfind("\n")) + 1  # whole words only
            if not shared[:cut].strip():
                raise DataError(f"there is no '{p_col}' column and {c_col} and {r_col} share no leading words to "
                                "take as the prompt", path=path, row=row, column=p_col,
                                fix=f"add a '{p_col}' column (or set task.prompt_column)")
            turns = [{"role": "user", "content": shared[:cut].strip()}]
            good, bad = _string(good[cut:], path, row, c_col), _string(bad[cut:], path, row, r_col)
    if not turns or turns[-1]["role"] == "assistant" or not any(m["role"] == "user" for m in turns):
        raise DataError("the prompt has no user turn before the answers" if not any(m["role"] == "user" for m in turns)
                        else "the prompt ends with the assistant's turn", path=path, row=row, column=p_col,
                        fix="the prompt is the conversation up to the answer: it holds a user turn and ends before "
                            "the assistant answers")
    if good.strip() == bad.strip():
        raise DataError(f"{c_col} and {r_col} are the same answer: the pair teaches nothing", path=path, row=row,
                        column=r_col, fix="give a worse answer as rejected, or remove the row")
    return Conversation(row, "preference", turns + [{"role": "assistant", "content": good}], rejected=bad)


def _cut_long(convs: list[Conversation], kind: str, task, text_column: str, limit: int, notes: list[dict],
              source: str) -> None:
    for c in convs:
        if kind == "text":
            c.text = cut_long(c.text, limit, notes, source, c.row, text_column)
            continue
        for k, m in enumerate(c.messages):
            if kind == "preference":
                field = task.chosen_column if k == len(c.messages) - 1 else task.prompt_column
            else:
                field = (task.prompt_column, task.completion_column)[k] if kind == "pair" else f"{task.messages_column}[{k}].content"
            m["content"] = cut_long(m["content"], limit, notes, source, c.row, field)
        if kind == "preference":
            c.rejected = cut_long(c.rejected, limit, notes, source, c.row, task.rejected_column)


def _dedupe(convs: list[Conversation], source: str) -> tuple[list[Conversation], list[dict]]:
    """Exact repeats of a whole example are dropped (the first is kept); the same prompt with other answers stays
    (several answers can be right) and the split keeps such rows together."""
    seen: dict[str, int] = {}
    kept, removed = [], []
    for c in convs:
        key = json.dumps([c.messages, c.text, c.rejected], ensure_ascii=False)
        if key in seen:
            removed.append({"file": source, "row": c.row, "reason": "duplicate", "detail": f"same example as row {seen[key]}"})
            continue
        seen[key] = c.row
        kept.append(c)
    return kept, removed


def _examples(convs: list[Conversation], source: str, kind: str) -> Examples:
    return Examples([c.prompt.strip() for c in convs], [c.completion.strip() for c in convs], [c.row for c in convs], source,
                    {"messages": [c.messages for c in convs], "text": [c.text for c in convs], "kind": [kind] * len(convs),
                     "rejected": [c.rejected for c in convs]})


def completion_counts(labels: list[str], max_shown: int = 20) -> dict[str, int]:
    """A split's completions as the data report counts them: each distinct one when they are few (a closed set,
    really labels), else how many there are."""
    counts = Counter(labels)
    if len(counts) <= max_shown:
        return dict(sorted(counts.items()))
    return {"(examples)": len(labels), "(distinct completions)": len(counts)}


def prepare(cfg):
    from tuneforge.data.prepare import assemble, held_out_files

    parts, files, removed, kinds, long_texts = {}, [], [], [], []
    for role, ref in {"main": cfg.data.path, **held_out_files(cfg.data)}.items():
        path = resolve_path(ref)
        convs, kind = read_conversations(path, cfg.task, cfg.data.text_column, cfg.data.format, cfg.data.encoding,
                                         cfg.data.max_text_chars, long_texts, sheet=cfg.data.sheet)
        kept, dropped = _dedupe(convs, str(path)) if role == "main" else (convs, [])  # held-out files: as given
        parts[role] = _examples(kept, str(path), kind)
        removed += dropped
        kinds.append(kind)
        files.append({"path": str(path), "format": detect_format(path, cfg.data.format), "sha256": file_sha256(path),
                      "rows_read": len(convs), "rows_kept": len(kept), "kind": kind}
                     | ({"role": role} if role != "main" else {}))
        if kind != kinds[0]:
            raise DataError(f"the {'test' if role == 'test' else 'validation'} file holds {kind} examples but the data "
                            f"file {kinds[0]}", path=path, fix="give every file the same columns")
    main = parts.pop("main")
    counts = Counter(main.labels)
    # closed-set completions (really labels) keep their shares in every split; free text needs no strata
    strata = list(main.labels) if len(counts) <= 20 and min(counts.values()) >= 2 else ["all"] * len(main)
    return assemble(main, parts, files, removed, cfg.data, cfg.audit.near_duplicate_threshold,
                    {"kind": kinds[0], "long_texts": long_texts},
                    completion_counts, strata=strata, leakage=cfg.audit.leakage)
