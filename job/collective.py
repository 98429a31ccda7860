"""What every rank must agree on: rank 0's outcome on every rank, a check that holds on every rank; and
what it means when a collective fails because a rank is gone."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import torch

from job.errors import JobError, PeerLost

T = TypeVar("T")
# What gloo and NCCL say when the process at the other end is gone. Not a collective's timeout: a rank
# that is silent is the heartbeats' to judge (job/peers.py); a timeout may be a deadlock or a slow upload.
PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|remote process exited", re.IGNORECASE)
BACKENDS = re.compile(r"gloo|nccl", re.IGNORECASE)


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


def lost_peer(error: BaseException) -> PeerLost | None:
    """The PeerLost that `error` is, when it is a collective's failure because another rank is gone (in
    a process group); None for any other error, which keeps its own exit code."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return None
    # torch's own errors only: a storage error that says "connection reset" (a lease claim, an upload) is no
    # lost peer, wherever it is raised
    message = str(error)
    from_backend = isinstance(error, RuntimeError) and BACKENDS.search(message) and PEER_GONE.search(message)
    if not (isinstance(error, distributed.DistNetworkError) or from_backend):
        return None
    cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return PeerLost(
        f"another process of this job is gone ({cause}); exit 76: rerun every node of the job, which "
        "resumes from the last committed checkpoint"
    )
