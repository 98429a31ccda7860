"""The MLflow spool: what a run logs goes to local disk first, then to MLflow, in order, exactly once.

    <root>/<key>/spool.json      written as the folder is made: ftjob's mark, and where the records go
                                 (the tracking URI without credentials, and the sha256 of the store it
                                 names: tracking.tracking_store)
    <root>/<key>/records.jsonl   append-only, one record a line: open, params, metrics, inputs,
                                 artifacts, register, table, status
    <root>/<key>/state.json      the MLflow run id, how far records.jsonl is delivered (a byte offset),
                                 and the last step delivered for each metric key
    <root>/<key>/files/          local copies of artifacts, kept until they are delivered
    <root>/<key>/lock            held (flock) by the one process that writes or delivers the spool

A record is acknowledged (state.json's offset moves past it) only after MLflow accepted it, so an
outage or a crash at any point leaves it to be delivered again, by this process or by the next one
that opens the same root. Delivering again never duplicates anything:
  - a run is looked up by its `ftjob.run_key` tag before one is created;
  - metric points keep the timestamp they were logged with, and MLflow stores a (key, step,
    timestamp, value) point once;
  - a training metric point whose step is not above the last step already delivered for its key is
    dropped (the first value wins). A resumed run starts from the steps its run already has, so the
    steps a restart trains again are not logged twice. System metrics are samples in time, not
    steps, and are exempt.
A record that MLflow rejects as invalid (not: unreachable) is skipped with a warning, so that it can
never hold back the records after it.

What a spool holds is data, never instructions. A key is 32 lowercase hex digits and a run id (in the
records, state.json or a checkpoint) is shaped as MLflow checks one, so neither is ever a path: a spool
folder is always a name directly in the root. The root and every spool folder are created 0700. A
folder is opened, delivered, quarantined or removed only when it is a real folder (not a link) of the
current user with its spool.json; others are left as they are, with a warning (among them spools of an
ftjob that wrote no spool.json: where their records go is not known). A spool is delivered only by a
process tracking to the store its spool.json names; others leave it, with a warning. A spool whose
spool.json, state.json or records are not as this module writes them (damaged on disk, or planted; a
link or a file with another link among them, or a files/ that is not a real folder) is quarantined:
renamed to `<key>.bad-<ms>`, which no later run opens, with one warning. That includes an artifacts
record whose folder is not under the spool's own files/, holds a symbolic link, or whose path leaves
the run. An open record continues the run in state.json or the one to resume (from a checkpoint) only
when it is an active run of the record's experiment with an `ftjob.run_key` tag: any other run on the
server is left alone, and a new one made; a leftover spool whose open record was delivered sends its
other records only to such a run (state.json's run id is input too), else it is quarantined. A `.new-<key>` folder an hour old is what a crash in
Spool.create left, and is removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger(__name__)
MARKER = "spool.json"
RECORDS = "records.jsonl"
STATE = "state.json"
FILES = "files"
LOCK = "lock"
QUARANTINED = ".bad-"  # a quarantined spool folder is named <key>.bad-<ms>
CREATING = ".new-"  # a spool folder being made is named .new-<key> until it is whole
# Spool.create renames its folder into place milliseconds after making it; one older than this was left
# by a process that died meanwhile. Judged by the folder's mtime, not by a pid or a lock: hosts and pods
# sharing the root have pids of their own, and the lock is taken only after the folder is made.
ABANDONED_AFTER_SECONDS = 3600
SPOOL_KEY = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as Spool.create names a spool folder
# A run id as MLflow itself checks one (mlflow.utils.validation; its own stores make uuid4().hex, other
# servers other ids): never a path, nor a quote in a search filter.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,255}")
SHA256 = re.compile(r"[0-9a-f]{64}")
RUN_KEY_TAG = "ftjob.run_key"
SYSTEM_PREFIX = "system/"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
# Error codes with which MLflow refuses a request for what it contains; anything else (connection
# refused, timeouts, 5xx, authentication) means "not now" and the record stays pending.
REJECTED = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
    "INVALID_STATE",
}
# The fields _Sender reads from each kind of record, and their JSON types.
FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "open": {"key": (str,), "experiment": (str,), "run_name": (str,), "tags": (dict,), "time": (int,)},
    "params": {"params": (dict,)},
    "metrics": {"step": (int,), "metrics": (dict,), "time": (int,)},
    "inputs": {"datasets": (list,)},
    "artifacts": {"dir": (str,), "path": (str, type(None))},
    "register": {"name": (str,), "path": (str,)},
    "table": {"data": (dict,), "artifact_file": (str,)},
    "status": {"status": (str,), "time": (int,)},
}
TABLE_FILE = re.compile(r"[A-Za-z0-9_.-]+\.json")


class CorruptSpool(Exception):
    """A spool that is not as this module writes it: damaged on disk, or planted."""


def now_ms() -> int:
    return int(time.time() * 1000)


def spool_root() -> Path:
    """FTJOB_SPOOL_DIR, or ./.ftjob-spool."""
    return Path(os.environ.get("FTJOB_SPOOL_DIR") or ".ftjob-spool").resolve()


def is_spool_key(value: object) -> bool:
    """Whether value is named as a spool folder (so it is a name directly in the spool root)."""
    return isinstance(value, str) and SPOOL_KEY.fullmatch(value) is not None


def is_run_id(value: object) -> bool:
    """Whether value is shaped like an MLflow run id (a spool key is one too)."""
    return isinstance(value, str) and RUN_ID.fullmatch(value) is not None


def is_rejection(error: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in REJECTED


@dataclass(frozen=True)
class Target:
    """Where a spool's records go: the tracking URI as shown (credentials removed) and the sha256 of the
    store it names (the caller's canonical text for it), which is what is compared."""

    uri: str
    sha256: str

    @classmethod
    def of(cls, store: str, shown: str) -> Target:
        return cls(shown, hashlib.sha256(store.encode()).hexdigest())

    @classmethod
    def load(cls, path: Path) -> Target:
        """The target in a spool's spool.json; CorruptSpool when it is not one."""
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise CorruptSpool(f"{MARKER}: {e}") from None
        valid = (
            isinstance(data, dict)
            and data.keys() == {"tracking_uri", "tracking_uri_sha256"}
            and isinstance(data["tracking_uri"], str)
            and isinstance(data["tracking_uri_sha256"], str)
            and SHA256.fullmatch(data["tracking_uri_sha256"]) is not None
        )
        if not valid:
            raise CorruptSpool(f"{MARKER}: not a spool target")
        return cls(data["tracking_uri"], data["tracking_uri_sha256"])

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"tracking_uri": self.uri, "tracking_uri_sha256": self.sha256}))


