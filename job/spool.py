"""The MLflow spool: what a run logs goes to local disk first, then to MLflow, in order, exactly once.

    <root>/<key>/records.jsonl   append-only, one record a line: open, params, metrics, inputs,
                                 artifacts, register, status
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
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
RECORDS = "records.jsonl"
STATE = "state.json"
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


def now_ms() -> int:
    return int(time.time() * 1000)


def spool_root() -> Path:
    """FTJOB_SPOOL_DIR, or ./.ftjob-spool."""
    return Path(os.environ.get("FTJOB_SPOOL_DIR") or ".ftjob-spool").resolve()


def is_rejection(error: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in REJECTED


@dataclass
class SpoolState:
    run_id: str | None = None
    offset: int = 0  # bytes of records.jsonl delivered
    last_steps: dict[str, int] = field(default_factory=dict)  # training metric key -> last step delivered


class Spool:
    """One run's records on disk; only the process holding its lock reads or writes it."""

    def __init__(self, directory: Path, lock_fd: int):
        self.directory = directory
        self.lock_fd = lock_fd
        self.records_path = directory / RECORDS
        state_path = directory / STATE
        self.state = SpoolState(**json.loads(state_path.read_text())) if state_path.exists() else SpoolState()
        self._drop_torn_line()

    @classmethod
    def acquire(cls, directory: Path) -> Spool | None:
        """The spool in directory (created when new), locked; None when another process holds it."""
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(directory, fd)

    @property
    def key(self) -> str:
        return self.directory.name

    def append(self, record: dict[str, Any]) -> None:
        with open(self.records_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def pending(self) -> list[tuple[dict[str, Any], int]]:
        """The records not yet acknowledged, in order, each with the offset just after it."""
        if not self.records_path.exists():
            return []
        with open(self.records_path, "rb") as f:
            f.seek(self.state.offset)
            data = f.read()
        records, offset = [], self.state.offset
        for line in data.splitlines(keepends=True):
            offset += len(line)
            records.append((json.loads(line), offset))
        return records

    @property
    def delivered(self) -> bool:
        size = self.records_path.stat().st_size if self.records_path.exists() else 0
        return self.state.offset >= size

    def acknowledge(self, offset: int) -> None:
        """Everything before offset is in MLflow; written atomically with the rest of the state."""
        self.state.offset = offset
        tmp = self.directory / f"{STATE}.tmp"
        tmp.write_text(json.dumps(asdict(self.state)))
        os.replace(tmp, self.directory / STATE)

    def files(self, name: str) -> Path:
        """An empty directory in the spool for artifact files that must outlive the job's temp dirs."""
        directory = self.directory / "files" / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        return directory

    def release(self) -> None:
        """Unlock; a spool whose every record is delivered is removed."""
        if self.delivered:
            shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self.lock_fd)

    def _drop_torn_line(self) -> None:
        """A process killed mid-write leaves half a line: cut it, so the next record starts a line."""
        if not self.records_path.exists():
            return
        data = self.records_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.records_path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def find_spool(root: Path, ref: str) -> Path | None:
    """The spool directory for a run: named by ref (its key), or recording ref as its run id."""
    if (root / ref).is_dir():
        return root / ref
    for state_path in root.glob(f"*/{STATE}"):
        try:
            if json.loads(state_path.read_text()).get("run_id") == ref:
                return state_path.parent
        except (OSError, ValueError):
            continue
    return None


def deliver(spool: Spool, client) -> int:
    """Send the spool's pending records to MLflow in order, acknowledging as it goes; returns how many.

    Raises on the first failure that is not a rejection (MLflow unreachable): the rest stays pending.
    """
    sender = _Sender(spool.state, client)
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

        experiment_id = self._experiment_id(record["experiment"])
        run_id = (
            self.state.run_id
            or self._existing_run(record.get("resume_run_id"), experiment_id)
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

    def _existing_run(self, ref: str | None, experiment_id: str) -> str | None:
        """ref as a run id, or as the key of a run (a run created after its first checkpoint)."""
        from mlflow.exceptions import MlflowException

        if not ref:
            return None
        try:
            return self.client.get_run(ref).info.run_id
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
        run_id = self._run_with_key(ref, experiment_id)
        if run_id is None:
            log.warning("MLflow run %s to resume does not exist; starting a new run", ref)
        return run_id

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

    def _status(self, record: dict[str, Any]) -> None:
        self.client.set_terminated(self.state.run_id, record["status"], end_time=record["time"])
