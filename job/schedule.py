"""The schedule: how many optimizer steps an epoch-based run takes, and the learning rate at each
(linear warm-up, then constant, linear or cosine decay to 0)."""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LambdaLR

from job.errors import DataError
from job.metrics import data_summary

if TYPE_CHECKING:
    from job.data.pipeline import DataPipeline


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


def epoch_run_steps(
    data: DataPipeline, accelerator: Accelerator, micro_batch_size: int, grad_accum: int
) -> int:
    """Optimizer steps of an epoch-based run, exactly: a counting pass over all its epochs (packing,
    splitting and the rank shares differ from epoch to epoch), then the busiest rank's micro-batches
    over grad_accum, as the loop takes them."""
    micro_batches, stats = data.count_micro_batches(micro_batch_size)
    count = torch.tensor(micro_batches, device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="max")
    if int(count) == 0:
        raise DataError(f"data.train: no example to train on; {data_summary(stats)}")
    return math.ceil(int(count) / grad_accum)


def saved_total_steps(saved: dict | None) -> int | None:
    """The step count that a checkpoint's run planned, so that a resumed epoch-based run skips the
    counting pass (a full read of the data). The resumed run trains the same spec (the fingerprint) on
    as many processes over the files the run started with (the plan travels with the cursor), so a
    count made again would only differ if those files changed meanwhile. None where the checkpoint
    holds none (older checkpoints) or one that cannot be right (not past the checkpoint's step)."""
    steps = saved.get("total_steps") if saved else None
    valid = isinstance(steps, int) and not isinstance(steps, bool) and steps >= saved.get("step", 0) >= 0
    return steps if valid and steps > 0 else None
