"""MLflow tracking of one run, on rank 0 only, that loses nothing when the tracking server does.

What a run records: the flattened public spec as params, tags that say where and what ran (ftjob
version, git commit, image, host, world size, Slurm and Kubernetes ids, sweep parent), metrics with
the optimizer step as step, MLflow's system metrics, the data sources as dataset inputs, the spec
and the final adapter as artifacts, and optionally a registered model version.

Everything goes through the spool (job/tracking/spool.py): written to local disk, then delivered. When the
server is unreachable, at start or mid-run, training goes on: one warning, records pile up in the
spool, and each later log call after a backoff tries again (one info when the server is back); the
end of the run tries once more, and what is still undelivered waits for the next ftjob run that
uses the same spool directory and the same tracking store (a run tracking elsewhere leaves it alone).
With MLFLOW_TRACKING_URI unset, runs go to a local sqlite store under ./mlruns
(`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` opens it).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job import __version__
from job.cluster import scheduler_tags
from job.data.plan import DataPlan, source_entries
from job.errors import EXIT_REQUEUE
from job.spec import DataSpec, Spec, TrackingSpec, echo, flatten, public_dict, public_tags, redact
from job.storage import absolute, filesystem, protocol_of
from job.tracking.spool import (
    RUN_KEY_TAG,
    CorruptSpool,
    Spool,
    Target,
    deliver,
    find_spool,
    is_run_id,
    leftovers,
    now_ms,
    quarantine,
    remove_abandoned,
    spool_root,
)
from job.tracking.store import default_tracking_uri, redact_url, use_http_defaults
from job.tracking.system_metrics import SystemSampler

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value
MAX_TAG_LENGTH = 8000  # and for a tag value
RETRY_SECONDS = (2.0, 60.0)  # wait after a failed delivery: first, and at most (doubling in between)
_URI = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<netloc>[^/?#]*)(?P<path>[^?#]*)(\?(?P<query>[^#]*))?"
)
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}
_SECRET_QUERY_NAME = re.compile(r"token|secret|passw|credential|signature|^sig$|key", re.IGNORECASE)


def tracking_store(uri: str) -> str:
    """The tracking store a URI names, as one text however the URI is spelled: scheme and an http(s)
    host lowercased, no default port, fragment or trailing slash, and no password or secret-looking
    query parameter (a rotated password or token is the same store). The user name stays: another user
    may see other runs."""
    match = _URI.match(uri)
    if match is None:  # a path, or a URI without a host part (databricks)
        return uri.rstrip("/") or uri
    scheme = match["scheme"].lower()
    userinfo, at, host = match["netloc"].rpartition("@")
    if scheme in _DEFAULT_PORTS:
        host = host.lower().removesuffix(_DEFAULT_PORTS[scheme])
    user = userinfo.partition(":")[0] + at
    query = "&".join(
        pair
        for pair in (match["query"] or "").split("&")
        if pair and not _SECRET_QUERY_NAME.search(pair.partition("=")[0])
    )
    return f"{scheme}://{user}{host}{match['path'].rstrip('/')}" + (f"?{query}" if query else "")


def tracking_target(uri: str) -> Target:
    """Where a run's records go, as its spool records it: the store the URI names, shown with the user
    name masked and compared by its hash."""
    store = tracking_store(uri)
    return Target.of(store, shown=redact(redact_url(store)))


def resumable_run_id(ref: object, warn: bool) -> str | None:
    """A checkpoint's run_id when it is shaped like an MLflow run id (or a spool key, which is one);
    else None, so that the run is logged as a new one, with a warning when warn."""
    if ref is None or is_run_id(ref):
        return ref
    if warn:
        log.warning(
            "the checkpoint's run.json has run_id %s, which is not an MLflow run id; this run is logged "
            "to a new MLflow run",
            echo(ref),
        )
    return None


def spec_params(spec: Spec) -> dict[str, str]:
    """The flattened public spec as MLflow params (dotted keys, secrets removed)."""
    return {
        key: redact_url(str(value))[:MAX_PARAM_LENGTH] for key, value in flatten(public_dict(spec)).items()
    }


# ---------------------------------------------------------------------------------------------
# Tags: what ran, where


def git_commit(environ: Mapping[str, str]) -> str | None:
    """FTJOB_GIT_COMMIT (set in images), else the commit of the checkout ftjob runs from, if any."""
    if environ.get("FTJOB_GIT_COMMIT"):
        return environ["FTJOB_GIT_COMMIT"]
    source = Path(__file__).resolve().parents[2]  # job/tracking/tracker.py -> the checkout
    if not (source / ".git").exists():
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def environment_tags(environ: Mapping[str, str]) -> dict[str, str]:
    """Tags from the environment: image, git commit, Slurm and Kubernetes ids, a sweep's parent run."""
    tags = {"ftjob.version": __version__, "host": socket.gethostname(), **scheduler_tags(environ)}
    from_env = {"ftjob.image": "FTJOB_IMAGE", "mlflow.parentRunId": "FTJOB_PARENT_RUN_ID"}
    tags |= {tag: environ[name] for tag, name in from_env.items() if environ.get(name)}
    commit = git_commit(environ)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_tags(spec_tags: Mapping[str, str], extra_tags: Mapping[str, str], key: str) -> dict[str, str]:
    tags = {
        "mlflow.source.name": "ftjob",
        "mlflow.source.type": "JOB",
        RUN_KEY_TAG: key,
        **environment_tags(os.environ),
        **extra_tags,
        **spec_tags,
    }
    with suppress(KeyError, OSError):  # a container user without a passwd entry has no name
        tags["mlflow.user"] = getpass.getuser()
    return {k: redact_url(str(v))[:MAX_TAG_LENGTH] for k, v in tags.items()}


