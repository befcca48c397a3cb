"""Dropout whose mask costs a quarter of the random draws on CPU.

torch's CPU dropout draws one 32-bit random number per element (`bernoulli_`, one thread): on SmolLM2-135M with LoRA
on every linear layer (210 dropout layers, a 256-token row) that was 131 ms of a 700 ms training step, more than
all attention (2-core AMD EPYC, avx512_bf16; bench/profile_steps.py). Here one 64-bit draw gives the keep decisions
of four elements, 15 random bits each: an element is dropped when its bits fall below round(p x 32768), so the drop
rate is p to within 1/65536. The rest is torch's own dropout: a bool mask saved for the backward pass, kept values
scaled by 1/(1-p) in the input's dtype. On CUDA (where torch's is fast) and outside training it is torch's dropout.
"""
from __future__ import annotations

import math

import torch
from torch import nn

_BITS = 15
_LEVELS = 1 << _BITS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """True where an element is kept: each with probability 1 - round(p x 2^15) / 2^15, independently, drawn from
    torch's generator (the same seed draws the same mask)."""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits each
    draws = bits.view(torch.int16)[:n].view(shape) & (_LEVELS - 1)  # four 15-bit draws per 64-bit number
    return draws >= round(p * _LEVELS)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class FastDropout(nn.Dropout):
    """nn.Dropout with the mask drawn by `keep_mask` on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or not x.is_floating_point():
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p, x.device), 1.0 / (1.0 - self.p))


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every torch.nn.Dropout layer of `model` (its own and, say, peft's LoRA dropout) for a FastDropout of
    the same rate, in place; returns how many. The weights, and so the exported model, do not change."""
    swapped = 0
    for module in model.modules():
        for name, child in list(module._modules.items()):
            if type(child) is nn.Dropout:
                module._modules[name] = FastDropout(child.p, child.inplace)
                swapped += 1
    return swapped
