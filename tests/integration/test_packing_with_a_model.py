"""Packing checked with the tiny model: a packed row's loss and attention keep its examples apart."""

from __future__ import annotations

import pytest
import torch

from job.data.batching import pad_batch
from job.data.formats import Formatter
from job.data.tokens import tokenize


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_loss_equals_the_examples_one_by_one(tiny_model_dir, tokenizer, isolated, attn):
    from transformers import AutoModelForCausalLM

    from job.data.batching import pack_row, stack_packed
    from job.loss import loss_sum, loss_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    formatter = Formatter("alpaca", {}, "all", tokenizer)
    texts = [("Say hi", "hi"), ("Reverse the words: one two", "two one"), ("Add one", "42 is the answer")]
    examples = [tokenize(formatter({"instruction": i, "output": o}), tokenizer) for i, o in texts]
    with torch.no_grad():
        one_by_one = sum(loss_sum(model, pad_batch([e], tokenizer.pad_token_id)) for e in examples)
        packed = stack_packed([pack_row(examples, 64, tokenizer.pad_token_id)])
        packed_loss = loss_sum(model, packed)
    assert loss_tokens(packed) == sum(len(e.input_ids) - 1 for e in examples)
    torch.testing.assert_close(packed_loss, one_by_one, rtol=1e-5, atol=1e-4)


def test_flash_attention_keeps_packed_examples_apart_in_a_micro_batch(
    tiny_model_dir, tokenizer, cpu_flash_kernels
):
    """transformers finds packed examples in the position ids only for a batch of one row: flatten_packed
    makes a [B, L] micro-batch one row. Given the collator's offsets (cu_seq_lens_q ...), it calls the
    variable-length kernel for [B, L] rows too; without either, examples see each other."""
    from transformers import AutoModelForCausalLM

    from job.data.batching import PACKED_OFFSETS, flatten_packed, pack_row, stack_packed
    from job.loss import loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    formatter = Formatter("alpaca", {}, "all", tokenizer)
    texts = [("Say hi", "hi"), ("Reverse the words: one two", "two one"), ("Add one", "42"), ("Say", "yes")]
    examples = [tokenize(formatter({"instruction": i, "output": o}), tokenizer) for i, o in texts]
    rows = [
        pack_row(examples[:2], 48, tokenizer.pad_token_id),
        pack_row(examples[2:], 48, tokenizer.pad_token_id),
    ]
    batch = stack_packed(rows)  # [2, 48]: two examples in each row
    bare = {key: value for key, value in batch.items() if key not in PACKED_OFFSETS}
    with torch.no_grad():
        one_by_one = sum(loss_sum(model, pad_batch([e], tokenizer.pad_token_id)) for e in examples)
        model.config._attn_implementation = "flash_attention_2"
        losses = {}
        for form, given in [("flat", flatten_packed(bare)), ("offsets", batch), ("bare", bare)]:
            cpu_flash_kernels.clear()
            losses[form] = loss_sum(model, given)
            assert set(cpu_flash_kernels) == ({"dense"} if form == "bare" else {"varlen"}), form
    torch.testing.assert_close(losses["flat"], one_by_one, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(losses["offsets"], one_by_one, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(losses["bare"], one_by_one, rtol=1e-3)  # examples saw each other
