"""The learning-rate schedule: linear warm-up, then constant, linear or cosine decay to 0."""

from __future__ import annotations

import math
from functools import partial

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, name: str, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then constant, linear decay to 0, or cosine decay to 0 (held at 0 past the end)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "linear":
        return 1.0 - progress
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    return LambdaLR(
        optimizer, partial(lr_factor, name=name, warmup_steps=warmup_steps, total_steps=total_steps)
    )
