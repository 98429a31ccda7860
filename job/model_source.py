"""Where a model comes from: a local directory, a Hub id, or an object-store URL cached on local disk.

Every source ends as a local directory that holds safetensors weights; pickle weights are refused.
Object-store models are fetched once per node into a cache keyed by URL and content (ETag, or size
and mtime), under a file lock, into a temporary directory renamed into place when complete. The cache
is input like any other: a cached folder is used only when it is this user's own folder (not a
symbolic link), writable by no one else, and holds the files its marker (.ftjob-source.json, written
with them) names; else it is downloaded again, or refused when it is another user's. So is its lock
file: opened without following a symbolic link or truncating it, and refused when it is no regular file.

A model's identity (model_identity) is a digest of the files it loads from. A run records the identity
of what it loaded in its checkpoints' fingerprint and in the published spec.json, so that resuming on
other weights under the same model.source is refused.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import BinaryIO

from job.errors import UserError
from job.export import sha256_file
from job.storage import download_dir, filesystem, is_local, storage_error, storage_errors

log = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
IDENTITY_PATTERNS = [*HUB_PATTERNS, "*.py"]  # the files a model loads from (code with trust_remote_code)
MARKER = ".ftjob-source.json"  # in a cached folder: its URL, files and identity, written at download
# A weight file's identity reads its header (tensor names, dtypes, shapes, offsets; within the first MiB
# for any usual model) and samples spread evenly over its weights: about 2 MiB a file, not gigabytes.
HEAD_BYTES = 1 << 20
SAMPLES, SAMPLE_BYTES = 256, 4096

# The identity of each model this process resolved, by (source, revision): what a run records is what it
# loaded, even if the folder changes while it trains.
_identities: dict[tuple[str, str | None], str] = {}


def cache_root() -> Path:
    return Path(os.environ.get("FTJOB_CACHE", Path.home() / ".cache" / "ftjob")) / "models"


def resolve_model_dir(source: str, revision: str | None = None) -> Path:
    """A local directory with the model's config, tokenizer and safetensors weights; its identity is
    taken now (resolved_identity)."""
    kind = source_kind(source)
    if kind == "object-store":
        directory = fetch_cached(source)
    elif kind == "hub":
        directory = _hub_snapshot(source, revision)
    elif os.path.exists(os.path.expanduser(source)):
        directory = Path(os.path.expanduser(source))
    else:
        raise UserError(f"model.source: no such directory: {source}")
    check_weights(directory, source)
    _identities[(source, revision)] = model_identity(directory)
    return directory


def resolved_identity(source: str, revision: str | None = None) -> str:
    """The identity of the model this process last resolved source (at revision) to, resolving it now if
    it has not."""
    if (source, revision) not in _identities:
        resolve_model_dir(source, revision)
    return _identities[(source, revision)]


def model_identity(directory: Path) -> str:
    """'sha256:' and a digest of every file a model loads from (config, tokenizer, code and weights, by
    name, size and content), the same for a local folder, a Hub snapshot and a downloaded copy.

    Config, tokenizer and code files are read whole; a safetensors file by its first MiB (the header) and
    256 blocks of 4 KiB spread evenly over the rest, since hashing gigabytes of weights at every start
    costs as much as loading them. Weights trained apart (another model, another fine-tune of the same
    one) differ in every block and so in identity; an edit of a few weights between the blocks does not."""
    lines = [f"{p.name}\t{p.stat().st_size}\t{file_digest(p)}" for p in identity_files(directory)]
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def identity_files(directory: Path) -> list[Path]:
    """The files of directory that a model loads from; hidden ones (ftjob's marker) are not."""
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and any(fnmatch(path.name, pattern) for pattern in IDENTITY_PATTERNS)
    )


def file_digest(path: Path) -> str:
    if path.suffix != ".safetensors":
        return sha256_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in sampled_blocks(f, path.stat().st_size):
            digest.update(block)
    return digest.hexdigest()


