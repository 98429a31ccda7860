"""RMSNorm as one autograd function, for CPUs.

transformers computes a Llama-style RMSNorm (x * rsqrt(mean(x^2) + eps) * weight) from single
operations, and autograd backpropagates through each: about a dozen passes over the [tokens, features]
tensor per norm, two norms per decoder layer. On a CPU those passes are a good part of a small model's
step; _RMSNorm makes three in forward and four in backward (seven when the weight trains too), keeping
the input and one number per token.

It takes over norms that compute exactly that formula (checked on random inputs and weights, so
variants such as Gemma's (1 + weight) keep their own forward), for float32 inputs and weights on a CPU;
anything else runs the model's own forward.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.autograd.function import once_differentiable


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # float32 under autocast too
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        features = x.shape[-1]
        squares = torch.linalg.vecdot(x, x).unsqueeze(-1)
        rstd = squares.div_(features).add_(eps).rsqrt_()  # one per token
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")  # as forward ran, also when backward() is called under autocast
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x).mul_(rstd).reshape(-1, x.shape[-1]).sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight  # the gradient at x * rstd
            # d(x * rstd)/dx = rstd * (I - x x^T rstd^2 / features), per token
            coefficient = torch.linalg.vecdot(grad_normed, x).unsqueeze(-1)
            coefficient.mul_(rstd.pow(3)).div_(-x.shape[-1])
            grad_x = grad_normed.mul_(rstd).addcmul_(x, coefficient)
        return grad_x, grad_weight, None


class FusedRMSNorm(nn.Module):
    """Mixed into a model's RMSNorm class (fused_class): its forward, through _RMSNorm where it applies."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight = self.weight
        if not (args or kwargs) and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
            return _RMSNorm.apply(x, weight, self.variance_epsilon)
        return super().forward(x, *args, **kwargs)


@functools.cache
def fused_class(norm_class: type) -> type:
    return type(f"Fused{norm_class.__name__}", (FusedRMSNorm, norm_class), {})


def computes_rms_norm(module: nn.Module) -> bool:
    """Whether module is an RMSNorm of the plain formula: a one-dimensional weight as its only parameter
    and state, variance_epsilon, and that formula's output for a random input and a random weight."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(eps, float):
        return False
    if [name for name, _ in module.named_parameters()] != ["weight"] or next(
        module.buffers(), None
    ) is not None:
        return False
    if weight.dim() != 1:
        return False
    generator = torch.Generator().manual_seed(0)
    probe_weight = torch.rand(weight.shape, generator=generator) + 0.5
    probe = torch.randn(3, weight.shape[0], generator=generator)
    expected = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + eps) * probe_weight
    with torch.no_grad():
        try:
            got = torch.func.functional_call(module, {"weight": probe_weight}, (probe,))
            return (
                isinstance(got, torch.Tensor)
                and got.shape == probe.shape
                and torch.allclose(got.float(), expected, rtol=1e-5, atol=1e-6)
            )
        except Exception:  # a forward that takes more than the hidden states, or returns something else
            return False


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every plain RMSNorm in model the fused forward (same parameters, same state); returns how many."""
    fused = 0
    for module in model.modules():
        if not isinstance(module, FusedRMSNorm) and computes_rms_norm(module):
            module.__class__ = fused_class(type(module))
            fused += 1
    return fused
