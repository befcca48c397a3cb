"""The training loop, written out plainly: length-grouped batches, AdamW with warm-up, mixed precision,
evaluation on validation only, early stopping, checkpoints and resume.

The same code runs on one CPU, one GPU, or many processes under `torchrun` / `tuneforge run --nproc N`:
Accelerate places the model, wraps it for DDP (or FSDP) and applies autocast. The recipe does not depend on the
number of processes: every process draws the same batches of `train.batch_size` rows and takes its slice of each,
so the steps per epoch and the rows per optimizer step are those of one process.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tuneforge.config import EvalConfig, TrainConfig
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.models.infer import FrozenWeightsCast
from tuneforge.models.load import load_trainable_state, set_train_mode, trainable_state
from tuneforge.tasks.base import TaskDefaults
from tuneforge.training.checkpoint import load_checkpoint, save_checkpoint


class TrainingInterrupted(TuneforgeError):
    exit_code = 130


@dataclass
class TrainData:
    """The training rows as the task encoded them. The loop reads the input ids' lengths (to group batches and count
    tokens); the rest it hands to the task's collate untouched."""
    ids: list[list[int]]
    targets: np.ndarray | list  # one per row, in the task's shape: a class id, a multi-hot row, a label per token, ...
    positions: list[list[int]] | None = None  # packed rows: positions restarting at 0 for each example in the row

    def examples(self, idx) -> list[dict]:
        """Rows `idx` as a task's collate takes them: input_ids, labels and, for packed rows, position_ids."""
        if self.positions is None:
            return [{"input_ids": self.ids[i], "labels": self.targets[i]} for i in idx]
        return [{"input_ids": self.ids[i], "labels": self.targets[i], "position_ids": self.positions[i]} for i in idx]


def default_collate(examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """The batch most tasks build (tasks.base.TaskDefaults.collate): for callers that pass no task's own."""
    return TaskDefaults().collate(examples, pad_id, pad_to_multiple_of)


def default_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@dataclass
class TrainResult:
    steps: int
    best_step: int
    best_metric: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    samples: int = 0
    tokens: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds else 0.0


def make_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[np.ndarray]:
    """Shuffled batches; with grouping, rows of similar length share a batch (as HF's LengthGroupedSampler:
    shuffle, sort within mega-batches of 50 batches, then shuffle the batch order)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        lengths_arr = np.asarray(lengths)
        mega = batch_size * 50
        chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([c[np.argsort(-lengths_arr[c], kind="stable")] for c in chunks])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def loss_units(targets) -> np.ndarray:
    """What the loss averages over, per row: what the targets declare (`targets.units`: e.g. the preference pairs
    packed in a row), else the row itself (one target per row: a class, or a multi-hot row whose labels all count
    alike), or its labelled tokens (a list of targets, -100 = none), as token classification's loss and the causal
    LM's packed loss average over labelled tokens (a packed row's first label is always -100), and a decoder's loss
    over its labels. Accumulation and several processes weigh each batch's mean loss by them (step_weights)."""
    units = getattr(targets, "units", None)
    if units is not None:
        return np.asarray(units, dtype=float)
    if isinstance(targets, np.ndarray):
        return np.ones(len(targets))
    return np.array([sum(1 for t in row if t != -100) for row in targets], dtype=float)


def rank_slice(idx: np.ndarray, units: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, float]:
    """This process's rows of a batch, and the weight of its mean loss.

    Rows are dealt out in turn (rank r takes rows r, r+world, ...: length-grouped batches stay balanced). DDP (and
    FSDP) average the gradients over the processes, so a process's mean loss is weighted by its share of the batch's
    loss units times `world`: the average then equals the gradient of the whole batch's mean loss, what one process
    computes, exactly, also when the batch does not split evenly (the last batch of an epoch, or batch_size not a
    multiple of the processes). With equal slices of rows the weight is 1. A process whose slice holds no units (the
    last batch has fewer rows than processes) still runs one row, weighted 0, so that it joins the gradient all-reduce."""
    if world == 1:
        return idx, 1.0
    mine = idx[rank::world]
    total, share = units[idx].sum(), units[mine].sum() if len(mine) else 0.0
    if share == 0 or total == 0:
        return idx[int(np.argmax(units[idx]))][None], 0.0
    return mine, float(share * world / total)


