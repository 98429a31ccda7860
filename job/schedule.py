"""The optimizer (AdamW over the trainable parameters) and its learning-rate schedule: linear warm-up,
then constant, linear or cosine decay to 0."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from job.spec import TrainSpec


def make_optimizer(model, cfg: TrainSpec, device_type: str) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        fused=device_type in ("cuda", "cpu"),
    )


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
