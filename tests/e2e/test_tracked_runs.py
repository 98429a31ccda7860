"""Runs tracked in a real MLflow server as a batch job runs them, as processes: one complete run through the
CLI, a run killed and restarted, a server unreachable at the start."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, make_spec, run_ftjob
from tracking_helpers import (
    TRAIN_KEYS,
    log_steps,
    messages,
    server_down,
    steps,
    tracked,
    tracker_spec,
)

from job.model.source import resolve_model_dir
from job.spec import validate_spec
from job.tracking.tracker import (
    spec_params,
)

MARKERS = {
    "AWS_SECRET_ACCESS_KEY": "AWS-SECRET-MARKER",
    "HF_TOKEN": "HF-TOKEN-MARKER",
    "MLFLOW_TRACKING_TOKEN": "MLFLOW-TOKEN-MARKER",
}


@pytest.fixture(scope="module")
def finished_run(server, tiny_model_dir, tmp_path_factory):
    from mlflow import MlflowClient

    workdir = tmp_path_factory.mktemp("finished-run")
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=workdir / "data",
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
    assert run.data.params == spec_params(
        finished_run["spec"].for_device("cpu")
    )  # the values it trained with
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
    assert set(inputs) == {"data.train", "data.eval"}
    train = inputs["data.train"]
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "train"
    assert train.dataset.source_type == "local"
    assert json.loads(train.dataset.source)["uri"] == str(finished_run["workdir"] / "data" / "train.jsonl")
    assert json.loads(train.dataset.profile)["files"] == 1
    assert train.dataset.digest != inputs["data.eval"].dataset.digest

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
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"data.train", "data.eval"}
    assert run.info.status == "FINISHED"
    assert not list(spool_dir.iterdir())


def test_killed_job_restarted_from_its_checkpoint_continues_its_run(server, client, tiny_model_dir, isolated):
    """Real processes: SIGKILL after the checkpoint at step 10 and step 12's log, then the same command."""
    spec = make_spec(
        "lora",
        model=tiny_model_dir,
        files=isolated,
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
