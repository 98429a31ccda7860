"""The pieces of a tracked run, without a server: run ids, tags, redaction, dataset digests, peak flops, system
metrics, end status."""

from __future__ import annotations

import json
import logging
import subprocess
import time
import uuid

import pytest
from helpers import ALPACA_ROWS, REPO, make_spec, write_jsonl
from tracking_helpers import messages

from job.data.plan import DataPlan
from job.errors import Preempted
from job.metrics import flops_per_token, gpu_peak_flops
from job.spec import validate_spec
from job.tracking.tracker import (
    dataset_inputs,
    end_status,
    environment_tags,
    file_dataset,
    git_commit,
    redact_url,
    resumable_run_id,
)


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
    assert redact_url("https://user:p#w?x@mlflow.example/x") == "https://***@mlflow.example/x"
    assert redact_url("see s3://KEY:SECRET@bucket/a and http://h/b") == "see s3://***@bucket/a and http://h/b"


def test_dataset_digest_follows_file_names_sizes_and_changes(isolated):
    path = write_jsonl(isolated / "d" / "a.jsonl", ALPACA_ROWS)
    glob, files = [str(isolated / "d" / "*.jsonl")], [str(path)]
    first = file_dataset("data.train", glob, files)
    assert file_dataset("data.train", glob, files)["digest"] == first["digest"]
    write_jsonl(path, ALPACA_ROWS * 2)
    assert file_dataset("data.train", glob, files)["digest"] != first["digest"]
    assert json.loads(first["source"]) == {"uri": glob[0]}


def test_datasets_are_the_files_of_the_plan_not_what_the_globs_name_now(isolated):
    """A resumed run logs the files its checkpoint's plan reads, though the glob names more by now."""
    old = write_jsonl(isolated / "d" / "a.jsonl", ALPACA_ROWS)
    write_jsonl(isolated / "d" / "b.jsonl", ALPACA_ROWS)
    glob = str(isolated / "d" / "*.jsonl")
    extra = write_jsonl(isolated / "e.jsonl", ALPACA_ROWS)
    data = validate_spec(make_spec(model="m", data={"train": [glob, str(extra)]})).data
    plan = DataPlan([([str(old), str(extra)], 1.0)], [], [None])
    [train] = dataset_inputs(data, plan)
    assert train["context"] == "train" and train["dataset"]["name"] == "data.train"
    assert json.loads(train["dataset"]["profile"]) == {"files": 2, "bytes": 2 * old.stat().st_size}
    assert json.loads(train["dataset"]["source"]) == {"uris": [glob, str(extra)]}


def test_weighted_sources_and_the_eval_files_are_a_dataset_each(isolated):
    a, b, e = (
        write_jsonl(isolated / f"{n}.jsonl", ALPACA_ROWS[:k]) for n, k in (("a", 1), ("b", 2), ("e", 3))
    )
    train = [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}]
    spec = make_spec(model="m", data={"train": train, "eval": [str(e)]})
    plan = DataPlan([([str(a)], 1.0), ([str(b)], 3.0)], [str(e)], [None, None])
    inputs = dataset_inputs(validate_spec(spec).data, plan)
    assert [(i["dataset"]["name"], i["context"]) for i in inputs] == [
        ("data.train[0]", "train"),
        ("data.train[1]", "train"),
        ("data.eval", "eval"),
    ]
    assert len({i["dataset"]["digest"] for i in inputs}) == 3


def test_peak_flops_of_known_gpus_and_model_flops():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA L4") == 121e12 and gpu_peak_flops("NVIDIA L40S") == 362e12
    assert gpu_peak_flops("NVIDIA A10G") is None  # unknown: no MFU rather than a wrong one
    assert flops_per_token(100, 100) == 600  # full fine-tune: 6N
    assert flops_per_token(100, 0) == 400


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
