"""Preference tuning of the causal LM: DPO (and IPO, length-normalised DPO) on pairs of a chosen and a rejected answer
to one prompt.

- Encoding: each side is the prompt's turns plus its answer, rendered as SFT renders a chat; the loss is on the
  answer's tokens only. Training rows pack whole pairs (chosen then rejected, positions restarting at each), best fit
  decreasing into rows of max_length (a pair longer than that has a row of its own): both sides of a pair, and
  several pairs, go through one forward without seeing each other (transformers builds the block-diagonal mask from
  the position restarts, as for SFT rows). Rows no wider than that keep the attention the mask throws away small: on
  the demo, rows of 2 x max_length trained at 198 tokens/s and held 5.6 GiB.
- Reference: the starting model's log-probabilities of each side, computed once before training (one forward over
  the pairs, before any adapter exists): under LoRA that is the model with its adapters off, under a full fine-tune
  the weights as loaded, and neither keeps a second copy of the model in memory.
- Loss: a mean over pairs, so `loss_units` is the pairs in a row and the loop's accumulation and process weights
  keep a step's gradient that of the whole batch's mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tuneforge.tasks.causal_lm.encoding import IGNORE, Encoded


@dataclass
class PairEncoded:
    chosen: Encoded
    rejected: Encoded


class PreferenceRows(list):
    """Training rows of packed pairs: per row {"labels", "segments" (2j + side of the row's j-th pair per labelled token,
    -1 elsewhere), "pairs" (the pairs' indices), "reference" (their reference log-probs, once computed)}. Beside them:
    the rows' position ids, the pairs in each row (what the loss averages over) and the pairs themselves."""

    def __init__(self, targets: list[dict], positions: list[list[int]], pairs: list[PairEncoded]):
        super().__init__(targets)
        self.positions = positions
        self.units = [len(t["pairs"]) for t in targets]
        self.pairs = pairs
        self.reference: np.ndarray | None = None

    def set_reference(self, reference: np.ndarray) -> None:
        self.reference = reference
        for t in self:
            t["reference"] = reference[t["pairs"]].tolist()


class HeldOutPairs(list):
    """A validation or test split's pairs (one per row), with their reference log-probs once computed."""

    def __init__(self, pairs: list[PairEncoded], reference: np.ndarray | None = None):
        super().__init__(pairs)
        self.row_of = list(range(len(pairs)))
        self.reference = reference

    def subset(self, positions: list[int]) -> "HeldOutPairs":
        ref = None if self.reference is None else self.reference[np.asarray(positions, dtype=np.int64)]
        return HeldOutPairs([self[i] for i in positions], ref)


def answer_only(enc: Encoded) -> Encoded:
    """The loss on the last answer only (a chat's earlier assistant turns are prompt here)."""
    return Encoded(enc.ids, [IGNORE] * enc.prompt_len + enc.labels[enc.prompt_len:], enc.prompt_len, enc.truncated)


def pack_pairs(pairs: list[PairEncoded], capacity: int, enabled: bool = True) -> tuple[list[list[int]], PreferenceRows]:
    """Input ids and PreferenceRows of whole pairs packed best fit decreasing into rows of `capacity` tokens (a pair
    longer than that alone in its row)."""
    from tuneforge.tasks.causal_lm.encoding import best_fit

    ids, targets, positions = [], [], []
    lengths = [len(p.chosen.ids) + len(p.rejected.ids) for p in pairs]
    for members in best_fit(lengths, capacity, enabled):
        row_ids, labels, segments, row_pos = [], [], [], []
        for j, k in enumerate(members):
            for side, e in enumerate((pairs[k].chosen, pairs[k].rejected)):
                row_ids += e.ids
                labels += [IGNORE] + e.labels[1:]  # nothing is predicted across a restart
                segments += [-1] + [2 * j + side if lab != IGNORE else -1 for lab in e.labels[1:]]
                row_pos += list(range(len(e.ids)))
        ids.append(row_ids)
        targets.append({"labels": labels, "segments": segments, "pairs": members})
        positions.append(row_pos)
    return ids, PreferenceRows(targets, positions, pairs)


def collate_pairs(examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """A batch of packed pair rows: input ids, labels and segments padded (segments renumbered across the batch),
    position ids in place of an attention mask, and the pairs' reference log-probs (pairs x [chosen, rejected])."""
    from tuneforge.models.infer import collate
    from tuneforge.tasks.causal_lm.encoding import packed_batch

    batch = collate([e["input_ids"] for e in examples], pad_id, multiple=pad_to_multiple_of)
    width = batch["input_ids"].shape[1]
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    segments = torch.full((len(examples), width), -1, dtype=torch.long)
    reference, offset = [], 0
    for r, e in enumerate(examples):
        t = e["labels"]
        labels[r, : len(t["labels"])] = torch.as_tensor(t["labels"], dtype=torch.long)
        seg = torch.as_tensor(t["segments"], dtype=torch.long)
        segments[r, : len(seg)] = torch.where(seg >= 0, seg + 2 * offset, seg)
        if "reference" not in t:
            raise RuntimeError("preference rows need their reference log-probs before training (task.before_training)")
        reference += t["reference"]
        offset += len(t["pairs"])
    batch["labels"], batch["segments"] = labels, segments
    batch["reference"] = torch.tensor(reference, dtype=torch.float32).reshape(-1, 2)
    return packed_batch(batch, [e["position_ids"] for e in examples])


def sequence_logps(model, batch: dict, labels: torch.Tensor, segments: torch.Tensor, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, labelled tokens) of each segment (pair side) of a packed batch. The output head runs on the
    labelled positions only (a boolean logits_to_keep), as for SFT."""
    target = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = target != IGNORE
    logits = model(**batch, logits_to_keep=keep).logits
    token = -F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target[target != IGNORE], reduction="none")
    seg = segments[:, 1:][target != IGNORE]
    logp = torch.zeros(n_sequences, dtype=token.dtype, device=token.device).index_add(0, seg, token)
    count = torch.zeros(n_sequences, dtype=token.dtype, device=token.device).index_add(0, seg, torch.ones_like(token))
    return logp, count


def objective(logp: torch.Tensor, count: torch.Tensor, reference: torch.Tensor, beta: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per pair, rewards per pair and side) from the policy's and the reference's log-probs (pairs x 2).

    sigmoid (DPO): -log sigmoid(beta (ratio_c - ratio_r)), ratio = log pi - log ref summed over the answer;
    sigmoid_norm: the same on per-token ratios; ipo: ((ratio_c - ratio_r) per token - 1 / (2 beta))^2 (as TRL, whose
    IPO averages over the answer's tokens). The reward is beta x the ratio the loss uses."""
    ratio = logp - reference.to(logp.dtype)
    if kind in ("sigmoid_norm", "ipo"):
        ratio = ratio / count.clamp(min=1)
    delta = ratio[:, 0] - ratio[:, 1]
    if kind == "ipo":
        per_pair = (delta - 1 / (2 * beta)) ** 2
    else:
        per_pair = -F.logsigmoid(beta * delta)
    return per_pair, beta * ratio.detach()


def preference_loss(beta: float, kind: str, sft_weight: float):
    """The training loss on collate_pairs batches: the mean over pairs of the preference loss, plus `sft_weight` x
    the chosen answer's mean token loss (also averaged over pairs, so the whole is a mean over pairs)."""

    def loss_fn(model, batch: dict) -> torch.Tensor:
        labels, segments, reference = batch.pop("labels"), batch.pop("segments"), batch.pop("reference")
        logp, count = sequence_logps(model, batch, labels, segments, 2 * len(reference))
        logp, count = logp.view(-1, 2), count.view(-1, 2)
        per_pair, _ = objective(logp, count, reference, beta, kind)
        if sft_weight:
            per_pair = per_pair + sft_weight * (-logp[:, 0] / count[:, 0].clamp(min=1))
        return per_pair.mean()

    return loss_fn


def pair_logps(model, pairs: list[PairEncoded], pad_id: int, batch_size: int, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(log-prob, answer tokens) of each pair's chosen and rejected answer (pairs x 2), each sequence alone in its row
    (the unpacked computation the packed loss is tested against)."""
    from tuneforge.tasks.causal_lm.generate import example_losses

    nll, count = example_losses(model, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, batch_size, precision)
    n = len(pairs)
    return -np.stack([nll[:n], nll[n:]], 1), np.stack([count[:n], count[n:]], 1).astype(float)


def preference_scores(logp: np.ndarray, count: np.ndarray, reference: np.ndarray | None, beta: float, kind: str) -> dict:
    """Per pair: `correct` (1 when the chosen answer is ranked above the rejected one, 0.5 for a tie) and `margin`
    (reward of chosen - reward of rejected). With a reference the ranking is the implicit reward's (as training
    defines it); without one, the log-probs' own (the reference model's ranking)."""
    if reference is None:
        score = logp
        margin = None
    else:
        _, rewards = objective(torch.as_tensor(logp, dtype=torch.float64), torch.as_tensor(count, dtype=torch.float64),
                               torch.as_tensor(reference, dtype=torch.float64), beta, kind)
        score = rewards.numpy()
        margin = score[:, 0] - score[:, 1]
    correct = (score[:, 0] > score[:, 1]) + 0.5 * (score[:, 0] == score[:, 1])
    return {"correct": correct.astype(float), "margin": margin}


def render_pairs(cfg, tokenizer, ex, template: bool) -> list[PairEncoded]:
    """Each pair of a split encoded: its prompt's turns (the system prompt first) with the chosen answer, and with
    the rejected one; the loss on the answer only."""
    from tuneforge.tasks.causal_lm.encoding import encode_chat, with_system

    out = []
    for k in range(len(ex)):
        messages = with_system(ex.extras["messages"][k], cfg.task.system_prompt)
        worse = messages[:-1] + [{"role": "assistant", "content": ex.extras["rejected"][k]}]
        out.append(PairEncoded(answer_only(encode_chat(tokenizer, messages, template)),
                               answer_only(encode_chat(tokenizer, worse, template))))
    return out


def encode_preference(cfg, tokenizer, space, splits, max_length: int) -> tuple[dict, dict]:
    """Training: whole pairs packed into rows of max_length (PreferenceRows; a longer pair alone in its row). Validation and test: one pair each
    (HeldOutPairs); ids hold each pair's tokens, chosen then rejected, for the cost estimate. A prompt that leaves no
    room for an answer within max_length stops here, naming its row."""
    from tuneforge.errors import DataError
    from tuneforge.tasks.causal_lm.encoding import fit, trainable

    ids, y = {}, {}
    for name, ex in splits.items():
        pairs = render_pairs(cfg, tokenizer, ex, space.template)
        for k, p in enumerate(pairs):
            if p.chosen.prompt_len >= max_length:
                raise DataError(f"the prompt is {p.chosen.prompt_len} tokens, which leaves no room for the answers within "
                                f"max_length {max_length}", path=ex.source, row=ex.rows[k], column=cfg.task.prompt_column,
                                fix="raise model.max_length, or shorten that prompt")
        pairs = [PairEncoded(fit(p.chosen, max_length), fit(p.rejected, max_length)) for p in pairs]
        if name == "train":
            pairs = [p for p in pairs if trainable(p.chosen) and trainable(p.rejected)]
            ids[name], y[name] = pack_pairs(pairs, max_length, cfg.task.packing)
            longest = max((len(p.chosen.ids) - p.chosen.prompt_len for p in pairs), default=48)
            space.max_new_tokens = cfg.task.max_new_tokens or min(256, int(np.ceil(1.25 * longest)))
        else:
            ids[name], y[name] = [p.chosen.ids + p.rejected.ids for p in pairs], HeldOutPairs(pairs)
    return ids, y


def compute_reference(cfg, y: dict, model, pad_id: int, precision: str) -> None:
    """The starting model's log-probs of the training and validation pairs, once (a search's trials share them)."""
    train, val = y["train"], y["val"]
    if train.reference is None:
        train.set_reference(pair_logps(model, train.pairs, pad_id, cfg.eval.batch_size, precision)[0])
    if val.reference is None:
        val.reference = pair_logps(model, list(val), pad_id, cfg.eval.batch_size, precision)[0]


def validator(cfg, val: HeldOutPairs, pad_id: int, precision: str):
    """Validation: the training objective on the validation pairs (selects the best step), with the preference accuracy
    and mean reward margin beside it."""
    t = cfg.task

    def validate(model) -> dict:
        logp, count = pair_logps(model, list(val), pad_id, cfg.eval.batch_size, precision)
        per_pair, rewards = objective(torch.as_tensor(logp), torch.as_tensor(count), torch.as_tensor(val.reference),
                                      t.beta, t.preference_loss)
        if t.sft_weight:
            per_pair = per_pair + t.sft_weight * torch.as_tensor(-logp[:, 0] / np.maximum(count[:, 0], 1))
        s = preference_scores(logp, count, val.reference, t.beta, t.preference_loss)
        return {"val_loss": float(per_pair.mean()), "val_preference_accuracy": float(s["correct"].mean()),
                "val_reward_margin": float(s["margin"].mean())}

    return validate
