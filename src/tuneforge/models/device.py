"""Pick the device and the numeric precision the hardware runs fastest without hurting accuracy."""
from __future__ import annotations

from pathlib import Path

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """cpu, cuda, cuda:N or auto as a torch device; a device this machine lacks is a clear error."""
    from tuneforge.errors import ConfigError

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}", fix="use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and (not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {device!r} is not on this machine ({torch.cuda.device_count()} CUDA GPUs)",
                          fix="use --device cpu, or auto to take a GPU when there is one")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported", fix="use cpu, cuda, cuda:N or auto")
    return resolved


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (figures are only comparable on the same CPU)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def cpu_info() -> dict:
    """What a benchmark figure needs beside it: the CPU, its bf16 path, and the cores and threads used."""
    import os

    flags = cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"model": cpu_name(), "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "fast_bf16": cpu_has_fast_bf16(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "torch_threads": torch.get_num_threads()}


def cpu_has_fast_bf16() -> bool:
    # Without AMX or AVX512-BF16, bf16 matmuls on CPU are emulated and far slower than fp32
    # (measured on an AVX2-only EPYC: 0.7 vs 48 GFLOP/s).
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for `requested` in auto|bf16|fp16|fp32."""
    if requested != "auto":
        return requested, "set in train.precision"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):  # emulated bf16 (pre-Ampere) is slow
            return "bf16", "GPU supports bf16"
        return "fp16", "GPU lacks bf16; fp16 autocast"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16", "CPU has AMX/avx512_bf16"
    return "fp32", "no fast bf16 on this hardware"
