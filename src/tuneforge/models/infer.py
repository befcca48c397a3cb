"""Tokenize, batch and run a model for inference. Shared by evaluation, `predict` and serving.

Rows are sorted by length and cut into batches that minimise padded tokens plus a per-forward cost
(`length_batches`); results come back in input order. On a CPU the encoder is compute-bound, so every
padding token is time: for 16 random review-length texts this runs 1.9x faster than one padded batch.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def token_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Tokens per text before any truncation (special tokens included)."""
    if not texts:
        return np.zeros(0, dtype=np.int64)
    return np.array([len(x) for x in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]])


AUTO_MAX_LENGTH_CAP = 256  # a token costs ~3x at width 256 and ~5.4x at 448 what it costs at 32 (MiniLM fwd+bwd,
#                            bf16, 2 cores): beyond this, set model.max_length yourself
AUTO_MAX_LENGTH_COVERAGE = 98  # percent of training texts that fit whole


def resolve_max_length(requested: int | None, train_lengths: np.ndarray, tokenizer, model_dir) -> tuple[int, str]:
    """(max_length, why): the configured value, or one that fits 98% of the training texts whole."""
    if requested is not None:
        return requested, "model.max_length"
    import json

    limits = [AUTO_MAX_LENGTH_CAP]
    if 0 < (tokenizer.model_max_length or 0) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    positions = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    if positions:
        limits.append(int(positions))
    p = float(np.percentile(train_lengths, AUTO_MAX_LENGTH_COVERAGE)) if len(train_lengths) else 32.0
    chosen = min(min(limits), max(32, -(-int(np.ceil(p)) // 32) * 32))
    return chosen, f"fits {AUTO_MAX_LENGTH_COVERAGE}% of training texts (cap {min(limits)})"


INFER_PAD_MULTIPLE = 8  # inference pads widths to a multiple of this: few distinct shapes keep a server's
#                         memory flat (measured: unpadded widths made a server grow +338 MB and rising over 1,200 batches)
FORWARD_COST_TOKENS = 64  # one forward call costs about as much as this many extra padded tokens (measured on
#                           MiniLM, 2 CPU cores: 32-256 all within 10% of the best; 64 was best at batch 16 and 64)
GPU_FORWARD_COST_TOKENS = 4096  # an accelerator is launch-bound at these sizes: padding is cheap, calls are not


def forward_cost(device: torch.device) -> int:
    return FORWARD_COST_TOKENS if device.type == "cpu" else GPU_FORWARD_COST_TOKENS


def collate(ids: list[list[int]], pad_id: int, device=None, multiple: int = 1) -> dict[str, torch.Tensor]:
    width = max(len(x) for x in ids)
    width = -(-width // multiple) * multiple
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def length_batches(lengths: list[int], max_batch: int, multiple: int = INFER_PAD_MULTIPLE,
                   call_cost: int = FORWARD_COST_TOKENS) -> list[np.ndarray]:
    """Row indices cut into batches of at most `max_batch`, minimising padded tokens + `call_cost` per batch.

    Rows are sorted by length, so an optimal cut is a split of the sorted order into runs: dynamic
    programming over the cut points (O(rows x max_batch), vectorised over the inner loop).
    """
    order = np.argsort(lengths, kind="stable")
    n = len(order)
    widths = -(-np.asarray(lengths, dtype=np.int64)[order] // multiple) * multiple
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        lo = max(0, j - max_batch)
        starts = np.arange(lo, j)
        cost = best[lo:j] + (j - starts) * widths[j - 1] + call_cost  # rows starts..j-1, padded to the widest
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], lo + k
    batches, j = [], n
    while j > 0:
        batches.append(order[cut[j]:j])
        j = int(cut[j])
    return batches[::-1]


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_CAST_BY_AUTOCAST = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                     torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def _autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _autocast_weights(model, frozen_only: bool = False):
    """(module, name, parameter) for each fp32 weight and bias that autocast casts at every forward pass: those of
    Linear and convolution layers (norms and embeddings it keeps fp32); `frozen_only`: those without gradients."""
    for module in model.modules():
        if isinstance(module, _CAST_BY_AUTOCAST):
            for name in ("weight", "bias"):
                param = module._parameters.get(name)
                if param is not None and param.dtype == torch.float32 and not (frozen_only and param.requires_grad):
                    yield module, name, param


def hold_autocast_weights(model, precision: str) -> int:
    """Cast once, in place, the weights autocast would cast at every forward pass (Linear and convolution layers,
    weight and bias) to `precision`'s dtype; norms and embeddings stay fp32, as autocast keeps them. Under autocast
    the outputs are the same (the same rounding, done once); the per-call cast goes: MiniLM at batch 1 on a 2-core
    EPYC with avx512_bf16, 7.3 -> 5.4 ms. Returns the number of tensors cast (0 for fp32)."""
    dtype = _autocast_dtype(precision)
    if dtype is None:
        return 0
    cast = 0
    for _, _, param in list(_autocast_weights(model)):
        param.data = param.data.to(dtype)
        cast += 1
    return cast


class FrozenWeightsCast:
    """Training's counterpart of hold_autocast_weights: the *frozen* Linear and convolution weights (and biases)
    that autocast casts afresh at every forward pass (it caches only weights that take gradients) held at
    `precision`'s dtype while `hold()` is in force, the fp32 originals put back by `release()`. The copies are made
    once (frozen weights do not change) and put back by the next `hold()`. Trainable weights are left to autocast
    (the optimizer updates their fp32 values). A frozen output head tied to the input embeddings gets its own
    low-precision copy; the embedding lookup keeps the fp32 table, as autocast does.

    Under autocast the outputs are the same. On SmolLM2-135M with LoRA (2-core AMD EPYC, avx512_bf16) the casts were
    ~110 ms of a 700 ms step, 50 ms of it the tied 49k x 576 head (bench/profile_steps.py). CPU weights only: the
    fp32 originals stay in memory beside the copies (+2 bytes a frozen weight while training), which host memory
    affords and an accelerator's, where a large model's frozen weights are most of the memory, may not; there
    autocast's per-forward casts are also cheap, and nothing was measured."""

    def __init__(self, model, precision: str):
        self.model, self.dtype = model, _autocast_dtype(precision)
        self.kept: list[tuple[torch.nn.Module, str, torch.nn.Parameter, torch.nn.Parameter]] = []
        self.held = False

    def hold(self) -> int:
        """Put the low-precision copies in place (cast on the first call; a no-op at fp32 or while held); returns
        how many tensors are held."""
        if self.dtype is not None and not self.kept:
            self.kept = [(module, name, param, torch.nn.Parameter(param.detach().to(self.dtype), requires_grad=False))
                         for module, name, param in _autocast_weights(self.model, frozen_only=True)
                         if param.device.type == "cpu"]
        for module, name, _, copy in self.kept:
            module._parameters[name] = copy
        self.held = True
        return len(self.kept)

    def release(self) -> None:
        """The fp32 weights back in place (the same Parameter objects: ties and optimizer state untouched)."""
        if self.held:
            for module, name, param, _ in self.kept:
                module._parameters[name] = param
        self.held = False

    def __enter__(self) -> "FrozenWeightsCast":
        self.hold()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id (0 without one: an image processor pads nothing)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else 0


@torch.no_grad()
def predict_logits(model, ids: list[list[int]], pad_id: int, batch_size: int = 64,
                   precision: str = "fp32", device: torch.device | None = None) -> np.ndarray:
    """Logits for each row, in input order. The model is left in eval mode."""
    device = device or next(model.parameters()).device
    model.eval()
    out: np.ndarray | None = None
    for idx in length_batches([len(x) for x in ids], batch_size, call_cost=forward_cost(device)):
        with autocast(device, precision):
            logits = model(**collate([ids[i] for i in idx], pad_id, device, INFER_PAD_MULTIPLE)).logits
        logits = logits.float().cpu().numpy()
        if out is None:
            out = np.zeros((len(ids), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


@torch.no_grad()
def mean_pooled(encoder, ids: list[list[int]], pad_id: int, batch_size: int = 64,
                precision: str = "fp32", device: torch.device | None = None) -> np.ndarray:
    """Mean of the last hidden states over real tokens: the frozen encoder's sentence embedding."""
    device = device or next(encoder.parameters()).device
    encoder.eval()
    out = None
    for idx in length_batches([len(x) for x in ids], batch_size, call_cost=forward_cost(device)):
        batch = collate([ids[i] for i in idx], pad_id, device, INFER_PAD_MULTIPLE)
        with autocast(device, precision):
            hidden = encoder(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy()
        if out is None:
            out = np.zeros((len(ids), pooled.shape[1]), dtype=np.float32)
        out[idx] = pooled
    return out
