"""The model as the loop trains it: loaded, packed rows routed to its attention, the adapter applied,
the layers that are faster on its device (on CPUs the allocator too), under train.distributed fsdp
sharded over the ranks (job/model/sharding.py), and under train.compile its decoder layers compiled
(job/model/compile.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from job.model.adapter import apply_adapter, keep_input_dtype_under_autocast
from job.model.compile import compile_layers
from job.model.dropout import use_cpu_dropout
from job.model.fused_lora import fuse_lora_linears
from job.model.fused_norm import fuse_rms_norms
from job.model.loading import load_model, model_on_meta
from job.model.packed_attention import packed_attention_pays, use_packed_attention
from job.model.sharding import (
    check_sharded_loss,
    frozen_parameters,
    offloaded,
    probe_loss,
    process_mesh,
    receive_from_rank0,
    shard_model,
    share_trainable_from_rank0,
)
from job.spec import Spec
from job.startup import keep_freed_memory

log = logging.getLogger(__name__)

# Under fsdp, the largest freed block glibc keeps for reuse (job/startup.py: keep_freed_memory), below the
# 32 MiB kept under ddp: FSDP gathers each layer's parameters and gradients and frees them a layer later;
# kept in glibc's arenas, those blocks fragmented them and a rank's memory doubled over a few steps.
# Handed back to the kernel from 4 MiB up, a ~100M-parameter full fine-tune on 2 ranks peaks at 0.68 of
# ddp's memory, not 1.1-1.2, as fast; glibc's defaults, 0.55 but slower (bench/RESULTS.md, FSDP against DDP).
FSDP_LARGEST_KEPT = 4 << 20

# The device types where the fused LoRA layer (job/model/fused_lora.py) is faster than peft's: CPUs
# (bench/RESULTS.md). On GPUs it saves passes and memory on paper, but is not measured yet.
FUSED_LORA_WINS = {"cpu"}


def prepare_model(
    model_dir: Path, spec: Spec, accelerator, compute_dtype: torch.dtype | None = None
) -> tuple[Any, bool]:
    """The model to train, and whether each micro-batch's packed rows become one row for it.
    `compute_dtype`: under train.distributed fsdp, the dtype FSDP computes in (None: the weights')."""
    if spec.train.distributed == "fsdp":  # its weights are there, for the packing probe, once received
        model = sharded_model(model_dir, spec, accelerator, compute_dtype)
        flatten = packed_rows_flattened(model, spec, accelerator)
    else:
        full = spec.adapter.method == "full"
        model = load_model(model_dir, spec.model, accelerator.device, full_finetune=full)
        flatten = packed_rows_flattened(model, spec, accelerator)
        model = adapted(model, spec, accelerator)
    if spec.train.compile:  # last: once sharded, and the packing probe has chosen the attention
        compiled = compile_layers(model)
        log.info("train.compile: %d decoder layers compiled, on their first call (the first steps)", compiled)
    return model, flatten


def adapted(model, spec: Spec, accelerator):
    """The loaded base with the adapter applied and the layers that are faster on its device; on CPUs,
    the allocator too."""
    train = spec.train
    model = apply_adapter(model, spec.adapter, bool(spec.model.quantization), train.gradient_checkpointing)
    device_type = accelerator.device.type
    if device_type == "cpu" and train.distributed == "fsdp":
        keep_freed_memory(FSDP_LARGEST_KEPT)
    elif device_type == "cpu":
        keep_freed_memory()
    return faster_layers(model, device_type, compiled=train.compile)


def faster_layers(model, device_type: str, fused_lora: bool | None = None, compiled: bool = False):
    """The adapted model's layers as they run faster on `device_type` (tests run a GPU's on the CPU):
    under autocast, the adapter layers on their 16-bit input (keep_input_dtype_under_autocast); on CPUs,
    the dropout and RMSNorm written for CPUs; the fused LoRA layer where it wins (FUSED_LORA_WINS) or as
    `fused_lora` says (a benchmark's switch). `compiled` (train.compile): torch's dropout, which compiles
    into the layer's code, where the CPU dropout would break it at every adapter layer."""
    keep_input_dtype_under_autocast(model)
    if device_type == "cpu":
        if not compiled:
            use_cpu_dropout(model)
        fuse_rms_norms(model)
    if fused_lora is None:
        fused_lora = device_type in FUSED_LORA_WINS
    if fused_lora:
        fuse_lora_linears(model)
    return model


def sharded_model(model_dir: Path, spec: Spec, accelerator, compute_dtype: torch.dtype | None):
    """train.distributed fsdp. Rank 0 reads the weights and applies the adapter first (so its random
    init is the one a ddp run would draw); every rank shards the model built on the meta device, then
    receives its shards from rank 0. A quantized base is loaded by every rank and not sharded."""
    device, full = accelerator.device, spec.adapter.method == "full"
    mesh = process_mesh(device)
    if spec.model.quantization:
        model = adapted(load_model(model_dir, spec.model, device), spec, accelerator)
        share_trainable_from_rank0(model)
        unsharded = probe_loss(model, device, compute_dtype)
        model = shard_model(model, spec.train.fsdp, mesh, compute_dtype, frozen_parameters(model))
        check_sharded_loss(model, unsharded, device, compute_dtype)
        return model
    source = rank_0_weights(model_dir, spec, device) if accelerator.is_main_process else {}
    model = adapted(model_on_meta(model_dir, spec.model, device, full), spec, accelerator)
    model = shard_model(model, spec.train.fsdp, mesh, compute_dtype)
    receive_from_rank0(model, source, device, offloaded(spec.train.fsdp, device.type))
    return model


def rank_0_weights(model_dir: Path, spec: Spec, device: torch.device) -> dict[str, torch.Tensor]:
    """The base's weights with the adapter applied, as a ddp run starts, in host memory, by name (the
    buffers too: their values are computed as the model is made, and no state dict holds some)."""
    model = load_model(model_dir, spec.model, device, full_finetune=spec.adapter.method == "full")
    model = apply_adapter(model, spec.adapter, quantized=False, gradient_checkpointing=False)
    named = [*model.named_buffers(remove_duplicate=False), *model.named_parameters(remove_duplicate=False)]
    return dict(named)


def packed_rows_flattened(model, spec: Spec, accelerator) -> bool:
    """How packed rows (data.packing) reach the model, decided once: flattened into one row per
    micro-batch for flash attention (job/data/batching.py: flatten_packed); under sdpa, attended one
    example at a time where that pays and the model's layers get position ids (a forward tells), else
    under sdpa's block mask."""
    if not spec.data.packing:
        return False
    attn_implementation = spec.model.attn_implementation
    if attn_implementation.startswith("flash"):
        return True
    pays = packed_attention_pays(accelerator.device.type, accelerator.mixed_precision, model.dtype)
    if attn_implementation == "sdpa" and pays and not use_packed_attention(model):
        log.info("this model's layers get no position ids: packed rows are attended under sdpa's block mask")
    return False
