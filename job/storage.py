"""Object storage through fsspec: one place that turns a URL into a filesystem with the spec's options.

S3-compatible stores are reached through the standard AWS variables (AWS_ENDPOINT_URL, keys, region),
which s3fs/botocore read themselves, or through `storage_options` per protocol in the spec.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import split_protocol

from job.errors import UserError

StorageOptions = Mapping[str, Mapping[str, Any]]


def protocol_of(url: str) -> str:
    return split_protocol(url)[0] or "file"


def filesystem(
    url: str, storage_options: StorageOptions | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or local path, with the options of its protocol."""
    options = dict((storage_options or {}).get(protocol_of(url), {}))
    return fsspec.core.url_to_fs(url, **options)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def is_local(url: str) -> bool:
    return protocol_of(url) == "file"


def check_writable(uri: str, storage_options: StorageOptions | None = None) -> None:
    """Write and delete a probe under uri, so a bad output location fails before training, not after."""
    probe = join(uri, f".ftjob-write-check-{uuid.uuid4().hex}")
    try:
        fs, path = filesystem(uri, storage_options)
        if is_local(uri):  # object stores have no directories, and makedirs there would create a bucket
            fs.makedirs(path, exist_ok=True)
        fs, probe_path = filesystem(probe, storage_options)
        with fs.open(probe_path, "wb") as f:
            f.write(b"ok")
        fs.rm(probe_path)
    except Exception as e:  # every backend raises its own types; all mean the same to the user here
        raise UserError(f"output.uri {uri} is not writable: {type(e).__name__}: {e}") from None


def upload_dir(
    local_dir: Path, uri: str, storage_options: StorageOptions | None = None, last: str = ""
) -> None:
    """Copy local_dir's files to uri; the file named `last` (a completion marker) goes after all others.

    A marker left by an earlier upload to the same place is removed first, so a reader never sees an
    old marker beside new, half-written files.
    """
    fs, root = filesystem(uri, storage_options)
    if last and fs.exists(f"{root}/{last}"):
        fs.rm(f"{root}/{last}")
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    for file in files:
        target = f"{root}/{file.relative_to(local_dir).as_posix()}"
        fs.makedirs(os.path.dirname(target), exist_ok=True)
        fs.put_file(str(file), target)


def download_dir(uri: str, local_dir: Path, storage_options: StorageOptions | None = None) -> list[str]:
    """Copy every file under uri into local_dir; returns the relative names copied."""
    fs, root = filesystem(uri, storage_options)
    root = root.rstrip("/")
    names = []
    for path in sorted(fs.find(root)):
        name = path[len(root) :].lstrip("/")
        (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(local_dir / name))
        names.append(name)
    return names
