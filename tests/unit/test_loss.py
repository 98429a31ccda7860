"""The chunked loss: linear_cross_entropy gives cross_entropy's loss and gradients without forming the
whole logits, and output_head uses it only where it reproduces the model's own loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_causal_lm

import job.loss
from job.data.batching import empty_batch
from job.loss import device_batch, linear_cross_entropy, loss_positions, loss_sum, loss_tokens, output_head


def reference_and_chunked(hidden, weight, labels, chunk_logits: int, monkeypatch):
    """(loss, grad of hidden, grad of weight) by F.cross_entropy on the whole logits, then chunked."""
    results = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if chunked:
            monkeypatch.setattr(job.loss, "CHUNK_LOGITS", chunk_logits)
            loss = linear_cross_entropy(h, w, labels)
        else:
            loss = F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100, reduction="sum")
        (loss * 0.7).backward()  # a scale on the way back, as the loop's 1/tokens
        results.append((loss.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize("chunk_logits", [7 * 11, 3 * 11, 10**6])  # 7 rows a chunk, 3, all at once
def test_chunks_give_cross_entropy_s_loss_and_gradients(chunk_logits, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(20, 8, generator=generator), torch.randn(11, 8, generator=generator)
    labels = torch.randint(0, 11, (20,), generator=generator)
    labels[[0, 5, 6, 19]] = -100  # ignored rows, one chunk ignored entirely at 3 rows a chunk
    (loss, grad_h, grad_w), (chunked, chunked_h, chunked_w) = reference_and_chunked(
        hidden, weight, labels, chunk_logits, monkeypatch
    )
    assert torch.allclose(chunked, loss, rtol=1e-6)
    assert torch.allclose(chunked_h, grad_h, atol=1e-6)
    assert torch.allclose(chunked_w, grad_w, atol=1e-6)
    assert not chunked_h[[0, 5, 6, 19]].any()  # no gradient from an ignored token


def test_under_autocast_the_logits_are_bf16_matmuls_and_the_softmax_float32():
    generator = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(12, 16, generator=generator), torch.randn(40, 16, generator=generator)
    labels = torch.randint(0, 40, (12,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")
        chunked = linear_cross_entropy(hidden, weight, labels)
    assert chunked.dtype == torch.float32
    assert torch.allclose(chunked, expected, rtol=1e-5)


def test_a_frozen_weight_gets_no_gradient_and_eval_computes_none(monkeypatch):
    hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4)
    labels = torch.randint(0, 9, (6,))
    linear_cross_entropy(hidden, weight, labels).backward()
    assert weight.grad is None and hidden.grad is not None
    computed, forward = [], job.loss.LinearCrossEntropy.forward

    def recorded(ctx, *args):
        computed.append(ctx.needs_input_grad[:2])
        return forward(ctx, *args)

    monkeypatch.setattr(job.loss.LinearCrossEntropy, "forward", staticmethod(recorded))
    with torch.no_grad():  # eval of a full fine-tune: the weight trains, but no gradient is wanted
        linear_cross_entropy(hidden, weight.requires_grad_(True), labels)
    assert computed == [(False, False)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_model_s_loss_and_gradients_are_the_same_through_its_head(arch):
    """Packed rows with ignored labels; every parameter's gradient, the tied head's included."""
    reference = tiny_causal_lm(arch, tie_word_embeddings=True).train()
    model = copy.deepcopy(reference)
    head = output_head(model)
    assert head is model.lm_head
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 2),
    }
    for m, h in ((reference, None), (model, head)):
        loss_sum(m, batch, h).backward()
    assert torch.allclose(loss_sum(model, batch, head), loss_sum(reference, batch), rtol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(q.grad, p.grad, atol=1e-5), name


def test_heads_it_cannot_reproduce_keep_the_model_s_own_loss():
    scaled = tiny_causal_lm("llama")
    scaled.lm_head.register_forward_hook(lambda module, args, out: out * 30)  # as logit scaling would
    assert output_head(scaled) is None
    capped = tiny_causal_lm("llama")
    capped.config.final_logit_softcapping = 30.0  # Gemma 2's: near the identity on small logits
    assert output_head(capped) is None
    biased = tiny_causal_lm("llama")
    biased.lm_head = torch.nn.Linear(64, 96, bias=True)
    assert output_head(biased) is None
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(tiny_causal_lm("llama"), LoraConfig(target_modules=["q_proj", "lm_head"]))
    assert output_head(adapted) is None
    assert output_head(get_peft_model(tiny_causal_lm("llama"), LoraConfig(target_modules=["q_proj"])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_accelerate_s_bf16_autocast_the_head_computes_as_the_model_s_own(dtype):
    """accelerate's mixed precision wraps only the model's forward in autocast and hands its outputs
    back in float32 (as below; the job's own run of it is test_train's bf16 test): the chunked head must
    compute in bf16 all the same, so the loop runs the loss under autocast too."""
    from accelerate.utils import convert_outputs_to_fp32

    model = tiny_causal_lm("llama", tie_word_embeddings=True).to(dtype)
    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    head = output_head(model)
    assert head is not None
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "labels": ids}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, expected = loss_sum(model, batch, head), loss_sum(model, batch)
    assert torch.allclose(chunked, expected, rtol=1e-6)
    outside = loss_sum(model, batch, head)  # the float32 hidden states the wrapped forward returns
    # a bf16 head computes in its own dtype; a float32 one outside autocast in float32, not as the model
    assert torch.allclose(outside, expected, rtol=1e-6) is (dtype == torch.bfloat16)


def prompt_and_padding_batch() -> dict[str, torch.Tensor]:
    """Two padded rows: the first with a 4-token prompt without loss, the second 6 tokens then padding."""
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    labels, attention_mask = ids.clone(), torch.ones_like(ids)
    labels[0, :4] = -100
    labels[1, 6:], attention_mask[1, 6:] = -100, 0
    return {"input_ids": ids, "labels": labels, "attention_mask": attention_mask}


def test_only_the_positions_whose_next_token_carries_loss_are_scored(monkeypatch):
    """Prompts and padding go through neither the chunked head nor the unchunked loss, and both give the
    loss and gradients of cross-entropy over the whole logits (ignore_index), which device_batch's
    CPU-computed positions do not change."""
    reference = tiny_causal_lm("llama", tie_word_embeddings=True).train()
    model, whole_logits = copy.deepcopy(reference), copy.deepcopy(reference)
    batch = prompt_and_padding_batch()
    logits = whole_logits(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    expected.backward()
    scored, forward = [], job.loss.LinearCrossEntropy.forward

    def recorded(ctx, hidden, *args):
        scored.append(len(hidden))
        return forward(ctx, hidden, *args)

    monkeypatch.setattr(job.loss.LinearCrossEntropy, "forward", staticmethod(recorded))
    chunked = loss_sum(model, device_batch(batch, torch.device("cpu")), output_head(model))
    chunked.backward()
    assert scored[-1] == loss_tokens(batch) == 6 + 5  # row 0: tokens 4..9 predicted; row 1: 1..5
    unchunked = loss_sum(reference, batch)
    unchunked.backward()
    assert torch.allclose(chunked, expected, rtol=1e-6) and torch.allclose(unchunked, expected, rtol=1e-6)
    for p, q, r in zip(whole_logits.parameters(), model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(q.grad, p.grad, atol=1e-6) and torch.allclose(r.grad, p.grad, atol=1e-6)


def test_loss_positions_index_the_token_before_each_label():
    labels = torch.tensor([[-100, -100, 5, 6], [7, 8, -100, -100]])
    assert loss_positions({"labels": labels}).tolist() == [1, 2, 4]
    assert loss_positions(empty_batch(0)).tolist() == []
