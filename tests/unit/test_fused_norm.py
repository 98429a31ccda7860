"""The fused CPU RMSNorm computes what transformers' norms compute (output, input and weight gradients),
in whole models too, and leaves to the model what it cannot take over (other formulas, other dtypes)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import count_applies, tiny_causal_lm
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import job.model.fused_norm
from job.model.fused_norm import FusedRMSNorm, computes_rms_norm, fuse_rms_norms


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """One entry per norm call that took the fused path."""
    return count_applies(monkeypatch, job.model.fused_norm._RMSNorm)


def random_norm(features: int, eps: float = 1e-6) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(features, eps=eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


@pytest.mark.parametrize("shape", [(2, 5, 16), (7, 16)])
@pytest.mark.parametrize("eps", [1e-6, 1.0])
def test_output_and_gradients_match_transformers(shape, eps, fused_calls):
    reference = random_norm(shape[-1], eps)
    fused = copy.deepcopy(reference)
    assert fuse_rms_norms(fused) == 1
    x = torch.randn(*shape) * 3
    grad = torch.randn(*shape)
    results = []
    for norm in (reference, fused):
        leaf = x.clone().requires_grad_()
        out = norm(leaf)
        out.backward(grad)
        results.append((out, leaf.grad, norm.weight.grad))
    assert fused_calls == [1]
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_gradient_is_computed_for_what_needs_none():
    norm = random_norm(8)
    fuse_rms_norms(norm)
    norm.weight.requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is None
    norm.weight.requires_grad_(True)
    frozen_input = torch.randn(3, 8)
    norm(frozen_input).sum().backward()
    assert norm.weight.grad is not None


@pytest.mark.parametrize("under_autocast", ["backward", "forward and backward"])
def test_under_autocast_the_norm_stays_in_float32(under_autocast, fused_calls):
    """A float32 norm computes under bf16 autocast what it computes without it, whether the loop runs
    only backward() inside its autocast block or forward too (torch would run the fused forward's
    vecdot, and the backward's, in bf16)."""
    norm = random_norm(64)
    fuse_rms_norms(norm)
    x, grad = torch.randn(4, 64) * 3, torch.randn(4, 64)
    results = []
    for autocast in (False, True):
        leaf = x.clone().requires_grad_()
        forward_bf16 = autocast and under_autocast == "forward and backward"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_bf16):
            out = norm(leaf)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out.backward(grad)
        results.append((out, leaf.grad, norm.weight.grad.clone()))
        norm.weight.grad = None
    assert len(fused_calls) == 2
    for expected, got in zip(*results, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_a_second_derivative_is_refused():
    norm = random_norm(8)
    fuse_rms_norms(norm)
    x = torch.randn(3, 8, requires_grad=True)
    (grad_x,) = torch.autograd.grad(norm(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        grad_x.sum().backward()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_model_trains_the_same(arch, autocast, fused_calls):
    """Every norm of the model fused (two per layer and the final one); loss and every gradient as before,
    the norms' weights trained as in a full fine-tune."""
    reference = tiny_causal_lm(arch)
    fused = copy.deepcopy(reference)
    assert fuse_rms_norms(fused) == 2 * 2 + 1
    ids = torch.randint(0, 96, (2, 12))
    results = []
    for model in (reference, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    assert len(fused_calls) == 5
    (loss, grads), (fused_loss, fused_grads) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-5)
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, **tolerance, msg=name)


def test_other_dtypes_run_the_models_own_forward(fused_calls):
    reference = random_norm(8).to(torch.bfloat16)
    fused = copy.deepcopy(reference)
    fuse_rms_norms(fused)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(fused(x), reference(x))
    assert fused_calls == []


class WeightlessRMSNorm(LlamaRMSNorm):
    """Ignores its weight: the same as the plain formula while the weight is all ones, as at init."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class OffsetRMSNorm(LlamaRMSNorm):
    """Gemma's formula, (1 + weight), under Llama's attribute names."""

    def forward(self, x):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return normed * (1 + self.weight)


class ResidualRMSNorm(LlamaRMSNorm):
    """The plain formula, with a residual added first when one is passed."""

    def forward(self, x, residual=None):
        return super().forward(x if residual is None else x + residual)


class TupleRMSNorm(LlamaRMSNorm):
    def forward(self, x):
        return super().forward(x), None


class BufferRMSNorm(LlamaRMSNorm):
    """State beyond the weight (a running scale, here at its neutral value) is not the plain formula's."""

    def __init__(self, features):
        super().__init__(features)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        return super().forward(x) * self.scale


def test_a_call_with_more_than_the_hidden_states_runs_the_models_own_forward(fused_calls):
    reference = ResidualRMSNorm(8)
    fused = copy.deepcopy(reference)
    assert fuse_rms_norms(fused) == 1
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(fused(x, residual=residual), reference(x, residual=residual))
    torch.testing.assert_close(fused(x, residual), reference(x, residual))
    assert fused_calls == []
    torch.testing.assert_close(fused(x), reference(x))
    assert fused_calls == [1]


@pytest.mark.parametrize(
    "norm",
    [
        WeightlessRMSNorm(8),
        OffsetRMSNorm(8),
        GemmaRMSNorm(8),
        nn.LayerNorm(8, bias=False),
        TupleRMSNorm(8),
        BufferRMSNorm(8),
    ],
    ids=["weightless", "offset", "gemma", "layernorm", "tuple", "buffer"],
)
def test_other_formulas_are_left_alone(norm):
    assert not computes_rms_norm(norm)
    assert fuse_rms_norms(norm) == 0 and not isinstance(norm, FusedRMSNorm)


def test_fused_twice_is_fused_once():
    model = tiny_causal_lm("llama")
    assert fuse_rms_norms(model) == 5
    assert fuse_rms_norms(model) == 0
    assert type(model.model.norm).__name__ == "FusedLlamaRMSNorm"
    assert set(model.state_dict()) == set(tiny_causal_lm("llama").state_dict())
