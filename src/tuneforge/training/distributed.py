"""What several training processes share (torchrun, or `tuneforge run --nproc N`): the Accelerator's strategy (DDP,
or FSDP), rank 0's prepared data sent to the others, a per-rank random stream, an interruption every process
agrees on, and the full weights gathered for export."""
from __future__ import annotations

import os
import signal

import numpy as np
import torch

from tuneforge.config import DistributedConfig
from tuneforge.errors import ConfigError, TuneforgeError


def check_processes(batch_size: int, world: int, device: torch.device) -> None:
    """Each optimizer step splits one batch of `batch_size` rows across the processes: there must be a row for each."""
    if world > 1 and batch_size < world:
        raise ConfigError(f"train.batch_size {batch_size} is smaller than the {world} processes: each optimizer step splits "
                          f"one batch of {batch_size} rows across them",
                          fix=f"set train.batch_size to at least {world} (a multiple of {world} splits evenly), or start fewer processes")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda" and local > torch.cuda.device_count():
        raise ConfigError(f"{local} processes on this machine but it has {torch.cuda.device_count()} GPUs",
                          fix=f"start one process per GPU: --nproc {torch.cuda.device_count()}")


def accelerator_kwargs(dcfg: DistributedConfig, device: torch.device) -> dict:
    """The Accelerator's arguments for train.distributed: none for DDP (Accelerate wraps the model when torchrun
    started several processes: gloo on CPU, NCCL on GPUs), an FSDP plugin for fsdp on GPUs. FSDP on CPU processes
    is switched on after the Accelerator is made (`shard_cpu_processes`)."""
    if dcfg.strategy != "fsdp" or device.type != "cuda":
        return {}
    return {"fsdp_plugin": fsdp_plugin(dcfg)}


def shard_cpu_processes(accelerator, dcfg: DistributedConfig, precision: str) -> None:
    """FSDP over CPU processes (gloo), through Accelerate's own FSDP2 preparation.

    Accelerate 1.15 turns an FSDP plugin on only for accelerator devices: given one on CPU processes it would
    silently train with DDP. torch's FSDP2 (`fully_shard`) runs on gloo, and Accelerate's FSDP2 code path has no
    device of its own, so the state is set as Accelerate sets it for GPU processes (distributed type FSDP, the
    plugin with this run's mixed precision): `prepare` then shards each layer, `get_state_dict` gathers the full
    weights. One process: nothing to shard, DDP's no-op is kept (as Accelerate does on one GPU)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.num_processes < 2 or accelerator.device.type != "cpu":
        return
    if dcfg.strategy == "fsdp":
        kind, plugin = DistributedType.FSDP, fsdp_plugin(dcfg)
        if precision != "fp32":
            plugin.set_mixed_precision(precision)
    elif accelerator.distributed_type == DistributedType.FSDP:  # left by an earlier FSDP run in this process
        kind, plugin = DistributedType.MULTI_CPU, None
    else:
        return
    accelerator.state.distributed_type = kind
    accelerator.state.fsdp_plugin = plugin
    # every AcceleratorState() (Accelerate makes them as it goes) copies the type from the process state again
    PartialState._shared_state["distributed_type"] = kind


def fsdp_plugin(dcfg: DistributedConfig):
    """Accelerate's FSDP2 plugin: each transformer layer a sharded unit, no CPU offload, and the full state dict
    gathered on rank 0 for export."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=dcfg.fsdp_sharding == "full_shard",
        auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=dcfg.fsdp_wrap,
        cpu_offload=False, state_dict_type="FULL_STATE_DICT")


def set_fsdp_units(accelerator, model) -> list[str]:
    """fsdp_wrap null: the model's own `_no_split_modules`, less any that holds the input embeddings (BERT lists
    BertEmbeddings): Accelerate shards the embedding layer as a unit of its own after the listed ones, and torch
    refuses to shard a weight twice. Returns the layer classes sharded as one unit each."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap:
        return list(plugin.transformer_cls_names_to_wrap)
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    holders = {type(m).__name__ for m in model.modules() if embed is not None and any(c is embed for c in m.modules())}
    names = list(getattr(model, "_no_split_modules", None) or [])
    units = [n for n in names if n not in holders]
    if not units:
        raise ConfigError(f"train.distributed.fsdp_wrap is null and the model names no layer class to shard as a unit "
                          f"(its _no_split_modules: {names or 'none'})",
                          fix="set train.distributed.fsdp_wrap to the model's transformer layer class, e.g. [LlamaDecoderLayer]")
    plugin.transformer_cls_names_to_wrap = units
    return units


def reshard(model) -> None:
    """FSDP: every unit back to its shards (the root unit stays gathered after a forward, e.g. a validation), so that
    `named_parameters()` are the sharded weights the optimizer updates and the export gathers."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def weights_held(model) -> float:
    """The share of the model's weights this process holds: 1.0 unsharded; FSDP about 1/N (its local shards)."""
    from torch.distributed.tensor import DTensor

    total = held = 0
    for p in model.parameters():
        total += p.numel()
        held += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return held / max(total, 1)


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def broadcast_from_main(accelerator, obj):
    """Rank 0's `obj` on every process (pickled; the others pass None)."""
    import torch.distributed as dist

    box = [obj if accelerator.is_main_process else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class SharedError(TuneforgeError):
    """An error rank 0 raised, raised again on the other processes (rank 0 alone prints it)."""

    def __init__(self, message: str, fix: str | None, exit_code: int):
        super().__init__(message, fix=fix)
        self.exit_code = exit_code


def error_payload(err: TuneforgeError) -> dict:
    return {"error": {"message": err.message, "fix": err.fix, "exit_code": err.exit_code}}


def raise_shared(payload) -> None:
    if isinstance(payload, dict) and "error" in payload:
        e = payload["error"]
        raise SharedError(e["message"], e["fix"], e["exit_code"])


def seed_rank(seed: int, rank: int) -> None:
    """A random stream of each process's own (dropout masks differ per rank, as they differ per row in one process);
    rank 0 keeps the stream one process would have."""
    if rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


class AgreedStop:
    """Ctrl-C / SIGTERM during training with several processes: the signal only sets a flag; at each step boundary the
    processes agree (any flag stops all), so every one stops after the same step and rank 0 can save a checkpoint.
    A second signal interrupts at once. The flag travels over a CPU (gloo) group, so a GPU run does not wait on it."""

    def __init__(self):
        import torch.distributed as dist

        self.flag = False
        self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        self.previous = {}

    def install(self) -> "AgreedStop":
        import threading

        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def agreed(self) -> bool:
        import torch.distributed as dist

        t = torch.tensor([int(self.flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        self.flag = self.flag or bool(t.item())
        return bool(t.item())


def full_state_dict(accelerator, model) -> dict:
    """FSDP: the whole model's weights gathered from the shards (every process takes part; rank 0 gets them, on CPU)."""
    return accelerator.get_state_dict(model)
