"""Checkpoints of a sharded model (train.distributed fsdp: torch's FSDP2) in two gloo processes on the CPU,
through ftjob's Takeover and Checkpointer: each rank writes its own shards, fresh processes resume
bitwise, a damaged newest checkpoint falls back to the one before, and a shard that is not as this run
writes it is refused, naming the file and the key."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import free_port
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STEPS = 4
CHECKPOINTED = (2, 3)  # the steps checkpointed; the newest is step 3's
NEWEST = "step-000003-g1"
LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
LORA_B = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"
FROZEN = "base_model.model.model.embed_tokens.weight"


# ---------------------------------------------------------------------------------------------
# What each of the two processes runs (torch.multiprocessing.spawn: fresh interpreters)


def spawn(phase: str, directory: Path) -> list[dict]:
    """Run phase in two fresh processes; each rank's results (a JSON file it writes)."""
    import torch.multiprocessing

    torch.multiprocessing.spawn(worker, args=(phase, str(directory), free_port()), nprocs=2)
    return [json.loads((directory / f"{phase}-rank-{rank}.json").read_text()) for rank in (0, 1)]


def worker(rank: int, phase: str, directory: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")  # fmt: skip
    from job.accelerator import make_accelerator
    from job.spec import TrainSpec

    accelerator = make_accelerator(TrainSpec(max_steps=STEPS, mixed_precision="no"))
    run = {"train": train_and_checkpoint, "resume": resume_each_output}[phase]
    results = run(rank, Path(directory), accelerator, *sharded_lora(STEPS))
    (Path(directory) / f"{phase}-rank-{rank}.json").write_text(json.dumps(results))
    accelerator.end_training()


def sharded_lora(total_steps: int):
    """The tiny Llama with LoRA (dropout: the RNG states must resume too), each decoder layer and the root
    sharded with fully_shard; AdamW and the schedule as ftjob makes them."""
    from helpers import tiny_causal_lm
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    from job.schedule import make_optimizer, make_scheduler
    from job.spec import TrainSpec

    model = get_peft_model(
        tiny_causal_lm(), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    )
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    cfg = TrainSpec(max_steps=total_steps, learning_rate=1e-2, warmup_steps=1, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg, "cpu")
    return model, optimizer, make_scheduler(optimizer, cfg.scheduler, cfg.warmup_steps, total_steps)


def train_step(model, optimizer, scheduler, step: int, rank: int) -> float:
    import torch

    model.train()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(100 * step + rank))
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def fingerprint() -> dict:
    """What the checkpoints' run.json records and a resume expects (the spec's keys are not needed here)."""
    from job.output.checkpoint import FINGERPRINT_VERSION

    return {"world_size": 2, "fingerprint_version": FINGERPRINT_VERSION}


@contextmanager
def taken_over(output: Path, accelerator):
    """output's lease claimed and its newest whole checkpoint loaded (if any), as setup() does."""
    from job.output.lease import Lease
    from job.output.takeover import Takeover
    from job.signals import StopRequest

    lease = Lease(str(output), 60, 600)
    with StopRequest(30) as stop, Takeover(str(output), lease, 3, accelerator, False, None) as takeover:
        takeover.claim(stop)
        takeover.settle(fingerprint())
        yield takeover


def rank_state(model, optimizer) -> dict:
    """This rank's part of the trainable state, to compare bitwise: its shard of each trainable parameter,
    of each optimizer state, and the learning rate."""
    import torch

    def local(t):
        return (t.to_local() if hasattr(t, "to_local") else t).detach().clone().contiguous()

    state = {name: local(p) for name, p in model.named_parameters() if p.requires_grad}
    for index, values in optimizer.state_dict()["state"].items():
        state |= {f"optimizer.{index}.{key}": local(value) for key, value in values.items()}
    return state | {"lr": torch.tensor(optimizer.param_groups[0]["lr"], dtype=torch.float64)}