@dataclass
class SpoolState:
    run_id: str | None = None
    offset: int = 0  # bytes of records.jsonl delivered
    last_steps: dict[str, int] = field(default_factory=dict)  # training metric key -> last step delivered

    @classmethod
    def load(cls, path: Path) -> SpoolState:
        """The state in path (a new one when there is none); CorruptSpool when it is not a state."""
        if not path.exists():
            return cls()
        try:
            state = cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise CorruptSpool(f"{STATE}: {e}") from None
        valid = (
            (state.run_id is None or is_run_id(state.run_id))
            and isinstance(state.offset, int)
            and state.offset >= 0
            and isinstance(state.last_steps, dict)
            and all(isinstance(step, int) for step in state.last_steps.values())
        )
        if not valid:
            raise CorruptSpool(f"{STATE}: not a spool state")
        return state


class Spool:
    """One run's records on disk; only the process holding its lock reads or writes it."""

    def __init__(self, root: Path, key: str, lock_fd: int):
        """Raises CorruptSpool when its target, state or a pending record is not one this module writes."""
        self.root = root
        self.directory = root / key
        self.lock_fd = lock_fd
        self.records_path = self.directory / RECORDS
        self._file = threading.Lock()  # one thread appends while another reads what is pending
        for name in (MARKER, STATE, RECORDS):
            _check_own_file(self.directory / name)
        _check_own_folder(self.directory / FILES)
        self.target = Target.load(self.directory / MARKER)
        self.state = SpoolState.load(self.directory / STATE)
        self._drop_torn_line()
        self.pending()

    @classmethod
    def create(cls, root: Path, target: Target) -> Spool:
        """A new spool for records that go to target, locked. It is made under another name and renamed
        into place whole, so that another process never finds it without its spool.json or its lock."""
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = uuid.uuid4().hex
        new = root / f"{CREATING}{key}"
        new.mkdir(mode=0o700)
        target.write(new / MARKER)
        fd = _lock(new)
        new.rename(root / key)
        return cls(root, key, fd)

    @classmethod
    def acquire(cls, root: Path, key: str, target: Target) -> Spool | None:
        """The existing spool `key` in root, locked. None when another process holds it; when it is not a
        spool folder of the current user or its records go to another target (both left as they are,
        with a warning); or when it is corrupt (then it is quarantined)."""
        directory = root / key
        problem = folder_problem(root, directory)
        if problem:
            log.warning("MLflow spool %s %s; left as it is, not delivered", directory, problem)
            return None
        try:
            fd = _lock(directory)
        except OSError as e:  # e.g. a lock that is a symbolic link
            log.warning("MLflow spool %s cannot be locked (%s); left as it is, not delivered", directory, e)
            return None
        if fd is None:
            return None
        try:
            spool = cls(root, key, fd)
        except CorruptSpool as e:
            quarantine(root, directory, str(e))  # still locked: no other process is delivering it
            os.close(fd)
            return None
        if spool.target.sha256 != target.sha256:
            log.warning(
                "MLflow spool %s holds records for %s; left for a job that tracks there",
                directory,
                _other_target(spool.target, target),
            )
            os.close(fd)
            return None
        return spool

    @property
    def key(self) -> str:
        return self.directory.name

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        with self._file, open(self.records_path, "a", encoding="utf-8") as f:
            f.write(line)

    def pending(self) -> list[tuple[dict[str, Any], int]]:
        """The records not yet acknowledged, in order, each with the offset just after it."""
        if not self.records_path.exists():
            return []
        with self._file, open(self.records_path, "rb") as f:
            f.seek(self.state.offset)
            data = f.read()
        records, offset = [], self.state.offset
        for line in data.splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:
                raise CorruptSpool(f"{RECORDS} at byte {offset}: not JSON") from None
            problem = self._problem(record)
            if problem:
                raise CorruptSpool(f"{RECORDS} at byte {offset}: {problem}")
            offset += len(line)
            records.append((record, offset))
        return records

    def _problem(self, record: Any) -> str | None:
        """Why record is not one this module writes, or None."""
        if not isinstance(record, dict) or record.get("kind") not in FIELDS:
            return "not a record"
        for name, types in FIELDS[record["kind"]].items():
            if not isinstance(record.get(name), types):
                return f"a {record['kind']} record without a valid {name!r}"
        if record["kind"] == "open":
            return self._open_problem(record)
        if record["kind"] == "table":
            return table_problem(record)
        return self._artifacts_problem(record) if record["kind"] == "artifacts" else None

    def _open_problem(self, record: dict[str, Any]) -> str | None:
        """An open record names this spool and, to resume, a run id or key: both end up in MLflow queries."""
        if record["key"] != self.key:
            return "an open record of another spool"
        if record.get("resume_run_id") is not None and not is_run_id(record["resume_run_id"]):
            return "an open record whose resume_run_id is not a run id"
        return None

    def _artifacts_problem(self, record: dict[str, Any]) -> str | None:
        """An artifacts record may upload only a folder under this spool's files/, with no link in it
        (a link could lead to any file of this user), and only to a path inside the run."""
        files = self.directory.resolve() / FILES  # not files/ resolved: a link there would lead anywhere
        directory = Path(record["dir"]).resolve()
        if not directory.is_relative_to(files):
            return f"artifacts folder {record['dir']} is outside {files}"
        for parent, folders, names in os.walk(directory):
            if any(os.path.islink(os.path.join(parent, name)) for name in folders + names):
                return f"artifacts folder {record['dir']} holds a symbolic link"
        path = PurePosixPath(record["path"] or ".")
        if path.is_absolute() or ".." in path.parts:
            return f"artifacts path {record['path']} is outside the run"
        return None

    @property
    def delivered(self) -> bool:
        size = self.records_path.stat().st_size if self.records_path.exists() else 0
        return self.state.offset >= size

    def acknowledge(self, offset: int) -> None:
        """Everything before offset is in MLflow; written atomically with the rest of the state."""
        self.state.offset = offset
        tmp = self.directory / f"{STATE}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(asdict(self.state)))
            f.flush()
            os.fsync(f.fileno())  # else a crash soon after the rename can leave an empty state.json
        os.replace(tmp, self.directory / STATE)

    def files(self, name: str) -> Path:
        """An empty directory in the spool for artifact files that must outlive the job's temp dirs."""
        directory = self.directory / FILES / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        return directory

    def release(self) -> None:
        """Unlock; a spool whose every record is delivered is removed, if it is still a spool folder."""
        if self.delivered and not folder_problem(self.root, self.directory):
            shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self.lock_fd)

    def open_record(self) -> dict[str, Any]:
        """records.jsonl's first record, this spool's open record (checked as pending() checks one)."""
        with self._file, open(self.records_path, "rb") as f:
            line = f.readline()
        try:
            record = json.loads(line)
        except ValueError:
            raise CorruptSpool(f"{RECORDS} at byte 0: not JSON") from None
        problem = self._problem(record) or ("" if record["kind"] == "open" else "not an open record")
        if problem:
            raise CorruptSpool(f"{RECORDS} at byte 0: {problem}")
        return record

    def _drop_torn_line(self) -> None:
        """A process killed mid-write leaves half a line: cut it, so the next record starts a line."""
        if not self.records_path.exists():
            return
        data = self.records_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.records_path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def table_problem(record: dict[str, Any]) -> str | None:
    """A table record: a file name at the run's root, and columns of strings and numbers, equally long."""
    if not TABLE_FILE.fullmatch(record["artifact_file"]) or record["artifact_file"].startswith("."):
        return f"table file {record['artifact_file']!r} is not a JSON file name"
    columns = record["data"].values()
    cells_ok = all(isinstance(c, list) and all(isinstance(v, str | int | float) for v in c) for c in columns)
    if not cells_ok or len({len(c) for c in columns}) > 1:
        return "a table whose columns are not lists of strings and numbers, all as long"
    return None