def step_weights(group: list[np.ndarray], units: np.ndarray, rank: int, world: int) -> list[tuple[np.ndarray, float]]:
    """This process's rows of each batch of an optimizer step (`group`: train.grad_accum batches), and the weight of
    its mean loss on them: its share of the step's loss units (times `world`, as DDP averages over the processes).
    The step's gradient is then that of the mean loss over all its units, as one batch of them all would give,
    whatever the units per batch (packed rows, the last batch of an epoch): exact accumulation, where dividing each
    batch's mean by grad_accum weighs a unit in a small batch more (transformers #34191)."""
    total = sum(float(units[idx].sum()) for idx in group)
    out = []
    for idx in group:
        mine, weight = rank_slice(idx, units, rank, world)
        share = float(units[idx].sum()) / total if total else 1.0 / len(group)
        out.append((mine, weight * share))
    return out


# Training batches are padded to a multiple of this width. Each distinct (rows, width) shape costs the CPU kernels'
# one-off set-up and cached memory that is never given back: on MiniLM with batch widths drawn from 5-64, memory grew
# 0.99 -> 1.33 GB over 320 steps and was still growing; padded to a multiple of 8 it stayed at 0.69 GB, at the same
# seconds per step (Xeon, AMX bf16). Eight shapes instead of sixty also make the cost estimate's few probes typical.
TRAIN_PAD_MULTIPLE = 8


def padded_width(width: int) -> int:
    return -(-width // TRAIN_PAD_MULTIPLE) * TRAIN_PAD_MULTIPLE


def batch_shape(lengths: np.ndarray, idx: np.ndarray) -> tuple[int, int]:
    """(rows, padded width) of a batch: the work the cost estimate measures per token and checks each step against
    (cost.py widths its probes alike). The task's collate pads the inputs to it; what else it builds rides along."""
    return len(idx), padded_width(int(lengths[idx].max()))


def training_batch(data: TrainData, idx: np.ndarray, pad_id: int, device,
                   collate: Callable[[list[dict], int, int], dict] = default_collate) -> dict:
    """Rows `idx` as the task's `collate` batches them (inputs padded to the widest row, rounded up to
    TRAIN_PAD_MULTIPLE; targets, position ids or decoder inputs as the task shapes them), tensors moved to `device`.
    The loop never looks inside: it feeds the batch to the task's loss."""
    batch = collate(data.examples(idx), pad_id, TRAIN_PAD_MULTIPLE)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _rng_state() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _rank_rng_states(accelerator) -> dict[str, torch.Tensor]:
    """Every process's random state, gathered on all (rank 0 saves them): `torch.rank<r>`, `cuda.rank<r>`."""
    import torch.distributed as dist

    mine = {"torch": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(accelerator.device)
    states = [None] * accelerator.num_processes
    dist.all_gather_object(states, mine)
    return {f"{k}.rank{r}": v for r, s in enumerate(states) for k, v in s.items()}


def epochs_for(n_rows: int, cfg: TrainConfig) -> float:
    """train.epochs, or (when null) the passes that give about `target_steps` steps on data of this size (the same for
    any number of processes: they split each batch)."""
    if cfg.epochs is not None:
        return cfg.epochs
    per_epoch = math.ceil(math.ceil(n_rows / cfg.batch_size) / cfg.grad_accum)
    return float(min(cfg.max_auto_epochs, max(1, math.ceil(cfg.target_steps / per_epoch))))


def patience_for(cfg: TrainConfig, per_epoch: int, eval_every: int) -> int:
    """train.early_stopping_patience, or (when null) the evaluations in two epochs, at least 3."""
    if cfg.early_stopping_patience is not None:
        return cfg.early_stopping_patience
    return max(3, math.ceil(2 * per_epoch / eval_every))


def plan_steps(n_rows: int, cfg: TrainConfig) -> tuple[int, int, int]:
    """(steps per epoch, total steps, evaluate every N steps); the same for any number of processes."""
    batches = max(1, math.ceil(n_rows / cfg.batch_size))
    per_epoch = math.ceil(batches / cfg.grad_accum)
    total = max(1, math.ceil(epochs_for(n_rows, cfg) * per_epoch))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    every = cfg.eval_every or max(1, math.ceil(per_epoch / 4))  # the 4th lands on the epoch's end
    return per_epoch, total, min(every, total)


def adamw(groups, lr: float, fused: bool = True) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over every weight, as HF Trainer's default `adamw_torch_fused`) where each
    weight is a plain CPU or CUDA tensor and `fused` allows it (FSDP's sharded weights take the foreach one). Measured
    on the 49M-parameter BERT2BERT, 2 EPYC cores: a clipped step 143 ms foreach, 39 ms fused, a sixth of each
    training step saved."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = fused and bool(params) and all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda")
                                           and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {}))


