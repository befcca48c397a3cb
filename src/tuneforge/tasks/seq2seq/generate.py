"""Running an encoder-decoder: sources and targets encoded for training (labels end with EOS; a leading start token
is dropped, the model puts it before the decoder's inputs itself), the training batch, per-example loss for
validation and perplexity, and batched generation (greedy or beam; sources of similar length together). The
predictor wraps these for evaluation, `tuneforge predict` and serving."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tuneforge.models.infer import autocast, collate as pad_inputs, length_batches

IGNORE = -100
TARGET_PAD_MULTIPLE = 8   # decoder widths, as the loop pads the inputs: few shapes keep CPU kernels' memory flat
LOGITS_BUDGET = 1 << 25   # logit elements one loss forward may hold (target positions x vocabulary)
KEPT_MULTIPLE = 32        # the output head's rows (target tokens of a batch) are padded to a multiple of this


def encode_sources(tokenizer, texts: list[str], prefix: str, max_length: int | None) -> list[list[int]]:
    """Each source with the task's prefix, as the encoder reads it (cut to `max_length` tokens, special tokens kept)."""
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    return [list(x) for x in tokenizer([prefix + t for t in texts], **kwargs)["input_ids"]]


class Target(list):
    """A target's token ids as the decoder learns them, with the decoder's start token beside them (`start`): the
    decoder reads start + target[:-1] and predicts target."""

    def __init__(self, ids, start: int):
        super().__init__(ids)
        self.start = start

    def __reduce__(self):  # pickled (sent to the other processes) with its start token
        return (Target, (list(self), self.start))


