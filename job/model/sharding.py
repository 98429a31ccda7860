"""train.distributed fsdp: the model sharded over the ranks with torch's FSDP2 (`fully_shard`).

Each wrap unit (a decoder layer) is sharded, then the root: a unit's parameters are gathered whole only
for its forward and backward, its gradients reduce-scattered, and each rank keeps and steps its shard.
Under mixed precision, FSDP casts the gathered parameters to the compute dtype and reduces gradients in
float32 (MixedPrecisionPolicy); the shards and the optimizer stay in the dtype they were loaded in.

Loading (job/model/prepare.py): every rank builds the model on the meta device, with no memory, and
shards it; rank 0 alone reads the weights and applies the adapter, and receive_from_rank0 sends each
rank its shards, one tensor at a time. So a node holds about one copy of the model as it loads, not
one per process, and the adapter's random init is rank 0's on every rank (FSDP2 has no
sync_module_states).

A quantized (QLoRA) base is not sharded: every rank loads its own 4-bit copy, which is small, and
only the adapter is sharded (from rank 0's init). FSDP over bitsandbytes' 4-bit storage has trained
wrong without an error (accelerate#3983, bitsandbytes#1945), so check_sharded_loss compares the
sharded model's loss with the unsharded one's before training, and refuses a difference.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from job.errors import JobError, UserError
from job.spec import FsdpSpec

log = logging.getLogger(__name__)

PROBE_TOKENS = 64  # the QLoRA check's batch: this many token ids, the same on every rank
PROBE_TOLERANCE = {None: 1e-5, torch.bfloat16: 2e-2}  # relative, by compute dtype (None: unchanged)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards the model (shard_model), whose parameters are then DTensors but between a
    forward and its backward, when they may be gathered whole (see resharded)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def process_mesh(device: torch.device):
    """The ranks' one-dimensional mesh. A single process shards over a group of one that it makes
    here (accelerate makes none), so that fsdp trains the same way, and offloads, on one device."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        backend = "gloo" if device.type == "cpu" else "cuda:nccl,cpu:gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def wrap_units(model: nn.Module, classes: list[str] | None) -> list[nn.Module]:
    """The modules sharded as units: those of train.fsdp.wrap_classes, by default the classes the model
    keeps whole (transformers' _no_split_modules: its decoder layers)."""
    names = set(classes or no_split_classes(model))
    if not names:
        raise UserError(
            "train.fsdp.wrap_classes: the model names no decoder layer class (_no_split_modules); set "
            "train.fsdp.wrap_classes to the class of its layers"
        )
    units = [module for module in model.modules() if type(module).__name__ in names]
    found = {type(module).__name__ for module in units}
    if classes and (missing := sorted(names - found)):
        known = sorted({type(m).__name__ for m in model.modules()})
        raise UserError(
            f"train.fsdp.wrap_classes: {', '.join(missing)} not a module class of this model (its classes: "
            f"{', '.join(known)})"
        )
    if not units:
        raise UserError(
            f"train.fsdp.wrap_classes: the model's _no_split_modules ({', '.join(sorted(names))}) name none "
            "of its modules; set train.fsdp.wrap_classes to the class of its layers"
        )
    return units


def no_split_classes(model: nn.Module) -> list[str]:
    """transformers' _no_split_modules of the model and of the models inside it (a peft model's base)."""
    return sorted({name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()})


def shard_model(
    model: nn.Module,
    fsdp: FsdpSpec,
    mesh,
    param_dtype: torch.dtype | None,
    replicated: set[nn.Parameter] = frozenset(),
) -> nn.Module:
    """fully_shard over `mesh` (process_mesh) on each wrap unit, then on the root; `replicated`:
    parameters left whole on every rank (a quantized base). Checked: every other parameter is a shard
    over every rank."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    offload = offloaded(fsdp, mesh.device_type)
    if fsdp.cpu_offload and not offload:
        log.warning("train.fsdp.cpu_offload: the model is in host memory already; nothing to offload")
    options = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
        "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
        "ignored_params": set(replicated) or None,
    }
    units = wrap_units(model, fsdp.wrap_classes)
    classes = "/".join(sorted({type(unit).__name__ for unit in units}))
    for unit in units:
        fully_shard(unit, reshard_after_forward=fsdp.reshard_after_forward, **options)
    fully_shard(model, **options)  # the root keeps its parameters gathered from forward to backward
    check_sharded(model, mesh.size(), replicated)
    log.info(
        "train.distributed fsdp: %d %s and the root sharded over %d rank(s)%s, computing in %s%s",
        len(units), classes, mesh.size(), ", a quantized base whole on each" if replicated else "",
        str(param_dtype or "the weights' dtype").removeprefix("torch."),
        ", shards offloaded to host memory" if offload else "",
    )  # fmt: skip
    return model


def offloaded(fsdp: FsdpSpec, device_type: str) -> bool:
    """Whether the shards live in host memory (train.fsdp.cpu_offload, on an accelerator)."""
    return fsdp.cpu_offload and device_type != "cpu"


def check_sharded(model: nn.Module, ranks: int, replicated: set[nn.Parameter]) -> None:
    """What shard_model promises, checked before anything trains: an FSDP root (not DDP), every
    parameter but the replicated ones a shard over all ranks (accelerate's DDP never wraps it:
    job/accelerator.py, wrap_for_ranks)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(model, FSDPModule):
        raise JobError(f"train.distributed fsdp: the model is a {type(model).__name__}, not sharded by FSDP")
    ids = {id(p) for p in replicated}
    for name, param in model.named_parameters():
        if id(param) in ids:
            continue
        if not isinstance(param, DTensor) or param.device_mesh.size() != ranks:
            raise JobError(f"train.distributed fsdp: {name} is not sharded over the {ranks} ranks")


