"""Attention over packed rows, one example at a time, for sdpa on CPUs.

A packed row holds several examples whose position ids restart at 0. transformers turns that into a
block-diagonal causal mask and sdpa then computes every block of the row, the masked ones included
(a mask rules out the causal kernel's skipping). Here each example is attended on its own with the
causal kernel: the same result (no example sees another), with the work of its own length squared
instead of the row's. On the bench's length-skewed data that halves the time spent in attention.

Registered with transformers as the attention implementation PACKED_SDPA. Its mask function builds
no mask for rows without padding (their structure is all in the position ids); a batch with a padding
mask, a bidirectional layer, or a call decoding one token runs transformers' sdpa with its usual mask.
use_packed_attention checks on the model itself that its layers receive the position ids, and keeps
sdpa where they do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_SDPA = "ftjob_packed_sdpa"


def example_lengths(position_ids: torch.Tensor) -> list[int]:
    """The lengths of a row's examples: a new one starts wherever the position id does not follow the
    previous one (transformers' rule for packed rows)."""
    starts = [0, *((position_ids[1:] != position_ids[:-1] + 1).nonzero().flatten() + 1).tolist()]
    return [end - start for start, end in zip(starts, starts[1:] + [len(position_ids)], strict=True)]


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
    grouped = query.shape[1] != key.shape[1]
    if torch.is_autocast_enabled(query.device.type):  # cast once, not each example's slice on its own
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    rows = []
    for q, k, v, positions in zip(query, key, value, position_ids.expand(query.shape[0], -1), strict=True):
        lengths = example_lengths(positions)
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
