"""The Accelerator a run trains with: its devices, mixed precision and process-group timeout.

The callers (the CLI, tests, benchmarks) make it and hand it to the recipe.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from job.spec import TrainSpec

log = logging.getLogger(__name__)


def make_accelerator(cfg: TrainSpec) -> Accelerator:
    """The Accelerator for a run of this train section."""
    cuda = torch.cuda.is_available()
    return Accelerator(
        cpu=not cuda,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cuda),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_seconds))],
    )


def cpu_supports_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_bf16_is_faster() -> bool:
    """Whether the CPU has bf16 matrix units (AMX) that the kernel lets us use. With AVX512-BF16 alone,
    bf16 matmuls run slower than float32 ones, and so does a bf16 epoch (bench/RESULTS.md)."""
    return torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()


def resolve_mixed_precision(requested: str, cuda: bool) -> str:
    """auto: what the hardware runs fastest: bf16 on GPUs that have it, else fp16 on GPUs; on CPUs bf16
    where they have AMX, else none. Unsupported choices fall back."""
    if requested == "auto":
        if not cuda:
            return "bf16" if cpu_bf16_is_faster() else "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "bf16" and not (torch.cuda.is_bf16_supported() if cuda else cpu_supports_bf16()):
        log.warning(
            "train.mixed_precision bf16: this %s has no bf16 support; training in float32",
            "GPU" if cuda else "CPU",
        )
        return "no"
    if requested == "fp16" and not cuda:
        log.warning("train.mixed_precision fp16 needs a GPU; training in float32 on the CPU")
        return "no"
    return requested