def sampled_blocks(f: BinaryIO, size: int) -> Iterator[bytes]:
    """A file's first HEAD_BYTES and SAMPLES blocks spread evenly over the rest; a small file whole."""
    if size <= HEAD_BYTES + SAMPLES * SAMPLE_BYTES:
        yield f.read()
        return
    yield f.read(HEAD_BYTES)
    rest = size - HEAD_BYTES
    for i in range(SAMPLES):
        f.seek(HEAD_BYTES + rest * i // SAMPLES)
        yield f.read(SAMPLE_BYTES)


def source_kind(source: str) -> str:
    """'object-store' for URLs, 'local' for paths that exist or look like paths, else 'hub' (org/name)."""
    if not is_local(source):
        return "object-store"
    if (
        os.path.exists(os.path.expanduser(source))
        or source.startswith(("/", ".", "~"))
        or source.count("/") > 1
    ):
        return "local"
    return "hub"


def check_weights(directory: Path, source: str) -> None:
    if not directory.is_dir():
        raise UserError(f"model.source: {source} is not a directory")
    names = [p.name for p in directory.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UserError(
            f"model.source: {source} has only pickle weights ({', '.join(pickles)}); ftjob loads safetensors "
            "only, since pickle files can run code. Convert them once, e.g. with "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)."
        )
    raise UserError(f"model.source: {source} has no model weights (*.safetensors)")


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unreachable, unknown repo, gated: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
        hint = (
            "HF_HUB_OFFLINE is set and the model is not in the local Hub cache"
            if offline
            else "the Hub could not be reached or has no such model (for private models set HF_TOKEN)"
        )
        raise UserError(
            f"model.source: '{repo_id}' is not a local directory, and {hint}: {type(e).__name__}. "
            "Pass a local directory or an object-store URL instead."
        ) from None


def content_key(url: str) -> tuple[str, list[str]]:
    """A cache key from the URL and each file's name and ETag (or size and mtime); also the file list."""
    with storage_errors(f"model.source: cannot list {url}"):
        fs, root = filesystem(url)
        listing = fs.find(root.rstrip("/"), detail=True)
    if not listing:
        raise UserError(f"model.source: no files under {url}")
    entries = []
    for path, info in sorted(listing.items()):
        version = (
            info.get("ETag")
            or info.get("etag")
            or f"{info.get('size')}:{info.get('mtime') or info.get('LastModified')}"
        )
        entries.append(f"{path}\t{version}")
    digest = hashlib.sha256("\n".join([url, *entries]).encode()).hexdigest()
    return digest[:24], entries


def fetch_cached(url: str) -> Path:
    """The model at url in the local cache, downloading it unless a trusted copy of this content is there."""
    key, _ = content_key(url)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    if os.path.lexists(target) and cache_problem(target, url) is None:
        return target
    with locked(root / f"{key}.lock"):  # other processes on this node wait, then find it cached
        remove_stale_staging(root, key)
        if os.path.lexists(target):
            problem = cache_problem(target, url)
            if problem is None:
                return target
            discard_untrusted(target, url, problem)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        log.info("downloading the model from %s into the node cache %s", url, root)
        try:
            names = download_dir(url, staging)
            marker = {"url": url, "files": names, "identity": model_identity(staging)}
            (staging / MARKER).write_text(json.dumps(marker))
            staging.rename(target)
        except Exception as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise storage_error(e, f"model.source: cannot download {url}") from None
    return target


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on lock_file, created if need be. Like the cache it is in, it is input:
    a symbolic link (which opening for writing would follow, to truncate what it points to, say) or
    anything but a regular file is refused."""
    unusable = f"model.source: {lock_file}, the node cache's lock file for this model,"
    remedy = "delete it, or set FTJOB_CACHE to a folder of your own"
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
        raise UserError(f"{unusable} {why}: {remedy}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{unusable} is not a regular file: {remedy}")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale_staging(root: Path, key: str) -> None:
    """Staging folders of this model's downloads that were killed midway. Only the holder of the model's
    lock downloads it, so under the lock no one writes into them."""
    for stale in root.glob(f".{key}-*"):
        log.info("removing %s, left by a download of the model that did not finish", stale)
        shutil.rmtree(stale, ignore_errors=True)


def cache_problem(folder: Path, url: str) -> str | None:
    """Why a cached folder is not to be used as it is, or None when it is this user's own folder (not a
    symbolic link), writable by no one else, whose marker names url and the identity of its files."""
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    if info.st_uid != os.geteuid():
        return f"it belongs to user id {info.st_uid}, not to this user ({os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "other users may write to it"
    try:
        marker = json.loads((folder / MARKER).read_text())
        matches = marker["url"] == url and marker["identity"] == model_identity(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MARKER} is missing or damaged"
    return None if matches else f"its files do not match its {MARKER}"


def discard_untrusted(folder: Path, url: str, problem: str) -> None:
    """Remove a cached folder that is not trusted, so that the model is downloaded again; one of another
    user is not this job's to remove: exit 2."""
    untrusted = f"model.source: the cached copy of {url} in {folder} is not trusted ({problem})"
    if folder.lstat().st_uid != os.geteuid():
        raise UserError(f"{untrusted}: delete it, or set FTJOB_CACHE to a folder of your own")
    log.warning("%s: downloading it again", untrusted)
    try:
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        else:
            folder.unlink()  # a symbolic link goes, never what it points to
    except OSError as e:
        raise UserError(f"{untrusted}, and cannot be removed ({e}): delete it") from None
