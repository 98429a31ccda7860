"""Attention over packed rows, one example at a time, for sdpa.

A packed row holds several examples whose position ids restart at 0. transformers turns that into a
block-diagonal causal mask and sdpa then computes every block of the row, the masked ones included
(a mask rules out the causal kernel's skipping). Here each example is attended on its own: the same
result (no example sees another), with the work of its own length squared instead of the row's.
On CPUs each example is one call of sdpa's causal kernel (less time in attention on length-skewed
data: bench/RESULTS.md); on CUDA in half precision every example of the micro-batch is
one call of PyTorch's FlashAttention variable-length kernel (`torch.nn.attention.varlen`), so packing
runs on flash attention without the flash-attn package.

Where each example starts comes from the collator (job/data/batching.py: stack_packed), computed on the
CPU and passed as transformers' variable-length keyword arguments (cu_seq_lens_q, max_length_q), so
that the device is not waited for; a call without them (attends_per_example's probe, generation)
derives them from the position ids, once per forward.

Registered with transformers as the attention implementation PACKED_SDPA. Its mask function builds
no mask for rows without padding (their structure is all in the position ids); a batch with a padding
mask, a bidirectional layer, or a call decoding one token runs transformers' sdpa with its usual mask.
use_packed_attention checks on the model itself that its layers receive the position ids, and keeps
sdpa where they do not.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

PACKED_SDPA = "ftjob_packed_sdpa"
HALF = (torch.float16, torch.bfloat16)


def once_per_forward(derive: Callable) -> Callable:
    """Cache what `derive` computes from a forward's tensor (its position ids, or its examples'
    offsets): transformers hands every layer (and its recomputation under gradient checkpointing) the
    same tensor, so this runs once per forward instead of once per layer (on CUDA it waits for the
    device each time)."""
    last: list = [None, None, None]  # the tensor, the other arguments, the result

    @functools.wraps(derive)
    def cached(tensor: torch.Tensor, *args):
        if last[0] is not tensor or last[1] != args:
            last[:] = tensor, args, derive(tensor, *args)
        return last[2]

    return cached


@once_per_forward
def cumulative_lengths(position_ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    """The examples of `rows` rows laid end to end, as the variable-length kernels take them: the
    offsets where each starts and where the last ends (int32, on the ids' device), and the longest's
    length. An example starts wherever the position id does not follow the previous one (transformers'
    rule for packed rows), and at every row's start (one row's ids stand for every row)."""
    flat = position_ids.expand(rows, -1).reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[:: position_ids.shape[-1]] = True
    offsets = torch.cat([starts.nonzero().flatten(), flat.new_tensor([len(flat)])]).to(torch.int32)
    return offsets, int((offsets[1:] - offsets[:-1]).max())


def example_offsets(position_ids: torch.Tensor, rows: int, kwargs: dict) -> tuple[torch.Tensor, int]:
    """cumulative_lengths() of the batch: as the collator gave them (cu_seq_lens_q, max_length_q), else
    derived from the position ids."""
    offsets, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if offsets is None or longest is None:
        return cumulative_lengths(position_ids, rows)
    return offsets, longest


@once_per_forward
def rows_example_lengths(offsets: torch.Tensor, length: int) -> list[list[int]]:
    """The lengths of each row's examples, from the offsets of the examples laid end to end over rows
    of `length` tokens (on CUDA, reading them waits for the device)."""
    lengths = []
    for start, end in itertools.pairwise(offsets.tolist()):
        if start % length == 0:
            lengths.append([])
        lengths[-1].append(end - start)
    return lengths


@functools.cache
def varlen_kernel() -> Callable | None:
    """PyTorch's FlashAttention varlen_attn in the signature used here (torch 2.11 and later: scale,
    window_size), else None."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return None
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn if {"scale", "window_size"} <= kernel_parameters(varlen_attn) else None


@functools.cache
def kernel_parameters(kernel: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(kernel).parameters)


def flash_can_attend(query: torch.Tensor, value: torch.Tensor) -> bool:
    """FlashAttention's limits: half precision, one head size for queries and values, at most 256 and
    a multiple of 8."""
    dim = query.shape[-1]
    return query.dtype in HALF and value.shape[-1] == dim and dim <= 256 and dim % 8 == 0


