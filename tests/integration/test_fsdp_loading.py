"""train.distributed fsdp as the model is prepared, in two gloo processes on the CPU: ranks whose random
states differ (FSDP2 has no sync_module_states) end with rank 0's weights and adapter init, whether
rank 0 sent them (a base each rank builds on the meta device) or each rank loaded its own (a 4-bit
base); the check of a sharded 4-bit model refuses one that computes otherwise, on every rank; under
bf16 FSDP computes in bf16 from float32 shards, with no autocast; and a sharded whole model is published
as a Hugging Face model folder without one rank holding all of it."""

from __future__ import annotations

import json
import os
import shutil
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
        "publish": published_from_shards(model_dir, Path(directory), accelerator),
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


def published_from_shards(model_dir: str, directory: Path, accelerator) -> dict:
    """A whole model sharded over the ranks (as adapter.method full trains it), written in files of an
    eighth of it (write_model_files), then published as trained() and save_trained publish it: what rank
    0 wrote, how much its resident memory rose while it wrote the files (large blocks mapped from the
    kernel and handed back when freed, so that it counts what is held), and the logits of each folder as
    from_pretrained loads it against the model's before sharding."""
    import torch
    import torch.distributed as dist
    from helpers import tiny_causal_lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.accelerator import trained
    from job.model.sharding import process_mesh, shard_model
    from job.output.publish import save_trained, write_model_files
    from job.spec import FsdpSpec
    from job.startup import keep_freed_memory

    keep_freed_memory(largest_kept=64 * 1024)
    model = tiny_causal_lm(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        vocab_size=4096,
        tie_word_embeddings=True,
    )
    model_bytes = sum(p.nbytes for p in model.parameters())  # the tied embedding once
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    shard_model(model, FsdpSpec(), process_mesh(torch.device("cpu")), None)
    rank_0 = dist.get_rank() == 0
    parts, published = directory / "parts", directory / "published"
    if rank_0:
        parts.mkdir()
        Path("/proc/self/clear_refs").write_text("5")  # resident memory's peak starts over from here
        before = resident_kib("VmRSS")
    write_model_files(model, parts if rank_0 else None, file_bytes=model_bytes // 8)
    risen = resident_kib("VmHWM") - before if rank_0 else 0
    model, weights = trained(model, accelerator)
    if not rank_0:
        return {}
    save_trained(model, AutoTokenizer.from_pretrained(model_dir), published, weights)
    shutil.copy(published / "config.json", parts)

    @torch.no_grad()
    def logits_differ(folder: Path) -> float:
        loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        return float((loaded(input_ids=ids).logits - expected).abs().max())

    return {
        "weights": type(weights).__name__,
        "published": sorted(path.name for path in published.iterdir()),
        "parts": sorted(path.name for path in parts.iterdir()),
        "differ": [logits_differ(published), logits_differ(parts)],
        "indexed": sorted(json.loads((parts / "model.safetensors.index.json").read_text())["weight_map"]),
        "risen_share": risen * 1024 / model_bytes,
    }


def resident_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1])


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


def test_a_sharded_whole_model_is_published_as_save_pretrained_does_without_one_rank_holding_it(ranks):
    """trained() has rank 0 write a full model's weights into files, one tensor gathered at a time, with
    config.json and the tokenizer beside them as with ddp. In files of an eighth of the model (named and
    indexed as save_pretrained does), rank 0 held well under the whole model at once (0.36 of it when
    measured; gathered whole: 1.2 times it). Each folder loads with from_pretrained and computes what the
    model did before sharding (the tied output head not saved twice)."""
    published = ranks[0]["publish"]
    assert published["weights"] == "TemporaryDirectory"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        published["published"]
    )
    files = [name for name in published["parts"] if name.endswith(".safetensors")]
    assert len(files) >= 8 and files[0] == f"model-00001-of-{len(files):05d}.safetensors", files
    assert "model.embed_tokens.weight" in published["indexed"]
    assert "lm_head.weight" not in published["indexed"]  # tied to the embedding: saved once, as by HF
    assert published["differ"] == [0.0, 0.0]
    assert published["risen_share"] < 0.6, published["risen_share"]
