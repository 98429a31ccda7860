"""train.compile: torch.compile of the decoder layers, one layer at a time (regional compilation).

Every decoder layer runs the same code on weights of the same shapes, so torch.compile traces and
compiles one of them and the others reuse its code: the compile time of one layer, not of the whole
model, and no graph over the loss or the optimizer. The layers are the model's decoder layer classes
(its _no_split_modules, as job/model/sharding.py finds FSDP's units), compiled in place
(nn.Module.compile: the state dict keeps its names), once the model is otherwise ready: the adapter
applied, the faster layers in place and, under train.distributed fsdp, each layer sharded. FSDP's hooks
then run around the layer's compiled code, not in it (torch marks them as code torch.compile skips).

Attention over packed rows (job/model/packed_attention.py) runs outside the compiled code: the lengths
of a micro-batch's examples are values Python reads, so compiled code would be specialized to them and
compiled again for each new set of lengths. Each layer is then two compiled graphs, before and after
its attention. Under gradient checkpointing that split cannot happen inside the checkpointed call
(torch.compile traces a checkpoint as one graph, and gives up on the whole layer at a break), so there
the layer's children (its attention block, MLP and norms) are compiled instead, each inside the
checkpoint that the layer runs eagerly.

What torch.compile makes of ftjob's CPU layers: the fused LoRA linear and the fused RMSNorm (autograd
Functions) are traced whole, with their backward; the CPU dropout's draws are not (a loop on values of
tensors breaks the graph at each adapter layer, and the count it draws, a tensor's size, changes at
every call), so job/model/prepare.py leaves LoRA's dropout to torch under train.compile. On CPUs the
compiled layers are not faster than ftjob's eager ones (bench/RESULTS.md).

What compiles when: the first training step; the second once more, with the sizes that changed made
symbolic (torch.compile's automatic dynamic shapes: packed micro-batches pass attention the examples'
offsets, whose count changes; padded batches change length), after which new sizes compile nothing.
The first layer has a variant of its own (its input needs no gradient). Forwards without gradients run
eagerly (compile_for_training).
"""

from __future__ import annotations

import torch
from torch import nn

from job.errors import UserError
from job.model.packed_attention import PACKED_SDPA, packed_rows_mask, packed_sdpa_attention
from job.model.sharding import no_split_classes

# ftjob's packed attention, registered under its own name as code that torch.compile does not trace
PACKED_SDPA_EAGER = f"{PACKED_SDPA}_eager"


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder layer of `model` in place (under gradient checkpointing with packed
    attention, each layer's children); returns how many decoder layers."""
    layers = decoder_layers(model)
    if getattr(model.config, "_attn_implementation", None) == PACKED_SDPA:
        attend_packed_rows_eagerly(model)
    for layer in layers:
        regions = layer.children() if splits_checkpoint(layer, model) else [layer]
        for region in regions:
            compile_for_training(region, backend)
    return len(layers)


def compile_for_training(module: nn.Module, backend: str) -> None:
    """module.compile(), its compiled code run by the forwards that record gradients; the others (the
    loop's probes, evals, generation) run the module as it is. Each of those would compile variants of
    its own (no gradients, a KV cache, one token at a time) for a few calls, and use up torch.compile's
    recompilations of the layer's code (8), after which a new variant, of training too, runs eagerly."""
    module.compile(backend=backend)
    compiled, eager = module._compiled_call_impl, module._call_impl

    def call(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else eager)(*args, **kwargs)

    module._compiled_call_impl = call


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of the model's decoder layer classes; FSDP's subclass of a layer counts as its class."""
    names = set(no_split_classes(model))
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise UserError(
            "train.compile: this model names no decoder layer class (_no_split_modules) whose layers "
            "could be compiled one at a time; set train.compile to false"
        )
    return layers


def splits_checkpoint(layer: nn.Module, model: nn.Module) -> bool:
    """Whether the layer is checkpointed (transformers' gradient checkpointing) and its attention runs
    outside compiled code: a graph break inside the checkpoint."""
    checkpointed = getattr(layer, "gradient_checkpointing", False)
    return checkpointed and model.config._attn_implementation == PACKED_SDPA_EAGER


def attend_packed_rows_eagerly(model: nn.Module) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA_EAGER, torch.compiler.disable(packed_sdpa_attention))
    AttentionMaskInterface.register(PACKED_SDPA_EAGER, packed_rows_mask)
    model.set_attn_implementation(PACKED_SDPA_EAGER)
