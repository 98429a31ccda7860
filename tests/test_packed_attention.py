"""Attention over packed rows example by example: the same logits and gradients as sdpa with the
block-diagonal mask transformers builds from restarting position ids, on Llama (grouped key/value
heads) and Qwen2 (biases), padding tails included; calls it cannot split fall back to sdpa."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_causal_lm

import job.packed_attention
from job.packed_attention import example_lengths, use_packed_attention


def test_an_example_starts_wherever_the_position_does_not_follow_the_previous_one():
    assert example_lengths(torch.tensor([0, 1, 2, 0, 1, 0, 0, 1])) == [3, 2, 1, 2]
    assert example_lengths(torch.tensor([5, 6, 0, 1])) == [2, 2]  # a row cut inside an example
    assert example_lengths(torch.tensor([0, 1, 2, 5, 6])) == [3, 2]
    assert example_lengths(torch.arange(4)) == [4]


def model_pair(arch: str):
    reference = tiny_causal_lm(arch).train()
    packed = copy.deepcopy(reference)
    assert use_packed_attention(packed)
    return reference, packed


@pytest.fixture
def split_calls(monkeypatch) -> list[int]:
    calls, attention = [], job.packed_attention.F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])
        return attention(*args, **kwargs)

    monkeypatch.setattr(job.packed_attention.F, "scaled_dot_product_attention", counted)
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
    unsplit = job.packed_attention.packed_sdpa_attention

    def without_positions(*args, position_ids=None, **kwargs):
        return unsplit(*args, **kwargs)

    monkeypatch.setattr(job.packed_attention, "packed_sdpa_attention", without_positions)
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
