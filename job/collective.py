"""What every rank must agree on: rank 0's outcome on every rank, a check that holds on every rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from job.errors import JobError

T = TypeVar("T")


def rank_0_outcome(accelerator, work: Callable[[], T]) -> T:
    """Every rank: rank 0 does work, and its result, or its error as a JobError, comes out on every rank,
    so that no rank is left waiting in a collective for a rank 0 that failed before it."""
    from accelerate.utils import broadcast_object_list

    outcome: T | JobError | None = None
    if accelerator.is_main_process:
        try:
            outcome = work()
        except Exception as e:  # a bug as much as a JobError: the other ranks must not wait for it
            outcome = e if isinstance(e, JobError) else JobError(f"rank 0: {type(e).__name__}: {e}")
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list([outcome])[0]
    if isinstance(outcome, JobError):
        raise outcome
    return outcome


def whole_everywhere(whole: bool, accelerator) -> bool:
    """Whether every rank found its copy of a checkpoint whole (a collective with several ranks)."""
    if accelerator is None or accelerator.num_processes == 1:
        return whole
    damaged = torch.tensor([int(not whole)], device=accelerator.device)
    return not bool(accelerator.reduce(damaged, reduction="max"))