def recorded(directory: Path, step: int, rank: int) -> Path:
    return directory / f"after-{step}-rank-{rank}.safetensors"


def train_and_checkpoint(rank, directory, accelerator, model, optimizer, scheduler) -> dict:
    """Train STEPS steps, checkpointing at CHECKPOINTED; record this rank's state after every step. The
    step of the newest checkpoint committed."""
    history = []
    with taken_over(directory / "out", accelerator) as takeover, takeover.checkpointer:
        for step in range(1, STEPS + 1):
            history.append({"step": step, "train/loss": train_step(model, optimizer, scheduler, step, rank)})
            save_file(rank_state(model, optimizer), recorded(directory, step, rank))
            if step in CHECKPOINTED:
                run = {"run_id": None, "fingerprint": fingerprint(), "total_steps": STEPS}
                takeover.checkpointer.save(
                    step, model, optimizer, scheduler, accelerator, {"cursor": step}, run, history
                )
        takeover.checkpointer.wait_committed(accelerator)
        return {"committed": takeover.checkpointer.committed_step}


def resume_each_output(rank, directory, accelerator, model, optimizer, scheduler) -> dict:
    """For each prepared copy of the trained output (resume-*): resume from it, and say which recorded
    state that gave, or how the restore was refused and whether anything was applied; after the plain
    resume, the step that follows."""
    results = {}
    for output in sorted(directory.glob("resume-*")):
        before = rank_state(model, optimizer)
        with taken_over(output, accelerator) as takeover:
            downloaded = sorted(path.name for path in takeover.saved["dir"].glob("shard-*"))
            try:
                first_step, _ = takeover.restore(model, optimizer, scheduler)
            except Exception as e:  # the refusal, read by the test
                unchanged = equal(rank_state(model, optimizer), before)
                results[output.name] = {"refused": str(e), "exit_code": getattr(e, "exit_code", None),
                                        "unchanged": unchanged}  # fmt: skip
                continue
        result = {"first_step": first_step, "state": recorded_step(directory, rank, model, optimizer),
                  "downloaded": downloaded}  # fmt: skip
        if output.name == "resume-whole":
            train_step(model, optimizer, scheduler, first_step, rank)
            result["next"] = recorded_step(directory, rank, model, optimizer)
        results[output.name] = result
    return results


def recorded_step(directory: Path, rank: int, model, optimizer) -> int | None:
    """The step after which the training run was in exactly this state; None if none."""
    state = rank_state(model, optimizer)
    return next(
        (s for s in range(1, STEPS + 1) if equal(state, load_file(recorded(directory, s, rank)))), None
    )


def equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fsdp")
    assert spawn("train", directory) == [{"committed": CHECKPOINTED[-1]}] * 2
    return directory


def edited_copy(trained: Path, name: str, edit=None) -> None:
    """trained's output as resume-<name>, its newest checkpoint edited (a folder -> None)."""
    copy = trained / f"resume-{name}"
    shutil.copytree(trained / "out", copy)
    if edit:
        edit(copy / "checkpoints" / NEWEST)


def truncated(rank: int):
    def edit(folder: Path) -> None:
        shard = folder / f"shard-{rank:05d}.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])

    return edit


def removed(rank: int):
    return lambda folder: (folder / f"shard-{rank:05d}.safetensors").unlink()


def rewritten(rank: int, change):
    """An edit of a rank's shard that keeps the checkpoint whole: its MANIFEST.json entry matches."""
    from job.output.manifest import manifest_entry

    def edit(folder: Path) -> None:
        name = f"shard-{rank:05d}.safetensors"
        tensors = load_file(folder / name)
        change(tensors)
        save_file(tensors, folder / name)
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        manifest["files"][name] = manifest_entry(folder / name)
        (folder / "MANIFEST.json").write_text(json.dumps(manifest))

    return edit


