"""MANIFEST.json: the sha256 and size of every file of a folder under output.uri (a checkpoint, adapter/,
merged/). A reader trusts a folder only when its MANIFEST.json is there and every file it lists matches.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from job import __version__
from job.digest import sha256_file
from job.errors import UserError
from job.output.layout import MANIFEST


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


def verify_manifest(directory: Path, reads: Callable[[str], bool] = lambda name: True) -> None:
    """Raise UserError unless directory has a MANIFEST.json whose every file is present and matches;
    of the files it lists, only those whose names `reads` accepts (the ones this reader downloaded)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise UserError(
            f"{directory} has no {MANIFEST}: not a finished ftjob output (or still being written)"
        )
    for name, entry in listed_files(manifest_path).items():
        path = directory / name
        if ".." in name.split("/") or name.startswith("/"):
            raise UserError(f"{directory}/{MANIFEST}: names a file outside the folder: {name!r}")
        if not reads(name):
            continue
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise UserError(f"{directory}: {name} is missing or does not match {MANIFEST}")


def listed_files(manifest_path: Path) -> dict[str, dict[str, Any]]:
    """The files a MANIFEST.json lists, each with its sha256 and size; UserError when it is not a
    manifest as write_manifest writes it."""
    try:
        files = json.loads(manifest_path.read_text())["files"]
        listed = isinstance(files, dict) and all(
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and type(entry.get("size")) is int
            for entry in files.values()
        )
    except (ValueError, KeyError, TypeError):
        listed = False
    if not listed:
        raise UserError(
            f"{manifest_path}: not a manifest as ftjob writes it (files, each with sha256 and size)"
        )
    return files
