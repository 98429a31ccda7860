"""One LoRA decoder layer's forward and backward under bf16 autocast, as ftjob prepares it for a GPU
(job/model/prepare.py: faster_layers), against peft's layers as they come: the aten ops it runs, the
casts among them, the bytes those ops write and the bytes autograd saves for backward.

The base is bfloat16 and the adapter float32, as on a GPU (job/model/loading.py: resolve_dtype; peft
keeps adapters in float32). By default it runs on the CPU under CPU autocast, with torch's dropout
drawing the mask a GPU draws (GpuDropout); --device cuda runs it on a GPU. Counts, not timings: which
variant is faster on a GPU is bench/gpu_step.py's to say.

    .venv/bin/python -m bench.lora_layer_ops [--size 1b] [--tokens 1024] [--dropout 0.05] [--device cpu]
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.workload import SIZES
from job.model.prepare import faster_layers

# peft's layers as they come; without the cast of their input to float32 under autocast
# (job/model/adapter.py: keep_input_dtype_under_autocast); and that with the fused LoRA layer.
VARIANTS = {"peft": None, "no input cast": False, "fused": True}


class GpuDropout(nn.Dropout):
    """nn.Dropout as it runs on a GPU, where F.dropout is torch.native_dropout (a mask of one byte an
    element); on a CPU, F.dropout draws a mask in the input's dtype instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_dropout(x, self.p, self.training)[0]


def lora_model(size: str, dropout: float, device: str = "cpu") -> nn.Module:
    """A one-layer model of bench/workload.py's SIZES[size] shape (a small vocabulary), in bfloat16,
    with a LoRA adapter (r 16) on every linear layer, in training mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = SIZES[size]
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[shape["arch"]]
    config = config_class(
        vocab_size=256, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=1, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    base = model_class(config).to(device=device, dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
    return get_peft_model(base, lora).train()


def prepared(model: nn.Module, variant: str, device_type: str = "cuda") -> nn.Module:
    """The model as VARIANTS[variant] has it on `device_type`; dropout as on a GPU."""
    fused = VARIANTS[variant]
    if fused is not None:
        faster_layers(model, device_type, fused_lora=fused)
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict) and not fused:
            for name, dropout in dropouts.items():
                if type(dropout) is nn.Dropout:
                    dropouts[name] = GpuDropout(dropout.p)
    return model


@dataclass
class Traffic:
    ops: Counter[str]  # aten op name: calls
    written: int  # bytes the ops write (new tensors and in-place results, not views)
    saved: int  # bytes of the tensors autograd saves for backward, each storage once, parameters not


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.written = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[func.overloadpacket.__name__] += 1
        results = out if isinstance(out, (tuple, list)) else (out,)
        for returned, result in zip(func._schema.returns, results, strict=False):
            alias = returned.alias_info
            if isinstance(result, torch.Tensor) and (alias is None or alias.is_write):
                self.written += result.nbytes
        return out


def layer_traffic(model: nn.Module, tokens: int) -> Traffic:
    """What the model's first decoder layer does for a forward and backward over `tokens` tokens under
    bf16 autocast on the model's device."""
    decoder = model.get_base_model().model
    layer = decoder.layers[0]
    device = next(model.parameters()).device
    hidden = torch.randn(
        1, tokens, layer.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True
    )
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    with autocast:
        rotary = decoder.rotary_emb(hidden, torch.arange(tokens, device=device).unsqueeze(0))
    with _Ops() as ops:
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = layer(hidden, position_embeddings=rotary)
        out.backward(torch.ones_like(out))
    return Traffic(ops.ops, ops.written, sum(saved.values()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lora_layer_ops", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    print(
        f"size {args.size}, {args.tokens} tokens, LoRA r 16 on all 7 linears, dropout {args.dropout}, {args.device}"
    )
    print("| variant | aten ops | _to_copy | MB written | MB saved for backward |")
    print("| --- | --- | --- | --- | --- |")
    for variant in VARIANTS:
        model = prepared(lora_model(args.size, args.dropout, args.device), variant)
        traffic = layer_traffic(model, args.tokens)
        ops = traffic.ops
        print(
            f"| {variant} | {ops.total()} | {ops['_to_copy']} | {traffic.written / 1e6:.1f} | "
            f"{traffic.saved / 1e6:.1f} |"
        )


if __name__ == "__main__":
    main()