def build_optimizer(model, cfg: TrainConfig, total_steps: int, fused: bool = True):
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # why: decaying biases and LayerNorm gains only hurts (standard BERT recipe)
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    opt = adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                 {"params": no_decay, "weight_decay": 0.0}], cfg.learning_rate, fused)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total_steps), total_steps)
    return opt, sched


def keep_freed_memory() -> bool:
    """Keep the memory a training step frees in this process for the next step (glibc: no trimming of the heap's
    top, the heap rather than fresh mmap()s for blocks up to 32 MiB). By default glibc gives a step's freed
    activations back to the kernel and every step faults them in again, page by page: on SmolLM2 with LoRA the
    cross-entropy over 128 x 49k logits took 36 ms in the step against 1.8 ms so kept (2-core AMD EPYC, a VM),
    ~20% of the step. The peak memory is the same (the next step takes it again). Not glibc: nothing done."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(libc.mallopt(m_mmap_threshold, 32 * 2**20))


def _optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float) -> None:
    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train(model, train_data: TrainData, validate: Callable[[object], dict], cfg: TrainConfig, ecfg: EvalConfig,
          *, accelerator, precision: str, pad_id: int, checkpoint_dir: Path, resume: bool, progress=None,
          loss_fn: Callable = default_loss, select: tuple[str, str] | None = None, monitor=None,
          collate: Callable[[list[dict], int, int], dict] = default_collate) -> TrainResult:
    """Train `model` in place; on return it holds the best weights by the validation metric.

    `validate(model)` is the task's: it scores the model on the validation split and returns
    {"val_loss": ..., "val_<eval.metric>": ...}; the test split never reaches the loop. `select` is the
    task's (key of that row, "max" or "min") that picks the best step: by default (val_<eval.metric>, max).
    `loss_fn(model, batch)` is the task's training loss (default: the model's own), on the batches the task's
    `collate(examples, pad_id, pad_to_multiple_of)` builds (default: tasks.base.TaskDefaults.collate); the loop
    makes no assumption about the targets' shape. `monitor` (cost.EstimateCheck) sees each step's seconds and batch
    shapes, and each evaluation's seconds.

    With several processes each takes its slice of every batch (`rank_slice`), has its own dropout stream, and all
    stop together on Ctrl-C. FSDP saves no checkpoints: its weights are sharded across the processes."""
    from tuneforge.training.distributed import AgreedStop, check_processes, is_sharded, reshard, seed_rank, set_fsdp_units

    world, rank = accelerator.num_processes, accelerator.process_index
    check_processes(cfg.batch_size, world, accelerator.device)
    per_epoch, total, eval_every = plan_steps(len(train_data.ids), cfg)
    patience = patience_for(cfg, per_epoch, eval_every)
    optimizer, scheduler = build_optimizer(model, cfg, total, fused=not is_sharded(accelerator))
    if is_sharded(accelerator):
        set_fsdp_units(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model)
    sharded = is_sharded(accelerator)
    keep_freed_memory()
    # the frozen weights held at the training precision for the steps (FSDP's flat shards excepted); validation sees
    # the fp32 model
    held = FrozenWeightsCast(unwrapped, "fp32" if sharded else precision)
    if sharded and resume:
        raise ConfigError("--resume is not available with train.distributed.strategy fsdp: its checkpoints would need "
                          "the sharded weights gathered", fix="start the run over, or train it with strategy: ddp")
    seed_rank(cfg.seed, rank)
    metric_key, mode = select or (f"val_{ecfg.metric}", "max")
    sign = -1.0 if mode == "min" else 1.0

    c = {"step": 0, "epoch": 0, "batch_pos": 0, "best_metric": -sign * math.inf, "best_step": 0, "bad_evals": 0,
         "samples": 0, "tokens": 0, "train_seconds": 0.0, "history": [], "loss_sum": 0.0, "loss_n": 0}
    best = None
    if resume:
        state, best, c = load_checkpoint(checkpoint_dir, optimizer=optimizer, scheduler=scheduler, rank=rank)
        load_trainable_state(unwrapped, state)
    lengths = [len(x) for x in train_data.ids]
    lengths_arr = np.asarray(lengths)
    units = loss_units(train_data.targets)

    last_checkpoint = time.monotonic()

    def checkpoint_due(evaluated: bool) -> bool:
        if cfg.checkpoint_every:
            return c["step"] % cfg.checkpoint_every == 0
        if not evaluated:
            return False
        due = time.monotonic() - last_checkpoint >= 60 * cfg.checkpoint_minutes
        if world > 1:  # every process must take the same decision (saving waits for all): rank 0's clock decides
            from accelerate.utils import broadcast

            due = bool(broadcast(torch.tensor([int(due)], device=device), from_process=0).item())
        return due

    def checkpoint() -> None:
        nonlocal last_checkpoint
        last_checkpoint = time.monotonic()
        if sharded:
            return
        rng = None
        if world > 1:
            rng = _rank_rng_states(accelerator)  # every process's own stream, for an exact resume
            c["loss_sum"] = _mean_loss_sum()  # the same on all, so rank 0's counters resume every process
        if accelerator.is_main_process:
            save_checkpoint(checkpoint_dir, trainable=trainable_state(unwrapped), best=best, optimizer=optimizer,
                            scheduler=scheduler, counters=c, rank_rng=rng)
        accelerator.wait_for_everyone()

    def _mean_loss_sum() -> float:
        """The processes' weighted slice losses add up (over processes, / world) to the batches' mean losses."""
        return float(accelerator.reduce(torch.tensor([c["loss_sum"]], device=device), "sum").item()) / world

    def run_eval() -> bool:
        """Evaluate, keep the best weights; True when early stopping says stop."""
        nonlocal best
        loss_sum = _mean_loss_sum() if world > 1 else c["loss_sum"]
        row = {"step": c["step"], "epoch": round(c["step"] / per_epoch, 3), "lr": scheduler.get_last_lr()[0],
               "train_loss": loss_sum / max(c["loss_n"], 1)}
        t_eval = time.perf_counter()
        held.release()
        row.update(validate(unwrapped))
        held.hold()
        if monitor is not None:
            monitor.evaluated(time.perf_counter() - t_eval)
        if sharded:
            reshard(unwrapped)  # FSDP keeps the root unit gathered after a forward: its weights would be the copies, not the shards
        c["loss_sum"], c["loss_n"] = 0.0, 0
        c["history"].append(row)
        if sign * row[metric_key] > sign * c["best_metric"]:
            c["best_metric"], c["best_step"], c["bad_evals"] = row[metric_key], c["step"], 0
            best = trainable_state(unwrapped)
        else:
            c["bad_evals"] += 1
        if progress:  # with the training throughput so far (not kept in the history: it is not reproducible)
            seconds = max(c["train_seconds"], 1e-9)
            progress(c["step"], total, row | {"train_rows_per_second": c["samples"] / seconds,
                                              "train_tokens_per_second": c["tokens"] / seconds})
        return bool(patience) and c["bad_evals"] >= patience

    stopped_early = False
    step_rng = _rng_state()  # the random state at the last step boundary: what an interruption's checkpoint keeps
    stop = AgreedStop().install() if world > 1 else None  # several processes: Ctrl-C is taken at a step boundary
    agreed = False
    try:
        set_train_mode(unwrapped)
        held.hold()
        while c["step"] < total and not stopped_early:
            # the same batches on every process; each takes its slice of each batch
            batches = make_batches(lengths, cfg.batch_size, cfg.seed, c["epoch"], cfg.group_by_length)
            for pos in range(c["batch_pos"], len(batches), cfg.grad_accum):
                t0 = time.perf_counter()
                group = batches[pos : pos + cfg.grad_accum]
                shapes = []
                for k, (idx, (mine, weight)) in enumerate(zip(group, step_weights(group, units, rank, world))):
                    batch = training_batch(train_data, mine, pad_id, device, collate)
                    shapes.append(batch_shape(lengths_arr, mine))
                    sync = k == len(group) - 1
                    ctx = accelerator.no_sync(model) if (world > 1 and not sync) else contextlib.nullcontext()
                    with ctx, accelerator.autocast():
                        loss = loss_fn(model, batch)
                    accelerator.backward(loss * weight)
                    c["loss_sum"] += float(loss.detach()) * weight  # the step's mean loss (summed over processes)
                    c["samples"] += len(idx)  # the whole batch: every process counts the same
                    c["tokens"] += int(lengths_arr[idx].sum())
                c["loss_n"] += 1
                _optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm)
                if device.type == "cuda":  # the step's kernels done before it is timed
                    torch.cuda.synchronize(device)
                step_seconds = time.perf_counter() - t0
                c["train_seconds"] += step_seconds
                c["step"] += 1
                if monitor is not None:
                    monitor.step(c["step"], step_seconds, shapes)
                step_rng = _rng_state()
                c["batch_pos"] = pos + cfg.grad_accum
                if progress:
                    progress(c["step"], total, None)
                evaluated = c["step"] % eval_every == 0 or c["step"] == total
                if evaluated:
                    stopped_early = run_eval()
                    if world > 1:  # every process leaves the loop together, as rank 0's validation says
                        from accelerate.utils import broadcast

                        stopped_early = bool(broadcast(torch.tensor([int(stopped_early)], device=device), from_process=0).item())
                    set_train_mode(unwrapped)
                if checkpoint_due(evaluated) or c["step"] == total or stopped_early:
                    checkpoint()
                if c["step"] >= total or stopped_early:
                    break
                if stop is not None and stop.agreed():  # a signal reached some process: all stop after this step
                    agreed = True
                    raise KeyboardInterrupt
            else:
                c["epoch"] += 1
                c["batch_pos"] = 0
    except KeyboardInterrupt:
        where = f"training interrupted at step {c['step']} of {total}"
        if world > 1 and not agreed:  # a second signal: the processes are not at the same step, nothing is saved
            raise TrainingInterrupted(f"{where}, at once: no checkpoint saved", fix="run the command again") from None
        if sharded:
            raise TrainingInterrupted(f"{where}; FSDP runs keep no checkpoint", fix="run the command again") from None
        optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is redone on resume ...
        _set_rng_state(step_rng)  # ... with the dropout draws it had the first time
        checkpoint()
        raise TrainingInterrupted(f"{where}; a checkpoint is saved in {checkpoint_dir}",
                                  fix="run the same command again with --resume to continue") from None
    finally:
        held.release()
        if stop is not None:
            stop.restore()

    if not c["history"] or c["history"][-1]["step"] != c["step"]:
        run_eval()
    if best is not None:
        if sharded:
            reshard(unwrapped)
        load_trainable_state(unwrapped, best)
    unwrapped.eval()
    return TrainResult(steps=c["step"], best_step=c["best_step"], best_metric=c["best_metric"], stopped_early=stopped_early,
                       history=c["history"], train_seconds=c["train_seconds"], samples=c["samples"], tokens=c["tokens"])