REFUSALS = {  # case: (rank whose shard is edited, the edit, what the refusal names)
    "missing": (0, lambda t: t.pop(f"optimizer/{LORA_A}/exp_avg_sq"),
                f"optimizer/{LORA_A}/exp_avg_sq: missing"),
    "shape": (1, lambda t: t.update({f"model/{LORA_B}": t[f"model/{LORA_B}"].repeat(2, 1)}),
              f"model/{LORA_B}: found float32 tensor of shape [64, 4], where this run has float32 tensor of shape [32, 4]"),
    "dtype": (1, lambda t: t.update({f"model/{LORA_A}": t[f"model/{LORA_A}"].bfloat16()}),
              f"model/{LORA_A}: found bfloat16 tensor of shape [2, 64], where this run has float32"),
    "frozen": (0, lambda t: t.update({f"model/{FROZEN}": t[f"model/{LORA_A}"].clone()}),
               f"'model/{FROZEN}': not in this run"),
}  # fmt: skip


@pytest.fixture(scope="module")
def resumed(trained) -> list[dict]:
    """Each rank's results of resuming from copies of the trained output: whole, damaged, edited."""
    edited_copy(trained, "whole")
    edited_copy(trained, "truncated", truncated(1))
    edited_copy(trained, "removed", removed(0))
    for case, (rank, change, _) in REFUSALS.items():
        edited_copy(trained, f"refused-{case}", rewritten(rank, change))
    return spawn("resume", trained)


def test_each_rank_writes_its_own_shard_and_no_file_holds_most_of_the_state(trained):
    folder = trained / "out" / "checkpoints" / NEWEST
    sizes = {path.name: path.stat().st_size for path in folder.iterdir()}
    assert "trainable.safetensors" not in sizes
    shards = ["shard-00000.safetensors", "shard-00001.safetensors"]
    manifest = json.loads((folder / "MANIFEST.json").read_text())["files"]
    assert set(shards) <= manifest.keys() and (folder / "COMMITTED").is_file()
    assert max(sizes.values()) < 0.6 * sum(sizes.values()), sizes
    for shard in shards:
        with safe_open(folder / shard, "pt") as f:
            names = list(f.keys())
            assert f.get_slice(f"model/{LORA_B}").get_shape() == [32, 4]  # half of [64, 4]
        assert not [n for n in names if "lora" not in n]  # the frozen base is never saved
        assert {n.rsplit("/", 1)[1] for n in names if n.startswith("optimizer/")} == {
            "step", "exp_avg", "exp_avg_sq"
        }  # fmt: skip


def test_fresh_processes_resume_the_newest_checkpoint_bitwise(resumed):
    for rank in (0, 1):
        own_shard_only = [f"shard-{rank:05d}.safetensors"]
        expected = {"first_step": 4, "state": 3, "next": 4, "downloaded": own_shard_only}
        assert resumed[rank]["resume-whole"] == expected


def test_a_shard_truncated_or_missing_on_one_rank_falls_back_to_the_checkpoint_before(resumed):
    for rank in (0, 1):
        for damaged in ("resume-truncated", "resume-removed"):
            result = resumed[rank][damaged]
            assert (result["first_step"], result["state"]) == (3, 2), (rank, damaged)


@pytest.mark.parametrize("case", REFUSALS)
def test_a_shard_not_as_this_run_writes_it_is_refused_naming_the_file_and_key(resumed, case):
    rank, _, problem = REFUSALS[case]
    refused = resumed[rank][f"resume-refused-{case}"]
    assert refused["exit_code"] == 2 and refused["unchanged"], refused
    assert (
        f"checkpoints/{NEWEST}/shard-{rank:05d}.safetensors: not as this run writes it: {problem}"
        in (refused["refused"])
    )
    other = resumed[1 - rank][f"resume-refused-{case}"]
    assert (other["first_step"], other["state"]) == (4, 3)  # the other rank's shard is as it wrote it
