"""The model as the loop trains it: loaded, packed rows routed to its attention, the adapter applied,
and on CPUs the kernels and allocator that are faster there."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from job.model.adapter import apply_adapter
from job.model.dropout import use_cpu_dropout
from job.model.fused_lora import fuse_lora_linears
from job.model.fused_norm import fuse_rms_norms
from job.model.loading import load_model
from job.model.packed_attention import packed_attention_pays, use_packed_attention
from job.spec import Spec
from job.startup import keep_freed_memory

log = logging.getLogger(__name__)


def prepare_model(model_dir: Path, spec: Spec, accelerator) -> tuple[Any, bool]:
    """The model to train, and whether each micro-batch's packed rows become one row for it."""
    full = spec.adapter.method == "full"
    model = load_model(model_dir, spec.model, accelerator.device, full_finetune=full)
    flatten = spec.data.packing and packed_rows_flattened(model, spec.model.attn_implementation, accelerator)
    train = spec.train
    model = apply_adapter(model, spec.adapter, bool(spec.model.quantization), train.gradient_checkpointing)
    if (
        accelerator.device.type == "cpu"
    ):  # on GPUs torch's and peft's own kernels and allocator are the fast ones
        keep_freed_memory()
        use_cpu_dropout(model)
        fuse_lora_linears(model)
        fuse_rms_norms(model)
    return model, flatten


def packed_rows_flattened(model, attn_implementation: str, accelerator) -> bool:
    """How packed rows reach the model, decided once: flattened into one row per micro-batch for flash
    attention (job/data/batching.py: flatten_packed); under sdpa, attended one example at a time where
    that pays and the model's layers get position ids, else under sdpa's block mask."""
    if attn_implementation.startswith("flash"):
        return True
    pays = packed_attention_pays(accelerator.device.type, accelerator.mixed_precision, model.dtype)
    if attn_implementation == "sdpa" and pays and not use_packed_attention(model):
        log.info("this model's layers get no position ids: packed rows are attended under sdpa's block mask")
    return False
