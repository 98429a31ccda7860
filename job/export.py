"""Publishing the result under output.uri: adapter/, then merged/, each with MANIFEST.json written last.

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
from job.storage import download_dir, filesystem, is_local, join, upload_dir

MANIFEST = "MANIFEST.json"
PUBLISHED = ("adapter", "merged")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def write_manifest(directory: Path, others: dict[str, dict[str, Any]] | None = None) -> None:
    """MANIFEST.json: every file of directory (and `others`, files that other processes upload beside
    them) with its sha256 and size."""
    files = {
        p.relative_to(directory).as_posix(): manifest_entry(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    files.update(others or {})
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
        if ".." in name.split("/") or name.startswith("/"):
            raise UserError(f"{directory}/{MANIFEST}: names a file outside the folder: {name!r}")
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise UserError(f"{directory}: {name} is missing or does not match {MANIFEST}")


def save_trained(model, tokenizer, directory: Path) -> None:
    """peft models save adapter_model.safetensors + adapter_config.json; full models save the model."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def write_run_files(directory: Path, spec: Spec, metrics: dict[str, Any]) -> None:
    (directory / "spec.json").write_text(json.dumps(public_dict(spec), indent=2) + "\n")
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def publish_dir(directory: Path, uri: str) -> None:
    """Upload a finished directory (MANIFEST.json written) to uri over a cleared target, MANIFEST.json
    last: files of an earlier publish never sit beside new ones under a valid MANIFEST."""
    remove_dir(uri)
    upload_dir(directory, uri, last=MANIFEST)


def published_uri(spec: Spec, name: str) -> str:
    """adapter/ or merged/ under output.uri."""
    return join(spec.output_uri, name)


def is_published(spec: Spec, name: str = "adapter") -> bool:
    fs, path = filesystem(join(published_uri(spec, name), MANIFEST))
    return fs.exists(path)


def remove_dir(uri: str) -> None:
    """Delete a published directory, its MANIFEST.json first: a reader never trusts half of one."""
    fs, path = filesystem(uri)
    if fs.exists(f"{path}/{MANIFEST}"):
        fs.rm(f"{path}/{MANIFEST}")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_published(spec: Spec) -> None:
    for name in PUBLISHED:
        remove_dir(published_uri(spec, name))


def publish(model, tokenizer, spec: Spec, metrics: dict[str, Any], directory: Path) -> str:
    """adapter/ under output.uri, written once into `directory` (which the caller may then hand to
    MLflow: the same files), then uploaded. Returns its URI."""
    uri = published_uri(spec, "adapter")
    save_trained(model, tokenizer, directory)
    write_run_files(directory, spec, metrics)
    write_manifest(directory)
    publish_dir(directory, uri)
    return uri


def publish_merged(spec: Spec, model_dir: Path) -> str:
    """Publish merged/: the published adapter merged into the base model as it was trained. Runs after
    adapter/ is published, from what was published, so a merge that fails loses no adapter and the
    next run (which finds adapter/ published and merged/ not) merges again."""
    from transformers import AutoTokenizer

    from job.model import merge_adapter

    merged_uri = published_uri(spec, "merged")
    with tempfile.TemporaryDirectory(prefix="ftjob-merge-") as tmp:
        adapter_dir = fetch_published(published_uri(spec, "adapter"), Path(tmp))
        merged = merge_adapter(model_dir, adapter_dir, spec.model)
        directory = Path(tmp) / "merged"
        save_trained(merged, AutoTokenizer.from_pretrained(adapter_dir), directory)
        write_manifest(directory)
        publish_dir(directory, merged_uri)
    return merged_uri


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
