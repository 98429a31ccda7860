"""train.distributed fsdp, the pieces that need no process group: the spec's keys and rules, the wrap
units found in a model, the dtype FSDP computes in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from job.errors import UserError
from job.spec import validate_spec


def spec(train: dict | None = None, model: dict | None = None) -> dict:
    return {
        "model": {"source": "./model", **(model or {})},
        "data": {"train": ["train.jsonl"]},
        "train": {"max_steps": 10, **(train or {})},
    }


def problems(data: dict) -> list[str]:
    with pytest.raises(UserError) as info:
        validate_spec(data, "spec.json")
    assert info.value.exit_code == 2
    return [line[4:] for line in str(info.value).splitlines() if line.startswith("  - ")]


def test_ddp_is_the_default_and_fsdp_options_have_defaults():
    default = validate_spec(spec()).train
    assert default.distributed == "ddp"
    fsdp = validate_spec(spec({"distributed": "fsdp", "fsdp": {"wrap_classes": ["LlamaDecoderLayer"]}})).train
    assert fsdp.distributed == "fsdp"
    assert (fsdp.fsdp.reshard_after_forward, fsdp.fsdp.cpu_offload) == (True, False)
    assert fsdp.fsdp.wrap_classes == ["LlamaDecoderLayer"]
    assert validate_spec(spec({"distributed": "fsdp"})).train.fsdp.wrap_classes is None  # the model's


def test_bad_fsdp_keys_are_named():
    found = problems(
        spec({"distributed": "fsdp", "fsdp": {"reshard_after_froward": False, "wrap_classes": []}})
    )
    assert any(
        p.startswith("train.fsdp.reshard_after_froward: unknown key; did you mean 'reshard_after_forward'")
        for p in found
    ), found
    assert any(p.startswith("train.fsdp.wrap_classes: List should have at least 1 item") for p in found), (
        found
    )
    assert problems(spec({"distributed": "zero3"}))[0].startswith(
        "train.distributed: Input should be 'ddp' or 'fsdp'"
    )


def test_what_fsdp_does_not_train_is_refused_naming_the_key():
    eight_bit = problems(spec({"distributed": "fsdp"}, {"quantization": "8bit"}))
    assert eight_bit == [
        "model.quantization: 8bit is not trained with train.distributed fsdp; use 4bit (QLoRA), or ddp"
    ]
    fp16 = problems(spec({"distributed": "fsdp", "mixed_precision": "fp16"}))
    assert fp16[0].startswith("train.mixed_precision: fp16 is not trained with train.distributed fsdp")
    validate_spec(spec({"distributed": "fsdp"}, {"quantization": "4bit"}))  # QLoRA is
    validate_spec(spec({"mixed_precision": "fp16"}, {"quantization": "8bit"}))  # and ddp as before


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class Decoder(nn.Module):
    _no_split_modules = ["DecoderLayer"]

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(), DecoderLayer()])
        self.head = nn.Linear(4, 8)


class Wrapper(nn.Module):
    """As a peft model wraps its base: the base model's _no_split_modules count."""

    def __init__(self):
        super().__init__()
        self.base_model = Decoder()


def test_the_wrap_units_are_the_models_decoder_layers_unless_named():
    from job.model.sharding import wrap_units

    model = Wrapper()
    assert wrap_units(model, None) == list(model.base_model.layers)
    assert wrap_units(model, ["Linear"]) == [
        model.base_model.layers[0].proj,
        model.base_model.layers[1].proj,
        model.base_model.head,
    ]


def test_a_wrap_class_the_model_does_not_have_is_named_with_the_classes_it_has():
    from job.model.sharding import wrap_units

    with pytest.raises(UserError) as info:
        wrap_units(Wrapper(), ["DecoderLayer", "LlamaDecoderLayer"])
    assert info.value.exit_code == 2
    assert str(info.value) == (
        "train.fsdp.wrap_classes: LlamaDecoderLayer not a module class of this model (its classes: Decoder, "
        "DecoderLayer, Linear, ModuleList, Wrapper)"
    )


def test_a_model_without_decoder_layer_classes_asks_for_wrap_classes():
    from job.model.sharding import wrap_units

    with pytest.raises(UserError, match=r"train\.fsdp\.wrap_classes: the model names no decoder layer class"):
        wrap_units(nn.Sequential(nn.Linear(2, 2)), None)
    named_elsewhere = Decoder()
    named_elsewhere._no_split_modules = ["Block"]
    with pytest.raises(UserError, match=r"_no_split_modules \(Block\) name none of its modules"):
        wrap_units(named_elsewhere, None)


def test_fsdp_computes_in_the_mixed_precision_asked_for():
    from job.accelerator import cpu_supports_bf16, fsdp_compute_dtype
    from job.spec import TrainSpec

    def fsdp(mixed_precision: str) -> TrainSpec:
        return TrainSpec(max_steps=1, mixed_precision=mixed_precision, distributed="fsdp")

    assert fsdp_compute_dtype(fsdp("no")) is None
    bf16 = torch.bfloat16 if cpu_supports_bf16() else None  # this CPU's: no GPU here
    assert fsdp_compute_dtype(fsdp("bf16")) is bf16
    assert fsdp_compute_dtype(TrainSpec(max_steps=1, mixed_precision="bf16")) is None  # ddp autocasts


def test_the_step_s_precision_is_fsdp_s_policy_under_fsdp_and_accelerate_s_otherwise():
    """Under fsdp accelerate's mixed precision is "no" (FSDP's policy casts): the progress line and the
    peak FLOP/s that MFU divides by must take the policy's."""
    from types import SimpleNamespace

    from job.accelerator import step_precision

    assert step_precision(SimpleNamespace(mixed_precision="no"), torch.bfloat16) == "bf16"
    assert step_precision(SimpleNamespace(mixed_precision="no"), None) == "no"
    assert step_precision(SimpleNamespace(mixed_precision="fp16"), None) == "fp16"
