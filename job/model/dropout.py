"""LoRA dropout for CPUs: torch's dropout, drawn from a few random numbers instead of one per element.

On a CPU, torch's dropout draws a random number for every element and keeps a float mask of the
input's size for the backward pass. In LoRA both are paid on the input of every adapted layer (seven
per decoder layer), and on a small model that cost more than the frozen matmuls beside them
(bench/RESULTS.md). With a drop probability p, the elements to drop are instead found by
drawing the gaps between them: the number of kept elements before the next dropped one follows a
geometric distribution, drawn exactly as floor(log(1 - U) / log(1 - p)) from a uniform U. That takes
about p x the elements' count random numbers (5% at LoRA's usual 0.05) and keeps only the dropped
positions for the backward pass.

The result has the distribution of torch's dropout: every element dropped independently with
probability p, the others scaled by 1 / (1 - p). The random numbers come from torch's generator,
whose state checkpoints save, so a resumed run draws the same masks. On GPUs torch's fused dropout
kernel is already cheap and is kept (job/model/fused_lora.py keeps its mask of kept elements there).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _draws(expected: float) -> int:
    """Gaps to draw at once: six standard deviations more than expected, so that one round nearly
    always reaches the end."""
    return int(expected + 6 * math.sqrt(expected) + 16)


def drop_positions(count: int, p: float) -> torch.Tensor:
    """Sorted flat indices of the elements to drop out of `count`, each with probability p (0 < p < 1)."""
    log_keep = math.log1p(-p)
    found, start = [], 0
    while start < count:
        uniform = torch.rand(_draws((count - start) * p), dtype=torch.float64)
        gaps = uniform.neg_().log1p_().div_(log_keep).floor_()  # kept elements before each drop
        ends = gaps.add_(1).cumsum_(0).add_(start - 1).to(torch.int64)
        found.append(ends[: torch.searchsorted(ends, count)])
        start = int(ends[-1]) + 1
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64)


def drop(x: torch.Tensor, dropped: torch.Tensor | None, p: float) -> torch.Tensor:
    """x with the dropped elements zeroed and the others scaled by 1/(1-p); x itself for None (p = 0).
    `dropped`: their flat indices (drop_positions), or torch's mask of the kept ones (torch.native_dropout's,
    bool, x's shape)."""
    if dropped is None:
        return x
    if dropped.dtype == torch.bool:  # x * mask * scale in one pass
        return torch.ops.aten.native_dropout_backward(x, dropped, 1 / (1 - p))
    out = torch.mul(x.contiguous(), 1 / (1 - p))
    out.view(-1).index_fill_(0, dropped, 0)
    return out


def zero_dropped(x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """x, contiguous, with the dropped elements zeroed in place (`dropped` as for drop), unscaled."""
    if dropped.dtype == torch.bool:
        return x.mul_(dropped)
    x.view(-1).index_fill_(0, dropped, 0)
    return x


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        positions = drop_positions(x.numel(), p)
        ctx.save_for_backward(positions)
        ctx.p = p
        return drop(x, positions, p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (positions,) = ctx.saved_tensors
        return drop(grad, positions, ctx.p), None


class CpuDropout(nn.Module):
    """Inverted dropout of probability p; the identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p} is not in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return _Dropout.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_cpu_dropout(model: nn.Module) -> int:
    """Replace the dropout of every LoRA layer in `model` (peft's nn.Dropout) by CpuDropout; returns
    how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                dropouts[name] = CpuDropout(dropout.p)
                replaced += 1
    return replaced
