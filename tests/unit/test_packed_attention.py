"""Attention over packed rows example by example: the same logits and gradients as sdpa with the
block-diagonal mask transformers builds from restarting position ids, on Llama (grouped key/value
heads) and Qwen2 (biases), padding tails included; calls it cannot split fall back to sdpa."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import attend_by_segments, tiny_causal_lm

import job.model.packed_attention
from job.model.packed_attention import (
    cumulative_lengths,
    flash_can_attend,
    packed_attention_pays,
    rows_example_lengths,
    use_packed_attention,
    varlen_attention,
)


def test_an_example_starts_wherever_the_position_does_not_follow_the_previous_one():
    def lengths(*rows):
        positions = torch.tensor(rows)
        return rows_example_lengths(cumulative_lengths(positions, len(rows))[0], positions.shape[-1])

    assert lengths([0, 1, 2, 0, 1, 0, 0, 1]) == [[3, 2, 1, 2]]
    assert lengths([5, 6, 0, 1]) == [[2, 2]]  # a row cut inside an example
    assert lengths([0, 1, 2, 5, 6]) == [[3, 2]]
    assert lengths([0, 1, 2, 3], [0, 1, 0, 1]) == [[4], [2, 2]]


def model_pair(arch: str):
    reference = tiny_causal_lm(arch).train()
    packed = copy.deepcopy(reference)
    assert use_packed_attention(packed)
    return reference, packed


@pytest.fixture
def split_calls(monkeypatch) -> list[int]:
    calls, attention = [], job.model.packed_attention.F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])
        return attention(*args, **kwargs)

    monkeypatch.setattr(job.model.packed_attention.F, "scaled_dot_product_attention", counted)
    return calls


def forward_backward(model, ids, positions):
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_give_the_block_diagonal_result_of_sdpa(arch, split_calls):
    reference, packed = model_pair(arch)
    examples = [[5, 9, 2], [7, 3, 6]]  # the second row ends in a padding tail of its own (length 2)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in examples])
    ids = torch.randint(0, 96, positions.shape, generator=torch.Generator().manual_seed(1))
    expected_logits, expected_grads = forward_backward(reference, ids, positions)
    split_calls.clear()  # sdpa's own calls go through the same function
    logits, grads = forward_backward(packed, ids, positions)
    assert split_calls == [5, 9, 2, 7, 3, 6] * 2  # each example on its own, in both layers
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-5), name
    separate = packed(input_ids=ids[:1, 5:14], use_cache=False).logits  # the second example alone
    assert torch.allclose(logits[0, 5:14], separate[0], atol=1e-5)


def test_padded_batches_run_sdpa_with_its_own_mask(split_calls):
    reference, packed = model_pair("llama")
    split_calls.clear()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        logits = packed(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert split_calls == [12, 12]  # one sdpa call per layer over whole rows, with the padding mask
        expected = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(logits, expected, atol=1e-6)


def test_a_model_whose_layers_get_no_position_ids_keeps_sdpa(monkeypatch):
    """As a model would whose attention layers are not handed the position ids."""
    _, packed = model_pair("llama")
    unsplit = job.model.packed_attention.packed_sdpa_attention

    def without_positions(*args, position_ids=None, **kwargs):
        return unsplit(*args, **kwargs)

    monkeypatch.setattr(job.model.packed_attention, "packed_sdpa_attention", without_positions)
    assert not use_packed_attention(packed)
    assert packed.config._attn_implementation == "sdpa"


def test_sliding_window_layers_keep_their_window():
    """Mistral with a window of 4: its layers attend as sdpa does, packed or not."""
    reference = tiny_causal_lm("mistral", sliding_window=4).eval()
    packed = copy.deepcopy(reference)
    assert use_packed_attention(packed)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    for positions in (torch.arange(16)[None], torch.cat([torch.arange(10), torch.arange(6)])[None]):
        with torch.no_grad():
            expected = reference(input_ids=ids, position_ids=positions, use_cache=False).logits
            logits = packed(input_ids=ids, position_ids=positions, use_cache=False).logits
        assert torch.allclose(logits, expected, atol=1e-5)


def test_the_examples_of_a_batch_laid_end_to_end_start_at_every_row():
    positions = torch.tensor([[0, 1, 2, 0, 1], [2, 3, 0, 1, 2]])  # 2 follows 1, but a new row starts
    offsets, longest = cumulative_lengths(positions, 2)
    assert offsets.dtype == torch.int32
    assert offsets.tolist() == [0, 3, 5, 7, 10]
    assert longest == 3
    offsets, longest = cumulative_lengths(torch.arange(4)[None], 3)  # one row's ids stand for three
    assert offsets.tolist() == [0, 4, 8, 12] and longest == 4


def test_what_is_derived_from_the_position_ids_is_computed_once_per_forward(monkeypatch):
    """Both layers of a forward, and a second forward over new ids, each derived once: every layer
    splits by the same offsets."""
    _, packed = model_pair("llama")
    offsets_used, split = [], job.model.packed_attention.rows_example_lengths
    monkeypatch.setattr(
        job.model.packed_attention,
        "rows_example_lengths",
        lambda offsets, length: offsets_used.append(offsets) or split(offsets, length),
    )
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for _ in range(2):
            packed(input_ids=ids, position_ids=torch.arange(8)[None], use_cache=False)
    assert len(offsets_used) == 4  # two forwards; the model has two layers
    assert len({id(offsets) for offsets in offsets_used}) == 2


def stand_in_kernel(grouped_heads: bool):
    """PyTorch's varlen_attn, computed with sdpa on the CPU (the real one runs on CUDA only), with or
    without its enable_gqa argument (torch 2.13 has it)."""

    def attend(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):  # fmt: skip
        assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        assert query.dim() == 3 and (enable_gqa or key.shape[1] == query.shape[1])
        assert window_size == (-1, 0)  # causal
        return attend_by_segments(query, key, value, cu_q, scale, enable_gqa=enable_gqa)

    if grouped_heads:
        return attend
    return lambda q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1): attend(
        q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size
    )


@pytest.mark.parametrize("grouped_heads", [True, False])
def test_the_varlen_call_attends_each_example_of_the_batch_alone(grouped_heads):
    """The reshaping around the kernel and its arguments, on grouped heads (repeated for a kernel
    without enable_gqa)."""
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 4, 9, 8, generator=generator, requires_grad=True)
    key, value = (torch.randn(2, 2, 9, 8, generator=generator, requires_grad=True) for _ in range(2))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 0, 1]])
    offsets, longest = cumulative_lengths(positions, 2)
    out = varlen_attention(query, key, value, offsets, longest, 0.3, kernel=stand_in_kernel(grouped_heads))
    assert out.shape == (2, 9, 4, 8)
    for row, lengths in ((0, [4, 2, 3]), (1, [7, 2])):
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            expected = F.scaled_dot_product_attention(
                query[row : row + 1, :, part], key[row : row + 1, :, part], value[row : row + 1, :, part],
                is_causal=True, scale=0.3, enable_gqa=True,
            )  # fmt: skip
            assert torch.allclose(out[row, part], expected[0].transpose(0, 1), atol=1e-6)
            start += n
    out.sum().backward()  # the kernel's gradients flow back through the reshaping
    assert query.grad.abs().sum() > 0 and key.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("device", "mixed_precision", "dtype", "capability", "pays"),
    [
        ("cpu", "no", torch.float32, None, True),
        ("cpu", "bf16", torch.float32, None, False),  # peak memory grew with the steps
        ("cuda", "bf16", torch.float32, (9, 0), True),
        ("cuda", "no", torch.bfloat16, (8, 0), True),
        ("cuda", "no", torch.float32, (9, 0), False),  # the varlen kernel takes half precision only
        ("cuda", "fp16", torch.float32, (7, 5), False),  # FlashAttention needs Ampere or newer
        ("mps", "no", torch.float32, None, False),
    ],
)
def test_packed_attention_is_used_where_it_pays(
    device, mixed_precision, dtype, capability, pays, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert packed_attention_pays(device, mixed_precision, dtype) is pays


@pytest.mark.parametrize(
    ("dtype", "value_dim", "dim", "can"),
    [
        (torch.bfloat16, 64, 64, True),
        (torch.float16, 128, 128, True),
        (torch.float32, 64, 64, False),
        (torch.bfloat16, 128, 192, False),  # value heads of another size (DeepSeek's attention)
        (torch.bfloat16, 288, 288, False),
        (torch.bfloat16, 60, 60, False),
    ],
)
def test_flash_attends_only_the_head_sizes_it_takes(dtype, value_dim, dim, can):
    query, value = torch.zeros(1, 2, 4, dim, dtype=dtype), torch.zeros(1, 2, 4, value_dim, dtype=dtype)
    assert flash_can_attend(query, value) is can
