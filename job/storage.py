"""Object storage through fsspec: one place that turns a URL into a filesystem with the spec's options.

S3-compatible stores are reached through the standard AWS variables (AWS_ENDPOINT_URL, keys, region),
which s3fs/botocore read themselves, or through `storage_options` per protocol in the spec.

Transient S3 faults (503 SlowDown, 500/502/504, connection resets, timeouts) are retried with
jittered exponential backoff, in two layers:

- botocore, in its "standard" retry mode, retries each request up to S3_MAX_ATTEMPTS times (waits of
  rand(0, 1) * 2**i seconds, i = 0, 1, ...), and stops retrying early when its per-client retry quota
  runs dry (a circuit breaker for a store that is down);
- s3fs repeats the whole call up to S3FS_RETRIES times when botocore gave up on a transient error
  (5xx, connection lost), and re-reads a response body that broke off mid-stream (botocore does not).

A persistent outage therefore surfaces as an exception after at most S3FS_RETRIES * S3_MAX_ATTEMPTS
attempts and about s3_retry_budget_seconds() of waiting (plus the timeouts of attempts that hang),
instead of hanging. The spec's storage_options["s3"]["config_kwargs"] (connect_timeout, read_timeout,
retries) and the AWS_RETRY_MODE / AWS_MAX_ATTEMPTS variables take precedence over these defaults.
"""

from __future__ import annotations

import errno
import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import split_protocol

from job.errors import JobError, UserError

StorageOptions = Mapping[str, Mapping[str, Any]]

S3_PROTOCOLS = ("s3", "s3a")
# Stores without directories: nothing to create before writing a key (s3fs's makedirs would probe the
# bucket, and create it when the probe fails).
OBJECT_STORE_PROTOCOLS = (*S3_PROTOCOLS, "gs", "gcs", "az", "abfs", "abfss")

S3_RETRY_MODE = "standard"  # retries 500/502/503/504, throttling codes and connection errors
S3_MAX_ATTEMPTS = 5  # botocore attempts per request, the first one included
S3FS_RETRIES = 3  # s3fs rounds of those attempts per call (and body re-reads per download)
S3_CONNECT_TIMEOUT = 5  # seconds
S3_READ_TIMEOUT = 15  # seconds without a byte of the response
S3_MAX_BACKOFF = 20  # botocore's cap on one wait, seconds
S3_SERVER_ERRORS = (500, 502, 503, 504)
# Multipart upload part size (and the size from which put_file uses multipart, times two). s3fs's
# default of 50 MiB holds up to 10 parts (500 MiB) in memory at once and resends 50 MiB per failed
# part; 8 MiB is the AWS CLI's default. Raised for files that would need over 10,000 parts.
UPLOAD_PART_SIZE = 8 << 20
MAX_UPLOAD_PARTS = 10_000


def protocol_of(url: str) -> str:
    return split_protocol(url)[0] or "file"


_configured: dict[str, dict[str, Any]] = {}


def configure_storage(storage_options: StorageOptions | None) -> None:
    """The spec's storage_options (per protocol) for every filesystem() of this process: set once, as
    the job starts, instead of passing them to every place that touches a URL."""
    global _configured
    _configured = {protocol: dict(options) for protocol, options in (storage_options or {}).items()}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or local path, with the configured options of its protocol."""
    protocol = protocol_of(url)
    options = dict(_configured.get(protocol, {}))
    if protocol in S3_PROTOCOLS:
        options = s3_options(options)
        _retry_server_errors_in_s3fs()
    fs, path = fsspec.core.url_to_fs(url, **options)
    if protocol in S3_PROTOCOLS:
        # s3fs takes its own retry count only as an attribute; instances are cached per options, so
        # this is the same value on every call.
        fs.retries = S3FS_RETRIES
    return fs, path


def s3_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """s3fs options with ftjob's retry and timeout defaults under the ones given.

    Given config_kwargs keys win; so do AWS_RETRY_MODE and AWS_MAX_ATTEMPTS from the environment.
    """
    options = dict(options)
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT)
    config.setdefault("read_timeout", S3_READ_TIMEOUT)
    retries = dict(config.get("retries") or {})
    if "mode" not in retries and "AWS_RETRY_MODE" not in os.environ:
        retries["mode"] = S3_RETRY_MODE
    attempts_given = "max_attempts" in retries or "total_max_attempts" in retries
    if not attempts_given and "AWS_MAX_ATTEMPTS" not in os.environ:
        retries["total_max_attempts"] = S3_MAX_ATTEMPTS
    if retries:
        config["retries"] = retries
    options["config_kwargs"] = config
    return options


def s3_retry_budget_seconds(
    max_attempts: int = S3_MAX_ATTEMPTS, rounds: int = S3FS_RETRIES, max_backoff: float = S3_MAX_BACKOFF
) -> float:
    """The longest an S3 call waits between attempts before a persistent fault surfaces.

    botocore (standard mode) waits at most min(2**i, max_backoff) before attempt i + 2; s3fs waits
    min(0.1 * 1.7**j, 15) after its round j. Time spent in the attempts themselves (up to the
    connect or read timeout each, when the store hangs) comes on top.
    """
    botocore = sum(min(2**i, max_backoff) for i in range(max_attempts - 1))
    s3fs = sum(min(0.1 * 1.7**j, 15) for j in range(rounds))
    return rounds * botocore + s3fs


def _is_server_error(error: Exception) -> bool:
    """A 5xx answer from S3 that botocore gave up on: worth another round in s3fs."""
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return False
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in S3_SERVER_ERRORS


def _retry_server_errors_in_s3fs() -> None:
    """s3fs repeats a call only for SlowDown among S3's error answers; make it every 5xx.

    The handler is process-wide in s3fs; ftjob owns its process and sets only this one.
    """
    import s3fs

    s3fs.set_custom_error_handler(_is_server_error)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def is_local(url: str) -> bool:
    return protocol_of(url) == "file"


def absolute(uri: str) -> str:
    """A local path (or file:// URL) as an absolute path, for records read elsewhere; other URLs as they are."""
    return str(Path(filesystem(uri)[1]).resolve()) if is_local(uri) else uri


# S3 error codes that mean "these credentials may not do this" (s3fs passes some on as OSError).
ACCESS_DENIED_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity", "403",
}  # fmt: skip
# Local errors that a retry cannot fix: the path itself is wrong.
PATH_ERRNOS = {
    errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL,
}  # fmt: skip


