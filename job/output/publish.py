"""Publishing the result under output.uri: adapter/, then merged/, each with MANIFEST.json written last.

A reader trusts a directory only when its MANIFEST.json is there and the sha256 of each file matches.
The adapter's spec.json is the spec the run trained with, model.identity (the model it was trained on)
included: merged/ is made only on that model.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from job.errors import UserError
from job.model.adapter import merge_adapter
from job.model.source import resolved_identity
from job.output.layout import MANIFEST, PUBLISHED, OutputLayout
from job.output.manifest import verify_manifest, write_manifest
from job.spec import MODEL_IDENTITY, ModelSpec, Spec, echo, parse_spec_text, public_dict, read_spec_text
from job.storage import download_dir, filesystem, is_local, join, upload_dir

log = logging.getLogger(__name__)


def save_trained(model, tokenizer, directory: Path, weights: dict | None = None) -> None:
    """peft models save adapter_model.safetensors + adapter_config.json; full models save the model.
    `weights`: a sharded model's, gathered whole (job/model/sharding.py); None: the model's own."""
    model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(directory)


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
    model, tokenizer, spec: Spec, metrics: dict[str, Any], directory: Path, weights: dict | None = None
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
