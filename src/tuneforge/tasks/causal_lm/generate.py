"""Running a causal LM: the packed training loss (logits only where there is a label), per-example loss for
validation and perplexity, and batched greedy generation with a KV cache (left padding, rows of similar
length together). The predictor wraps these for evaluation, `tuneforge predict` and serving.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tuneforge.models.infer import autocast, length_batches
from tuneforge.tasks.causal_lm.encoding import IGNORE, Encoded, eos_id, prompt_ids, uses_template, with_system


def packed_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens of a (packed) batch. The output head runs only on the
    positions that predict a label (a boolean `logits_to_keep`): on a 49k-word vocabulary the head is a fifth
    of the forward pass, and most tokens of an instruction example are prompt."""
    labels = batch.pop("labels")
    target = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = target != IGNORE
    if not keep.any():  # nothing to learn in this batch: a zero loss with a graph, not NaN
        return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
    logits = model(**batch, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target[target != IGNORE])


def _rows(examples: list[Encoded], idx, pad_id: int, device) -> dict:
    width = max(len(examples[i].ids) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for r, i in enumerate(idx):
        n = len(examples[i].ids)
        ids[r, :n] = torch.tensor(examples[i].ids)
        labels[r, :n] = torch.tensor(examples[i].labels)
        mask[r, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@torch.no_grad()
def example_losses(model, examples: list[Encoded], pad_id: int, batch_size: int = 16, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(summed negative log-likelihood, labelled tokens) per example, each example alone in its row."""
    device = next(model.parameters()).device
    model.eval()
    nll, count = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    for idx in loss_batches(examples, batch_size, _vocab_size(model)):
        batch = _rows(examples, idx, pad_id, device)
        target = batch["labels"][:, 1:]
        keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        keep[:, :-1] = target != IGNORE  # the head only where a label is predicted, as in training
        if not keep.any():
            continue
        with autocast(device, precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                           logits_to_keep=keep).logits
        per_token = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target[target != IGNORE],
                                                      reduction="none")
        row = torch.nonzero(keep, as_tuple=True)[0]  # each kept position's row, in the order the logits come
        sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, row.cpu(), per_token.double().cpu())
        nll[idx] = sums.numpy()
        count[idx] = keep.sum(1).cpu().numpy()
    return nll, count


# Logit elements one loss forward may hold: the head's output over the vocabulary at each labelled position (49k words:
# 680 positions, 128 MB in fp32), and the loss makes a copy as large. Without it a batch of 64 plain-text chunks of 320
# tokens held 4 GB of logits twice: the run's peak memory (7 GiB), and a heap that stayed that large.
LOGITS_BUDGET = 1 << 25


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else int(getattr(model.config, "vocab_size", 1) or 1)


def loss_batches(examples: list[Encoded], batch_size: int, vocab: int, budget: int | None = None) -> list[np.ndarray]:
    """Batches of example indices for scoring: rows of similar length together (at most `batch_size`), cut further so
    that the labelled positions of a batch times the vocabulary stay within `budget` logit elements (one example at
    least)."""
    kept = [sum(1 for lab in e.labels[1:] if lab != IGNORE) for e in examples]
    cap = max(1, (LOGITS_BUDGET if budget is None else budget) // max(vocab, 1))
    out = []
    for idx in length_batches([len(e.ids) for e in examples], batch_size, call_cost=256):
        chunk, used = [], 0
        for i in idx.tolist():
            if chunk and used + kept[i] > cap:
                out.append(np.array(chunk))
                chunk, used = [], 0
            chunk.append(i)
            used += kept[i]
        out.append(np.array(chunk))
    return out


def mean_loss(nll: np.ndarray, count: np.ndarray) -> float:
    return float(nll.sum() / max(int(count.sum()), 1))


def perplexity(loss: float) -> float:
    return float(math.exp(min(loss, 50.0)))


@torch.no_grad()
@torch.no_grad()
def prompt_logprobs(model, prompts: list[list[int]], pad_id: int, batch_size: int = 16) -> tuple[list[np.ndarray], list[int]]:
    """Per prompt: the log-probabilities of the next token after it (the whole vocabulary) followed by those of each
    of its own tokens given the ones before (every position, so attention at each one counts); and its top next
    token. fp32; right-padded batches of similar length."""
    device = next(model.parameters()).device
    out: list = [None] * len(prompts)
    top: list = [0] * len(prompts)
    for idx in length_batches([len(p) for p in prompts], batch_size):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, :len(prompts[i])] = torch.tensor(prompts[i])
            mask[r, :len(prompts[i])] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1).cpu()
        for r, i in enumerate(idx):
            n = len(prompts[i])
            own = logp[r, torch.arange(n - 1), ids[r, 1:n]]
            out[i] = torch.cat([logp[r, n - 1], own]).numpy()
            top[i] = int(logp[r, n - 1].argmax())
    return out, top


def generate_ids(model, prompts: list[list[int]], pad_id: int, stop_ids: list[int], max_new_tokens: int,
                 batch_size: int = 16, precision: str = "fp32") -> list[list[int]]:
    """Greedy completions (new token ids, up to the first stop token) for each prompt, in input order. Prompts of
    similar length share a batch; each batch is left-padded and decoded with the KV cache."""
    device = next(model.parameters()).device
    model.eval()
    out: list[list[int]] = [[] for _ in prompts]
    for idx in length_batches([len(p) for p in prompts], batch_size, multiple=1, call_cost=64):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(prompts[i])
            ids[r, width - n:] = torch.tensor(prompts[i])
            mask[r, width - n:] = 1
        with autocast(device, precision):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                                 top_p=None, top_k=None, temperature=None)
        for r, i in enumerate(idx):
            new = gen[r, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
            out[i] = new[:cut]
    return out


def stop_ids(tokenizer, model_dir: Path | None = None) -> list[int]:
    """EOS and the chat template's end of turn (e.g. <|im_end|>), when it is its own token."""
    ids = [eos_id(tokenizer)]
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        import json

        eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        for t in eos if isinstance(eos, list) else [eos]:
            if t is not None and t not in ids:
                ids.append(int(t))
    for name in ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        t = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if t is not None and t not in ids:
            ids.append(int(t))
    return ids


class CompletionPredictor:
    """A fine-tuned (or base) causal LM with its tokenizer and the run's prompt settings: `complete_ids(prompts)`,
    `predict(texts)` (serving's and predict's shape: {"completion", "finish_reason", "completion_tokens",
    "max_tokens"} per text; finish_reason "length" when max_tokens ran out before a stop token)."""

    def __init__(self, model, tokenizer, settings: dict, device, precision: str = "fp32", stops: list[int] | None = None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.device, self.precision = device, precision
        self.template = uses_template(tokenizer, settings.get("chat_template", True))
        self.stops = stops or stop_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]

    @classmethod
    def load(cls, model_dir: Path, device="cpu", precision: str = "fp32") -> "CompletionPredictor":
        import json

        from tuneforge.artifacts import SETTINGS_KEY
        from tuneforge.tasks.causal_lm.model import load_causal_lm, load_lm_tokenizer

        from tuneforge.models.device import resolve_device, resolve_precision

        model_dir = Path(model_dir)
        device = resolve_device(device)
        precision, _ = resolve_precision(precision, device)  # auto: bf16 on a bf16 GPU or a fast-bf16 CPU
        settings = json.loads((model_dir / "config.json").read_text()).get(SETTINGS_KEY, {})
        tokenizer = load_lm_tokenizer(model_dir)
        model = load_causal_lm(model_dir).to(device)
        model.eval()
        return cls(model, tokenizer, settings, device, precision, stop_ids(tokenizer, model_dir))

    @property
    def labels(self):
        return []

    def cast_weights(self) -> None:
        """Hold the weights in the serving precision. Autocast alone re-casts every fp32 weight at every forward:
        for token-by-token decoding that cast was half of each step (measured with SmolLM2 on a 2-core EPYC
        with avx512_bf16: 140 ms per token against 68 for fp32 `generate`)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is not None and next(self.model.parameters()).dtype != dtype:
            self.model.to(dtype)

    def prompt_of(self, messages: list[dict]) -> list[int]:
        return prompt_ids(self.tokenizer, with_system(messages, self.settings.get("system_prompt")), self.template)

    def text_prompt(self, text: str) -> list[int]:
        """A user's text: a prefix to continue (text-trained model) or the user's message (instruction-tuned)."""
        if self.settings.get("format") == "text":
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return self.prompt_of([{"role": "user", "content": text}])

    @property
    def max_new_tokens(self) -> int:
        return int(self.settings.get("max_new_tokens") or 64)

    def fit_prompt(self, prompt: list[int]) -> list[int]:
        """The prompt's last max_length tokens (the run's), as generation for predict and evaluation sees it."""
        limit = int(self.settings.get("max_length") or 0)
        return prompt[-limit:] if limit and len(prompt) > limit else prompt

    def complete_details(self, prompts: list[list[int]], max_new_tokens: int | None = None,
                         batch_size: int = 16) -> list[dict]:
        """Greedy completions with how each ended: stop token, or max_new_tokens ("length")."""
        max_new = max_new_tokens or self.max_new_tokens
        ids = generate_ids(self.model, [self.fit_prompt(p) for p in prompts], self.pad_id, self.stops, max_new,
                           batch_size, self.precision)
        return [{"completion": self.tokenizer.decode(x, skip_special_tokens=True).strip(),
                 "finish_reason": "length" if len(x) >= max_new else "stop", "completion_tokens": len(x),
                 "max_tokens": max_new} for x in ids]

    def complete_ids(self, prompts: list[list[int]], max_new_tokens: int | None = None, batch_size: int = 16) -> list[str]:
        return [d["completion"] for d in self.complete_details(prompts, max_new_tokens, batch_size)]

    def predict(self, texts: list[str], batch_size: int = 16) -> list[dict]:
        return self.complete_details([self.text_prompt(t) for t in texts], batch_size=batch_size)
