"""Where a model comes from: a local directory, a Hub id, or an object-store URL cached on local disk.

Every source ends as a local directory that holds safetensors weights; pickle weights are refused.
Object-store models are fetched once per node into a cache keyed by URL and content (ETag, or size
and mtime), under a file lock, into a temporary directory renamed into place when complete. The cache
is input like any other: a cached folder is used only when it is this user's own folder (not a
symbolic link), writable by no one else, and holds the files its marker (.ftjob-source.json, written
with them) names, with their digests; else it is downloaded again, or refused when it is another user's.
So is its lock file: opened without following a symbolic link or truncating it, and refused when it is
no regular file.

A model's identity (ModelIdentity) names what a run loaded: a Hub model's is its commit; a folder's (a
local one, or an object-store copy) is a digest of the files the loader reads from it, each of which has
its own digest too. A run sets it as the spec's model.identity when it resolves model.source: its
checkpoints' fingerprint and the published spec.json carry it, so that resuming, merging or generating
on another model under the same model.source is refused, naming the files that changed.
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
from contextlib import contextmanager, suppress
from fnmatch import fnmatch
from pathlib import Path
from typing import BinaryIO, NamedTuple

from job.digest import sha256_file
from job.errors import UserError
from job.spec import ModelSpec
from job.storage import download_dir, filesystem, is_local, storage_error, storage_errors

log = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# The files transformers reads from a causal LM's folder: its config, the weights (and their index) and
# the tokenizer's files (sentencepiece *.model, tiktoken, named chat templates included). Others (a
# README, a LICENSE.txt another tool added) are not the model. *.py: its code, run only with
# model.trust_remote_code.
LOADED_NAMES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
}
CHAT_TEMPLATES = "additional_chat_templates"  # a folder of named templates: <name>.jinja
LOADED_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.model",
    "*.tiktoken",
    "*.py",
    f"{CHAT_TEMPLATES}/*.jinja",
]
MARKER = ".ftjob-source.json"  # in a cached folder: its URL and the digests of its files, written at download
# A weight file's digest reads its header (tensor names, dtypes, shapes, offsets; within the first MiB
# for any usual model) and samples spread evenly over its weights: about 2 MiB a file, not gigabytes.
HEAD_BYTES = 1 << 20
SAMPLES, SAMPLE_BYTES = 256, 4096
SHOWN_FILES = 5  # changed files a message names; the rest are counted


class ModelIdentity(NamedTuple):
    digest: str  # 'hub:<repo>@<commit>', or 'sha256:' and a digest over `files`
    files: dict[str, str]  # each loaded file's digest by its path in the folder; none for a Hub commit


# The identity of each model this process resolved, by (source, revision, trust_remote_code): what a run
# records is what it loaded, even if the folder changes while it trains.
_identities: dict[tuple[str, str | None, bool], ModelIdentity] = {}


def cache_root() -> Path:
    return Path(os.environ.get("FTJOB_CACHE", Path.home() / ".cache" / "ftjob")) / "models"


def resolve_model_dir(model: ModelSpec) -> Path:
    """A local directory with the model's config, tokenizer and safetensors weights. Its identity is
    taken now (resolved_identity) and set as model.identity, so that from here on the spec names the model
    it trains (spec.json publishes it, MLflow logs it); a model.identity the spec already has (a
    published spec.json run again) pins it: another model under model.source is refused."""
    directory, identity = located(model)
    check_pinned(model, identity.digest)
    model.identity = identity.digest
    _identities[(model.source, model.revision, model.trust_remote_code)] = identity
    return directory


def located(model: ModelSpec) -> tuple[Path, ModelIdentity]:
    """model.source as a local directory of safetensors weights, and the identity of the model in it."""
    source = model.source
    kind = source_kind(source)
    if kind == "hub":
        directory = _hub_snapshot(source, model.revision)
        check_weights(directory, source)
        return directory, ModelIdentity(f"hub:{source}@{directory.name}", {})  # snapshots/<commit>
    if kind == "object-store":
        directory, files = fetch_cached(source)
        check_weights(directory, source)
        return directory, identity_of(files, model.trust_remote_code)
    directory = Path(os.path.expanduser(source))
    if not directory.exists():
        raise UserError(f"model.source: no such directory: {source}")
    check_weights(directory, source)
    return directory, model_identity(directory, model.trust_remote_code)


def resolved_identity(model: ModelSpec) -> ModelIdentity:
    """The identity of the model this process last resolved model.source to, resolving it now if it has
    not."""
    key = (model.source, model.revision, model.trust_remote_code)
    if key not in _identities:
        resolve_model_dir(model)
    return _identities[key]


def check_pinned(model: ModelSpec, identity: str) -> None:
    """Refuse a model other than the one the spec's model.identity names, if it names one."""
    if model.identity is not None and model.identity != identity:
        raise UserError(
            f"model.identity: model.source {model.source} holds the model {identity!r}, not "
            f"{model.identity!r}, which model.identity names (the model a published spec.json was trained "
            "on): point model.source at that model, or leave model.identity out (--set model.identity=null; "
            "ftjob generate: --base-model) to use this one"
        )