def folder_problem(root: Path, directory: Path) -> str | None:
    """Why directory is not a spool folder this process may open, quarantine or remove; None when it is:
    a key-named real folder directly in root (not a link), of the current user, with its spool.json."""
    if directory.parent != root or not is_spool_key(directory.name):
        return f"is not named as a spool folder directly in {root}"
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return "is gone"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder (a symbolic link?)"
    if info.st_uid != os.geteuid():
        return f"belongs to uid {info.st_uid}, not {os.geteuid()}"
    try:
        marker = os.lstat(directory / MARKER)
    except FileNotFoundError:
        return f"has no {MARKER}: written by an earlier ftjob (which did not record where its records go) or not by ftjob"
    if not stat.S_ISREG(marker.st_mode):
        return f"has a {MARKER} that is not a file"
    return None


def _other_target(spool: Target, job: Target) -> str:
    """Where a spool's records go, as a warning says it: told apart from where the job's go."""
    if spool.uri != job.uri:
        return f"{spool.uri}, not for this job's {job.uri}"
    return f"{spool.uri} for another user name than this job's (user names are not shown)"


def _check_own_folder(path: Path) -> None:
    """The spool's files/ is a real folder, or none yet: through a link, files() would empty, and an
    artifacts record upload, a folder anywhere."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        raise CorruptSpool(f"{path.name} is not a folder of its own (a symbolic link, or not a folder)")


def _check_own_file(path: Path) -> None:
    """A file the spool reads or writes is its own: a regular file with no other link, or none yet."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise CorruptSpool(f"{path.name} is not a file of its own (a link, or not a regular file)")


