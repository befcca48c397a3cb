"""What a run will cost on this hardware, said before training starts.

Measured, not guessed: a short warm-up runs forward+backward on the run's own batches at three widths
(per-token cost grows with the width) and one AdamW step on copies of the trainable weights; summed
over the planned batches that gives the training time. The warm-up's peak memory plus the optimizer's
state gives the memory.
"""
from __future__ import annotations

import math
import resource
import time

import numpy as np
import torch

from tuneforge.models.infer import FrozenWeightsCast, autocast
from tuneforge.training.loop import (TrainData, adamw, default_collate, default_loss, keep_freed_memory, make_batches,
                                     padded_width, training_batch)

_TAIL_SECONDS = 1.5  # reload, report (matplotlib plots) and model card, measured here: 0.4-1 s
_DISK_BYTES_PER_SECOND = 100e6  # export writes fp32 weights, the final evaluation reads them back


def _rss_bytes() -> int:
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


class PeakRSS:
    """The peak resident memory while the block runs, sampled every 2 ms from a thread (the process's lifetime
    peak, ru_maxrss, cannot be reset, and the block's peak is what one training step needs on top of the rest).
    Where /proc is missing, the lifetime peak stands in."""

    def __enter__(self) -> "PeakRSS":
        import threading

        self.peak = _current_rss() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            rss = _current_rss()
            if rss is None:
                return
            self.peak = max(self.peak, rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = _current_rss()
        self.peak = max(self.peak, now) if now is not None else _rss_bytes()


def _fwd_bwd(model, data: TrainData, idx, pad_id, device, precision, loss_fn, collate) -> float:
    batch = training_batch(data, idx, pad_id, device, collate)
    _sync(device)
    t0 = time.perf_counter()
    with autocast(device, precision):
        loss = loss_fn(model, batch)
    loss.backward()
    _sync(device)
    return time.perf_counter() - t0


def counted_flops(model, data: TrainData, idx, pad_id, device, precision, loss_fn, collate,
                  backward: bool = True) -> float:
    """The FLOPs of one forward and backward pass of batch `idx` as torch runs them (torch.utils.flop_counter:
    matrix multiplies, convolutions and attention, forward and backward): a frozen layer's missing weight gradients
    and LoRA's small extra matmuls count as what they compute; embedding lookups, norms and activations do not. The
    model's gradients are left to the caller. `backward=False`: the forward pass alone, without gradients (what a
    frozen reference model computes)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = training_batch(data, idx, pad_id, device, collate)
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        with torch.set_grad_enabled(backward), autocast(device, precision):
            loss = loss_fn(model, batch)
        if backward:
            loss.backward()
    return float(counter.get_total_flops())


def _cpu_attention_flops() -> dict:
    """torch's FLOP counter knows the GPU attention kernels, not the CPU's (SDPA runs
    _scaled_dot_product_flash_attention_for_cpu there): the same formulas for those."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:  # shapes: the counter passes them
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = fn
    return mapping


def _optimizer_seconds(model, max_grad_norm: float = 1.0) -> float:
    """One clipped AdamW step over copies of the trainable weights (the model's own are not touched). For a
    full fine-tune on short texts it is a third of the step: measured on MiniLM, tweets, batch 32."""
    params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    if not params:
        return 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = adamw(params, 1e-4)  # as training builds it (fused where it can be)
    opt.step()  # allocates the moments
    _sync(params[0].device)
    t0 = time.perf_counter()
    for _ in range(2):
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    _sync(params[0].device)
    return (time.perf_counter() - t0) / 2


def _sync(device: torch.device) -> None:
    """Waits for the GPU's queued kernels: a CUDA call returns before its work is done, a timer must not."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _forward_seconds(model, data: TrainData, idx, pad_id, device, precision: str = "fp32",
                     collate=default_collate) -> float:
    """One inference pass on a batch: at fp32 (the final evaluation scores the fp32 export) or at the training
    precision (validation)."""
    batch = training_batch(data, idx, pad_id, device, collate)
    batch.pop("labels")
    model.eval()
    _sync(device)
    t0 = time.perf_counter()
    with autocast(device, precision):
        model(**batch)
    _sync(device)
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
              loss_fn=default_loss, world: int = 1, collate=default_collate) -> dict:
    """Estimated seconds and peak memory of the whole run; `model` is left with zero gradients.

    With `world` processes each computes its 1/world slice of every batch, measured here with this process's own
    threads (cores / world on CPU); the gradient all-reduce is not counted (its share grows with the processes).

    Parts: what the run has spent already (data, audit, baselines: measured), training (warm-up steps
    times the planned padded tokens), evaluation (validation passes at the training precision, the final
    test pass at fp32, as the exported model is scored) and the tail (export, reload, report). `collate` and `loss_fn`
    are the task's, as the loop gets them."""
    device = next(model.parameters()).device
    data = TrainData(ids, targets, positions)
    lengths = np.array([len(x) for x in ids])
    batches = make_batches(lengths.tolist(), batch_size, seed, 0, group_by_length)
    widths = np.array([padded_width(int(lengths[b].max())) for b in batches])
    padded = np.array([len(b) for b in batches]) * widths
    largest = int(padded.argmax())
    typical = int(np.argsort(padded)[len(padded) // 2])
    by_width = np.argsort(widths, kind="stable")
    probes = sorted({typical, int(by_width[int(0.9 * (len(by_width) - 1))]), int(by_width[-1])}, key=lambda k: widths[k])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()

    def per_token_of(k: int, repeats: int) -> float:
        return min(_fwd_bwd(model, data, batches[k], pad_id, device, precision, loss_fn, collate) for _ in range(repeats)) / padded[k]

    peak_before = _rss_bytes()  # data, audit, baselines and the model so far
    keep_freed_memory()  # the steps as the loop runs them: freed memory kept, frozen weights held at the precision
    with FrozenWeightsCast(model, precision):
        with PeakRSS() as step_memory:
            first = per_token_of(largest, 1) * padded[largest]  # warms up the kernels, and sets the peak memory
        repeats = 2 if first < 2.0 else 1  # an LLM's packed batch takes seconds: once is enough, and cheaper
        probes = sorted({int(widths[k]): k for k in probes}.values(), key=lambda k: widths[k])  # packed rows: one width
        # a token costs more in a wider batch (attention; measured on MiniLM here, bf16: 145 us at width 32, 437 at
        # 256, 780 at 448), so the cost is measured at the median, 90th-percentile and widest batch and interpolated
        measured = [(float(widths[k]), per_token_of(k, repeats)) for k in probes]
        flops_per_position = counted_flops(model, data, batches[typical], pad_id, device, precision, loss_fn,
                                           collate) / padded[typical]
    model.zero_grad(set_to_none=True)
    per_token_at = np.interp(widths, [w for w, _ in measured], [c for _, c in measured])
    per_token = float(per_token_at[typical])
    steps_seconds = float((padded * per_token_at).mean()) * grad_accum * total_steps / world
    # the steps' GPU peak, read before the optimizer's timing allocates copies of the weights and their moments
    cuda_step_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    optimizer_s = _optimizer_seconds(model)
    steps_seconds += optimizer_s * total_steps
    per_token_fp32_infer = min(_forward_seconds(model, data, batches[typical], pad_id, device, collate=collate)
                               for _ in range(repeats)) / padded[typical]
    # a forward is a third of forward+backward for a full fine-tune but half of it for LoRA (no weight gradients):
    # validation is measured, not assumed
    per_token_infer = per_token_fp32_infer if precision == "fp32" else min(
        _forward_seconds(model, data, batches[typical], pad_id, device, precision, collate) for _ in range(repeats)) / padded[typical]

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() for p in model.parameters())
    # on top of the largest step: AdamW's two fp32 moments per trainable weight, the copy of the best validation
    # weights the loop keeps, and at the end the exported model loaded again in fp32 for the test evaluation while the
    # trained one is still held (the heap the steps grew is not given back in between); a LoRA model is merged on a
    # copy for the export, one more fp32 model (SmolLM2 LoRA: RSS rose 2.27 -> 3.30 GB after training, 7.7x weights)
    copies = 2 if hasattr(model, "merge_and_unload") else 1
    extra = 2 * 4 * trainable + 4 * trainable + copies * 4 * weights
    if device.type == "cuda":
        peak = cuda_step_peak + extra
    else:
        peak = max(peak_before, step_memory.peak + extra)
    train_s = steps_seconds
    validation_s = per_token_infer * eval_rows_tokens * n_evals
    eval_s = validation_s + per_token_fp32_infer * infer_tokens
    tail_s = _TAIL_SECONDS + 4 * sum(p.numel() for p in model.parameters()) / _DISK_BYTES_PER_SECOND
    return {"seconds_so_far": float(seconds_so_far), "seconds_train": float(train_s), "seconds_eval": float(eval_s),
            "seconds_validation": float(validation_s),
            "seconds_export_and_report": float(tail_s),
            "seconds_total": float(seconds_so_far + train_s + eval_s + tail_s), "peak_memory_bytes": int(peak),
            "device": device.type, "precision": precision, "seconds_per_1k_tokens": float(per_token * 1000),
            "trainable_parameters": int(trainable),
            # what the check against the real steps (EstimateCheck) predicts each step from
            "per_token_curve": [[w, c] for w, c in measured], "optimizer_seconds_per_step": float(optimizer_s),
            "world": world, "grad_accum": grad_accum,
            # utilisation: the model's FLOPs per trained position (a typical batch), and this device's matmul peak
            "flops_per_token": float(flops_per_position), "peak_flops_per_second": float(matmul_flops(precision, device))}


class EstimateCheck:
    """The estimate checked against the real training steps: each step's time against what the warm-up's per-token
    curve predicts for its batches. A busy moment during the warm-up (another process on the cores) inflates every
    timed step there, by several times on 2 cores; the real steps then run faster than predicted (or slower, if the
    machine got busy later). At a few points (the 8th step or 3% of the run, a quarter, half) the median ratio of the
    steps since the last check is compared with the current belief; off by more than `tolerance`, the whole run is
    estimated again from it and the measured evaluations, printed once, and kept in `est["corrected"]`."""

    def __init__(self, est: dict, total_steps: int, n_evals: int, print_fn, tolerance: float = 0.3):
        self.est, self.total, self.n_evals, self.print = est, total_steps, n_evals, print_fn
        self.tolerance = tolerance
        curve = est["per_token_curve"]
        self.widths, self.costs = [w for w, _ in curve], [c for _, c in curve]
        self.ratios: list[float] = []
        self.step_seconds = 0.0
        self.eval_seconds: list[float] = []
        self.scale = 1.0
        marks = {max(8, math.ceil(0.03 * total_steps)), math.ceil(0.25 * total_steps), math.ceil(0.5 * total_steps)}
        self.marks = sorted(m for m in marks if 5 <= m < total_steps)

    def predicted(self, shapes: list[tuple[int, int]]) -> float:
        """Seconds the warm-up predicts for a step of micro-batches of these (rows, width) shapes."""
        work = sum(rows * width * float(np.interp(width, self.widths, self.costs)) for rows, width in shapes)
        return work + self.est["optimizer_seconds_per_step"]

    def step(self, step: int, seconds: float, shapes: list[tuple[int, int]]) -> None:
        self.step_seconds += seconds
        self.ratios.append(seconds / max(self.predicted(shapes), 1e-9))
        if self.marks and step >= self.marks[0]:
            self.marks.pop(0)
            window = self.ratios[1:] if len(self.ratios) > 2 else self.ratios  # the very first step sets kernels up
            self.scale = float(np.median(window))
            self.ratios = []
            projected = self._projection(step)
            current = (self.est.get("corrected") or self.est)["seconds_total"]
            if abs(math.log(projected["seconds_total"] / current)) > math.log(1 + self.tolerance):
                self._correct(step, projected)

    def evaluated(self, seconds: float) -> None:
        self.eval_seconds.append(seconds)

    def _projection(self, step: int) -> dict:
        """The whole run from what training has shown by `step`: the steps run, the rest at the steps' speed, the
        evaluations at their measured length (before the first: the estimate's, at the steps' speed)."""
        est, left = self.est, (self.total - step) / self.total
        train = self.step_seconds + est["seconds_train"] * left * self.scale
        if self.eval_seconds:
            validation = float(np.mean(self.eval_seconds)) * self.n_evals
        else:
            validation = est["seconds_validation"] * self.scale
        test = (est["seconds_eval"] - est["seconds_validation"]) * self.scale
        tail = est["seconds_export_and_report"]
        return {"after_step": step, "ratio": round(self.scale, 3), "seconds_train": train,
                "seconds_validation": validation, "seconds_eval": validation + test, "seconds_export_and_report": tail,
                "seconds_so_far": est["seconds_so_far"],
                "seconds_total": est["seconds_so_far"] + train + validation + test + tail,
                "peak_memory_bytes": est["peak_memory_bytes"]}

    def _correct(self, step: int, projected: dict) -> None:
        was = (self.est.get("corrected") or self.est)["seconds_total"]
        self.est["corrected"] = projected
        if self.eval_seconds and abs(math.log(self.scale)) <= math.log(1 + self.tolerance):
            why = f"validation takes {projected['seconds_validation'] / max(self.est['seconds_validation'], 1e-9):.2f}x the time estimated"
        else:
            why = (f"the steps run {self.scale:.2f}x the time the warm-up measured"
                   + ("; the machine was busier during the warm-up" if self.scale < 1 else ""))
        self.print(f"[bold]estimate[/] corrected after step {step} ({why}): whole run ~{_fmt(projected['seconds_total'])} "
                   f"(training ~{_fmt(projected['seconds_train'])}), was {_fmt(was)}")


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def restated_for_steps(est: dict, steps: int, total: int) -> float:
    """The whole-run estimate for the steps actually run (early stopping ends a run before its planned steps)."""
    return est["seconds_total"] - (est["seconds_train"] + est["seconds_validation"]) * (1 - steps / total)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _rss_bytes()


def matmul_flops(precision: str = "fp32", device: torch.device | str = "cpu", seconds: float = 0.3, n: int = 1024) -> float:
    """Measured matmul FLOP/s of this device at `precision`: square n x n products for `seconds` (the peak a run's
    utilisation is the share of; `tuneforge models` prints it)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device = torch.device(device)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def utilisation(est: dict | None, tokens: int, train_seconds: float) -> dict | None:
    """Achieved model FLOP/s of a training (the estimate's FLOPs per trained position x the real tokens trained per
    second: padding is not counted as work) beside the device's measured matmul peak at the run's precision."""
    if not est or not est.get("flops_per_token") or train_seconds <= 0:
        return None
    achieved = est["flops_per_token"] * tokens / train_seconds
    peak = est["peak_flops_per_second"]
    return {"flops_per_token": est["flops_per_token"], "achieved_flops_per_second": achieved,
            "peak_flops_per_second": peak, "precision": est["precision"], "share_of_peak": achieved / peak if peak else None}


def seconds_per_1k_examples(non_embedding_params: int, flops: float, tokens_per_example: int = 48,
                            efficiency: float = 0.75) -> float:
    """Full fine-tuning: ~6 FLOPs per weight per token (forward 2, backward 4); `efficiency` measured on
    MiniLM-L6 here (real steps reach ~75% of peak matmul speed)."""
    return 6 * non_embedding_params * tokens_per_example * 1000 / (flops * efficiency)
