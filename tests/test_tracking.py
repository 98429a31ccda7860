"""MLflow tracking against a real `mlflow server`: the record a run leaves, outages, restarts, secrets."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import ALPACA_ROWS, REPO, free_port, run_ftjob, spec_dict, train_in_process, write_jsonl

from job.errors import Preempted
from job.metrics import flops_per_token, gpu_peak_flops
from job.model.source import resolve_model_dir
from job.output.publish import MANIFEST, manifest_entry
from job.spec import TrackingSpec, validate_spec
from job.tracking import tracker as tracker_module
from job.tracking.spool import (
    RECORDS,
    RUN_KEY_TAG,
    STATE,
    CorruptSpool,
    Spool,
    SpoolState,
    Target,
    deliver,
    find_spool,
    quarantine,
)
from job.tracking.tracker import (
    RunRecord,
    Tracker,
    end_status,
    environment_tags,
    file_dataset,
    git_commit,
    redact_url,
    resumable_run_id,
    run_record,
    spec_params,
    tracking_target,
)

MLFLOW = Path(sys.executable).with_name("mlflow")
MARKERS = {
    "AWS_SECRET_ACCESS_KEY": "AWS-SECRET-MARKER",
    "HF_TOKEN": "HF-TOKEN-MARKER",
    "MLFLOW_TRACKING_TOKEN": "MLFLOW-TOKEN-MARKER",
}
TRAIN_KEYS = (
    "train/loss",
    "train/learning_rate",
    "train/grad_norm",
    "train/tokens_per_second",
    "train/epoch",
)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1: sqlite store, artifacts served by the server, in root."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        with open(self.root / "server.log", "a") as log_file:
            self.process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends the workers too
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        deadline = time.monotonic() + 90
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()}")
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        while self.healthy():  # a worker may outlive the parent by a moment
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@contextmanager
def server_down(server: MlflowServer):
    """The server stopped for the block and started again after it (same URL, same store)."""
    server.stop()
    try:
        yield
    finally:
        server.start()


@pytest.fixture
def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server.url)


@pytest.fixture
def spool_dir(isolated, monkeypatch):
    path = isolated / "spool"
    monkeypatch.setenv("FTJOB_SPOOL_DIR", str(path))
    return path


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def messages(caplog, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


def tracked(spec, resume_run_id: str | None = None) -> Tracker:
    """The tracker of rank 0 for spec."""
    return Tracker(spec.tracking, run_record(spec), resume_run_id)


def wait_for_run(tracker: Tracker) -> None:
    """Until the delivery thread has created (or found) the tracker's MLflow run."""
    deadline = time.monotonic() + 60
    while tracker.run_id is None:
        assert time.monotonic() < deadline, "the run was never created"
        time.sleep(0.05)


def tracker_spec(tiny_model_dir, data_files, experiment: str, **tracking_cfg):
    return validate_spec(
        spec_dict(
            tiny_model_dir,
            data_files,
            tracking={"experiment": experiment, "system_metrics": False, **tracking_cfg},
        )
    )


def log_steps(tracker: Tracker, steps_to_log) -> None:
    for step in steps_to_log:
        tracker.log_metrics({"train/loss": 10.0 / step, "train/epoch": step / 10}, step)


# ---------------------------------------------------------------------------------------------
# One complete run through the CLI, as a batch job runs: what it records, and no secrets anywhere