def _lock(directory: Path) -> int | None:
    """An exclusive lock on the spool folder (its lock file); None when another process holds it."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def quarantine(root: Path, directory: Path, reason: str) -> None:
    """Rename a corrupt spool folder out of the way of every later run, keeping it for a person to read."""
    problem = folder_problem(root, directory)
    if problem:
        log.warning("MLflow spool %s is corrupt (%s) and %s; left as it is", directory, reason, problem)
        return
    target = directory.with_name(f"{directory.name}{QUARANTINED}{now_ms()}")
    directory.rename(target)
    log.warning(
        "MLflow spool %s is corrupt (%s); quarantined as %s, its records are not delivered",
        directory,
        reason,
        target,
    )


def remove_abandoned(root: Path) -> None:
    """Remove the folders in root that processes killed inside Spool.create left."""
    if not root.is_dir():
        return
    for path in filter(_abandoned, root.iterdir()):
        try:
            shutil.rmtree(path)
        except OSError as e:
            log.warning("%s, left half made by a process that died, cannot be removed: %s", path, e)
        else:
            log.info("removed %s, left half made by a process that died", path)


def _abandoned(path: Path) -> bool:
    """Whether path is a `.new-<key>` folder (not a link) of the current user, older than
    ABANDONED_AFTER_SECONDS."""
    if not (path.name.startswith(CREATING) and is_spool_key(path.name.removeprefix(CREATING))):
        return False
    try:
        info = os.lstat(path)
    except FileNotFoundError:  # removed meanwhile by another job
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and time.time() - info.st_mtime > ABANDONED_AFTER_SECONDS
    )


def leftovers(root: Path) -> list[str]:
    """The keys of the spool folders in root, in order; quarantined ones and others' names left out."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if is_spool_key(p.name) and p.is_dir())


