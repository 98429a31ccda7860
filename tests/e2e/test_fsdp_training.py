"""train.distributed fsdp as processes: two gloo ranks on the CPU through `ftjob run --nproc-per-node 2`
train LoRA, full and QLoRA to ddp's losses and weights; a ~100M-parameter full fine-tune under fsdp
holds clearly less memory than under ddp."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ALPACA_ROWS, run_ftjob, write_jsonl
from safetensors.torch import load_file

STEPS = 10
LORA = {"method": "lora", "r": 4, "dropout": 0.0}  # no dropout: its draws depend on what each rank loaded
METHODS = {  # the spec's sections that differ; each also tries a way of fsdp or of the data
    "lora": {"adapter": LORA, "data": {"packing": True, "max_seq_len": 64}},
    "full": {"adapter": {"method": "full"}, "fsdp": {"reshard_after_forward": False}},
    "qlora": {"adapter": LORA, "model": {"quantization": "4bit"}},
}


def two_ranks(directory, model_dir, method: str, distributed: str) -> tuple[dict, dict, str]:
    """`ftjob run --nproc-per-node 2` of method under train.distributed: its metric history, its
    published weights and its log."""
    sections = METHODS[method]
    spec = {
        "model": {"source": str(model_dir), **sections.get("model", {})},
        "adapter": sections["adapter"],
        "data": {
            "train": [str(write_jsonl(directory / "train.jsonl", ALPACA_ROWS * 8))],
            "eval": [str(write_jsonl(directory / "eval.jsonl", ALPACA_ROWS[:1]))],  # rank 1 has none
            "shuffle_buffer": 0,
            **sections.get("data", {}),
        },
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "learning_rate": 1e-3,
                  "mixed_precision": "no", "eval_every": 5, "checkpoint_every": 0, "distributed": distributed,
                  "fsdp": sections.get("fsdp", {})},
        "tracking": {"enabled": False},
        "output": {"uri": f"./{distributed}"},
    }  # fmt: skip
    (directory / f"{distributed}.json").write_text(json.dumps(spec))
    done = run_ftjob("run", f"{distributed}.json", "--nproc-per-node", "2", cwd=directory, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    published = directory / distributed / "adapter"
    history = json.loads((published / "metrics.json").read_text())["history"]
    weights = load_file(
        published / ("model.safetensors" if method == "full" else "adapter_model.safetensors")
    )
    return history, weights, done.stderr


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_trains_as_ddp(tiny_model_dir, isolated, method):
    """The same steps, losses, gradient norms, eval losses and published weights (within float32's
    rounding: sums are reduced in another order) as ddp, from a model each rank holds in shards. LoRA
    with packed rows, full with each layer kept gathered from its forward to its backward."""
    ddp, ddp_weights, _ = two_ranks(isolated, tiny_model_dir, method, "ddp")
    fsdp, fsdp_weights, log = two_ranks(isolated, tiny_model_dir, method, "fsdp")
    assert "2 LlamaDecoderLayer and the root sharded over 2 rank(s)" in log
    assert ("a quantized base whole on each" in log) == (method == "qlora")
    assert [h["step"] for h in fsdp] == list(range(1, STEPS + 1))
    for key in ("train/loss", "train/grad_norm"):
        assert [h[key] for h in fsdp] == pytest.approx([h[key] for h in ddp], rel=1e-5), key
    evaluated = {h["step"]: h["eval/loss"] for h in fsdp if "eval/loss" in h}
    assert evaluated == pytest.approx({h["step"]: h["eval/loss"] for h in ddp if "eval/loss" in h}, rel=1e-5)
    assert list(evaluated) == [5, 10]
    assert fsdp[-1]["train/loss"] < fsdp[0]["train/loss"] - 0.1  # it trained
    assert fsdp_weights.keys() == ddp_weights.keys()
    for name, tensor in fsdp_weights.items():
        torch.testing.assert_close(tensor, ddp_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    if method == "full":  # written by rank 0 from the shards: a model folder as save_pretrained writes it
        fsdp_logits, ddp_logits = (published_logits(isolated / run / "adapter") for run in ("fsdp", "ddp"))
        torch.testing.assert_close(fsdp_logits, ddp_logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def published_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=torch.arange(1, 17)[None]).logits


def test_a_100m_full_fine_tune_under_fsdp_peaks_well_below_ddp(tmp_path):
    """bench/fsdp_memory.py at 3 steps: the launcher's whole process tree, summed peaks."""
    from bench.fsdp_memory import build, measure

    model, data = build(tmp_path, layers=18)
    ddp = measure("ddp-2", model, data, 3, tmp_path)
    fsdp = measure("fsdp-2", model, data, 3, tmp_path)
    assert fsdp["final_loss"] == pytest.approx(ddp["final_loss"], rel=1e-4)
    assert fsdp["peak_mib"] / ddp["peak_mib"] < 0.8, (fsdp, ddp)
