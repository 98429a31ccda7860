"""Where each example of a packed micro-batch starts, computed by the collator on the CPU: the offsets
attention would derive from the position ids on the device, and what the model computes with them is
what it computes without them, through peft's wrapper and gradient checkpointing, under packed sdpa
and under transformers' flash-attention path."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers import attend_by_segments, tiny_causal_lm

import job.model.packed_attention
from job.data.batching import PACKED_OFFSETS, flatten_packed, pack_row, stack_packed
from job.data.tokens import TokenizedExample
from job.loss import device_batch, loss_sum
from job.model.adapter import apply_adapter
from job.model.packed_attention import cumulative_lengths, packed_sdpa_attention, use_packed_attention
from job.spec import AdapterSpec
from job.step import HostReady

LENGTH = 16


def random_example(generator: random.Random, size: int) -> TokenizedExample:
    ids = [generator.randrange(1, 96) for _ in range(size)]
    return TokenizedExample(input_ids=ids, labels=ids)


def random_packing(seed: int, rows: int) -> dict[str, torch.Tensor]:
    """`rows` rows of LENGTH tokens holding examples of random sizes: about half the rows full, the
    others with a padding tail."""
    generator = random.Random(seed)
    packed = []
    for _ in range(rows):
        unfilled = LENGTH if generator.random() < 0.5 else generator.randrange(1, LENGTH)
        sizes = []
        while unfilled:
            sizes.append(generator.randrange(1, unfilled + 1))
            unfilled -= sizes[-1]
        packed.append(pack_row([random_example(generator, n) for n in sizes], LENGTH, 0))
    return stack_packed(packed)


def without_offsets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in batch.items() if key not in ("cu_seq_lens", "max_length")}


@pytest.mark.parametrize("seed", range(8))
def test_the_collator_gives_the_offsets_derived_from_the_position_ids(seed):
    batch = random_packing(seed, rows=1 + seed % 4)
    rows = len(batch["input_ids"])
    offsets, longest = cumulative_lengths(batch["position_ids"], rows)
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert torch.equal(batch["cu_seq_lens"], offsets)
    assert int(batch["max_length"]) == longest
    assert batch["cu_seq_lens"][0] == 0 and batch["cu_seq_lens"][-1] == rows * LENGTH
    flat = flatten_packed(batch)
    assert torch.equal(flat["cu_seq_lens"], cumulative_lengths(flat["position_ids"], 1)[0])
    assert flat["max_length"] is batch["max_length"]


def test_full_rows_and_padding_tails_are_segments_of_their_own():
    examples = [TokenizedExample(input_ids=[1] * n, labels=[1] * n) for n in (3, 5, 16, 4)]
    batch = stack_packed([pack_row(examples[:2], LENGTH, 0), pack_row(examples[2:3], LENGTH, 0)])
    assert batch["cu_seq_lens"].tolist() == [0, 3, 8, 16, 32]  # 3, 5, a padding tail of 8, a full row
    assert int(batch["max_length"]) == 16


def test_the_device_gets_the_offsets_and_the_host_keeps_the_longest_length():
    batch = device_batch(random_packing(0, rows=2), torch.device("meta"))
    assert batch["cu_seq_lens"].device.type == "meta"
    assert batch["max_length"].device.type == "cpu" and batch["real_tokens"].device.type == "cpu"


def refuse_to_derive(*args):
    raise AssertionError("the offsets were derived from the position ids")


def test_attention_with_the_collator_s_offsets_derives_nothing(monkeypatch):
    """The same output as with the offsets derived from the position ids, on grouped key/value heads."""
    batch = random_packing(3, rows=3)
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(3, 4, LENGTH, 8, generator=generator)
    key, value = (torch.randn(3, 2, LENGTH, 8, generator=generator) for _ in range(2))
    module = torch.nn.Module()
    attend = {"position_ids": batch["position_ids"], "scaling": 0.3}
    expected, _ = packed_sdpa_attention(module, query, key, value, None, **attend)
    monkeypatch.setattr(job.model.packed_attention, "cumulative_lengths", refuse_to_derive)
    offsets, longest = batch["cu_seq_lens"], int(batch["max_length"])
    given = {
        "cu_seq_lens_q": offsets,
        "cu_seq_lens_k": offsets,
        "max_length_q": longest,
        "max_length_k": longest,
    }
    out, _ = packed_sdpa_attention(module, query, key, value, None, **attend, **given)
    assert torch.equal(out, expected)


def loss_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = loss_sum(model, device_batch(batch, torch.device("cpu")))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_a_packed_batch_s_loss_and_gradients_are_the_same_with_the_collator_s_offsets(
    gradient_checkpointing, monkeypatch
):
    """Through peft's wrapper, the Llama layers and (recomputed in backward) gradient checkpointing: the
    offsets reach every attention call, which derives none of its own."""
    model = tiny_causal_lm("llama")
    assert use_packed_attention(model)
    model = apply_adapter(model, AdapterSpec(r=4, dropout=0.0), False, gradient_checkpointing).train()
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A without a gradient
            torch.nn.init.normal_(parameter, std=0.1)
    batch = random_packing(1, rows=3)
    expected, expected_gradients = loss_and_gradients(model, without_offsets(batch))
    monkeypatch.setattr(job.model.packed_attention, "cumulative_lengths", refuse_to_derive)
    loss, gradients = loss_and_gradients(model, batch)
    assert torch.allclose(loss, expected, rtol=1e-6)
    for name, gradient in gradients.items():
        assert gradient.abs().sum() > 0, name
        assert torch.allclose(gradient, expected_gradients[name], atol=1e-6), name


def stand_in_flash_varlen(calls: list):
    """flash-attn's variable-length function as transformers calls it ([tokens, heads, dim]), computed
    with sdpa on the CPU, each call's offsets recorded."""

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=True):  # fmt: skip
        calls.append((cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
        return attend_by_segments(q, k, v, cu_seqlens_q, softmax_scale, causal, enable_gqa=True)

    return flash_attn_varlen_func


def test_flash_attention_takes_the_flattened_batch_s_offsets(monkeypatch):
    """transformers' flash-attention path, on a micro-batch flattened as for flash_attention_2, calls
    the variable-length kernel with the collator's offsets and longest length and derives none from
    the position ids; the loss is packed sdpa's."""
    import transformers.modeling_flash_attention_utils as flash_utils

    reference = tiny_causal_lm("llama").eval()
    flash = copy.deepcopy(reference)
    assert use_packed_attention(reference)
    calls = []
    kernels = (None, stand_in_flash_varlen(calls), None, None, None)  # only the varlen function
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    monkeypatch.setattr(flash_utils, "_prepare_from_posids", refuse_to_derive)
    flash.config._attn_implementation = "flash_attention_2"
    batch = random_packing(2, rows=3)
    with torch.no_grad():
        expected = loss_sum(reference, device_batch(batch, torch.device("cpu")))
        flat = device_batch(flatten_packed(batch), torch.device("cpu"))
        loss = loss_sum(flash, flat)
    assert len(calls) == 2  # two layers
    for cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k in calls:
        assert cu_seqlens_q is flat["cu_seq_lens"] and cu_seqlens_k is flat["cu_seq_lens"]
        assert max_seqlen_q == max_seqlen_k == int(batch["max_length"])
    assert torch.allclose(loss, expected, rtol=1e-6)


def test_the_step_s_host_work_keeps_the_offsets_only_for_an_attention_that_takes_them():
    batch = random_packing(seed=3, rows=2)
    assert set(PACKED_OFFSETS) <= HostReady(flatten=False, offsets=True, pin=False)(batch).keys()
    plain = HostReady(flatten=False, offsets=False, pin=False)(batch)
    assert not set(PACKED_OFFSETS) & plain.keys() and "loss_positions" in plain
    flat = HostReady(flatten=True, offsets=True, pin=False)(batch)
    assert flat["input_ids"].shape == (1, 2 * LENGTH) and torch.equal(
        flat["cu_seq_lens"], batch["cu_seq_lens"]
    )
