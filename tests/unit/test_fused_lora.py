"""The fused CPU LoRA linear computes what peft's layers compute (same loss, same gradients, same
dropout masks from the same generator state), with or without bias, dropout and bf16 autocast, and
leaves what it cannot fuse (DoRA, a merged adapter) to peft."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import count_applies, tiny_causal_lm

import job.model.fused_lora
from job.model.dropout import use_cpu_dropout
from job.model.fused_lora import FusedLoraLinear, fuse_lora_linears


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """One entry per layer call that took the fused path."""
    return count_applies(monkeypatch, job.model.fused_lora._LoraLinear)


def lora_model(arch: str, dropout: float, method: str = "lora", lora_bias: bool = False):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules="all-linear",
        use_dora=method == "dora",
        lora_bias=lora_bias,
    )
    model = get_peft_model(tiny_causal_lm(arch), lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B (and its bias) at zero, which would hide half of the arithmetic
            torch.nn.init.normal_(param, std=0.02)
    use_cpu_dropout(model)
    return model.train()


def loss_and_grads(model, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.arange(64).remainder(96).view(2, 32)
    torch.manual_seed(1)  # the same dropout masks for both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("arch", "dropout", "autocast"), [
    ("llama", 0.05, False), ("llama", 0.0, False), ("qwen2", 0.1, False), ("llama", 0.05, True),
])  # fmt: skip
def test_the_fused_layers_give_peft_s_loss_and_gradients(arch, dropout, autocast, fused_calls):
    reference = lora_model(arch, dropout)
    fused = copy.deepcopy(reference)
    assert fuse_lora_linears(fused) == 2 * 7
    expected_loss, expected = loss_and_grads(reference, autocast)
    assert fused_calls == []
    loss, grads = loss_and_grads(fused, autocast)
    assert len(fused_calls) == 2 * 7
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-4, "atol": 1e-6}
    assert torch.allclose(loss, expected_loss, **tolerance)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert grad.dtype == expected[name].dtype
        assert torch.allclose(grad, expected[name], **tolerance), name


@pytest.mark.parametrize("variant", ["dora", "lora_bias"])
def test_dora_and_lora_bias_run_peft_s_own_forward(variant, fused_calls):
    reference = lora_model(
        "llama", 0.05, "dora" if variant == "dora" else "lora", lora_bias=variant == "lora_bias"
    )
    fused = copy.deepcopy(reference)
    fuse_lora_linears(fused)
    expected_loss, expected = loss_and_grads(reference)
    loss, grads = loss_and_grads(fused)
    assert fused_calls == []
    assert torch.allclose(loss, expected_loss)
    assert all(torch.allclose(grads[name], grad) for name, grad in expected.items())


def test_merged_and_disabled_adapters_run_peft_s_own_forward(fused_calls):
    model = lora_model("llama", 0.0)
    fuse_lora_linears(model)
    model.eval()
    ids = torch.arange(32).view(1, 32)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        fused_calls.clear()
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert fused_calls == [] and not torch.allclose(base, adapted)
        model.merge_adapter()
        assert torch.allclose(model(input_ids=ids).logits, adapted, atol=1e-5) and fused_calls == []
        model.unmerge_adapter()
        merged = model.merge_and_unload()
        assert not any(isinstance(m, FusedLoraLinear) for m in merged.modules())
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)


def test_eval_mode_drops_nothing():
    model = lora_model("llama", 0.5)
    fuse_lora_linears(model)
    model.eval()
    ids = torch.arange(32).view(1, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
