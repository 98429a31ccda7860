"""train.compile (job/model/compile.py) on the tiny model with the CPU layers as the job prepares them,
under torch.compile's aot_eager backend (it traces as inductor does, without making kernels): the same
loss and gradients as eager, with and without packed attention and gradient checkpointing; the layers
really compiled, and run eagerly without gradients; new example lengths in packed rows compile nothing
more once the second micro-batch has made their sizes symbolic; a model that names no decoder layer
class is refused."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from helpers import tiny_causal_lm
from torch import nn
from torch._dynamo.utils import counters
from transformers import LlamaPreTrainedModel

from job.errors import UserError
from job.model.adapter import apply_adapter
from job.model.compile import PACKED_SDPA_EAGER, compile_layers
from job.model.dropout import CpuDropout
from job.model.packed_attention import use_packed_attention
from job.model.prepare import faster_layers
from job.spec import AdapterSpec

ROWS, LENGTH = 2, 24


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """No compiled code or counts from another test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def lora_model(packed: bool, checkpointing: bool = False, layers: int = 2) -> nn.Module:
    adapter = AdapterSpec(r=4, alpha=8, dropout=0.1)
    base = tiny_causal_lm(num_hidden_layers=layers)
    model = faster_layers(apply_adapter(base, adapter, False, checkpointing), "cpu", compiled=True)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A without gradients
            nn.init.normal_(param, std=0.02)
    if packed:
        assert use_packed_attention(model)
    return model.train()


def packed_inputs(*row_lengths: list[int]) -> dict:
    """input_ids, position_ids restarting at each example, and the examples laid end to end as the
    loop passes them (job/loss.py)."""
    lengths = [n for row in row_lengths for n in row]
    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return {
        "input_ids": torch.arange(ROWS * LENGTH).remainder(96).view(ROWS, LENGTH),
        "position_ids": torch.stack([torch.cat([torch.arange(n) for n in row]) for row in row_lengths]),
        "cu_seq_lens_q": offsets,
        "cu_seq_lens_k": offsets,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
        "use_cache": False,
    }


def loss_and_grads(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks in both models
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(  # whole layers; split at packed attention; under checkpointing, their children
    ("packed", "checkpointing"), [(False, False), (True, False), (True, True)]
)
def test_compiled_layers_give_the_eager_loss_and_gradients(packed, checkpointing):
    eager = lora_model(packed, checkpointing)
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled, backend="aot_eager") == 2
    if packed:
        inputs = packed_inputs([5, 19], [10, 14])
        assert compiled.config._attn_implementation == PACKED_SDPA_EAGER
    else:
        inputs = {"input_ids": packed_inputs([LENGTH], [LENGTH])["input_ids"]}
    expected_loss, expected = loss_and_grads(eager, inputs)
    loss, grads = loss_and_grads(compiled, inputs)
    assert counters["stats"]["unique_graphs"] > 0
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-6), name


def test_the_layers_are_compiled_and_forwards_without_gradients_run_them_eagerly():
    model = lora_model(packed=False)
    compile_layers(model, backend="aot_eager")
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    assert not any(isinstance(m, CpuDropout) for m in model.modules())  # torch's, which compiles
    ids = torch.arange(LENGTH).view(1, LENGTH)
    with torch.no_grad():
        model(input_ids=ids)
    assert counters["frames"]["ok"] == 0
    model(input_ids=ids).logits.sum().backward()
    assert counters["frames"]["ok"] > 0


def test_packed_rows_with_new_example_lengths_compile_nothing_more_after_the_second_step():
    """The first micro-batch compiles with its sizes as they are, the second once more with those that
    changed symbolic (the examples' count and the longest, passed to attention); then nothing."""
    model = lora_model(packed=True, layers=1)  # half the graphs of two layers to compile
    compile_layers(model, backend="aot_eager")
    compiled = []
    for lengths in ([[5, 19], [10, 14]], [[3, 4, 17], [12, 12]], [[2, 2, 20], [1, 6, 8, 9]]):
        loss_and_grads(model, packed_inputs(*lengths))
        compiled.append(counters["stats"]["unique_graphs"])
    assert compiled[0] > 0 and compiled[1] <= 2 * compiled[0]
    assert compiled[2] == compiled[1]


def test_a_model_that_names_no_decoder_layer_class_is_refused(monkeypatch):
    monkeypatch.setattr(LlamaPreTrainedModel, "_no_split_modules", None)
    with pytest.raises(UserError, match="train.compile"):
        compile_layers(tiny_causal_lm(), backend="aot_eager")
