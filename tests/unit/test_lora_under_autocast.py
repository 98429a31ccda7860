"""LoRA as ftjob prepares it for a GPU (job/model/prepare.py: faster_layers), run on the CPU under bf16
autocast, on a bfloat16 base with a float32 adapter as on a GPU: the adapter layers compute on their
16-bit input instead of a float32 copy (four fewer casts per layer, the adapter and its gradients still
float32), the fused LoRA layer saves one input for q, k and v instead of a dropped copy each, and both
compute what peft's layers compute."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import count_applies, tiny_causal_lm
from peft import LoraConfig, get_peft_model
from torch import nn

import job.model.fused_lora
from bench.lora_layer_ops import layer_traffic, lora_model, prepared
from job.model.dropout import CpuDropout
from job.model.fused_lora import FusedLoraLinear
from job.model.prepare import faster_layers

ADAPTED = 7  # q, k, v, o, gate, up and down in each decoder layer
TOKENS = 32


def adapter_layers(model) -> list[nn.Module]:
    return [module for module in model.modules() if hasattr(module, "cast_input_dtype_enabled")]


def dropouts(model) -> list[nn.Module]:
    return [dropout for layer in adapter_layers(model) for dropout in layer.lora_dropout.values()]


def test_the_gpu_path_keeps_peft_s_layers_and_dropout_and_the_cpu_path_its_own():
    model = faster_layers(lora_model("tiny", 0.05), "cuda")
    assert not any(isinstance(layer, FusedLoraLinear) for layer in adapter_layers(model))  # not measured
    assert all(type(dropout) is nn.Dropout for dropout in dropouts(model))
    model = faster_layers(lora_model("tiny", 0.05), "cpu")
    assert all(isinstance(layer, FusedLoraLinear) for layer in adapter_layers(model))
    assert all(type(dropout) is CpuDropout for dropout in dropouts(model))


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_the_input_is_cast_only_without_autocast_where_a_16_bit_input_needs_it(device_type):
    model = faster_layers(lora_model("tiny", 0.05), device_type)
    ids = torch.arange(16).view(1, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    assert [layer.cast_input_dtype_enabled for layer in adapter_layers(model)] == [False] * ADAPTED
    assert model(input_ids=ids).logits.dtype == torch.bfloat16  # a probe without autocast still runs
    assert [layer.cast_input_dtype_enabled for layer in adapter_layers(model)] == [True] * ADAPTED


def test_without_the_input_cast_each_adapter_layer_casts_four_times_less_and_the_adapter_stays_float32():
    before = layer_traffic(prepared(lora_model("tiny", 0.05), "peft"), TOKENS)
    model = prepared(lora_model("tiny", 0.05), "no input cast")
    after = layer_traffic(model, TOKENS)
    # its input to float32 and back in forward, and the gradient at each of those casts in backward
    assert before.ops["_to_copy"] - after.ops["_to_copy"] == 4 * ADAPTED
    assert after.written < before.written
    adapter = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(adapter) == 2 * ADAPTED
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in adapter.values())


def test_the_fused_layer_on_the_gpu_path_saves_an_input_once_not_a_dropped_copy_per_layer():
    peft = layer_traffic(prepared(lora_model("tiny", 0.05), "no input cast"), TOKENS)
    model = prepared(lora_model("tiny", 0.05), "fused")
    fused = layer_traffic(model, TOKENS)
    inputs = [m.in_features for m in model.modules() if isinstance(m, FusedLoraLinear)]
    hidden, intermediate = max(inputs[:3]), max(inputs)
    # peft saves each layer's dropped bfloat16 input for lora_A; the fused layer saves its input, one
    # tensor for q, k and v, one for o, one for gate and up, one for down (at most, others may keep it)
    dropped_copies = 2 * TOKENS * sum(inputs)
    inputs_once = 2 * TOKENS * (3 * hidden + intermediate)
    assert peft.saved - fused.saved >= dropped_copies - inputs_once > 0
    # the scaling and the sum of the two paths, in forward and in backward, are folded into matmuls
    assert fused.ops["add"] <= peft.ops["add"] - 2 * ADAPTED
    assert fused.ops.total() < peft.ops.total() and fused.written < peft.written


def bf16_lora_model(dropout: float):
    """The two-layer tiny Llama in bfloat16 with a float32 LoRA adapter, as a GPU loads it."""
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(tiny_causal_lm("llama").to(torch.bfloat16), lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide half of the arithmetic
            torch.nn.init.normal_(param, std=0.02)
    return model.train()


def loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.arange(64).remainder(96).view(2, 32)
    torch.manual_seed(1)  # the same dropout masks for both models
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fused_lora", [False, True])
@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_the_gpu_path_gives_peft_s_loss_and_gradients(fused_lora, dropout, monkeypatch):
    reference = bf16_lora_model(dropout)
    model = copy.deepcopy(reference)
    expected_loss, expected = loss_and_grads(prepared(reference, "peft"))  # dropout drawn as on a GPU
    model = prepared(model, "fused" if fused_lora else "no input cast")
    fused_calls = count_applies(monkeypatch, job.model.fused_lora._LoraLinear)
    loss, grads = loss_and_grads(model)
    assert len(fused_calls) == (2 * ADAPTED if fused_lora else 0)
    assert torch.allclose(loss, expected_loss, rtol=1e-2)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert torch.allclose(grad, expected[name], rtol=2e-2, atol=2e-3), name