def varlen_attention(query, key, value, offsets, longest, scaling, kernel: Callable | None = None):
    """Every example of the batch in one call of a variable-length causal kernel (varlen_kernel()
    unless `kernel` is given), the examples given as cumulative_lengths() gives them: query [batch,
    heads, length, dim] in, the output as [batch, length, heads, dim] out."""
    kernel = kernel or varlen_kernel()
    batch, heads, length, dim = query.shape
    query, key, value = (
        x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value)
    )
    options = {"window_size": (-1, 0)}  # causal
    if key.shape[1] != heads:  # grouped key/value heads
        if "enable_gqa" in kernel_parameters(kernel):
            options["enable_gqa"] = True
        else:
            key, value = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (key, value))
    out = kernel(query, key, value, offsets, offsets, longest, longest, scale=scaling, **options)
    return out.reshape(batch, length, heads, dim)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):  # fmt: skip
    """transformers' attention signature: query [batch, heads, length, dim], key and value with as many
    or fewer heads; returns the output as [batch, length, heads, dim] and no attention weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    whole_rows = query.shape[2] == 1 or key.shape[2] != query.shape[2]  # decoding with a cache
    if attention_mask is not None or position_ids is None or not causal or whole_rows:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )  # fmt: skip
    if torch.is_autocast_enabled(query.device.type):  # cast once, not each example's slice on its own
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    offsets, longest = example_offsets(position_ids, query.shape[0], kwargs)
    if query.is_cuda and not dropout and flash_can_attend(query, value) and varlen_kernel():
        return varlen_attention(query, key, value, offsets, longest, scaling), None
    grouped = query.shape[1] != key.shape[1]
    rows = []
    for q, k, v, lengths in zip(
        query, key, value, rows_example_lengths(offsets, query.shape[2]), strict=True
    ):
        examples = [
            F.scaled_dot_product_attention(
                q_part[None], k_part[None], v_part[None], dropout_p=dropout, is_causal=True, scale=scaling,
                enable_gqa=grouped,
            )
            for q_part, k_part, v_part in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True)
        ]  # fmt: skip
        rows.append(torch.cat(examples, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def packed_rows_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """No mask for full-attention layers over rows without padding (the position ids say where the
    examples start); sdpa's mask for padded rows and for sliding-window layers (local_size), whose
    attention then runs as sdpa."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs.get("local_size") is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def packed_attention_pays(device_type: str, mixed_precision: str, dtype: torch.dtype) -> bool:
    """Where attending example by example is the faster way: on CPUs without mixed precision (under
    bf16 autocast peak memory grew with the steps; bench/RESULTS.md), and on CUDA GPUs that run
    FlashAttention (Ampere or newer) where attention runs in half precision (bf16 or fp16 autocast, or
    a half-precision model) on the varlen kernel; a layer it cannot take (head sizes, attention
    dropout) attends example by example with sdpa."""
    if device_type == "cpu":
        return mixed_precision == "no"
    if device_type != "cuda" or torch.version.hip or not varlen_kernel():
        return False
    half = mixed_precision in ("bf16", "fp16") or dtype in HALF
    return half and torch.cuda.get_device_capability() >= (8, 0)  # FlashAttention: Ampere or newer


def takes_offsets(model) -> bool:
    """Whether `model` attends through packed_sdpa_attention (job/model/compile.py's eager registration
    of it too), which takes the collator's offsets of packed rows; other attention is given none."""
    return str(getattr(model.config, "_attn_implementation", "")).startswith(PACKED_SDPA)


def use_packed_attention(model) -> bool:
    """Make `model` (a transformers model using sdpa) attend to packed rows example by example; False
    (and sdpa kept) when its layers do not receive the position ids that this needs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_rows_mask)
    model.set_attn_implementation(PACKED_SDPA)
    if attends_per_example(model):
        return True
    model.set_attn_implementation("sdpa")
    return False


def attends_per_example(model) -> bool:
    """Whether two copies of the same two tokens packed in one row give the same logits: only if
    neither copy sees the other."""
    ids = torch.tensor([[1, 2, 1, 2]], device=model.device)
    positions = torch.tensor([[0, 1, 0, 1]], device=model.device)
    training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    model.train(training)
    return torch.allclose(logits[0, :2], logits[0, 2:], rtol=1e-3, atol=1e-4)
