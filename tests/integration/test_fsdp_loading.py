"""train.distributed fsdp as the model is prepared, in two gloo processes on the CPU: ranks whose random
states differ (FSDP2 has no sync_module_states) end with rank 0's weights and adapter init, whether
rank 0 sent them (a base each rank builds on the meta device) or each rank loaded its own (a 4-bit
base); the check of a sharded 4-bit model refuses one that computes otherwise, on every rank; and under
bf16 FSDP computes in bf16 from float32 shards, with no autocast."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import free_port


def spec(model_dir: str, quantization: str | None = None, mixed_precision: str = "no"):
    from job.spec import validate_spec

    return validate_spec(
        {
            "model": {"source": model_dir, "quantization": quantization},
            "adapter": {"r": 4, "dropout": 0.0},
            "data": {"train": ["unused.jsonl"]},
            "train": {"max_steps": 1, "mixed_precision": mixed_precision, "distributed": "fsdp"},
        }
    )


def worker(rank: int, model_dir: str, directory: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")  # fmt: skip
    from job.accelerator import make_accelerator

    accelerator = make_accelerator(spec(model_dir, mixed_precision="bf16").train)
    results = {
        "meta": differs_from_rank_0_init(model_dir, None, accelerator),
        "4bit": differs_from_rank_0_init(model_dir, "4bit", accelerator),
        "check": check_of_a_changed_base(model_dir, accelerator),
        "bf16": {"accelerator": accelerator.mixed_precision, **computed_in(model_dir, accelerator)},
    }
    (Path(directory) / f"rank-{rank}.json").write_text(json.dumps(results))
    accelerator.end_training()


def differs_from_rank_0_init(model_dir: str, quantization: str | None, accelerator) -> list[str]:
    """The names of the trained model's tensors (gathered whole) that are not as rank 0 makes them
    before any rank shares anything (on the other ranks: [] whatever they hold)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from job.model.adapter import apply_adapter
    from job.model.loading import load_model
    from job.model.prepare import prepare_model

    cpu, rank = torch.device("cpu"), dist.get_rank()
    torch.manual_seed(0)  # what rank 0 draws below
    run = spec(model_dir, quantization)
    expected = apply_adapter(
        load_model(Path(model_dir), run.model, cpu), run.adapter, bool(quantization), False
    )
    expected = {
        name: p.detach().clone()
        for name, p in expected.named_parameters()
        if p.requires_grad or not quantization
    }
    torch.manual_seed(rank)  # the ranks start differently
    model, _ = prepare_model(Path(model_dir), run, accelerator)
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=bool(quantization)
    )
    gathered = get_model_state_dict(model, options=options)  # every rank: a collective
    if rank != 0:
        return []
    assert expected.keys() <= gathered.keys()  # and a 4-bit base's quantization states
    return [name for name, tensor in expected.items() if not torch.equal(gathered[name], tensor)]


def check_of_a_changed_base(model_dir: str, accelerator) -> str:
    """The 4-bit model sharded as prepare_model does, its probe loss taken unsharded, then rank 1's copy
    of one quantized weight zeroed: the check's error, as every rank raises it."""
    import torch
    import torch.distributed as dist

    from job.errors import UserError
    from job.model.loading import load_model
    from job.model.prepare import adapted
    from job.model.sharding import (
        check_sharded_loss,
        frozen_parameters,
        probe_loss,
        process_mesh,
        shard_model,
    )

    cpu, run = torch.device("cpu"), spec(model_dir, "4bit")
    model = adapted(load_model(Path(model_dir), run.model, cpu), run, accelerator)
    unsharded = probe_loss(model, cpu, None)
    model = shard_model(model, run.train.fsdp, process_mesh(cpu), None, frozen_parameters(model))
    check_sharded_loss(model, unsharded, cpu, None)  # as sharded: the same
    if dist.get_rank() == 1:
        quantized = model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
        quantized.data.zero_()
    try:
        check_sharded_loss(model, unsharded, cpu, None)
    except UserError as e:
        return f"{e.exit_code}: {e}"
    return "no error"


def computed_in(model_dir: str, accelerator) -> dict:
    """Under bf16: the dtypes a decoder layer's linear sees in the forward (its weight, its input),
    whether autocast is on there, and the dtype of its shard."""
    import torch

    from job.model.prepare import prepare_model

    run = spec(model_dir, mixed_precision="bf16")
    model, _ = prepare_model(Path(model_dir), run, accelerator, torch.bfloat16)
    lora = model.base_model.model.model.layers[0].self_attn.q_proj  # its base linear's weight, in forward
    seen = []
    lora.register_forward_pre_hook(
        lambda module, args: seen.append(
            [str(module.base_layer.weight.dtype), str(args[0].dtype), torch.is_autocast_enabled("cpu")]
        )
    )
    ids = torch.arange(1, 9)[None]
    model(input_ids=ids, labels=ids).loss.backward()
    shard = lora.base_layer.weight
    return {"forward": seen[0], "shard": str(shard.dtype), "shard_type": type(shard).__name__}


@pytest.fixture(scope="module")
def ranks(tiny_model_dir, tmp_path_factory) -> list[dict]:
    import torch.multiprocessing

    directory = tmp_path_factory.mktemp("fsdp-loading")
    torch.multiprocessing.spawn(worker, args=(str(tiny_model_dir), str(directory), free_port()), nprocs=2)
    return [json.loads((directory / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def test_ranks_that_start_differently_train_rank_0s_weights(ranks):
    """A base built on the meta device: every weight and the adapter's init, gathered from the shards,
    are rank 0's (rank 1 drew another LoRA init and loaded nothing)."""
    assert ranks[0]["meta"] == []


def test_ranks_that_load_their_own_4bit_base_train_rank_0s_adapter_init(ranks):
    assert ranks[0]["4bit"] == []


def test_under_bf16_fsdp_computes_in_bf16_from_float32_shards_without_autocast(ranks):
    for rank in ranks:
        assert rank["bf16"] == {
            "accelerator": "no",  # asked for bf16: the Accelerator does not autocast under fsdp
            "forward": ["torch.bfloat16", "torch.bfloat16", False],
            "shard": "torch.float32",
            "shard_type": "DTensor",
        }


def test_a_sharded_4bit_model_that_computes_otherwise_is_refused_on_every_rank(ranks):
    """Rank 1's copy of a 4-bit weight changed after its unsharded loss was taken: both ranks refuse
    (exit 2), with the same message naming rank 1."""
    assert ranks[0]["check"] == ranks[1]["check"]
    assert ranks[0]["check"].startswith(
        "2: train.distributed fsdp: the sharded quantized model does not compute what the unsharded one "
        "does: on rank 1, a probe batch's loss is "
    ), ranks[0]["check"]
    assert ranks[0]["check"].endswith("train it with train.distributed ddp")