def find_spool(root: Path, ref: str) -> str | None:
    """The key of a run's spool in root: ref itself (a spool key), or that of the spool recording ref as
    its run id. None for a ref shaped like neither."""
    if not is_run_id(ref):
        return None
    if is_spool_key(ref) and (root / ref).is_dir():
        return ref
    for key in leftovers(root):
        with suppress(OSError, CorruptSpool):
            if not folder_problem(root, root / key) and SpoolState.load(root / key / STATE).run_id == ref:
                return key
    return None


def deliver(spool: Spool, client, leftover: bool = False) -> int:
    """Send the spool's pending records to MLflow in order, acknowledging as it goes; returns how many.

    Raises on the first failure that is not a rejection (MLflow unreachable): the rest stays pending.
    A `leftover` (an earlier process's spool) whose open record was delivered goes on only to a run its
    open record could have continued (state.json is input like the rest): else CorruptSpool.
    """
    sender = _Sender(spool.state, client)
    if leftover and spool.state.offset > 0:
        sender.confirm_run(spool.open_record())
    records = spool.pending()
    sent = 0
    while sent < len(records):
        group = _next_group(records, sent)
        try:
            sender.send([record for record, _ in group])
        except Exception as e:
            if not is_rejection(e) or group[0][0]["kind"] == "open":
                raise  # unreachable, or no run to log to: everything stays pending
            _deliver_one_by_one(spool, sender, group)
        spool.acknowledge(group[-1][1])
        sent += len(group)
    return sent


def _deliver_one_by_one(spool: Spool, sender: _Sender, group: list[tuple[dict[str, Any], int]]) -> None:
    """After MLflow refused a request: each of its records alone, skipping those MLflow refuses."""
    for record, offset in group:
        try:
            sender.send([record])
        except Exception as e:
            if not is_rejection(e):
                raise
            log.warning("MLflow refused a %s record; skipped: %s", record["kind"], e)
        spool.acknowledge(offset)


def _next_group(records: list[tuple[dict[str, Any], int]], start: int) -> list[tuple[dict[str, Any], int]]:
    """Consecutive metrics records go in one request (up to MLflow's batch limit); others alone."""
    group = [records[start]]
    if records[start][0]["kind"] != "metrics":
        return group
    count = len(records[start][0]["metrics"])
    for record, offset in records[start + 1 :]:
        if record["kind"] != "metrics" or count + len(record["metrics"]) > MAX_METRICS_PER_BATCH:
            break
        count += len(record["metrics"])
        group.append((record, offset))
    return group


