"""The Accelerator a run trains with: its devices, mixed precision and process-group timeout; and what
differs between train.distributed ddp (accelerate's DDP, autocast) and fsdp (job/model/sharding.py:
torch's FSDP2, its own mixed precision), which accelerate's process group, reductions and loop serve
alike.

The callers (the CLI, tests, benchmarks) make it and hand it to the recipe.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.distributed.tensor import DTensor

from job.errors import JobError
from job.model.sharding import clip_sharded_gradients, gathered_weights, is_sharded, resharded
from job.output.publish import write_model_files
from job.spec import TrainSpec

log = logging.getLogger(__name__)


def make_accelerator(cfg: TrainSpec) -> Accelerator:
    """The Accelerator for a run of this train section. Under fsdp it does not autocast: FSDP casts the
    gathered parameters itself (fsdp_compute_dtype), and autocast would compute from float32 shards."""
    cuda = torch.cuda.is_available()
    sharded = cfg.distributed == "fsdp"
    return Accelerator(
        cpu=not cuda,
        mixed_precision="no" if sharded else resolve_mixed_precision(cfg.mixed_precision, cuda),
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


def fsdp_compute_dtype(cfg: TrainSpec) -> torch.dtype | None:
    """The dtype FSDP computes in under train.distributed fsdp, as mixed_precision resolves; None:
    the weights' own, and under ddp. fp16 (auto on GPUs without bf16) trains in float32: no loss
    scaling here."""
    if cfg.distributed != "fsdp":
        return None
    precision = resolve_mixed_precision(cfg.mixed_precision, torch.cuda.is_available())
    if precision == "fp16":
        log.warning("train.distributed fsdp: this GPU has no bf16; training in the weights' dtype (float32)")
    return torch.bfloat16 if precision == "bf16" else None


def step_precision(accelerator: Accelerator, fsdp_dtype: torch.dtype | None) -> str:
    """What the step computes in, "bf16", "fp16" or "no": under fsdp FSDP's policy (fsdp_compute_dtype;
    accelerate's own is "no" there), otherwise accelerate's autocast."""
    return "bf16" if fsdp_dtype == torch.bfloat16 else accelerator.mixed_precision


def wrap_for_ranks(model, optimizer, accelerator: Accelerator) -> tuple[Any, Any]:
    """ddp: the model in accelerate's DDP (and autocast), the optimizer in its wrapper (loss scaling).
    A model sharded by FSDP stays as it is, and so does its optimizer, which must hold its shards."""
    if is_sharded(model):
        if not all(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]):
            raise JobError(
                "train.distributed fsdp: the optimizer holds parameters that are not the model's shards"
            )
        return model, optimizer
    return accelerator.prepare(model, optimizer)


def gradient_sync(model, accelerator: Accelerator, last: bool) -> AbstractContextManager:
    """Around one micro-batch's backward: DDP syncs gradients at the step's last micro-batch only;
    FSDP reduce-scatters each micro-batch's (left unsynced, they would be whole on every rank)."""
    return nullcontext() if last or is_sharded(model) else accelerator.no_sync(model)


def clip_gradients(optimizer, max_norm: float | None, accelerator: Accelerator) -> torch.Tensor:
    """The gradients' whole norm (before clipping), clipped to max_norm (None: not clipped)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(isinstance(p, DTensor) for p in params):
        return clip_sharded_gradients(params, max_norm or float("inf"))
    return accelerator.clip_grad_norm_(params, max_norm or float("inf"))


def trained(
    model, accelerator: Accelerator
) -> tuple[Any, dict[str, torch.Tensor] | tempfile.TemporaryDirectory | None]:
    """Every rank, after the loop: the model unwrapped, in eval mode, and where it is sharded its weights
    on rank 0 for publishing (a collective): an adapter's gathered whole, a whole model's written to
    safetensors files in a temporary folder a tensor at a time, so that no rank ever holds all of it
    (job/output/publish.py: write_model_files). None for a model that is whole."""
    from peft import PeftModel

    model = accelerator.unwrap_model(model).eval()
    if not is_sharded(model):
        return model, None
    if isinstance(model, PeftModel):
        return model, gathered_weights(model)
    folder = tempfile.TemporaryDirectory(prefix="ftjob-weights-") if accelerator.is_main_process else None
    write_model_files(resharded(model), Path(folder.name) if folder else None)
    return model, folder
