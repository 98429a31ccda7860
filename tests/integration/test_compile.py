"""train.compile end to end on the tiny model: the job trains packed rows through compiled decoder
layers, evaluates, and publishes an adapter that plain peft reloads to the same logits (compiling in
place keeps the parameters' names). Under the aot_eager backend, which traces as inductor does without
making kernels: inductor's kernels for the tiny model took 43 s here; bench/compile.py runs them."""

from __future__ import annotations

import functools
import logging
import math

import helpers
import torch
from helpers import make_spec, messages, train_in_process

from job.model import prepare
from job.model.compile import PACKED_SDPA_EAGER, compile_layers
from job.model.loading import load_model
from job.spec import validate_spec


def test_a_compiled_run_trains_evaluates_and_publishes_a_reloadable_adapter(
    tiny_model_dir, data_files, isolated, caplog, monkeypatch
):
    from peft import PeftModel

    monkeypatch.setattr(prepare, "compile_layers", functools.partial(compile_layers, backend="aot_eager"))

    caplog.set_level(logging.INFO, logger="job")
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=data_files,
        data={"packing": True},
        train={"max_steps": 4, "eval_every": 2, "compile": True},
        tracking={"enabled": False},
    )
    try:
        result = train_in_process(spec, restart=True)
        model = result.model
        assert "train.compile: 2 decoder layers compiled" in messages(caplog)
        layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
        if helpers._accelerator.mixed_precision == "no":  # packed rows attended example by example
            assert model.config._attn_implementation == PACKED_SDPA_EAGER
        losses = [entry["train/loss"] for entry in result.history if "train/loss" in entry]
        assert len(losses) == 4 and losses[-1] < losses[0]
        eval_losses = [entry["eval/loss"] for entry in result.history if "eval/loss" in entry]
        assert eval_losses and all(math.isfinite(loss) for loss in eval_losses)

        base = load_model(tiny_model_dir, validate_spec(spec).model, torch.device("cpu"))
        reloaded = PeftModel.from_pretrained(base, isolated / "runs" / "t" / "adapter").eval()
        ids = torch.arange(1, 17).view(1, 16)
        with torch.no_grad():
            assert torch.allclose(
                reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5
            )
    finally:
        torch._dynamo.reset()  # no compiled code left to the tests after this one
