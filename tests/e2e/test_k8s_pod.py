"""The pod's command as a process, with the pod's environment: it trains, publishes, and stops with 75 on
SIGTERM to its group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import REPO, make_spec, numbered_rows, read_until, write_jsonl
from k8s_helpers import env_of, the_container

from job.spec import validate_spec
from launch.k8s import K8sOptions, render


def pod_process(job: dict, config_map: dict, tmp_path: Path, output: str) -> subprocess.Popen:
    """The pod's container command, here: its spec from the ConfigMap as a file where the pod mounts
    it, its literal env, the downward-API values Kubernetes would fill, and JOB_COMPLETION_INDEX."""
    container = the_container(job)
    mount = tmp_path / "spec"
    mount.mkdir(exist_ok=True)
    spec = json.loads(config_map["data"]["spec.json"])
    spec["output"]["uri"] = output
    (mount / "spec.json").write_text(json.dumps(spec))
    here = lambda value: value.replace("/spec/", f"{mount}/")  # noqa: E731
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "JOB_COMPLETION_INDEX": "0",
           "KUBERNETES_SERVICE_HOST": "10.96.0.1"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    downward = {"JOB_NAME": job["metadata"]["name"], "FTJOB_RESTART_ID": "uid-1", "NODE_RANK": "0", "POD_NAMESPACE": "default"}  # fmt: skip
    for name, entry in env_of(container).items():
        env[name] = here(entry["value"]) if "value" in entry else downward[name]
    assert container["command"] == ["ftjob"]
    argv = [sys.executable, "-m", "job", *(here(a) for a in container["args"])]
    return subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # fmt: skip


def test_the_pod_trains_publishes_and_stops_with_75(tiny_model_dir, tmp_path):
    # few steps: each one is logged to MLflow's SQLite store in the pod's folder (a good part of a second)
    train = {"max_steps": 12, "micro_batch_size": 2, "checkpoint_every": 1000, "log_every": 1}
    data = {"train": [str(write_jsonl(tmp_path / "train.jsonl", numbered_rows()))], "max_seq_len": 48}
    spec = validate_spec(
        make_spec(name="pod", model=tiny_model_dir, data=data, train=train, tracking={"experiment": "pod"})
    )
    config_map, job = render([spec], K8sOptions())
    finished = pod_process(job, config_map, tmp_path, str(tmp_path / "done"))
    out = finished.communicate(timeout=300)[0]
    assert finished.returncode == 0, out
    assert (tmp_path / "done" / "adapter" / "MANIFEST.json").is_file()
    assert "MLFLOW_TRACKING_URI is not set in this pod" in out  # loud: the run dies with the pod

    stopped = pod_process(job, config_map, tmp_path, str(tmp_path / "stopped"))
    read_until(stopped, "step 5/12")
    os.killpg(stopped.pid, signal.SIGTERM)  # what the kubelet does: SIGTERM to the container
    out = stopped.communicate(timeout=300)[0]
    assert stopped.returncode == 75, out
    committed = list((tmp_path / "stopped" / "checkpoints").glob("step-*/COMMITTED"))
    assert committed and not (tmp_path / "stopped" / "adapter").exists()
