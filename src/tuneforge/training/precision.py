"""Pick the numeric precision the hardware runs fastest without hurting accuracy."""
from __future__ import annotations

from pathlib import Path

import torch


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> bool:
    # Without AMX or AVX512-BF16, bf16 matmuls on CPU are emulated and far slower than fp32
    # (measured on an AVX2-only EPYC: 0.7 vs 48 GFLOP/s).
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for `requested` in auto|bf16|fp16|fp32."""
    if requested != "auto":
        return requested, "set in train.precision"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "GPU supports bf16"
        return "fp16", "GPU lacks bf16; fp16 autocast"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16", "CPU has AMX/avx512_bf16"
    return "fp32", "no fast bf16 on this hardware"
