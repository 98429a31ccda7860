"""Publishing the result under output.uri: adapter/, then merged/, each with MANIFEST.json written last.

A reader trusts a directory only when its MANIFEST.json is there and the sha256 of each file matches.
The adapter's spec.json is the spec the run trained with, model.identity (the model it was trained on)
included: merged/ is made only on that model.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from job.errors import UserError
from job.model.adapter import merge_adapter
from job.model.source import resolved_identity
from job.output.layout import MANIFEST, PUBLISHED, OutputLayout
from job.output.manifest import verify_manifest, write_manifest
from job.spec import MODEL_IDENTITY, ModelSpec, Spec, echo, parse_spec_text, public_dict, read_spec_text
from job.storage import download_dir, filesystem, is_local, join, upload_dir

log = logging.getLogger(__name__)


# The largest safetensors file of a sharded model's weights (write_model_files); a larger tensor has one alone
WEIGHT_FILE_BYTES = 5 * 1024**3
INDEX = "model.safetensors.index.json"


def save_trained(
    model, tokenizer, directory: Path, weights: dict | tempfile.TemporaryDirectory | None = None
) -> None:
    """peft models save adapter_model.safetensors + adapter_config.json; full models save the model.
    `weights`: a sharded adapter's, gathered whole (job/model/sharding.py: gathered_weights), or a sharded
    full model's weight files (write_model_files), moved here beside the config save_pretrained writes;
    None: the model's own."""
    if isinstance(weights, tempfile.TemporaryDirectory):
        model.save_pretrained(directory, state_dict={})  # config.json and generation_config.json alone
        for path in sorted(Path(weights.name).iterdir()):
            shutil.move(path, directory / path.name)
    else:
        model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(directory)