def identity_of(files: dict[str, str], trust_remote_code: bool) -> ModelIdentity:
    """The identity of a folder whose files have these digests (model_files): its code counts only where
    it runs."""
    loaded = {name: digest for name, digest in files.items() if trust_remote_code or not name.endswith(".py")}
    lines = "\n".join(f"{name}\t{digest}" for name, digest in sorted(loaded.items()))
    return ModelIdentity("sha256:" + hashlib.sha256(lines.encode()).hexdigest(), loaded)


def model_identity(directory: Path, trust_remote_code: bool = False) -> ModelIdentity:
    """The identity of a model folder, the same for a local folder and a downloaded copy of it."""
    return identity_of(model_files(directory), trust_remote_code)


def identity_change(before: ModelIdentity, after: ModelIdentity) -> str:
    """How a model's identity changed, for a message: the files whose digests differ (or that came or
    went), else (a Hub commit) the identities, and what to do."""
    changed = changed_files(before.files, after.files)
    if len(changed) > SHOWN_FILES:
        changed = [*changed[:SHOWN_FILES], f"and {len(changed) - SHOWN_FILES} more"]
    what = "other model files under model.source"
    if changed:
        what = f"model files changed under model.source: {', '.join(changed)}"
    return (
        f"{what} (model.identity {before.digest!r} -> {after.digest!r}): point model.source at the model "
        "the run started on"
    )


def changed_files(before: object, after: dict[str, str]) -> list[str]:
    """The names whose digests differ. `before` was read back (a checkpoint's run.json): anything but a
    mapping is as good as no files."""
    before = before if isinstance(before, dict) else {}
    return sorted(str(name) for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def model_files(directory: Path) -> dict[str, str]:
    """The digest of each file of directory that the loader reads (LOADED_NAMES, LOADED_PATTERNS), by its
    path in directory.

    Config, tokenizer and code files are read whole; a safetensors file by its size, its first MiB (the
    header) and 256 blocks of 4 KiB spread evenly over the rest, since hashing gigabytes of weights at
    every start costs as much as loading them. Weights trained apart (another model, another fine-tune of
    the same one) differ in every block; an edit of a few weights between the blocks does not show."""
    candidates = [*directory.iterdir(), *(directory / CHAT_TEMPLATES).glob("*.jinja")]
    names = sorted(path.relative_to(directory).as_posix() for path in candidates if path.is_file())
    return {name: file_digest(directory / name) for name in names if is_loaded(name)}


def is_loaded(name: str) -> bool:
    return name in LOADED_NAMES or any(fnmatch(name, pattern) for pattern in LOADED_PATTERNS)


def file_digest(path: Path) -> str:
    if path.suffix != ".safetensors":
        return sha256_file(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for block in sampled_blocks(f, size):
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


class Untrusted(Exception):
    """A cached folder that is not to be used as it is; the message says why."""


def fetch_cached(url: str) -> tuple[Path, dict[str, str]]:
    """The model at url in the local cache, downloading it unless a trusted copy of this content is there,
    and the digests of its files (model_files): checked against its marker, or taken at download."""
    key, _ = content_key(url)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    with suppress(Untrusted):  # not there, or not trusted: seen to under the lock
        return target, trusted_files(target, url)
    with locked(root / f"{key}.lock"):  # other processes on this node wait, then find it cached
        remove_stale_staging(root, key)
        if os.path.lexists(target):
            try:
                return target, trusted_files(target, url)
            except Untrusted as e:
                discard_untrusted(target, url, str(e))
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        log.info("downloading the model from %s into the node cache %s", url, root)
        try:
            download_dir(url, staging)
            files = model_files(staging)  # the renamed folder's too: the same files
            (staging / MARKER).write_text(json.dumps({"url": url, "files": files}))
            staging.rename(target)
        except Exception as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise storage_error(e, f"model.source: cannot download {url}") from None
    return target, files


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


def trusted_files(folder: Path, url: str) -> dict[str, str]:
    """The digests of a cached folder's files (model_files) when it is this user's own folder (not a
    symbolic link), writable by no one else, whose marker names url and these digests; else Untrusted."""
    try:
        info = folder.lstat()
    except FileNotFoundError:  # not downloaded yet, or removed by a download that did not trust it
        raise Untrusted("it is not there") from None
    if stat.S_ISLNK(info.st_mode):
        raise Untrusted("it is a symbolic link")
    if not stat.S_ISDIR(info.st_mode):
        raise Untrusted("it is not a folder")
    if info.st_uid != os.geteuid():
        raise Untrusted(f"it belongs to user id {info.st_uid}, not to this user ({os.geteuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise Untrusted("other users may write to it")
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = model_files(folder)
        matches = marker["url"] == url and marker["files"] == files
    except (OSError, ValueError, KeyError, TypeError):
        raise Untrusted(f"its {MARKER} is missing or damaged") from None
    if not matches:
        raise Untrusted(f"its files do not match its {MARKER}")
    return files


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