def resharded(model: nn.Module) -> nn.Module:
    """The model with each FSDP unit's shards registered as its parameters, as a backward leaves them:
    a forward without one (an eval, a probe) leaves the root's gathered (with reshard_after_forward
    false, every unit's), and an optimizer made then would hold those. A model not sharded as it is."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


@torch.no_grad()
def receive_from_rank0(
    model: nn.Module, source: dict[str, torch.Tensor], device: torch.device, offload: bool = False
) -> None:
    """Every rank: rank 0's weights and buffers (`source`, by name; empty on the other ranks) into the
    model that shard_model sharded on the meta device. One tensor at a time, each rank receives only its
    shard (a scatter) and allocates it only then; rank 0 drops each tensor of `source` once it is sent.
    Buffers (rotary frequencies, which no state dict holds) are sent whole. Tied weights stay tied.
    `offload`: each shard goes on to host memory as it arrives (offloaded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    received: dict[int, torch.Tensor] = {}  # by the meta tensor's id: a tied weight is received once
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, target in named:
        if id(target) not in received:
            if dist.get_rank() == 0:
                whole = source.pop(name).to(device=device, dtype=target.dtype)
            else:
                whole = torch.empty(target.shape, dtype=target.dtype, device=device)
            if isinstance(target, DTensor):
                tensor = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=0)
                tensor = tensor.cpu() if offload else tensor
            else:
                dist.broadcast(whole, src=0)
                tensor = whole
            del whole
            if isinstance(target, nn.Parameter):
                tensor = nn.Parameter(tensor, requires_grad=target.requires_grad)
            received[id(target)] = tensor
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, received[id(target)])


@torch.no_grad()
def share_trainable_from_rank0(model: nn.Module) -> None:
    """Every rank: the trainable parameters as rank 0 initialized them, for a model that every rank
    loaded itself (a quantized base), before it is sharded."""
    for param in model.parameters():
        if param.requires_grad:
            dist.broadcast(param.data, src=0)


def frozen_parameters(model: nn.Module) -> set[nn.Parameter]:
    """What a quantized base keeps whole on every rank: all that does not train."""
    return {p for p in model.parameters() if not p.requires_grad}


@torch.no_grad()
def probe_loss(model: nn.Module, device: torch.device, compute_dtype: torch.dtype | None) -> float:
    """The model's mean loss on a batch of token ids drawn from a fixed seed, without dropout: the same
    batch on every rank, and for a sharded model a collective."""
    vocabulary = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(vocabulary, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype is not None):
            return float(model(input_ids=ids, labels=ids, use_cache=False).loss)
    finally:
        model.train(training)


def check_sharded_loss(
    model: nn.Module, unsharded: float, device: torch.device, compute_dtype: torch.dtype | None
) -> None:
    """Every rank: the sharded model's probe loss is the unsharded model's (`unsharded`), on every rank,
    within the compute dtype's tolerance; else every rank raises the same UserError, naming the first
    rank where it is not and both losses."""
    sharded = probe_loss(model, device, compute_dtype)
    log.info("train.distributed fsdp: a probe batch's loss %.6g sharded, %.6g unsharded", sharded, unsharded)
    losses = torch.tensor([sharded, unsharded], dtype=torch.float64, device=device)
    every_rank = [torch.empty_like(losses) for _ in range(dist.get_world_size())]
    dist.all_gather(every_rank, losses)
    tolerance = PROBE_TOLERANCE.get(compute_dtype, PROBE_TOLERANCE[torch.bfloat16])
    for rank, (on_shards, whole) in enumerate(pair.tolist() for pair in every_rank):
        if not math.isclose(on_shards, whole, rel_tol=tolerance):
            raise UserError(
                "train.distributed fsdp: the sharded quantized model does not compute what the unsharded "
                f"one does: on rank {rank}, a probe batch's loss is {on_shards:.6g} sharded and {whole:.6g} "
                f"unsharded (tolerance {tolerance:g}, relative). Training it would go wrong without an "
                "error (bitsandbytes#1945); train it with train.distributed ddp"
            )


def clip_sharded_gradients(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over sharded gradients: the norm of the whole gradient, over every
    rank's shards, returned whole (a plain tensor) on every rank."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def gathered_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank (a collective): the trained weights whole, on rank 0 in host memory, for publishing
    (the trainable parameters and the buffers; a frozen base is not gathered); {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(resharded(model), options=options)