def storage_error(error: Exception, what: str) -> JobError:
    """A storage failure as the user meets it. Exit 2 for what the user must fix (access denied, no
    credentials, an endpoint that cannot be reached, nothing there); exit 1 for what a later attempt may
    fix (a store outage that outlasted the retries, a full local disk), so the scheduler retries it."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(error, JobError):
        return error
    detail = f"{type(error).__name__}: {error}"
    cause = error.__cause__ or error.__context__
    code = ""
    for candidate in (error, cause):
        if isinstance(candidate, ClientError):
            code = str(candidate.response.get("Error", {}).get("Code", ""))
    if isinstance(error, NoCredentialsError):
        return UserError(
            f"{what}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS "
            "profile or role), or storage_options in the spec for other stores"
        )
    if isinstance(error, PermissionError) or code in ACCESS_DENIED_CODES:
        return UserError(
            f"{what}: access denied ({detail}); check the credentials (AWS_* variables, a mounted "
            "Secret, storage_options) and that they may read and write there"
        )
    if isinstance(error, EndpointConnectionError) or isinstance(cause, EndpointConnectionError):
        return UserError(
            f"{what}: cannot reach the storage endpoint ({detail}); check AWS_ENDPOINT_URL or "
            "storage_options.s3.endpoint_url and the network"
        )
    if isinstance(error, FileNotFoundError):
        return UserError(f"{what}: not found ({detail})")
    if isinstance(error, OSError) and error.errno in PATH_ERRNOS:
        return UserError(f"{what}: {detail}")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return JobError(f"{what}: the local disk is full ({detail})")
    if isinstance(error, (OSError, BotoCoreError, ClientError)):
        return JobError(f"{what}: storage failed ({detail}); a later attempt may succeed")
    return UserError(f"{what}: {detail}")  # a URL no backend takes, a backend not installed, ...


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Around storage calls only: what they raise becomes storage_error(error, what)."""
    try:
        yield
    except Exception as e:  # every backend raises its own types
        raise storage_error(e, what) from None


def check_writable(uri: str) -> None:
    """Write and delete a probe under uri, so a bad output location fails before training, not after."""
    probe = join(uri, f".ftjob-write-check-{uuid.uuid4().hex}")
    with storage_errors(f"output.uri {uri} is not writable"):
        fs, path = filesystem(uri)
        if is_local(uri):  # object stores have no directories, and makedirs there would create a bucket
            fs.makedirs(path, exist_ok=True)
        fs, probe_path = filesystem(probe)
        with fs.open(probe_path, "wb") as f:
            f.write(b"ok")
        fs.rm(probe_path)


def upload_dir(local_dir: Path, uri: str, last: str = "") -> None:
    """Copy local_dir's files to uri; the file named `last` (a completion marker) goes after all others.

    A marker left by an earlier upload to the same place is removed first, so a reader never sees an
    old marker beside new, half-written files. A failure that outlasts the retries raises JobError
    naming the object, with the storage error as its cause; what was uploaded before stays.
    """
    fs, root = filesystem(uri)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    protocol = protocol_of(uri)
    target = f"{root}/{last}"
    try:
        if last and fs.exists(target):
            fs.rm(target)
        for file in files:
            target = f"{root}/{file.relative_to(local_dir).as_posix()}"
            if protocol not in OBJECT_STORE_PROTOCOLS:
                fs.makedirs(os.path.dirname(target), exist_ok=True)
            fs.put_file(str(file), target, **_put_options(protocol, file.stat().st_size))
    except Exception as e:  # every backend raises its own types; after retries, all mean the upload failed
        where = fs.unstrip_protocol(target) if not is_local(uri) else target
        raise JobError(f"cannot upload to {where}: {type(e).__name__}: {e}") from e


def _put_options(protocol: str, size: int) -> dict[str, Any]:
    """put_file options: S3 multipart part size (see UPLOAD_PART_SIZE)."""
    if protocol not in S3_PROTOCOLS:
        return {}
    return {"chunksize": max(UPLOAD_PART_SIZE, math.ceil(size / MAX_UPLOAD_PARTS))}


def download_dir(uri: str, local_dir: Path, wanted: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Copy every file under uri (whose relative name `wanted` accepts) into local_dir; returns the
    relative names copied. Object keys are untrusted: one that is absolute, has a `..` or empty part, or
    would land outside local_dir is refused (UserError naming it) before anything is copied."""
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    inside = local_dir.resolve()
    copies = []
    for path in sorted(fs.find(root)):
        name = path[len(root) :].removeprefix("/")  # one separator: "a//b" keeps its empty part
        if not name or name.endswith("/") or not wanted(name):  # "/": a folder marker (S3 consoles)
            continue
        target = (local_dir / name).resolve()
        if (
            name.startswith("/")
            or any(p in ("", ".", "..") for p in name.split("/"))
            or not target.is_relative_to(inside)
        ):
            raise UserError(
                f"{uri}: refusing the object {name!r}: its name would be written outside {local_dir}"
            )
        copies.append((path, name, target))
    for path, _, target in copies:
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
    return [name for _, name, _ in copies]