def encode_targets(tokenizer, texts: list[str], max_length: int | None, start_id: int,
                   eos_id: int | None = None) -> list[Target]:
    """Each target as the decoder learns it: its tokens and EOS (`eos_id`, added where the tokenizer adds none; cut to
    `max_length`), without a leading token equal to the decoder's start (BERT's [CLS]: the decoder reads the start
    token before the target anyway)."""
    out = []
    for ids in tokenizer(text_target=list(texts), add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if len(ids) > 1 and ids[0] == start_id:
            ids = ids[1:]
        if eos_id is not None and (not ids or ids[-1] != eos_id):
            ids.append(eos_id)
        if max_length and len(ids) > max_length:
            ids = ids[: max_length - 1] + ids[-1:]  # the end token stays: generation learns where to stop
        out.append(Target(ids, start_id))
    return out


def batch(examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Sources padded (with their attention mask) to the widest row; the decoder's inputs (its start token, then the
    target but its last token) padded with `pad_id` and the labels (each target, Target) with -100, to the longest
    target. The decoder inputs are given, not left to the model: every architecture's forward then runs with or
    without labels alike."""
    out = pad_inputs([e["input_ids"] for e in examples], pad_id, multiple=pad_to_multiple_of)
    width = max(len(e["labels"]) for e in examples)
    width = -(-width // TARGET_PAD_MULTIPLE) * TARGET_PAD_MULTIPLE
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    decoder = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for r, e in enumerate(examples):
        target = e["labels"]
        labels[r, : len(target)] = torch.as_tensor(target, dtype=torch.long)
        decoder[r, : len(target)] = torch.as_tensor([target.start, *target[:-1]], dtype=torch.long)
    out["decoder_input_ids"], out["labels"] = decoder, labels
    return out


def kept_logits(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """The logits at the positions `keep` marks (rows x target positions), [kept, vocabulary]: the decoder's hidden
    states are cut to those positions on their way into the output head (a forward pre-hook on the model's output
    embeddings), so target padding costs no vocabulary-sized logits, forward or backward (measured on the BERT2BERT,
    batch 16: a training step's forward and backward 10-20% faster). A model without output embeddings to hook runs
    its head everywhere and the logits are cut after."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model  # DDP hides it
    head = inner.get_output_embeddings()
    if head is None:
        return model(**batch).logits[keep]
    flat = torch.nonzero(keep.reshape(-1), as_tuple=True)[0]
    n = len(flat)
    # the head's rows rounded up to a multiple of KEPT_MULTIPLE (repeating the first): a new matmul shape at every
    # step costs the CPU kernels memory they never give back (the loop pads its widths for the same reason)
    rows = min(-(-n // KEPT_MULTIPLE) * KEPT_MULTIPLE, keep.numel())
    flat = torch.cat([flat, flat[:1].expand(rows - n)]) if rows > n else flat

    def only_targets(module, args):
        hidden = args[0]
        if hidden.shape[:2] != keep.shape:
            return None
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(hidden.device)), *args[1:])

    handle = head.register_forward_pre_hook(only_targets)
    try:
        logits = model(**batch).logits
    finally:
        handle.remove()
    return logits[:n] if logits.dim() == 2 else logits[keep]


def target_loss(model, batch: dict) -> torch.Tensor:
    """The training loss: mean cross-entropy over the target tokens of a batch, the same as the model's own (tested),
    with the output head run on the target tokens only (kept_logits)."""
    labels = batch.pop("labels")
    keep = labels != IGNORE
    if not keep.any():  # nothing to learn in this batch: a zero loss with a graph, not NaN
        return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
    return torch.nn.functional.cross_entropy(kept_logits(model, batch, keep).float(), labels[keep])


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(getattr(model.config, "vocab_size", 1) or 1)


def loss_batches(sources: list[list[int]], targets: list[list[int]], batch_size: int, vocab: int) -> list[np.ndarray]:
    """Rows of similar source length together (at most `batch_size`), cut so a batch's target positions times the
    vocabulary stay within LOGITS_BUDGET (one row at least)."""
    cap = max(1, LOGITS_BUDGET // max(vocab, 1))
    out = []
    for idx in length_batches([len(s) for s in sources], batch_size, call_cost=256):
        chunk, used = [], 0
        for i in idx.tolist():
            if chunk and used + len(targets[i]) > cap:
                out.append(np.array(chunk))
                chunk, used = [], 0
            chunk.append(i)
            used += len(targets[i])
        out.append(np.array(chunk))
    return out


@torch.no_grad()
def example_losses(model, sources: list[list[int]], targets: list[list[int]], pad_id: int, batch_size: int = 32,
                   precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(summed negative log-likelihood of the target tokens, target tokens) per example."""
    device = next(model.parameters()).device
    model.eval()
    nll, count = np.zeros(len(sources)), np.zeros(len(sources), dtype=np.int64)
    for idx in loss_batches(sources, targets, batch_size, _vocab_size(model)):
        b = {k: v.to(device) for k, v in batch([{"input_ids": sources[i], "labels": targets[i]} for i in idx], pad_id).items()}
        labels = b.pop("labels")
        keep = labels != IGNORE
        with autocast(device, precision):
            logits = kept_logits(model, b, keep)
        per_token = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="none")
        row = torch.nonzero(keep, as_tuple=True)[0]  # each kept position's row, in the order the logits come
        nll[idx] = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, row.cpu(), per_token.double().cpu()).numpy()
        count[idx] = keep.sum(1).cpu().numpy()
    return nll, count


def mean_loss(nll: np.ndarray, count: np.ndarray) -> float:
    return float(nll.sum() / max(int(count.sum()), 1))


def perplexity(loss: float) -> float:
    return float(math.exp(min(loss, 50.0)))


@torch.no_grad()
def generate_ids(model, sources: list[list[int]], pad_id: int, stops: list[int], max_new_tokens: int,
                 num_beams: int = 1, batch_size: int = 16, precision: str = "fp32") -> list[tuple[list[int], bool]]:
    """(the generated token ids, up to and without an end token, the start token and a forced first token left out;
    whether an end token ended it) per source, in input order. Decoding is the export's (model.decoding): the
    checkpoint's own min_length, length penalty or repetition rules (a summariser's, say) do not apply, so the untuned
    baseline, validation, evaluation and a plain `generate` on the export all decode alike."""
    import copy

    from tuneforge.tasks.seq2seq.model import decoding

    device = next(model.parameters()).device
    model.eval()
    config = copy.deepcopy(model.generation_config)
    config.update(**decoding({"eos_token_id": list(stops), "pad_token_id": pad_id}, num_beams, max_new_tokens))
    forced = getattr(config, "forced_bos_token_id", None)
    out: list[tuple[list[int], bool]] = [([], False)] * len(sources)
    for idx in length_batches([len(s) for s in sources], batch_size, call_cost=64):
        b = pad_inputs([sources[i] for i in idx], pad_id, device)
        with autocast(device, precision):
            gen = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], generation_config=config)
        for r, i in enumerate(idx):
            new = gen[r, 1:].tolist()  # the first is the decoder's start token
            if forced is not None and new[:1] == [forced]:  # BART's forced <s>: not output the model chose
                new = new[1:]
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            out[i] = ([t for t in new if t != pad_id], False) if cut is None else (new[:cut], True)
    return out


class Seq2SeqPredictor:
    """A fine-tuned (or pre-trained) encoder-decoder with its tokenizer and the run's settings (prefix, max_length,
    num_beams, max_new_tokens): `generate(texts)` and `predict(texts)` give {"generation", "finish_reason",
    "output_tokens", "max_tokens"} per text; finish_reason "length" when max_tokens ran out before the end token."""

    def __init__(self, model, tokenizer, settings: dict, device, precision: str = "fp32"):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.device, self.precision = device, precision
        ids = settings["ids"]  # decoder start, end and pad tokens (model.special_ids)
        self.eos_id, self.pad_id = ids["eos_token_id"], ids["pad_token_id"]
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.stops = sorted({self.eos_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})

    @classmethod
    def load(cls, model_dir: Path, device="cpu", precision: str = "fp32") -> "Seq2SeqPredictor":
        import json

        from tuneforge.artifacts import SETTINGS_KEY
        from tuneforge.models.device import resolve_device, resolve_precision
        from tuneforge.models.load import load_tokenizer
        from tuneforge.tasks.seq2seq.model import load_seq2seq, special_ids

        model_dir = Path(model_dir)
        device = resolve_device(device)
        precision, _ = resolve_precision(precision, device)
        settings = json.loads((model_dir / "config.json").read_text()).get(SETTINGS_KEY, {})
        model = load_seq2seq(model_dir).to(device)
        model.eval()
        tokenizer = load_tokenizer(model_dir)
        return cls(model, tokenizer, {**settings, "ids": special_ids(model_dir, tokenizer)}, device, precision)

    @property
    def labels(self):
        return []

    @property
    def max_new_tokens(self) -> int:
        return int(self.settings.get("max_new_tokens") or 64)

    def sources(self, texts: list[str]) -> list[list[int]]:
        return encode_sources(self.tokenizer, texts, self.settings.get("prefix", ""), self.settings.get("max_length"))

    def generate(self, texts: list[str], max_new_tokens: int | None = None, batch_size: int = 16,
                 num_beams: int | None = None) -> list[dict]:
        return self.generate_from(self.sources(texts), max_new_tokens, batch_size, num_beams)

    def generate_from(self, sources: list[list[int]], max_new_tokens: int | None = None, batch_size: int = 16,
                      num_beams: int | None = None) -> list[dict]:
        """As generate, from sources already encoded (prefix and cut included)."""
        max_new = max_new_tokens or self.max_new_tokens
        beams = num_beams or int(self.settings.get("num_beams") or 1)
        ids = generate_ids(self.model, sources, self.pad_id, self.stops, max_new, beams, batch_size, self.precision)
        return [{"generation": self.tokenizer.decode(x, skip_special_tokens=True).strip(),
                 "finish_reason": "stop" if stopped else "length", "output_tokens": len(x), "max_tokens": max_new}
                for x, stopped in ids]

    def predict(self, texts: list[str], batch_size: int = 16) -> list[dict]:
        return self.generate(texts, batch_size=batch_size)
