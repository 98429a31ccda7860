"""`ftjob launch slurm` and the sbatch script on a real single-node Slurm (slurm/testcluster.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import REPO, make_spec, run_ftjob, write_spec
from safetensors.torch import load_file

# Long enough that a signal sent at step 2 lands before the end, on a fast machine too; no longer, since
# each step of a tracked run writes to MLflow's SQLite store (a good part of a second here). A stop
# writes a checkpoint of its own.
STEPS, CHECKPOINT_EVERY = 80, 20


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def spec_path(tiny_model_dir, workdir):
    tracking = {"enabled": True, "experiment": "slurm", "system_metrics": False}
    train = {"max_steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY}
    spec = make_spec("stop", model=tiny_model_dir, files=workdir, name="sl", train=train, tracking=tracking)
    return write_spec(workdir / "spec.json", spec)


def launch(spec_path, output: str, *args: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "job", "launch", "slurm", str(spec_path), "--time", "10"]
    command += ["--set", f"output.uri={output}", "--folder", f"logs-{output}", *args]
    return subprocess.Popen(
        command, cwd=spec_path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def job_id(process: subprocess.Popen) -> tuple[str, list[str]]:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("submitted Slurm job "):
            return line.split()[3].rstrip(";"), lines
    raise AssertionError("".join(lines))


def wait_for_line(log, text: str, seconds: float) -> None:
    """Until the job's log (written by Slurm, appended across requeues) holds text."""
    deadline = time.monotonic() + seconds
    while text not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {log}"
        time.sleep(0.1)