@torch.no_grad()
def write_model_files(model, directory: Path | None, file_bytes: int = WEIGHT_FILE_BYTES) -> None:
    """Every rank (a collective a tensor): a sharded model's weights, written by rank 0 into `directory`
    (None on the other ranks) as save_pretrained names them: model.safetensors, or files of at most
    `file_bytes` (model-00001-of-0000N.safetensors) and model.safetensors.index.json. Each tensor is
    gathered whole in turn and each file written once its tensors are: rank 0 holds one file's tensors
    at most, never the whole model, and writes every file, so that it alone uploads them, as with ddp."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    tensors = model.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one tensor
    tensors = remove_tied_weights_from_state_dict(tensors, model)  # the names save_pretrained keeps
    for name in model._keys_to_ignore_on_save or ():
        tensors.pop(name, None)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=file_bytes)
    for file_name, names in split.filename_to_tensors.items():
        part = {}
        for name in names:
            whole = gathered(tensors[name])
            if directory is not None:
                part[name] = whole.detach().cpu().contiguous()
        if directory is not None:
            save_file(part, directory / file_name, metadata={"format": "pt"})
    if directory is not None and split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whole: a DTensor's shards gathered from every rank (on its mesh's device: offloaded
    shards are in host memory), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    return tensor.to(tensor.device_mesh.device_type).full_tensor()


def write_run_files(directory: Path, spec: Spec, metrics: dict[str, Any]) -> None:
    """spec.json: the spec the run trained with, whose model.identity names the model it loaded
    (which model.source alone does not pin down: set as model.source was resolved); metrics.json."""
    (directory / "spec.json").write_text(json.dumps(public_dict(spec), indent=2) + "\n")
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def publish_dir(directory: Path, uri: str) -> None:
    """Upload a finished directory (MANIFEST.json written) to uri over a cleared target, MANIFEST.json
    last: files of an earlier publish never sit beside new ones under a valid MANIFEST."""
    remove_dir(uri)
    upload_dir(directory, uri, last=MANIFEST)


def is_published(output_uri: str, name: str = "adapter") -> bool:
    fs, path = filesystem(join(OutputLayout(output_uri).published(name), MANIFEST))
    return fs.exists(path)


def remove_dir(uri: str) -> None:
    """Delete a published directory, its MANIFEST.json first: a reader never trusts half of one."""
    fs, path = filesystem(uri)
    if fs.exists(f"{path}/{MANIFEST}"):
        fs.rm(f"{path}/{MANIFEST}")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_published(output_uri: str) -> None:
    for name in PUBLISHED:
        remove_dir(OutputLayout(output_uri).published(name))


def publish(
    model,
    tokenizer,
    spec: Spec,
    metrics: dict[str, Any],
    directory: Path,
    weights: dict | tempfile.TemporaryDirectory | None = None,
) -> str:
    """adapter/ under output.uri, written once into `directory` (which the caller may then hand to
    MLflow: the same files), then uploaded. Returns its URI. `weights`: as save_trained takes them."""
    uri = OutputLayout(spec.output_uri).published("adapter")
    save_trained(model, tokenizer, directory, weights)
    write_run_files(directory, spec, metrics)
    write_manifest(directory)
    publish_dir(directory, uri)
    return uri


def publish_merged(output_uri: str, model: ModelSpec, model_dir: Path) -> str:
    """Publish merged/: the published adapter merged into the base model as it was trained. Runs after
    adapter/ is published, from what was published, so a merge that fails loses no adapter and the
    next run (which finds adapter/ published and merged/ not) merges again. `model_dir`: where
    `model` resolved to (job/model/source.py: resolve_model_dir), checked to be the model the adapter was
    trained on."""
    from transformers import AutoTokenizer

    layout = OutputLayout(output_uri)
    adapter_uri, merged_uri = layout.published("adapter"), layout.published("merged")
    with tempfile.TemporaryDirectory(prefix="ftjob-merge-") as tmp:
        adapter_dir = fetch_published(adapter_uri, Path(tmp))
        check_trained_on(adapter_dir, adapter_uri, model)
        merged = merge_adapter(model_dir, adapter_dir, model)
        directory = Path(tmp) / "merged"
        save_trained(merged, AutoTokenizer.from_pretrained(adapter_dir), directory)
        write_manifest(directory)
        publish_dir(directory, merged_uri)
    return merged_uri


def trained_on(adapter_dir: Path) -> str | None:
    """The identity of the model a published adapter was trained on: model.identity in its spec.json;
    None for an adapter published by an ftjob that did not record it."""
    where = str(adapter_dir / "spec.json")
    model = parse_spec_text(read_spec_text(where)[0], where).get("model")
    if not isinstance(model, dict):
        raise UserError(f"{where}: model is {echo(model)}, not a mapping")
    identity = model.get("identity")
    if identity is not None and not (isinstance(identity, str) and re.fullmatch(MODEL_IDENTITY, identity)):
        raise UserError(f"{where}: model.identity is {echo(identity)}, not a model's identity (hub:<repo>@<commit> or sha256:<64 hex digits>)")  # fmt: skip
    return identity


def check_trained_on(adapter_dir: Path, adapter_uri: str, model: ModelSpec) -> None:
    """Refuse (exit 2) to merge an adapter into another model than the one it was trained on:
    model.source may hold other model files by now. An adapter whose spec.json does not say (an older ftjob
    published it) is merged unchecked, with a warning."""
    trained, current = trained_on(adapter_dir), resolved_identity(model).digest
    if trained is None:
        log.warning("%s/spec.json has no model.identity (an older ftjob published it): merging it into the model under model.source %s unchecked", adapter_uri, model.source)  # fmt: skip
    elif trained != current:
        raise UserError(
            f"output.merge: the adapter in {adapter_uri} was trained on the model {trained}, but "
            f"model.source {model.source} now holds {current}: merging it there would publish a "
            "model that was never trained. Point model.source at the model it was trained on, or run with "
            "--restart to train on this one (which deletes the checkpoints and the published adapter)"
        )


def fetch_published(uri: str, tmp: Path) -> Path:
    """A published directory as a local one (downloaded into tmp unless it is local), its MANIFEST
    verified."""
    if is_local(uri):
        directory = Path(filesystem(uri)[1])
    else:
        directory = tmp / "published"
        download_dir(uri, directory)
    verify_manifest(directory)
    return directory