# ---------------------------------------------------------------------------------------------
# Dataset inputs: where the data came from, and a digest that changes when the files do


def file_dataset(name: str, patterns: list[str], files: list[str]) -> dict[str, str]:
    """An MLflow dataset (entity fields) for one source of the run: the URLs and globs the spec names
    (its source), and a digest of the names, sizes and ETags (modification times where the store has no
    ETags) of the files the run reads from them."""
    entries = []
    for url in files:
        fs, path = filesystem(url)
        info = fs.info(path)
        change = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        entries.append([posixpath.basename(path), info.get("size"), str(change)])
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    uris = [source_uri(pattern) for pattern in patterns]
    protocol = protocol_of(patterns[0])
    return {
        "name": name,
        "digest": digest,
        "source_type": "local" if protocol == "file" else protocol,
        "source": json.dumps({"uri": uris[0]} if len(uris) == 1 else {"uris": uris}),
        "profile": json.dumps({"files": len(entries), "bytes": sum(e[1] or 0 for e in entries)}),
    }


def source_uri(pattern: str) -> str:
    """A URL or glob as a dataset source: a local path made absolute, credentials left out."""
    if protocol_of(pattern) == "file" and "://" not in pattern:
        return str(Path(pattern).resolve())
    return redact_url(pattern)


def dataset_inputs(data: DataSpec, plan: DataPlan) -> list[dict[str, Any]]:
    """The plan's sources as MLflow dataset inputs, named by spec key (data.train, or data.train[i] for
    each weighted source; data.eval): the files the run reads, which a resumed run takes from its
    checkpoint, not from what a glob names today."""
    inputs = [
        {"dataset": file_dataset(name, patterns, files), "context": "train"}
        for (name, patterns, _), (files, _) in zip(source_entries(data), plan.sources, strict=True)
    ]
    if data.eval:
        inputs.append({"dataset": file_dataset("data.eval", data.eval, plan.eval_files), "context": "eval"})
    return inputs


# ---------------------------------------------------------------------------------------------
# The tracker


def end_status(error: BaseException) -> str:
    """KILLED for a stop that will be resumed (exit 75) or an interrupt, FAILED for anything else."""
    if isinstance(error, KeyboardInterrupt) or getattr(error, "exit_code", None) == EXIT_REQUEUE:
        return "KILLED"
    return "FAILED"


@dataclass(frozen=True)
class RunRecord:
    """What a run logs once besides its metrics, taken from its spec by run_record()."""

    name: str
    params: dict[str, str]
    spec_json: dict[str, Any]  # secrets removed
    tags: dict[str, str]  # ftjob.output_uri and tracking.tags
    datasets: list[dict[str, Any]]


def run_record(spec: Spec, plan: DataPlan) -> RunRecord:
    try:
        datasets = dataset_inputs(spec.data, plan)
    except Exception as e:  # a source listed a moment ago and gone now: the run goes on without it
        log.warning("data sources not logged to MLflow: %s: %s", type(e).__name__, e)
        datasets = []
    tags = {"ftjob.output_uri": absolute(spec.output_uri), **public_tags(spec.tracking.tags)}
    return RunRecord(
        spec.tracking.run_name or spec.name, spec_params(spec), public_dict(spec), tags, datasets
    )


