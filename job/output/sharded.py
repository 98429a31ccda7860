"""The trainable state of a sharded model (train.distributed fsdp: torch's FSDP2, whose parameters are
DTensors, each rank holding a shard of each) in a checkpoint: every rank writes its own shards, so no
rank gathers the whole state and no file holds most of it.

    shard-00000.safetensors   this rank's shard of each trainable parameter ("model/<name>") and   each rank
                              of its AdamW state ("optimizer/<name>/step", ".../exp_avg",
                              ".../exp_avg_sq"); the frozen base is never saved
    optimizer.pt              the optimizer's param groups (its "state" empty), schedule and grad  rank 0
                              scaler, as in a ddp checkpoint (job/output/checkpoint.py)

A checkpoint resumes on as many processes as wrote it (the fingerprint's world_size): each rank reads
back the shards it wrote, checked against the shards it holds (names, dtypes, shapes) before anything is
applied. The shards are plain safetensors and optimizer.pt is read with weights_only: nothing read back
can run code (torch's DCP format is not used: its .metadata is a pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

MODEL, OPTIMIZER = "model", "optimizer"
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, any other tensor whole."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def weight_key(name: str) -> str:
    return f"{MODEL}/{name}"


def state_key(name: str, key: str) -> str:
    """The name of a parameter's optimizer state `key` (step, exp_avg, ...) in a shard file."""
    return f"{OPTIMIZER}/{name}/{key}"


def write_shard(path: Path, parameters: dict[str, torch.nn.Parameter], optimizer) -> None:
    """This rank's shard file of the trainable parameters (by name) and their optimizer state."""
    tensors = {weight_key(name): local_part(p.detach()) for name, p in parameters.items()}
    for name, p in parameters.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[state_key(name, key)] = local_part(value)
    save_file({name: t.cpu().contiguous() for name, t in tensors.items()}, path)


def shard_reference(found: Any, parameters: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """What this rank's shard file must hold to be loaded here, as (meta) tensors of the dtypes and
    shapes of the shards this rank holds: every trainable parameter's, and AdamW's step and moments for
    each parameter that the file has optimizer state for (one without a gradient yet has none)."""
    saved = found.keys() if isinstance(found, dict) else set()
    reference = {}
    for name, p in parameters.items():
        shard = torch.empty_like(local_part(p.detach()), device="meta")
        reference[weight_key(name)] = shard
        if any(state_key(name, key) in saved for key in ADAMW_STATE):
            step = torch.empty((), dtype=torch.float32, device="meta")
            reference |= {state_key(name, "step"): step, state_key(name, "exp_avg"): shard,
                          state_key(name, "exp_avg_sq"): shard}  # fmt: skip
    return reference


def load_shard(
    shard: dict[str, torch.Tensor], parameters: dict[str, torch.nn.Parameter], optimizer, param_groups: list
) -> None:
    """Put a checked shard file's tensors into this rank's shards of the parameters, and its optimizer
    state, with the param groups of optimizer.pt, into the optimizer."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state = {}
    with torch.no_grad():
        for name, p in parameters.items():
            local_part(p).copy_(shard[weight_key(name)])
            if state_key(name, "step") in shard:
                state[index[id(p)]] = {
                    "step": shard[state_key(name, "step")],
                    "exp_avg": like(p, shard[state_key(name, "exp_avg")]),
                    "exp_avg_sq": like(p, shard[state_key(name, "exp_avg_sq")]),
                }
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def like(parameter: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """A saved local shard as a tensor like the parameter (a DTensor of its mesh and placements)."""
    if not isinstance(parameter, DTensor):
        return saved
    return DTensor.from_local(
        saved.to(parameter.device),
        parameter.device_mesh,
        parameter.placements,
        shape=parameter.shape,
        stride=parameter.stride(),
    )