def adapter(workdir, output: str) -> dict:
    return load_file(workdir / output / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(slurm, spec_path, workdir, tracking_env):
    process = launch(spec_path, "straight", "--wait", env=tracking_env)
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out
    assert "ended COMPLETED" in out and f"step {STEPS}/{STEPS}" in out  # the job's log, streamed
    assert (workdir / "logs-straight").stat().st_mode & 0o777 == 0o700  # the pickle holds the spec
    return "straight"


@pytest.fixture(scope="module")
def tracking_env(workdir):

    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db", "PYTHONPATH": str(REPO)}


def test_the_time_limit_signal_checkpoints_requeues_and_resumes_exactly(
    slurm, spec_path, workdir, uninterrupted, tracking_env
):
    """Slurm's USR2 before the time limit (sent as Slurm does, to the job's step): the run checkpoints,
    exits 75, the job is requeued, resumes, and ends with the adapter of an uninterrupted run and one
    MLflow run."""
    process = launch(spec_path, "stopped", "--wait", env=tracking_env)
    job, lines = job_id(process)
    log = workdir / "logs-stopped" / f"{job}_0_log.out"
    wait_for_line(log, f"step 2/{STEPS}", 120)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == 0, out
    assert "checkpointed (exit 75); requeueing job" in out
    assert "resuming from the checkpoint at step" in out
    assert f"ftjob launch: job {job} ended COMPLETED" in out
    restarts = subprocess.run(
        ["sacct", "-j", job, "-X", "-n", "-D", "-o", "State"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "REQUEUED" in restarts and restarts[-1] == "COMPLETED"
    a, b = adapter(workdir, "straight"), adapter(workdir, "stopped")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("slurm")
    runs = client.search_runs([experiment.experiment_id], "tags.`ftjob.output_uri` LIKE '%stopped'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_a_bad_spec_is_exit_2_before_anything_is_submitted(slurm, spec_path, workdir):
    result = run_ftjob(
        "launch",
        "slurm",
        str(spec_path),
        "--set",
        "train.learning_rate=-1",
        "--folder",
        "logs-bad",
        cwd=workdir,
    )
    assert result.returncode == 2 and "train.learning_rate" in result.stderr
    assert not (workdir / "logs-bad").exists()


def test_a_failing_job_returns_its_exit_code(slurm, spec_path, workdir, tracking_env):
    process = launch(
        spec_path, "nodata", "--wait", "--set", f"data.train=[{workdir / 'none.jsonl'}]", env=tracking_env
    )
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 2, out  # the job's own exit 2 (no such file), through --wait
    assert "no such file" in out and "ended FAILED" in out


def test_the_sbatch_script_with_two_processes_requeues_after_usr1_and_resumes_exactly(
    slurm, spec_path, workdir
):
    """slurm/ftjob.sbatch as users submit it, two worker processes on the node: USR1 to the job's step
    (what `--signal=USR1@120` does before the time limit) -> checkpoint, exit 75, the script requeues,
    the job resumes and ends as a straight two-process run does."""

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FTJOB_CMD": f"{sys.executable} -m job",
        "FTJOB_NPROC_PER_NODE": "2",
    }
    spec = json.loads(spec_path.read_text())
    spec["tracking"] = {"enabled": False}
    two = workdir / "two.json"
    two.write_text(json.dumps(spec))
    straight = subprocess.run(
        [sys.executable, "-m", "job", "run", str(two), "--nproc-per-node", "2", "--set", "output.uri=./two-straight"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr

    (workdir / "logs").mkdir(exist_ok=True)
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=2", str(REPO / "slurm" / "ftjob.sbatch"), str(two), "--set", "output.uri=./two-stopped"],
        cwd=workdir, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = submitted.stdout.strip()
    log = workdir / "logs" / f"ftjob-{job}.out"
    wait_for_line(log, f"step 2/{STEPS}", 180)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    from launch.slurm import slurm_state

    deadline = time.monotonic() + 300
    while (state := slurm_state(job)) not in {"COMPLETED", "FAILED", "CANCELLED"}:
        assert time.monotonic() < deadline, f"job {job} still {state}"
        time.sleep(1)
    text = log.read_text()
    assert state == "COMPLETED", text
    assert "x 2 process(es)" in text and "requeueing job" in text
    assert "resuming from the checkpoint at step" in text
    a, b = adapter(workdir, "two-straight"), adapter(workdir, "two-stopped")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_sweep_is_one_job_array_of_children_of_one_parent_run(slurm, spec_path, workdir, tracking_env):
    (workdir / "sweep.yaml").write_text("grid:\n  train.learning_rate: [0.001, 0.002]\n")
    process = launch(
        spec_path, "sweep", "--wait", "--sweep", "sweep.yaml", "--set", "train.max_steps=4", env=tracking_env
    )
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out
    parent = out.split("MLflow parent run ", 1)[1].split()[0]
    jobs = [line.split()[3] for line in out.splitlines() if line.startswith("submitted Slurm job ")]
    assert len(jobs) == 2 and len({job.split("_")[0] for job in jobs}) == 1  # one array, two tasks
    for name in ("sl-p00", "sl-p01"):
        assert (workdir / "sweep" / name / "adapter" / "MANIFEST.json").is_file()

    compared = run_ftjob("compare", "--parent", parent, "--json", cwd=workdir, env=tracking_env)
    assert compared.returncode == 0, compared.stderr
    runs = json.loads(compared.stdout)
    assert sorted(r["params"]["train.learning_rate"] for r in runs) == ["0.001", "0.002"]


# --- without a cluster: the sbatch script, the task's requeue rules, sweeps ---------------------------


def test_a_cancelled_job_ends_the_wait_and_a_refused_submission_is_exit_2(
    slurm, spec_path, workdir, tracking_env
):
    process = launch(spec_path, "cancelled", "--wait", env=tracking_env)
    job, lines = job_id(process)
    log = workdir / "logs-cancelled" / f"{job}_0_log.out"
    wait_for_line(log, "step 2/", 120)
    subprocess.run(["scancel", job], check=True)
    out = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 75 and "ended CANCELLED" in out  # scancel's SIGTERM: checkpointed, 75

    refused = run_ftjob(
        "launch", "slurm", str(spec_path), "--partition", "nope", "--folder", "logs-nope", cwd=workdir
    )
    assert refused.returncode == 2 and "sbatch refused the job" in refused.stderr
