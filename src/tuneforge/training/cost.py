"""What a run will cost on this hardware, said before training starts.

Measured, not guessed: a short warm-up runs forward+backward on the run's own batches at three widths
(per-token cost grows with the width) and one AdamW step on copies of the trainable weights; summed
over the planned batches that gives the training time. The warm-up's peak memory plus the optimizer's
state gives the memory.
"""
from __future__ import annotations

import resource
import time

import numpy as np
import torch

from tuneforge.models.infer import autocast
from tuneforge.training.loop import TrainData, default_loss, make_batches, training_batch

_TAIL_SECONDS = 1.5  # reload, report (matplotlib plots) and model card, measured here: 0.4-1 s
_DISK_BYTES_PER_SECOND = 100e6  # export writes fp32 weights, the final evaluation reads them back


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _fwd_bwd(model, data: TrainData, idx, pad_id, device, precision, loss_fn) -> float:
    batch = training_batch(data, idx, pad_id, device)
    t0 = time.perf_counter()
    with autocast(device, precision):
        loss = loss_fn(model, batch)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _optimizer_seconds(model, max_grad_norm: float = 1.0) -> float:
    """One clipped AdamW step over copies of the trainable weights (the model's own are not touched). For a
    full fine-tune on short texts it is a third of the step: measured on MiniLM, tweets, batch 32."""
    params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    if not params:
        return 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4)
    opt.step()  # allocates the moments
    t0 = time.perf_counter()
    for _ in range(2):
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    return (time.perf_counter() - t0) / 2


@torch.no_grad()
def _forward_seconds(model, data: TrainData, idx, pad_id, device, precision: str = "fp32") -> float:
    """One inference pass on a batch: at fp32 (the final evaluation scores the fp32 export) or at the training
    precision (validation)."""
    batch = training_batch(data, idx, pad_id, device)
    batch.pop("labels")
    model.eval()
    t0 = time.perf_counter()
    with autocast(device, precision):
        model(**batch)
    seconds = time.perf_counter() - t0
    model.train()
    return seconds


def estimate(model, *args, **kwargs) -> dict:
    """`_estimate`, leaving the random state as it found it: the warm-up's dropout draws must not change
    the training that follows (the same seed trains the same model whether or not it was estimated)."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return _estimate(model, *args, **kwargs)
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _estimate(model, ids: list[list[int]], targets: np.ndarray, *, batch_size: int, seed: int, group_by_length: bool,
              total_steps: int, grad_accum: int, eval_rows_tokens: int, n_evals: int, infer_tokens: int,
              pad_id: int, precision: str, seconds_so_far: float = 0.0, positions: list | None = None,
              loss_fn=default_loss, world: int = 1) -> dict:
    """Estimated seconds and peak memory of the whole run; `model` is left with zero gradients.

    With `world` processes each computes its 1/world slice of every batch, measured here with this process's own
    threads (cores / world on CPU); the gradient all-reduce is not counted (its share grows with the processes).

    Parts: what the run has spent already (data, audit, baselines: measured), training (warm-up steps
    times the planned padded tokens), evaluation (validation passes at the training precision, the final
    test pass at fp32, as the exported model is scored) and the tail (export, reload, report)."""
    device = next(model.parameters()).device
    data = TrainData(ids, targets, positions)
    lengths = np.array([len(x) for x in ids])
    batches = make_batches(lengths.tolist(), batch_size, seed, 0, group_by_length)
    widths = np.array([lengths[b].max() for b in batches])
    padded = np.array([len(b) for b in batches]) * widths
    largest = int(padded.argmax())
    typical = int(np.argsort(padded)[len(padded) // 2])
    by_width = np.argsort(widths, kind="stable")
    probes = sorted({typical, int(by_width[int(0.9 * (len(by_width) - 1))]), int(by_width[-1])}, key=lambda k: widths[k])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()

    def per_token_of(k: int, repeats: int) -> float:
        return min(_fwd_bwd(model, data, batches[k], pad_id, device, precision, loss_fn) for _ in range(repeats)) / padded[k]

    first = per_token_of(largest, 1) * padded[largest]  # warms up the kernels, and sets the peak memory
    repeats = 2 if first < 2.0 else 1  # an LLM's packed batch takes seconds: once is enough, and cheaper
    probes = sorted({int(widths[k]): k for k in probes}.values(), key=lambda k: widths[k])  # packed rows: one width
    # a token costs more in a wider batch (attention; measured on MiniLM here, bf16: 145 us at width 32, 437 at
    # 256, 780 at 448), so the cost is measured at the median, 90th-percentile and widest batch and interpolated
    measured = [(float(widths[k]), per_token_of(k, repeats)) for k in probes]
    model.zero_grad(set_to_none=True)
    per_token_at = np.interp(widths, [w for w, _ in measured], [c for _, c in measured])
    per_token = float(per_token_at[typical])
    steps_seconds = float((padded * per_token_at).mean()) * grad_accum * total_steps / world
    steps_seconds += _optimizer_seconds(model) * total_steps
    per_token_fp32_infer = min(_forward_seconds(model, data, batches[typical], pad_id, device)
                               for _ in range(repeats)) / padded[typical]
    # a forward is a third of forward+backward for a full fine-tune but half of it for LoRA (no weight gradients):
    # validation is measured, not assumed
    per_token_infer = per_token_fp32_infer if precision == "fp32" else min(
        _forward_seconds(model, data, batches[typical], pad_id, device, precision) for _ in range(repeats)) / padded[typical]

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer_bytes = 2 * 4 * trainable  # AdamW keeps two fp32 moments per trainable weight
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() + optimizer_bytes
    else:
        peak = _rss_bytes() + optimizer_bytes
    train_s = steps_seconds
    validation_s = per_token_infer * eval_rows_tokens * n_evals
    eval_s = validation_s + per_token_fp32_infer * infer_tokens
    tail_s = _TAIL_SECONDS + 4 * sum(p.numel() for p in model.parameters()) / _DISK_BYTES_PER_SECOND
    return {"seconds_so_far": float(seconds_so_far), "seconds_train": float(train_s), "seconds_eval": float(eval_s),
            "seconds_validation": float(validation_s),
            "seconds_export_and_report": float(tail_s),
            "seconds_total": float(seconds_so_far + train_s + eval_s + tail_s), "peak_memory_bytes": int(peak),
            "device": device.type, "precision": precision, "seconds_per_1k_tokens": float(per_token * 1000),
            "trainable_parameters": int(trainable)}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _rss_bytes()


def matmul_flops(precision: str = "fp32", seconds: float = 0.3) -> float:
    """Measured matmul FLOP/s of this machine at `precision` (a quick probe for `tuneforge models`)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def seconds_per_1k_examples(non_embedding_params: int, flops: float, tokens_per_example: int = 48,
                            efficiency: float = 0.75) -> float:
    """Full fine-tuning: ~6 FLOPs per weight per token (forward 2, backward 4); `efficiency` measured on
    MiniLM-L6 here (real steps reach ~75% of peak matmul speed)."""
    return 6 * non_embedding_params * tokens_per_example * 1000 / (flops * efficiency)
