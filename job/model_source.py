"""Where a model comes from: a local directory, a Hub id, or an object-store URL cached on local disk.

Every source ends as a local directory that holds safetensors weights; pickle weights are refused.
Object-store models are fetched once per node into a cache keyed by URL and content (ETag, or size
and mtime), under a file lock, into a temporary directory renamed into place when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from job.errors import UserError
from job.storage import download_dir, filesystem, is_local, storage_error, storage_errors

log = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def cache_root() -> Path:
    return Path(os.environ.get("FTJOB_CACHE", Path.home() / ".cache" / "ftjob")) / "models"


def resolve_model_dir(source: str, revision: str | None = None) -> Path:
    """A local directory with the model's config, tokenizer and safetensors weights."""
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
    return directory


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
    """The model at url in the local cache, downloading it if this content is not cached yet."""
    key, _ = content_key(url)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    if target.is_dir():
        return target
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other processes on this node wait, then find it cached
        if target.is_dir():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        log.info("downloading the model from %s into the node cache %s", url, root)
        try:
            names = download_dir(url, staging)
            (staging / ".ftjob-source.json").write_text(json.dumps({"url": url, "files": names}))
            staging.rename(target)
        except Exception as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise storage_error(e, f"model.source: cannot download {url}") from None
    return target
