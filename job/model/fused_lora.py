"""A LoRA linear layer computed as one autograd function.

peft computes a LoRA layer as base(x) + lora_B(lora_A(dropout(x))) * scaling, a chain of modules
whose forward and backward each make their own pass over a [tokens, features] tensor: the scaling,
the sum, and in backward the scaling again and the sum of the two paths' input gradients. FusedLoraLinear
does the same arithmetic with the scaling and the sums folded into the matmuls (addmm). It keeps the
layer's input (one tensor that q, k and v share, unless autocast casts it) and what dropout dropped for
backward instead of a dropped copy of the input per layer: on a CPU the dropped positions
(job/model/dropout.py), a shorter step (bench/RESULTS.md); on a GPU torch's own dropout's mask of kept
elements, one byte an element. Whether it wins on GPUs is job/model/prepare.py's choice (FUSED_LORA_WINS).

It takes over only plain LoRA (no DoRA, no LoRA bias) on an nn.Linear with one active adapter,
unmerged and enabled; anything else (quantized layers, several adapters, mixed dtypes without
autocast) runs peft's own forward.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from job.model.dropout import CpuDropout, drop, drop_positions, zero_dropped


class _LoraLinear(torch.autograd.Function):
    """x W^T + b + scaling * dropout(x) A^T B^T, every tensor already in one dtype, 2-D x. Dropout with
    probability p draws its positions as CpuDropout does (`cpu_dropout`), else as torch's dropout does."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, cpu_dropout: bool):
        dropped_x, dropped = dropout_and_mask(x, p, cpu_dropout)
        a = dropped_x @ lora_a.t()
        out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        out.addmm_(a, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, a, dropped)
        ctx.scaling, ctx.p = scaling, p
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, a, dropped = ctx.saved_tensors
        scaling, p = ctx.scaling, ctx.p
        grad_b_side = grad @ lora_b  # the gradient at A's output, before the scaling
        grad_a = torch.mm(grad_b_side.t(), drop(x, dropped, p)).mul_(scaling)
        grad_b = torch.mm(grad.t(), a).mul_(scaling)
        grad_x = None
        if ctx.needs_input_grad[0]:
            lora_path = grad_b_side @ lora_a
            if dropped is not None:
                zero_dropped(lora_path, dropped)
            grad_x = torch.addmm(lora_path, grad, weight, beta=scaling / (1 - p))
        return grad_x, None, None, grad_a, grad_b, None, None, None


def dropout_and_mask(
    x: torch.Tensor, p: float, cpu_dropout: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dropout(x), and what backward drops again with (job/model/dropout.py: drop): CpuDropout's dropped
    positions, or the mask of kept elements that torch's dropout draws (F.dropout's on GPUs, so the
    same draws as peft's layer there); None for p = 0."""
    if not p:
        return x, None
    if cpu_dropout:
        positions = drop_positions(x.numel(), p)
        return drop(x, positions, p), positions
    return torch.native_dropout(x, p, True)


class FusedLoraLinear(LoraLinear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._fusable_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        base, lora_a, lora_b = self.base_layer, self.lora_A[adapter], self.lora_B[adapter]
        dropout = self.lora_dropout[adapter]
        p = 0.0 if not self.training or isinstance(dropout, nn.Identity) else dropout.p
        with torch.autocast(device, enabled=False):  # cast here, once, as autocast would
            out = _LoraLinear.apply(
                x.reshape(-1, x.shape[-1]).to(dtype),
                base.weight.to(dtype),
                None if base.bias is None else base.bias.to(dtype),
                lora_a.weight.to(dtype),
                lora_b.weight.to(dtype),
                self.scaling[adapter],
                p,
                isinstance(dropout, CpuDropout),
            )
        return out.view(*x.shape[:-1], out.shape[-1])

    def _fusable_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active plain-LoRA adapter this call can be fused for, or None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant:
            return None
        if self.lora_B[adapter].bias is not None:
            return None
        base = self.base_layer
        if type(base) is not nn.Linear or any(
            t.requires_grad for t in (base.weight, base.bias) if t is not None
        ):
            return None
        if type(self.lora_dropout[adapter]) not in (CpuDropout, nn.Dropout, nn.Identity):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return adapter
        tensors = (base.weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight)
        return adapter if all(t.dtype == x.dtype for t in tensors) else None


def fuse_lora_linears(model: nn.Module) -> int:
    """Make every peft LoRA Linear in `model` a FusedLoraLinear (same parameters, same state); returns
    how many."""
    fused = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            fused += 1
    return fused
