"""Publishing the result under output.uri: adapter/ (and merged/), MANIFEST.json written last.

A reader trusts a directory only when its MANIFEST.json is there and the sha256 of each file matches.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from job import __version__
from job.errors import UserError
from job.spec import Spec, public_dict
from job.storage import StorageOptions, join, upload_dir

MANIFEST = "MANIFEST.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = {
        p.relative_to(directory).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"ftjob_version": __version__, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify_manifest(directory: Path) -> None:
    """Raise UserError unless directory has a MANIFEST.json whose every file is present and matches."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise UserError(
            f"{directory} has no {MANIFEST}: not a finished ftjob output (or still being written)"
        )
    for name, entry in json.loads(manifest_path.read_text())["files"].items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise UserError(f"{directory}: {name} is missing or does not match {MANIFEST}")


def save_trained(model, tokenizer, directory: Path) -> None:
    """peft models save adapter_model.safetensors + adapter_config.json; full models save the model."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def write_run_files(directory: Path, spec: Spec, metrics: dict[str, Any]) -> None:
    (directory / "spec.json").write_text(json.dumps(public_dict(spec), indent=2) + "\n")
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def publish_dir(fill, uri: str, storage_options: StorageOptions) -> None:
    """fill(tmpdir) writes the files; they are uploaded to uri with MANIFEST.json last."""
    with tempfile.TemporaryDirectory(prefix="ftjob-publish-") as tmp:
        directory = Path(tmp)
        fill(directory)
        write_manifest(directory)
        upload_dir(directory, uri, storage_options, last=MANIFEST)


def publish(model, tokenizer, spec: Spec, metrics: dict[str, Any], merged_model=None) -> str:
    """Publish adapter/ (and merged/ when given) under the spec's output URI; returns adapter/'s URI."""
    adapter_uri = join(spec.output_uri, "adapter")

    def fill_adapter(directory: Path) -> None:
        save_trained(model, tokenizer, directory)
        write_run_files(directory, spec, metrics)

    publish_dir(fill_adapter, adapter_uri, spec.storage_options)
    if merged_model is not None:
        publish_dir(
            lambda d: save_trained(merged_model, tokenizer, d),
            join(spec.output_uri, "merged"),
            spec.storage_options,
        )
    return adapter_uri