@pytest.fixture(scope="module")
def finished_run(server, tiny_model_dir, tmp_path_factory):
    from mlflow import MlflowClient

    workdir = tmp_path_factory.mktemp("finished-run")
    data = (
        write_jsonl(workdir / "data" / "train.jsonl", ALPACA_ROWS * 8),
        write_jsonl(workdir / "data" / "eval.jsonl", ALPACA_ROWS),
    )
    spec = spec_dict(
        tiny_model_dir,
        data,
        train={"max_steps": 6, "eval_every": 3, "log_every": 2},
        tracking={"experiment": "complete", "tags": {"team": "nlp"}, "register_as": "tiny-adapter"},
        storage_options={"s3": {"secret": "SPEC-SECRET-MARKER", "key": "SPEC-KEY-MARKER"}},
    )
    (workdir / "spec.json").write_text(json.dumps(spec))
    client = MlflowClient(server.url)
    parent = client.create_run(client.create_experiment("sweeps")).info.run_id
    env = {
        **MARKERS,
        "MLFLOW_TRACKING_URI": server.url,
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "FTJOB_CACHE": str(workdir / "cache"),
        "FTJOB_IMAGE": "registry.example/ftjob:1.2",
        "FTJOB_GIT_COMMIT": "0123abcd",
        "FTJOB_PARENT_RUN_ID": parent,
        "SLURM_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "3",
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "POD_NAMESPACE": "ml-team",
        "HOSTNAME": "ftjob-0-abcde",
        "JOB_NAME": "ftjob-sweep-3",
    }
    result = run_ftjob("run", "spec.json", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    run = client.search_runs([client.get_experiment_by_name("complete").experiment_id])[0]
    ran = validate_spec(spec)
    resolve_model_dir(ran.model)  # as the run did: the spec it logs names the model it loaded
    return {"run": run, "result": result, "spec": ran, "workdir": workdir, "parent": parent}


def test_run_has_spec_params_and_where_it_ran_tags(finished_run):
    run = finished_run["run"]
    assert run.info.status == "FINISHED"
    assert run.data.params == spec_params(finished_run["spec"])
    assert run.data.params["train.learning_rate"] == "0.005"
    assert run.data.params["storage_options.s3.secret"] == "***"
    expected = {
        "ftjob.version": "0.1.0",
        "mlflow.source.git.commit": "0123abcd",
        "ftjob.image": "registry.example/ftjob:1.2",
        "world_size": "1",
        "device": "cpu",
        "adapter.method": "lora",
        "slurm.job_id": "4242",
        "slurm.array_task_id": "3",
        "k8s.namespace": "ml-team",
        "k8s.pod": "ftjob-0-abcde",
        "k8s.job_name": "ftjob-sweep-3",
        "mlflow.parentRunId": finished_run["parent"],
        "team": "nlp",
    }
    assert expected.items() <= run.data.tags.items()
    assert run.data.tags["host"]
    assert f"MLflow run {run.info.run_id}" in finished_run["result"].stdout


def test_metrics_each_step_once_with_memory_and_system_metrics(finished_run, client):
    run_id = finished_run["run"].info.run_id
    for key in TRAIN_KEYS:
        assert steps(client, run_id, key) == [1, 2, 3, 4, 5, 6], key
    assert steps(client, run_id, "eval/loss") == [3, 6]
    assert steps(client, run_id, "eval/perplexity") == [3, 6]
    assert steps(client, run_id, "data/rows_read") == [2, 4, 6]  # log_every; the final values are step 6's
    assert steps(client, run_id, "train/peak_memory_gib") == [2, 4, 6]
    assert 0.05 < client.get_metric_history(run_id, "train/peak_memory_gib")[0].value < 64
    metrics = finished_run["run"].data.metrics
    assert "train/mfu" not in metrics  # no known peak FLOP/s on a CPU
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


def test_data_sources_spec_adapter_and_model_version(finished_run, client, tmp_path):
    run = finished_run["run"]
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"data.train[0]", "data.eval[0]"}
    train = inputs["data.train[0]"]
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "train"
    assert train.dataset.source_type == "local"
    assert json.loads(train.dataset.source)["uri"] == str(finished_run["workdir"] / "data" / "train.jsonl")
    assert json.loads(train.dataset.profile)["files"] == 1
    assert train.dataset.digest != inputs["data.eval[0]"].dataset.digest

    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    assert json.loads((local / "spec.json").read_text())["name"] == "t"
    published = finished_run["workdir"] / "runs" / "t" / "adapter"
    assert {p.name for p in (local / "adapter").iterdir()} == {p.name for p in published.iterdir()}
    assert (local / "adapter" / "adapter_model.safetensors").read_bytes() == (
        published / "adapter_model.safetensors"
    ).read_bytes()

    versions = client.search_model_versions("name = 'tiny-adapter'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert versions[0].source.endswith("/adapter")
    assert not list((finished_run["workdir"] / ".ftjob-spool").iterdir())  # delivered, removed


def test_no_secret_in_params_tags_inputs_artifacts_or_logs(finished_run, client, tmp_path):
    run = finished_run["run"]
    secrets = [*MARKERS.values(), "SPEC-SECRET-MARKER", "SPEC-KEY-MARKER"]
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    artifact_files = [p for p in local.rglob("*") if p.is_file()]
    assert len(artifact_files) >= 5
    places = {
        "params": json.dumps(run.data.params),
        "tags": json.dumps(run.data.tags),
        "inputs": json.dumps([i.dataset.to_dictionary() for i in run.inputs.dataset_inputs]),
        "stdout": finished_run["result"].stdout,
        "stderr": finished_run["result"].stderr,
        **{str(p): p.read_bytes().decode("latin-1") for p in artifact_files},
    }
    assert places["stdout"] and places["params"]
    leaks = [(where, s) for where, text in places.items() for s in secrets if s in text]
    assert not leaks


# ---------------------------------------------------------------------------------------------
# Outages


def test_server_outage_mid_run_loses_and_duplicates_nothing(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    """The server is stopped after step 4 and started again (same port, same store) after step 10."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setattr(tracker_module, "RETRY_SECONDS", (0.2, 0.5))
    reachable_at = {}
    log_metrics = Tracker.log_metrics

    def log_then_disturb(self, metrics, step):
        log_metrics(self, metrics, step)
        if "train/loss" not in metrics:
            return
        if step == 4:
            wait_for_run(self)  # the outage starts mid-run
            server.stop()
        elif step == 10:
            server.start()
        elif step == 11:
            time.sleep(0.6)  # past any backoff: step 12 tries again even if step 11 hit a stale connection
        elif step == 16:
            reachable_at[step] = self.reachable

    monkeypatch.setattr(Tracker, "log_metrics", log_then_disturb)
    spec = spec_dict(
        tiny_model_dir,
        data_files,
        train={"max_steps": 16, "log_every": 1, "eval_every": 4},
        tracking={"experiment": "outage", "system_metrics": False},
    )
    with caplog.at_level(logging.INFO, logger="job"):
        result = train_in_process(spec, restart=True)

    assert reachable_at == {16: True}  # delivered during the run, on a log call, not only at the end
    assert len(messages(caplog, logging.WARNING, "is unreachable")) == 1
    assert len(messages(caplog, logging.INFO, "is back")) == 1
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "is unreachable" not in r.getMessage()
    ]
    for key in (*TRAIN_KEYS, "data/rows_read", "train/peak_memory_gib"):
        assert steps(client, result.run_id, key) == list(range(1, 17)), key
    assert steps(client, result.run_id, "eval/loss") == [4, 8, 12, 16]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert not list(spool_dir.iterdir())


def test_a_step_never_waits_on_the_server(server, client, tiny_model_dir, data_files, spool_dir, monkeypatch):
    """Logging appends to the spool; a thread delivers. With the server frozen (a delivery then waits up
    to MLFLOW_HTTP_REQUEST_TIMEOUT, 10 s), logging still returns at once, and nothing is lost."""
    import threading

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    tracker = tracked(tracker_spec(tiny_model_dir, data_files, "frozen"))
    with tracker.run({}):
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        deadline = time.monotonic() + 60
        while not tracker.run_id or steps(client, tracker.run_id, "train/loss") != [
            1
        ]:  # run made by the thread
            assert time.monotonic() < deadline, "step 1 was never delivered"
            time.sleep(0.1)
        os.killpg(server.process.pid, signal.SIGSTOP)
        try:
            logging_steps = threading.Thread(
                target=lambda: [tracker.log_metrics({"train/loss": 0.5}, step=s) for s in (2, 3, 4)]
            )
            logging_steps.start()
            logging_steps.join(timeout=5)
            assert not logging_steps.is_alive(), "a log call waited on the frozen server"
            assert [r["step"] for r, _ in tracker.spool.pending() if r["kind"] == "metrics"][-3:] == [2, 3, 4]
        finally:
            os.killpg(server.process.pid, signal.SIGCONT)
    assert steps(client, tracker.run_id, "train/loss") == [1, 2, 3, 4]


@pytest.fixture
def client_made(monkeypatch):
    """An event that MLflow's client waits for before it is made: the delivery thread is held back."""
    import threading

    import mlflow

    made = threading.Event()
    real_client = mlflow.MlflowClient

    def slow_client(uri):
        made.wait(timeout=60)
        return real_client(uri)

    monkeypatch.setattr(mlflow, "MlflowClient", slow_client)
    return made


def test_training_starts_before_the_mlflow_client_is_made(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, client_made
):
    """MLflow's import and client take 1 to 2.5 s: the delivery thread makes them, not the first step."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    tracker = tracked(tracker_spec(tiny_model_dir, data_files, "client-later"))
    with tracker.run({}):
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        assert tracker.client is None and tracker.run_id is None  # training went on meanwhile
        client_made.set()
    assert steps(client, tracker.run_id, "train/loss") == [1]


def test_unreachable_at_start_run_created_by_the_next_job(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    spec = tracker_spec(tiny_model_dir, data_files, "offline", tags={"team": "nlp"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    with server_down(server), caplog.at_level(logging.INFO, logger="job"):
        started = time.time()
        first = tracked(spec)
        with first.run({"world_size": "1"}):
            log_steps(first, range(1, 6))
        # an outage costs failed requests, not MLflow's minutes of retries
        assert time.time() - started < 20
    assert first.run_id is None and first.resume_id
    assert len(messages(caplog, logging.WARNING, "is unreachable")) == 1
    assert len(messages(caplog, logging.WARNING, "not delivered yet")) == 1
    assert len(list(spool_dir.iterdir())) == 1

    caplog.clear()
    next_job = tracked(tracker_spec(tiny_model_dir, data_files, "offline-next"))
    with caplog.at_level(logging.INFO, logger="job"), next_job.run({}):
        pass
    experiment = client.get_experiment_by_name("offline")
    [run] = client.search_runs([experiment.experiment_id])
    assert messages(caplog, logging.INFO, f"MLflow run {run.info.run_id} created")
    assert messages(caplog, logging.INFO, "left in")
    assert run.data.params == spec_params(spec)
    assert run.data.tags["team"] == "nlp" and run.data.tags["world_size"] == "1"
    assert run.info.start_time <= started * 1000 + 1000  # created with the time the job started
    assert steps(client, run.info.run_id, "train/loss") == [1, 2, 3, 4, 5]
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"data.train[0]", "data.eval[0]"}
    assert run.info.status == "FINISHED"
    assert not list(spool_dir.iterdir())


# ---------------------------------------------------------------------------------------------
# Restarts continue the run (the id travels in the checkpoint: Tracker.resume_id)


def test_killed_job_restarted_from_its_checkpoint_continues_its_run(server, client, tiny_model_dir, isolated):
    """Real processes: SIGKILL after the checkpoint at step 10 and step 12's log, then the same command."""
    data = (
        write_jsonl(isolated / "train.jsonl", ALPACA_ROWS * 8),
        write_jsonl(isolated / "eval.jsonl", ALPACA_ROWS),
    )
    spec = spec_dict(
        tiny_model_dir,
        data,
        train={"max_steps": 20, "checkpoint_every": 5, "log_every": 1, "eval_every": 0},
        tracking={"experiment": "killed"},
    )
    (isolated / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
    command = [sys.executable, "-m", "job", "run", "spec.json"]
    first = subprocess.Popen(
        command, cwd=isolated, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    for line in first.stdout:
        output.append(line)
        if "checkpoint step 10 committed" in "".join(output) and line.startswith("step 12/20"):
            break
    first.kill()
    first.wait()
    assert any(line.startswith("step 12/20") for line in output), "".join(output)

    second = subprocess.run(command, cwd=isolated, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming from the checkpoint at step 10" in second.stderr
    [run] = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert f"MLflow run {run.info.run_id}" in second.stdout
    assert steps(client, run.info.run_id, "train/loss") == list(range(1, 21))  # 11 and 12 once
    assert run.info.status == "FINISHED"
    system = steps(client, run.info.run_id, "system/cpu_utilization_percentage")
    assert len(system) == len(set(system)) > 0  # the restart continues the samples' steps too


def test_restart_continues_the_same_run_at_the_next_step(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, client_made
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    spec = tracker_spec(tiny_model_dir, data_files, "restart")
    first = tracked(spec)
    with pytest.raises(Preempted), first.run({}):
        client_made.set()
        log_steps(first, range(1, 5))
        wait_for_run(first)
        checkpointed = first.resume_id  # the checkpoint at step 4 keeps it
        log_steps(first, range(5, 7))  # steps 5 and 6 are trained again after the restart
        raise Preempted
    assert checkpointed == first.run_id
    assert client.get_run(first.run_id).info.status == "KILLED"

    client_made.clear()
    second = tracked(spec, resume_run_id=checkpointed)
    with second.run({}):
        log_steps(second, range(5, 9))
        rechecked = second.resume_id  # its checkpoint before the thread found the run
        client_made.set()
        log_steps(second, range(9, 11))
    assert rechecked == checkpointed  # not the second job's own spool key: a third job finds the run too
    assert second.run_id == first.run_id
    assert steps(client, first.run_id, "train/loss") == list(range(1, 11))
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("restart").experiment_id])) == 1


def test_restart_while_unreachable_is_delivered_later_without_duplicates(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    spec = tracker_spec(tiny_model_dir, data_files, "restart-offline")
    first = tracked(spec)
    with pytest.raises(Preempted), first.run({}):
        log_steps(first, range(1, 7))
        raise Preempted

    with server_down(server):
        second = tracked(spec, resume_run_id=first.run_id)  # checkpoint at step 4
        with second.run({}):
            log_steps(second, range(5, 11))
    assert steps(client, first.run_id, "train/loss") == list(range(1, 7))

    with tracked(tracker_spec(tiny_model_dir, data_files, "restart-offline-next")).run({}):
        pass
    assert steps(client, first.run_id, "train/loss") == list(range(1, 11))
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_restart_of_a_run_never_created_adopts_its_spool(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch
):
    """Unreachable from the start: the checkpoint keeps the spool key; the restart delivers the first
    attempt's records, then its own, to one run."""
    spec = tracker_spec(tiny_model_dir, data_files, "never-created")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    first = tracked(spec)
    with server_down(server), pytest.raises(Preempted), first.run({}):
        log_steps(first, range(1, 4))
        raise Preempted
    assert first.run_id is None

    second = tracked(spec, resume_run_id=first.resume_id)
    with second.run({}):
        log_steps(second, range(3, 7))
    [run] = client.search_runs([client.get_experiment_by_name("never-created").experiment_id])
    assert second.run_id == run.info.run_id
    assert steps(client, run.info.run_id, "train/loss") == list(range(1, 7))
    assert run.info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------
# The spool, directly


def spool_records(key: str, experiment: str) -> list[dict]:
    now = int(time.time() * 1000)
    return [
        {"kind": "open", "key": key, "resume_run_id": None, "experiment": experiment, "run_name": "r",
         "tags": {"ftjob.run_key": key}, "time": now},
        {"kind": "params", "params": {"a": "1"}, "time": now},
        *({"kind": "metrics", "step": s, "metrics": {"train/loss": 1.0 / s}, "time": now + s} for s in (1, 2, 3)),
        {"kind": "status", "status": "FINISHED", "time": now + 4},
    ]  # fmt: skip


TARGET = Target.of("sqlite:///elsewhere.db", shown="sqlite:///elsewhere.db")  # of spools used directly


def test_delivering_again_after_lost_acknowledgements_duplicates_nothing(client, spool_dir):
    spool = Spool.create(spool_dir, TARGET)
    for record in spool_records(spool.key, "lost-acks"):
        spool.append(record)
    assert deliver(spool, client) == 6
    run_id = spool.state.run_id

    spool.state = SpoolState()  # as if the process died after MLflow's answers and before state.json
    spool.acknowledge(0)
    assert deliver(spool, client) == 6
    assert spool.state.run_id == run_id  # found by its ftjob.run_key tag, not created twice
    assert len(client.search_runs([client.get_experiment_by_name("lost-acks").experiment_id])) == 1
    assert steps(client, run_id, "train/loss") == [1, 2, 3]
    spool.release()
    assert not spool.directory.exists()


def test_a_record_mlflow_refuses_is_skipped_and_holds_nothing_back(client, spool_dir, caplog):
    spool = Spool.create(spool_dir, TARGET)
    records = spool_records(spool.key, "refused")
    changed = {"kind": "params", "params": {"a": "2"}, "time": records[1]["time"]}  # params never change
    for record in [*records[:2], changed, *records[2:]]:
        spool.append(record)
    with caplog.at_level(logging.WARNING, logger="job"):
        assert deliver(spool, client) == 7
    assert len(messages(caplog, logging.WARNING, "refused a params record")) == 1
    assert client.get_run(spool.state.run_id).data.params == {"a": "1"}
    assert steps(client, spool.state.run_id, "train/loss") == [1, 2, 3]
    spool.release()


def test_spool_cuts_a_torn_last_line_and_is_held_by_one_process(spool_dir):
    spool = Spool.create(spool_dir, TARGET)
    spool.append({"kind": "params", "params": {"a": "1"}})
    with open(spool.records_path, "a") as f:
        f.write('{"kind": "metr')  # killed mid-write
    assert Spool.acquire(spool_dir, spool.key, TARGET) is None  # locked by its writer
    os.close(spool.lock_fd)

    again = Spool.acquire(spool_dir, spool.key, TARGET)
    again.append({"kind": "params", "params": {"b": "2"}})
    assert [r["params"] for r, _ in again.pending()] == [{"a": "1"}, {"b": "2"}]
    again.release()
    assert spool.directory.exists()  # undelivered records stay


def test_inactive_tracker_writes_nothing(tiny_model_dir, data_files, isolated):
    tracker = Tracker(tracker_spec(tiny_model_dir, data_files, "x").tracking, None)  # a rank other than 0
    with tracker.run({}):
        tracker.log_metrics({"train/loss": 1.0}, 1)
    assert tracker.run_id is None and tracker.resume_id is None
    assert not (isolated / "mlruns").exists() and not (isolated / ".ftjob-spool").exists()


# ---------------------------------------------------------------------------------------------
# Damaged and planted spools: quarantined, never in the way of this run or of the spools after them


def key_of(letter: str) -> str:
    """A spool key that sorts by its letter (keys are 32 hex digits)."""
    return letter * 32


def leftover(spool_dir: Path, key: str, experiment: str) -> Path:
    """A spool under key that an earlier job tracking to MLFLOW_TRACKING_URI left undelivered."""
    spool = Spool.create(spool_dir, tracking_target(os.environ["MLFLOW_TRACKING_URI"]))
    for record in spool_records(key, experiment):
        spool.append(record)
    spool.release()
    return spool.directory.rename(spool_dir / key)


def insert_line(path: Path, index: int, line: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:index], line + b"\n", *lines[index:]]))


def run_three_steps(spec) -> Tracker:
    tracker = tracked(spec)
    with tracker.run({}):
        log_steps(tracker, range(1, 4))
    return tracker


DAMAGE = {
    "garbage-line": lambda spool: insert_line(spool / RECORDS, 2, b"\x00\xff not json"),
    "record-without-its-fields": lambda spool: insert_line(spool / RECORDS, 2, b'{"kind": "metrics"}'),
    "unknown-kind": lambda spool: insert_line(spool / RECORDS, 2, b'{"kind": "shell", "time": 1}'),
    "state-not-json": lambda spool: (spool / STATE).write_text('{"run_id": nu'),
    "state-offset-negative": lambda spool: (spool / STATE).write_text('{"offset": -5}'),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_leftover_is_quarantined_and_the_next_one_still_delivered(
    damage, server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    damaged = leftover(spool_dir, key_of("a"), f"{damage}-damaged")
    DAMAGE[damage](damaged)
    leftover(spool_dir, key_of("b"), f"{damage}-good")
    with caplog.at_level(logging.WARNING, logger="job"):
        current = run_three_steps(tracker_spec(tiny_model_dir, data_files, f"{damage}-current"))

    assert client.get_run(current.run_id).info.status == "FINISHED"
    assert steps(client, current.run_id, "train/loss") == [1, 2, 3]
    [good] = client.search_runs([client.get_experiment_by_name(f"{damage}-good").experiment_id])
    assert good.info.status == "FINISHED" and steps(client, good.info.run_id, "train/loss") == [1, 2, 3]
    assert client.get_experiment_by_name(f"{damage}-damaged") is None  # nothing of it delivered
    [quarantined] = spool_dir.iterdir()
    assert quarantined.name.removeprefix(f"{damaged.name}.bad-").isdigit()  # the time, in milliseconds
    [warning] = messages(caplog, logging.WARNING, str(damaged))
    assert str(quarantined) in warning

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="job"):
        run_three_steps(tracker_spec(tiny_model_dir, data_files, f"{damage}-later"))
    assert not messages(caplog, logging.WARNING, "spool")  # later runs leave the quarantined one alone
    assert list(spool_dir.iterdir()) == [quarantined]


def test_a_damaged_spool_of_the_run_to_resume_is_quarantined_and_the_run_goes_on(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    damaged = leftover(spool_dir, key_of("c"), "resume-damaged")
    (damaged / STATE).write_text("{")
    resumed = tracked(tracker_spec(tiny_model_dir, data_files, "resume-damaged"), resume_run_id=damaged.name)
    with caplog.at_level(logging.WARNING, logger="job"), resumed.run({}):
        log_steps(resumed, range(4, 7))

    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert steps(client, resumed.run_id, "train/loss") == [4, 5, 6]
    [quarantined] = spool_dir.iterdir()
    assert quarantined.name.startswith(f"{damaged.name}.bad-")
    assert messages(caplog, logging.WARNING, str(damaged))


PLANTED = {  # where a planted artifacts record points, given its spool folder and a secret file
    "absolute-path": lambda spool, secret: str(secret.parent),
    "dot-dot": lambda spool, secret: f"{spool}/files/../../../home/.aws",
    "link-to-a-file": lambda spool, secret: str(
        link(spool / "files" / "adapter" / "credentials", secret).parent
    ),
    "link-to-a-folder": lambda spool, secret: str(link(spool / "files" / "adapter", secret.parent)),
}


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


@pytest.mark.parametrize("planted", PLANTED)
def test_a_planted_artifacts_record_uploads_nothing_from_outside_its_spool(
    planted, server, client, tiny_model_dir, data_files, spool_dir, isolated, monkeypatch, caplog
):
    """A record pointing at a credentials file, the way a planted one made a run upload it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    marker = f"PLANTED-SECRET-{planted}".encode()
    secret = isolated / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(marker)
    spool = leftover(spool_dir, key_of("d"), f"planted-{planted}")
    (spool / "files").mkdir()
    record = {"kind": "artifacts", "dir": PLANTED[planted](spool, secret), "path": "adapter", "time": 1}
    insert_line(spool / RECORDS, 2, json.dumps(record).encode())
    with caplog.at_level(logging.WARNING, logger="job"):
        current = run_three_steps(tracker_spec(tiny_model_dir, data_files, f"planted-{planted}-current"))

    stored = [p for p in (server.root / "artifacts").rglob("*") if p.is_file()]
    assert not [p for p in stored if marker in p.read_bytes()]
    assert client.get_experiment_by_name(f"planted-{planted}") is None
    assert steps(client, current.run_id, "train/loss") == [1, 2, 3]
    [quarantined] = spool_dir.iterdir()
    assert quarantined.name.startswith(f"{spool.name}.bad-")
    [warning] = messages(caplog, logging.WARNING, str(spool))
    assert "artifacts" in warning and str(quarantined) in warning
    assert secret.read_bytes() == marker


def test_an_artifacts_record_that_would_write_outside_the_run_is_quarantined(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    spool = leftover(spool_dir, key_of("e"), "escape")
    (spool / "files" / "spec").mkdir(parents=True)
    (spool / "files" / "spec" / "spec.json").write_text("{}")
    record = {"kind": "artifacts", "dir": str(spool / "files" / "spec"), "path": "../../escape", "time": 1}
    insert_line(spool / RECORDS, 2, json.dumps(record).encode())
    leftover(spool_dir, key_of("f"), "escape-later")
    with caplog.at_level(logging.WARNING, logger="job"):
        run_three_steps(tracker_spec(tiny_model_dir, data_files, "escape-current"))

    assert client.get_experiment_by_name("escape") is None
    assert client.search_runs([client.get_experiment_by_name("escape-later").experiment_id])
    [quarantined] = spool_dir.iterdir()
    assert quarantined.name.startswith(f"{spool.name}.bad-")
    assert messages(caplog, logging.WARNING, str(spool))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_spools_of_another_user_or_behind_a_link_are_not_delivered(
    server, client, tiny_model_dir, data_files, spool_dir, isolated, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    other = leftover(spool_dir, key_of("1"), "other-user")
    for path in [other, *other.rglob("*")]:
        os.chown(path, 65534, 65534)
    linked = spool_dir / key_of("2")
    linked.symlink_to(leftover(isolated / "elsewhere", key_of("2"), "linked"))
    with caplog.at_level(logging.WARNING, logger="job"):
        run_three_steps(tracker_spec(tiny_model_dir, data_files, "not-mine-current"))

    assert client.get_experiment_by_name("other-user") is None
    assert client.get_experiment_by_name("linked") is None
    assert other.stat().st_uid == 65534 and linked.is_symlink()  # left as they are
    assert messages(caplog, logging.WARNING, str(other))
    assert messages(caplog, logging.WARNING, str(linked))
    assert Spool.acquire(spool_dir, other.name, tracking_target(server.url)) is None  # nor adopted to resume


def test_spool_folders_are_created_0700_under_a_permissive_umask(spool_dir):
    previous = os.umask(0)
    try:
        spool = Spool.create(spool_dir, TARGET)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    spool.release()


def test_state_is_fsynced_before_it_replaces_the_old_one(spool_dir, monkeypatch):
    spool = Spool.create(spool_dir, TARGET)
    spool.append({"kind": "params", "params": {"a": "1"}})
    end = spool.records_path.stat().st_size
    spool.acknowledge(end)
    os.close(spool.lock_fd)
    (spool.directory / f"{STATE}.tmp").write_text('{"run_id": "r')  # a crash in the middle of a write
    again = Spool.acquire(spool_dir, spool.key, TARGET)
    assert again.state == SpoolState(offset=end)

    events = []
    fsync, replace = os.fsync, os.replace

    def fsync_spy(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", path.name, path.read_text()))
        fsync(fd)

    def replace_spy(source, target) -> None:
        events.append(("replace", Path(source).name, Path(target).name))
        replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync_spy)
        patch.setattr(os, "replace", replace_spy)
        again.state.run_id = "r1"
        again.acknowledge(end)
    state = json.dumps({"run_id": "r1", "offset": end, "last_steps": {}})
    assert events == [("fsync", f"{STATE}.tmp", state), ("replace", f"{STATE}.tmp", STATE)]
    assert (again.directory / STATE).read_text() == state
    assert not (again.directory / f"{STATE}.tmp").exists()
    again.release()


# ---------------------------------------------------------------------------------------------
# A checkpoint's run id, spool folders and where their records go are input, never trusted


def plant_run_id(checkpoint: Path, run_id) -> None:
    """Set run.json's run_id in a committed checkpoint, and its MANIFEST entry with it."""
    run = json.loads((checkpoint / "run.json").read_text())
    (checkpoint / "run.json").write_text(json.dumps({**run, "run_id": run_id}))
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"]["run.json"] = manifest_entry(checkpoint / "run.json")
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_whose_run_id_is_a_path_deletes_nothing_and_starts_a_new_run(
    tiny_model_dir, data_files, isolated, caplog
):
    """A run_id that named a folder outside the spool: the run adopted it as its spool and, once the
    records were delivered, removed it."""
    spec = spec_dict(
        tiny_model_dir,
        data_files,
        train={"max_steps": 2, "checkpoint_every": 2, "eval_every": 0},
        tracking={"experiment": "run-id-paths", "system_metrics": False},
    )
    runs = [train_in_process(spec).run_id]
    output = isolated / "runs" / "t"
    newest = sorted((output / "checkpoints").iterdir())[-1]
    victim = isolated / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    for run_id in ["../victim", str(victim)]:
        plant_run_id(newest, run_id)
        (output / "adapter" / MANIFEST).unlink()  # not published: the next run resumes from the checkpoint
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="job"):
            runs.append(train_in_process(spec).run_id)
        assert (victim / "notes.txt").read_text() == "keep me" and len(list(victim.iterdir())) == 1
        [warning] = messages(caplog, logging.WARNING, "not an MLflow run id")
        assert repr(run_id) in warning
    assert None not in runs and len(set(runs)) == 3  # each resume logged to a new run


def failed_run(client, experiment: str, tags: dict[str, str]) -> str:
    """A FAILED run in experiment (made when missing), as another team's job may have left it."""
    found = client.get_experiment_by_name(experiment)
    run = client.create_run(found.experiment_id if found else client.create_experiment(experiment), tags=tags)
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def deleted_run(client, experiment: str) -> str:
    run_id = failed_run(client, experiment, {RUN_KEY_TAG: key_of("9")})
    client.delete_run(run_id)
    return run_id


NOT_THIS_JOBS_RUNS = {  # a run of valid id that a checkpoint may name, given the job's experiment
    "in another experiment": lambda client, experiment: failed_run(
        client, f"{experiment}-other", {RUN_KEY_TAG: key_of("9")}
    ),
    "without ftjob's run key": lambda client, experiment: failed_run(client, experiment, {}),
    "deleted": deleted_run,
}


@pytest.mark.parametrize("case", NOT_THIS_JOBS_RUNS)
def test_a_checkpoint_naming_a_run_that_is_not_this_jobs_leaves_it_alone_and_starts_a_new_run(
    case, server, client, tiny_model_dir, data_files, spool_dir, monkeypatch, caplog
):
    """An edited run.json made the job log to, and set the status of, any run on the server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    experiment = f"not-this-jobs-{case.replace(' ', '-')}"
    other = NOT_THIS_JOBS_RUNS[case](client, experiment)
    before = client.get_run(other)
    resumed = tracked(tracker_spec(tiny_model_dir, data_files, experiment), resume_run_id=other)
    with caplog.at_level(logging.WARNING, logger="job"), resumed.run({}):
        log_steps(resumed, range(1, 4))

    assert resumed.run_id not in (None, other)
    assert steps(client, resumed.run_id, "train/loss") == [1, 2, 3]
    after = client.get_run(other)
    assert after.info == before.info and after.data.metrics == {} and after.data.tags == before.data.tags
    [warning] = messages(caplog, logging.WARNING, other)
    assert f"not an ftjob run of experiment {experiment!r}" in warning


def test_a_spool_whose_state_names_a_run_that_is_not_its_jobs_starts_a_new_run(
    server, client, tiny_model_dir, data_files, spool_dir, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    other = failed_run(client, "planted-state-other", {RUN_KEY_TAG: key_of("9")})
    left = leftover(spool_dir, key_of("e"), "planted-state")
    (left / STATE).write_text(json.dumps({"run_id": other, "offset": 0, "last_steps": {}}))
    run_three_steps(tracker_spec(tiny_model_dir, data_files, "planted-state-current"))

    [run] = client.search_runs([client.get_experiment_by_name("planted-state").experiment_id])
    assert run.info.run_id != other and steps(client, run.info.run_id, "train/loss") == [1, 2, 3]
    assert client.get_run(other).info.status == "FAILED" and client.get_run(other).data.metrics == {}


@pytest.mark.parametrize("run_id", ["../victim", "/home/user/project", "a' OR name LIKE '%", 42, ["x"]])
def test_a_run_id_that_is_not_shaped_as_mlflow_makes_them_is_dropped_with_a_warning(run_id, caplog):
    with caplog.at_level(logging.WARNING, logger="job"):
        assert resumable_run_id(run_id, warn=True) is None
    assert messages(caplog, logging.WARNING, "run.json has run_id")


@pytest.mark.parametrize("run_id", [None, uuid.uuid4().hex, "frosty_boot_0k4g7y1nqk"])
def test_run_ids_of_mlflow_and_other_servers_and_spool_keys_are_kept(run_id, caplog):
    with caplog.at_level(logging.WARNING, logger="job"):
        assert resumable_run_id(run_id, warn=True) == run_id
    assert not caplog.records


def test_find_spool_looks_only_at_spool_folders_directly_in_the_root(spool_dir, isolated):
    spool = Spool.create(spool_dir, TARGET)
    spool.append({"kind": "params", "params": {"a": "1"}})  # undelivered: release keeps the spool
    spool.state.run_id = "frosty_boot_0k4g7y1nqk"
    spool.acknowledge(0)
    spool.release()
    (isolated / "victim").mkdir()
    (spool_dir / "victim").mkdir()
    for ref in ["../victim", str(isolated / "victim"), "victim", f"{spool.key}/..", ""]:
        assert find_spool(spool_dir, ref) is None, ref
    assert find_spool(spool_dir, spool.key) == spool.key
    assert find_spool(spool_dir, "frosty_boot_0k4g7y1nqk") == spool.key


def an_earlier_ftjobs_spool(root: Path, key: str) -> Path:
    """A spool folder as an ftjob before spool.json left it: records, a lock, no target."""
    directory = root / key
    directory.mkdir(parents=True)
    (directory / RECORDS).write_text(json.dumps({"kind": "params", "params": {"a": "1"}}) + "\n")
    (directory / "lock").touch()
    return directory


def unlocked_spool(root: Path) -> Path:
    """A new spool folder in root, as a job that ended left it."""
    spool = Spool.create(root, TARGET)
    spool.append({"kind": "params", "params": {"a": "1"}})
    os.close(spool.lock_fd)
    return spool.directory


def swapped_for_a_link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def spool_with_a_linked_marker(root: Path, outside: Path) -> tuple[str, Path]:
    spool = unlocked_spool(root)
    swapped_for_a_link(spool / "spool.json", outside / "spool.json")
    return spool.name, outside


NOT_SPOOL_FOLDERS = {  # given the spool root and a folder outside it: the key to open, and the folder it names
    "outside the root": lambda root, outside: ("../outside", outside),
    "an earlier ftjob's": lambda root, outside: (key_of("a"), an_earlier_ftjobs_spool(root, key_of("a"))),
    "a link to a folder": lambda root, outside: (key_of("b"), link(root / key_of("b"), outside)),
    "a link to a spool": lambda root, outside: (
        key_of("c"),
        link(root / key_of("c"), unlocked_spool(outside)),
    ),
    "spool.json a link": spool_with_a_linked_marker,
}


@pytest.mark.parametrize("case", NOT_SPOOL_FOLDERS)
def test_a_folder_that_is_not_a_spool_folder_of_this_job_is_left_as_it_is(case, spool_dir, isolated, caplog):
    outside = isolated / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("keep me")
    (outside / "spool.json").write_text(json.dumps({"tracking_uri": "x", "tracking_uri_sha256": "0" * 64}))
    key, folder = NOT_SPOOL_FOLDERS[case](spool_dir, outside)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "lock"}
    with caplog.at_level(logging.WARNING, logger="job"):
        assert Spool.acquire(spool_dir, key, TARGET) is None
    assert messages(caplog, logging.WARNING, str(spool_dir / key))
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "lock"} == before
    assert not list(spool_dir.glob("*.bad-*"))


def test_release_and_quarantine_touch_only_what_is_still_a_spool_folder(spool_dir, isolated, caplog):
    """A spool folder replaced by another folder meanwhile is neither removed nor renamed."""
    victim = isolated / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    spool = Spool.create(spool_dir, TARGET)  # nothing to deliver: release removes it
    spool.directory.rename(isolated / "moved")
    victim.rename(spool.directory)
    with caplog.at_level(logging.WARNING, logger="job"):
        spool.release()
        quarantine(spool_dir, spool.directory, "damaged")
        quarantine(spool_dir, isolated / "moved", "damaged")  # a spool folder, but not in the root
    assert (spool.directory / "notes.txt").read_text() == "keep me"
    assert (isolated / "moved" / "spool.json").is_file()
    assert len(messages(caplog, logging.WARNING, "left as it is")) == 2


OWN_FILES_PLANTED = {
    "records a link": lambda spool, outside: swapped_for_a_link(spool / RECORDS, outside),
    "records a hard link": lambda spool, outside: (
        (spool / RECORDS).unlink(),
        os.link(outside, spool / RECORDS),
    ),
    "state a link": lambda spool, outside: (spool / STATE).symlink_to(outside),
    "lock a link": lambda spool, outside: swapped_for_a_link(spool / "lock", outside),
    "files a link": lambda spool, outside: link(spool / "files", outside.parent),  # emptied by files()
}


@pytest.mark.parametrize("planted", OWN_FILES_PLANTED)
def test_a_spool_file_that_is_a_link_is_never_written_through(planted, spool_dir, isolated, caplog):
    """records.jsonl is cut at its last newline and appended to; a link would do that to another file."""
    outside = isolated / "notes.txt"
    outside.write_text('{"offset": 0}\nno newline at the end')
    spool = unlocked_spool(spool_dir)
    OWN_FILES_PLANTED[planted](spool, outside)
    with caplog.at_level(logging.WARNING, logger="job"):
        assert Spool.acquire(spool_dir, spool.name, TARGET) is None
    assert outside.read_text() == '{"offset": 0}\nno newline at the end'
    assert messages(caplog, logging.WARNING, str(spool))


def half_made(path: Path, age_seconds: float) -> Path:
    """A spool folder as Spool.create leaves it when killed before renaming it into place."""
    path.mkdir(parents=True)
    TARGET.write(path / "spool.json")
    (path / "lock").touch()
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def test_a_spool_folder_left_half_made_by_a_crash_is_removed_and_nothing_else(
    server, tiny_model_dir, data_files, spool_dir, isolated, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    crashed = half_made(spool_dir / f".new-{key_of('1')}", age_seconds=2 * 3600)
    being_made = half_made(spool_dir / f".new-{key_of('2')}", age_seconds=0)  # by a process running now
    misnamed = half_made(spool_dir / ".new-notes", age_seconds=2 * 3600)
    outside = half_made(isolated / "outside", age_seconds=2 * 3600)
    linked = link(spool_dir / f".new-{key_of('3')}", outside)
    run_three_steps(tracker_spec(tiny_model_dir, data_files, "half-made"))

    assert not crashed.exists()
    assert being_made.is_dir() and misnamed.is_dir() and linked.is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["lock", "spool.json"]


PLANTED_OPEN = {
    "another spool's key": {"key": key_of("f")},
    "a resume_run_id that is a path": {"resume_run_id": "../victim"},
}


@pytest.mark.parametrize("planted", PLANTED_OPEN)
def test_an_open_record_naming_another_spool_or_a_path_is_quarantined(planted, spool_dir, caplog):
    """Both go into MLflow queries (the run_key tag filter, get_run)."""
    spool = Spool.create(spool_dir, TARGET)
    [opening, *_] = spool_records(spool.key, "planted-open")
    spool.append({**opening, **PLANTED_OPEN[planted]})
    os.close(spool.lock_fd)
    with caplog.at_level(logging.WARNING, logger="job"):
        assert Spool.acquire(spool_dir, spool.key, TARGET) is None
    [quarantined] = spool_dir.iterdir()
    assert quarantined.name.startswith(f"{spool.key}.bad-")
    assert messages(caplog, logging.WARNING, "open record")


def test_a_state_whose_run_id_is_not_a_run_id_is_corrupt(isolated):
    (isolated / STATE).write_text(json.dumps({"run_id": "../victim", "offset": 0, "last_steps": {}}))
    with pytest.raises(CorruptSpool):
        SpoolState.load(isolated / STATE)


def test_the_spool_records_where_it_goes_without_secrets_and_tells_users_apart(spool_dir):
    alice = tracking_target("https://alice:ALICE-SECRET@mlflow.example/")
    bob = tracking_target("https://bob:BOB-SECRET@mlflow.example/")
    with_token = tracking_target("https://mlflow.example/?token=TOKEN-SECRET")
    assert alice.uri == bob.uri == "https://***@mlflow.example" and alice.sha256 != bob.sha256
    assert with_token.uri == "https://mlflow.example"
    for target in (alice, bob, with_token):
        spool = Spool.create(spool_dir, target)
        on_disk = b"".join(p.read_bytes() for p in spool.directory.rglob("*") if p.is_file())
        assert not [s for s in (b"ALICE-SECRET", b"BOB-SECRET", b"TOKEN-SECRET") if s in on_disk]
        spool.release()


SAME_STORES = [  # each a list of tracking URIs of one store, as one job and the next may spell them
    ["http://mlflow.example:5000", "http://mlflow.example:5000/", "HTTP://MLflow.Example:5000/"],
    ["https://alice:OLD@mlflow.example/", "https://alice:ROTATED@MLFLOW.example:443", "https://alice@mlflow.example"],
    ["https://mlflow.example/?token=OLD", "https://mlflow.example:443?token=ROTATED", "https://mlflow.example/"],
    ["postgresql://ml:OLD@db.example/mlflow?sslmode=require", "postgresql://ml:ROTATED@db.example/mlflow?sslmode=require"],
    ["https://bob@mlflow.example"],
    ["http://mlflow.example:5001"],
    ["https://mlflow.example/other"],
    ["postgresql://ml@db.example/mlflow"],
    [f"sqlite:///{REPO}/mlruns/mlflow.db", f"sqlite:///{REPO}/mlruns/mlflow.db/"],
]  # fmt: skip


def test_a_spool_goes_to_its_store_however_its_uri_is_spelled_or_its_password_rotated():
    stores = [{tracking_target(uri).sha256 for uri in same} for same in SAME_STORES]
    assert all(len(hashes) == 1 for hashes in stores)
    assert len(set.union(*stores)) == len(SAME_STORES)


def test_a_spool_of_another_user_name_on_the_same_server_is_left_with_a_warning_that_says_so(
    spool_dir, caplog
):
    spool = Spool.create(spool_dir, tracking_target("https://alice:OLD@mlflow.example/"))
    spool.append({"kind": "params", "params": {"a": "1"}})  # undelivered: release keeps the spool
    spool.release()
    with caplog.at_level(logging.WARNING, logger="job"):
        assert Spool.acquire(spool_dir, spool.key, tracking_target("https://bob:BOB@mlflow.example/")) is None
    [warning] = messages(caplog, logging.WARNING, str(spool.directory))
    assert "https://***@mlflow.example for another user name than this job's" in warning
    again = Spool.acquire(spool_dir, spool.key, tracking_target("https://alice:ROTATED@mlflow.example"))
    assert again is not None
    again.release()


@pytest.mark.integration
def test_a_leftover_goes_only_to_the_tracking_uri_it_was_logged_for(spool_dir, isolated, monkeypatch, caplog):
    """Two teams' jobs, two stores, one spool folder: a job delivers no leftover of the other's store."""
    from mlflow import MlflowClient

    store = {team: f"sqlite:///{isolated / team / 'mlflow.db'}" for team in ("a", "b")}
    for team in store:
        (isolated / team).mkdir()

    def unreachable(spool, client):
        raise ConnectionError("the server is down")

    def job(team: str, experiment: str) -> Tracker:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store[team])
        record = RunRecord(experiment, {"team": team}, {}, {}, [])
        tracker = Tracker(TrackingSpec(experiment=experiment, system_metrics=False), record)
        with tracker.run({}):
            log_steps(tracker, range(1, 4))
        return tracker

    with monkeypatch.context() as outage:  # team a's server is down: its job leaves its records behind
        outage.setattr(tracker_module, "deliver", unreachable)
        left = job("a", "a-offline").spool.directory
    records = (left / RECORDS).read_bytes()

    with caplog.at_level(logging.WARNING, logger="job"):
        job("b", "b-current")
    assert MlflowClient(store["b"]).get_experiment_by_name("a-offline") is None
    assert [p.name for p in spool_dir.iterdir()] == [left.name] and (left / RECORDS).read_bytes() == records
    assert messages(caplog, logging.WARNING, f"{left} holds records for {store['a']}")

    job("a", "a-current")
    client = MlflowClient(store["a"])
    [run] = client.search_runs([client.get_experiment_by_name("a-offline").experiment_id])
    assert steps(client, run.info.run_id, "train/loss") == [1, 2, 3]
    assert not list(spool_dir.iterdir())


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_environment_tags_read_slurm_kubernetes_and_sweep_ids():
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_ARRAY_JOB_ID": "6",
        "SLURM_ARRAY_TASK_ID": "1",
        "FTJOB_PARENT_RUN_ID": "p",
        "FTJOB_GIT_COMMIT": "c",
        "JOB_NAME": "jenkins-job",
    }
    tags = environment_tags(env)
    assert tags["slurm.job_id"] == "7" and tags["slurm.array_task_id"] == "1"
    assert tags["mlflow.parentRunId"] == "p" and tags["mlflow.source.git.commit"] == "c"
    assert not any(k.startswith("k8s.") for k in tags)  # JOB_NAME outside a pod is someone else's

    pod = environment_tags(
        {
            "KUBERNETES_SERVICE_HOST": "10.0.0.1",
            "KUBERNETES_NAMESPACE": "ns",
            "HOSTNAME": "p-0",
            "JOB_NAME": "j",
        }
    )
    assert (pod["k8s.namespace"], pod["k8s.pod"], pod["k8s.job_name"]) == ("ns", "p-0", "j")


def test_git_commit_from_the_environment_or_the_checkout():
    assert git_commit({"FTJOB_GIT_COMMIT": "abc"}) == "abc"
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert git_commit({}) == head.stdout.strip()


def test_credentials_in_urls_are_redacted():
    assert redact_url("https://user:pw@mlflow.example/x") == "https://***@mlflow.example/x"
    assert redact_url("see s3://KEY:SECRET@bucket/a and http://h/b") == "see s3://***@bucket/a and http://h/b"


def test_dataset_digest_follows_file_names_sizes_and_changes(isolated):
    path = write_jsonl(isolated / "d" / "a.jsonl", ALPACA_ROWS)
    first = file_dataset("data.train[0]", str(isolated / "d" / "*.jsonl"))
    assert file_dataset("data.train[0]", str(isolated / "d" / "*.jsonl"))["digest"] == first["digest"]
    write_jsonl(path, ALPACA_ROWS * 2)
    assert file_dataset("data.train[0]", str(isolated / "d" / "*.jsonl"))["digest"] != first["digest"]
    assert json.loads(first["source"]) == {"uri": str(isolated / "d" / "*.jsonl")}


def test_peak_flops_of_known_gpus_and_model_flops():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA L4") == 121e12 and gpu_peak_flops("NVIDIA L40S") == 362e12
    assert gpu_peak_flops("NVIDIA A10G") is None  # unknown: no MFU rather than a wrong one
    assert flops_per_token(100, 100) == 600  # full fine-tune: 6N
    assert flops_per_token(100, 0) == 400


def test_cpu_peak_memory_is_the_programs_own_not_what_ran_before_exec():
    """A worker that torchrun starts is a fork of the launcher followed by exec: ru_maxrss carries the
    launcher's peak across the exec, VmHWM does not."""
    worker = "import resource; from job.metrics import peak_rss_bytes; print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    launcher = (
        f"import os, sys; big = b'x' * 2**31; os.execv(sys.executable, [sys.executable, '-c', {worker!r}])"
    )
    out = subprocess.run(
        [sys.executable, "-c", launcher], cwd=REPO, capture_output=True, text=True, check=True
    )
    ours, carried = map(int, out.stdout.split())
    assert carried > 2**31 > ours + 2**30  # ftjob's imports take about 300 MB


def test_system_sampler_logs_host_metrics_with_increasing_steps():
    from job.tracking.system_metrics import SystemSampler

    samples = []
    sampler = SystemSampler(lambda metrics, step: samples.append((step, metrics)), interval=0.05)
    sampler.start()
    time.sleep(0.3)
    sampler.stop()
    assert len(samples) >= 3
    steps = [step for step, _ in samples]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(samples[0][1])
    assert 0 <= samples[-1][1]["system/system_memory_usage_percentage"] <= 100


def test_end_status():
    assert end_status(Preempted()) == "KILLED" and end_status(KeyboardInterrupt()) == "KILLED"
    assert end_status(ValueError()) == "FAILED"


@pytest.mark.parametrize(("given", "disabled"), [(None, True), ("false", False)])
def test_mlflow_usage_telemetry_is_off_unless_the_user_turns_it_on(given, disabled):
    """MLflow 3 reports usage from any process that imports it, except under CI markers (pytest's own
    among them): the child runs with none of them, as on a cluster."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH", "FTJOB_CACHE") if k in os.environ}
    if given is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = given
    code = (
        "import io, contextlib; from job.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['schema'])\n"
        "from mlflow.telemetry.utils import is_telemetry_disabled; print(is_telemetry_disabled())"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(disabled)]