class Tracker:
    """One MLflow run around the training loop. Does nothing when inactive (no record: ranks other
    than 0; tracking.enabled false); never raises into training.

    resume_run_id continues a run instead of starting one: what `resume_id` returned for the run
    (kept in checkpoints), so that a restart logs to the same run, from the step it resumes at. One
    that is not shaped as a run id is input that cannot name a run: a new run is started instead.
    """

    def __init__(self, config: TrackingSpec, record: RunRecord | None, resume_run_id: str | None = None):
        self.config = config
        self.record = record
        self.active = record is not None and config.enabled
        self.resume_run_id = resumable_run_id(resume_run_id, warn=self.active)
        self.uri: str | None = None  # for messages: credentials removed
        self.client = None
        self.spool: Spool | None = None
        self.system_metrics: SystemSampler | None = None
        self.reachable = True
        self.retry_delay = RETRY_SECONDS[0]
        self.retry_at = 0.0
        self._lock = threading.Lock()  # one delivery at a time
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._deliverer: threading.Thread | None = None

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None until the run is created (later, when the server was unreachable)."""
        return self.spool.state.run_id if self.spool else None

    @property
    def resume_id(self) -> str | None:
        """What a checkpoint keeps for `resume_run_id`: the run id; while the delivery thread has not
        made or found the run yet, the reference this run resumed (so that a later restart finds the
        same run), or else the spool key that the run will be created with (and found by)."""
        return self.run_id or self.resume_run_id or (self.spool.key if self.spool else None)

    @contextmanager
    def run(self, extra_tags: Mapping[str, str]) -> Iterator[Tracker]:
        """The MLflow run around the block: FINISHED when it completes, KILLED or FAILED when it raises."""
        if self.active:
            self._guard(self._start, extra_tags)
        try:
            yield self
        except BaseException as e:
            self.finish(end_status(e))
            raise
        self.finish("FINISHED")

    def _start(self, extra_tags: Mapping[str, str]) -> None:
        """The run's opening records into the spool; the delivery thread connects and sends them, so
        the first step does not wait for MLflow's import and client (seconds: bench/RESULTS.md)."""
        use_http_defaults()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
        if "MLFLOW_TRACKING_URI" not in os.environ and "KUBERNETES_SERVICE_HOST" in os.environ:
            log.warning(
                "MLFLOW_TRACKING_URI is not set in this pod: the run is logged to %s, which is lost with "
                "the pod; set it (e.g. in the pod's Secret) to keep the run",
                uri,
            )
        target = tracking_target(uri)
        self.uri = target.uri
        root = spool_root()
        self.spool = self._open_spool(root, target)
        cfg, record = self.config, self.record
        self._record(
            kind="open",
            key=self.spool.key,
            resume_run_id=self.resume_run_id,
            experiment=cfg.experiment,
            run_name=record.name,
            tags=run_tags(record.tags, extra_tags, self.spool.key),
        )
        self._record(kind="params", params=record.params)
        spec_dir = self.spool.files("spec")
        (spec_dir / "spec.json").write_text(json.dumps(record.spec_json, indent=2) + "\n")
        self._record(kind="artifacts", dir=str(spec_dir), path=None)
        if record.datasets:
            self._record(kind="inputs", datasets=record.datasets)
        self._deliverer = threading.Thread(
            target=self._deliver_in_background, args=(uri, root), name="ftjob-mlflow", daemon=True
        )
        self._deliverer.start()
        if cfg.system_metrics:
            self.system_metrics = SystemSampler(self.log_metrics)
            self.system_metrics.start()

    def _open_spool(self, root: Path, target: Target) -> Spool:
        """The spool of the run to resume when it is still here and its records go to target (they go
        first), else a new one."""
        key = find_spool(root, self.resume_run_id) if self.resume_run_id else None
        spool = Spool.acquire(root, key, target) if key else None
        return spool or Spool.create(root, target)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.active:
            self._guard(
                self._log, kind="metrics", step=step, metrics={k: float(v) for k, v in metrics.items()}
            )

    def log_table(self, table: Mapping[str, list], artifact_file: str) -> None:
        """Rows (columns of equal length) added to the run's table `artifact_file` (a .json name)."""
        if self.active:
            self._guard(self._log, kind="table", data=dict(table), artifact_file=artifact_file)

    def artifact_dir(self, name: str) -> Path | None:
        """A local directory to write files into for log_adapter, kept until they are delivered."""
        return self.spool.files(name) if self.active and self.spool else None

    def log_adapter(self, directory: Path | None, uri: str) -> None:
        """The published adapter: the files of `directory` as artifacts under adapter/ (None for a full
        fine-tune: the run's ftjob.output_uri tag points at the model, not a second multi-GB copy), and
        a registered model version when tracking.register_as is set (from uri when no files)."""
        if not self.active:
            return
        if directory is not None:
            self._guard(self._record, kind="artifacts", dir=str(directory.resolve()), path="adapter")
        if self.config.register_as:
            source = {} if directory is not None else {"source": uri}
            self._guard(self._record, kind="register", name=self.config.register_as, path="adapter", **source)
        self._guard(self._deliver)

    def finish(self, status: str) -> None:
        """End the run (FINISHED, FAILED, KILLED): last system sample, status, one more delivery."""
        if not self.active:
            return
        self._guard(self._finish, status)
        self.active = False

    def _finish(self, status: str) -> None:
        if self.system_metrics:
            self.system_metrics.stop()
        if self._deliverer:
            self._stopping.set()
            self._wake.set()
            self._deliverer.join()
        self._record(kind="status", status=status)
        self._deliver(force=True)
        if not self.spool.delivered:
            log.warning(
                "MLflow run %s: records not delivered yet are kept in %s; the next ftjob run with this "
                "spool directory (FTJOB_SPOOL_DIR) delivers them",
                self.run_id or "(not created yet)",
                self.spool.directory,
            )
        self.spool.release()

    def _log(self, **record: Any) -> None:
        """Into the spool now; to MLflow from the delivery thread, so a step never waits on the server."""
        self._record(**record)
        self._wake.set()

    def _record(self, **record: Any) -> None:
        self.spool.append({**record, "time": now_ms()})

    def _deliver_in_background(self, uri: str, root: Path) -> None:
        try:
            from mlflow import MlflowClient

            self.client = MlflowClient(uri)
        except Exception as e:  # a tracking URI MLflow cannot use: the records stay in the spool
            log.warning(
                "MLflow tracking at %s cannot be used (%s); training goes on, and what it logs is kept in %s",
                self.uri,
                redact_url(f"{type(e).__name__}: {e}"),
                self.spool.directory,
            )
            return
        self._deliver(force=True)
        if self.reachable:
            try:
                self._deliver_leftovers(root)
            except Exception as e:  # e.g. a leftover that cannot be opened: this run's delivery goes on
                log.warning("MLflow spools of earlier jobs not delivered: %s: %s", type(e).__name__, e)
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            if not self._stopping.is_set():
                self._deliver()

    def _deliver(self, force: bool = False) -> None:
        """Send what is pending, unless a recent failure says to wait (force: try anyway). Before the
        delivery thread has a client, nothing: the thread sends everything once it has one."""
        if self.client is None:
            return
        with self._lock:
            if not force and time.monotonic() < self.retry_at:
                return
            try:
                sent = deliver(self.spool, self.client)
            except Exception as e:
                self.retry_at = time.monotonic() + self.retry_delay
                self.retry_delay = min(2 * self.retry_delay, RETRY_SECONDS[1])
                if self.reachable:
                    self.reachable = False
                    log.warning(
                        "MLflow tracking at %s is unreachable (%s); training goes on, and what it logs "
                        "is kept in %s and sent when the server is back",
                        self.uri,
                        redact_url(f"{type(e).__name__}: {e}"),
                        self.spool.directory,
                    )
                return
            self.retry_at, self.retry_delay = 0.0, RETRY_SECONDS[0]
            if not self.reachable:
                self.reachable = True
                log.info("MLflow tracking at %s is back: %d spooled records delivered", self.uri, sent)

    def _deliver_leftovers(self, root: Path) -> None:
        """Deliver spools that earlier jobs tracking to the same store left behind (a job that is still
        running holds its lock; a corrupt one is quarantined; another user's, or one for another store,
        is left alone), after removing folders that a crash left half made."""
        remove_abandoned(root)
        for key in leftovers(root):
            if key == self.spool.key:
                continue
            spool = Spool.acquire(root, key, self.spool.target)
            if spool is None:
                continue
            try:
                sent = deliver(spool, self.client, leftover=True)
            except CorruptSpool as e:
                quarantine(root, spool.directory, str(e))
                continue
            except Exception as e:
                log.debug("spool %s not delivered: %s", spool.directory, e)
                return
            finally:
                spool.release()
            if sent:
                log.info("delivered %d MLflow records left in %s by an earlier job", sent, spool.directory)

    def _guard(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except Exception as e:  # tracking is not worth a lost training run
            log.warning(
                "MLflow tracking failed (%s: %s); training goes on without tracking", type(e).__name__, e
            )
            self.active = False