class _Sender:
    """Turns records into MLflow client calls for one spool's run (state: its run id, last steps)."""

    def __init__(self, state: SpoolState, client):
        self.state = state
        self.client = client

    def send(self, records: list[dict[str, Any]]) -> None:
        kind = records[0]["kind"]
        if kind == "metrics":
            self._metrics(records)
        else:
            getattr(self, f"_{kind}")(records[0])

    def _open(self, record: dict[str, Any]) -> None:
        """Create the run, or continue it: the run already opened by this spool, the run to resume, or
        a run this key created whose acknowledgement was lost."""
        from mlflow.entities import RunTag

        experiment = record["experiment"]
        experiment_id = self._experiment_id(experiment)
        run_id = (
            self._run_to_resume(self.state.run_id, experiment, experiment_id)
            or self._run_to_resume(record.get("resume_run_id"), experiment, experiment_id)
            or self._run_with_key(record["key"], experiment_id)
        )
        if run_id is None:
            run = self.client.create_run(
                experiment_id, start_time=record["time"], tags=record["tags"], run_name=record["run_name"]
            )
            run_id = run.info.run_id
            log.info("MLflow run %s created (experiment %s)", run_id, record["experiment"])
        else:
            self.client.update_run(run_id, status="RUNNING")
            tags = [RunTag(k, v) for k, v in record["tags"].items() if k != RUN_KEY_TAG]
            for i in range(0, len(tags), MAX_TAGS_PER_BATCH):
                self.client.log_batch(run_id, tags=tags[i : i + MAX_TAGS_PER_BATCH])
            for key, step in self._last_steps(run_id).items():
                self.state.last_steps[key] = max(step, self.state.last_steps.get(key, step))
        self.state.run_id = run_id

    def confirm_run(self, record: dict[str, Any]) -> None:
        """CorruptSpool unless state.json's run is an active ftjob run of the open record's experiment."""
        experiment = self.client.get_experiment_by_name(record["experiment"])
        run = self._run(self.state.run_id) if self.state.run_id else None
        if experiment is None or run is None or not _is_ftjob_run_of(run, experiment.experiment_id):
            raise CorruptSpool(
                f"{STATE}: run {self.state.run_id} is not an ftjob run of experiment {record['experiment']!r}"
            )

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException as e:  # created meanwhile by another job
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def _run_to_resume(self, ref: str | None, experiment: str, experiment_id: str) -> str | None:
        """ref as the id of an ftjob run of the experiment, or as the key of one (a run created after its
        first checkpoint). A ref read back from a checkpoint or the spool may name any run on the
        server: one that is not an active run of the experiment with ftjob's run key tag is left alone."""
        if not ref:
            return None
        run = self._run(ref)
        if run is None:
            run_id = self._run_with_key(ref, experiment_id)
            if run_id is None:
                log.warning("MLflow run %s to resume does not exist; starting a new run", ref)
            return run_id
        if _is_ftjob_run_of(run, experiment_id):
            return run.info.run_id
        log.warning(
            "MLflow run %s to resume is not an ftjob run of experiment %r (it is in another experiment, "
            "deleted, or has no %s tag); it is left as it is, and a new run is started",
            ref,
            experiment,
            RUN_KEY_TAG,
        )
        return None

    def _run(self, run_id: str):
        """The MLflow run run_id, or None when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            return None

    def _run_with_key(self, key: str, experiment_id: str) -> str | None:
        runs = self.client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def _last_steps(self, run_id: str) -> dict[str, int]:
        """The last step of each training metric the run already has."""
        keys = [k for k in self.client.get_run(run_id).data.metrics if not k.startswith(SYSTEM_PREFIX)]
        return {k: max(m.step for m in self.client.get_metric_history(run_id, k)) for k in keys}

    def _metrics(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        last_steps = dict(self.state.last_steps)
        points = []
        for record in records:
            step = record["step"]
            for key, value in record["metrics"].items():
                if not key.startswith(SYSTEM_PREFIX):
                    if step <= last_steps.get(key, -1):
                        continue
                    last_steps[key] = step
                points.append(Metric(key, value, record["time"], step))
        if points:
            self.client.log_batch(self.state.run_id, metrics=points)
        self.state.last_steps = last_steps

    def _params(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.state.run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])

    def _inputs(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(Dataset(**d["dataset"]), [InputTag("mlflow.data.context", d["context"])])
            for d in record["datasets"]
        ]
        self.client.log_inputs(self.state.run_id, datasets=inputs)

    def _artifacts(self, record: dict[str, Any]) -> None:
        directory = Path(record["dir"])
        if not directory.is_dir():  # a published directory deleted before a later job delivered this
            log.warning("artifacts %s not logged: %s is gone", record["path"] or "(root)", directory)
            return
        self.client.log_artifacts(self.state.run_id, str(directory), record["path"])

    def _register(self, record: dict[str, Any]) -> None:
        """A model version from the run's artifacts at record["path"], or from record["source"] (a full
        model, published but not copied to MLflow); once per run and name."""
        from mlflow.exceptions import MlflowException

        name, run_id = record["name"], self.state.run_id
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return
        source = record.get("source") or f"{self.client.get_run(run_id).info.artifact_uri}/{record['path']}"
        version = self.client.create_model_version(name, source, run_id=run_id)
        log.info("registered model %s version %s", name, version.version)

    def _table(self, record: dict[str, Any]) -> None:
        """Rows added to the run's table artifact (MLflow appends to a table of that name)."""
        self.client.log_table(self.state.run_id, data=record["data"], artifact_file=record["artifact_file"])

    def _status(self, record: dict[str, Any]) -> None:
        self.client.set_terminated(self.state.run_id, record["status"], end_time=record["time"])


def _is_ftjob_run_of(run, experiment_id: str) -> bool:
    """Whether an open record may continue run: an active run of its experiment that ftjob made."""
    return (
        run.info.experiment_id == experiment_id
        and run.info.lifecycle_stage == "active"
        and RUN_KEY_TAG in run.data.tags
    )
