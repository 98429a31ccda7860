"""Checkpoints, signals and exact resume, with real processes killed by real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALPACA_ROWS, REPO, run_ftjob, write_jsonl
from safetensors.torch import load_file

STEPS = 30


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def spec_path(tiny_model_dir, workdir):
    rows = [dict(r, output=f"{r['output']} {i}") for i, r in enumerate(ALPACA_ROWS * 15)]
    data = write_jsonl(workdir / "train.jsonl", rows)
    spec = {
        "name": "r",
        "model": {"source": str(tiny_model_dir)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout on: the RNG must resume too
        "data": {"train": [str(data)], "packing": True, "max_seq_len": 48, "shuffle_buffer": 16},
        "train": {
            "max_steps": STEPS,
            "micro_batch_size": 2,
            "checkpoint_every": 5,
            "log_every": 1,
            "seed": 3,
        },
        "tracking": {"enabled": False},
    }
    path = workdir / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def start(spec_path, output: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "job", "run", str(spec_path), "--set", f"output.uri={output}"],
        cwd=spec_path.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )


def run_until(process: subprocess.Popen, marker: str) -> list[str]:
    """Read the job's output until a line contains marker."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(lines)}")


def losses(output_dir) -> list[float]:
    history = json.loads((output_dir / "adapter" / "metrics.json").read_text())["history"]
    return [h["train/loss"] for h in history]


def assert_same_run(workdir, uninterrupted: str, resumed: str) -> None:
    assert losses(workdir / resumed) == losses(workdir / uninterrupted)
    a = load_file(workdir / uninterrupted / "adapter" / "adapter_model.safetensors")
    b = load_file(workdir / resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bitwise


@pytest.fixture(scope="module")
def uninterrupted(spec_path, workdir):
    result = run_ftjob("run", str(spec_path), "--set", "output.uri=./straight", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert len(losses(workdir / "straight")) == STEPS
    return "straight"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_exits_75_and_resumes_exactly(spec_path, workdir, uninterrupted, signum):
    output = f"./stopped-{signum.name}"
    process = start(spec_path, output)
    run_until(process, f"step 8/{STEPS}")
    process.send_signal(signum)
    out = process.stdout.read()
    assert process.wait(timeout=120) == 75, out
    assert "checkpoint committed" in out and "exit 75" in out
    steps = sorted(p.name for p in (workdir / output / "checkpoints").iterdir())
    assert steps[-1] >= "step-000008" and not (workdir / output / "adapter").exists()

    resumed = run_ftjob("run", str(spec_path), "--set", f"output.uri={output}", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at step" in resumed.stderr
    assert_same_run(workdir, uninterrupted, output)


def test_sigkill_after_a_checkpoint_resumes_exactly(spec_path, workdir, uninterrupted):
    process = start(spec_path, "./killed")
    run_until(process, "checkpoint step 10 committed")
    run_until(process, f"step 12/{STEPS}")
    process.kill()
    process.wait(timeout=60)
    assert not (workdir / "killed" / "adapter").exists()

    resumed = run_ftjob("run", str(spec_path), "--set", "output.uri=./killed", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at step 10" in resumed.stderr
    assert_same_run(workdir, uninterrupted, "killed")


def test_retention_incomplete_checkpoints_finished_runs_and_spec_changes(spec_path, workdir):
    first = run_ftjob(
        "run", str(spec_path), "--set", "train.max_steps=12", "--set", "output.uri=./o", cwd=workdir
    )
    assert first.returncode == 0, first.stderr
    checkpoints = workdir / "o" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000005", "step-000010"]  # keep 2

    again = run_ftjob(
        "run", str(spec_path), "--set", "train.max_steps=12", "--set", "output.uri=./o", cwd=workdir
    )
    assert again.returncode == 0 and "already published; nothing to do" in again.stdout
    assert "step 1/" not in again.stdout

    # an upload that died before COMMITTED is neither trusted nor kept
    (workdir / "o" / "adapter" / "MANIFEST.json").unlink()
    (checkpoints / "step-000099").mkdir()
    (checkpoints / "step-000099" / "run.json").write_text("{half written")
    changed = run_ftjob(
        "run", str(spec_path), "--set", "train.max_steps=12", "--set", "train.seed=4", "--set", "output.uri=./o",
        cwd=workdir,
    )  # fmt: skip
    assert changed.returncode == 2
    assert "train.seed: 3 -> 4" in changed.stderr and "--restart" in changed.stderr
    assert not (checkpoints / "step-000099").exists()

    restarted = run_ftjob(
        "run", str(spec_path), "--restart", "--set", "train.max_steps=12", "--set", "train.seed=4",
        "--set", "output.uri=./o", cwd=workdir,
    )  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr
    assert "resuming" not in restarted.stderr and "step 1/12" in restarted.stdout


def torchrun(spec_path, output: str, *extra: str) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "-m", "job", "run"]
    return subprocess.Popen(
        [*command, str(spec_path), "--set", f"output.uri={output}", *extra],
        cwd=spec_path.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )


def test_two_processes_stop_together_when_one_rank_is_signalled_and_resume_exactly(spec_path, workdir):
    import psutil

    straight = torchrun(spec_path, "./ddp-straight")
    out = straight.stdout.read()
    assert straight.wait(timeout=300) == 0, out

    stopped = torchrun(spec_path, "./ddp-stopped")
    run_until(stopped, f"step 8/{STEPS}")
    workers = psutil.Process(stopped.pid).children()
    assert len(workers) == 2
    non_main = max(workers, key=lambda p: p.pid)  # started second: rank 1, which prints nothing
    non_main.send_signal(signal.SIGTERM)  # the signal reaches one rank only
    out = stopped.stdout.read()
    stopped.wait(timeout=300)
    assert out.count("exit 75 to be requeued") == 2, out  # both ranks stopped after the same step
    assert not (workdir / "ddp-stopped" / "adapter").exists()

    resumed = torchrun(spec_path, "./ddp-stopped")
    out = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, out
    assert "resuming from the checkpoint at step" in out
    assert_same_run(workdir, "ddp-straight", "ddp-stopped")


def s3_spec(tiny_model_dir, workdir, proxy, bucket: str, **retries) -> dict:
    """The resume spec with checkpoints and output on S3 through the fault proxy."""
    spec = json.loads((workdir / "spec.json").read_text())
    options = {"endpoint_url": proxy.url, **({"config_kwargs": {"retries": retries}} if retries else {})}
    spec["output"] = {"uri": f"s3://{bucket}/runs/{{name}}"}
    spec["storage_options"] = {"s3": options}
    spec["train"].update(max_steps=8, checkpoint_every=2)
    return spec


def train_in_process(spec: dict):
    from accelerate.state import AcceleratorState

    from job.spec import validate_spec
    from job.train import train

    AcceleratorState._reset_state(reset_partial_state=True)
    return train(validate_spec(spec))


def test_transient_storage_faults_leave_the_run_unchanged(
    tiny_model_dir, spec_path, workdir, s3, fault_proxy
):
    clean = train_in_process(s3_spec(tiny_model_dir, workdir, fault_proxy, s3.bucket) | {"name": "clean"})
    fault_proxy.fail_fraction = 0.3  # 503 SlowDown / ServiceUnavailable on 30% of requests
    faulty = train_in_process(s3_spec(tiny_model_dir, workdir, fault_proxy, s3.bucket) | {"name": "faulty"})
    assert fault_proxy.faults_injected > 0
    assert [h["train/loss"] for h in faulty.history] == [h["train/loss"] for h in clean.history]
    weights = "adapter/adapter_model.safetensors"
    assert s3.cat(f"{s3.bucket}/runs/faulty/{weights}") == s3.cat(f"{s3.bucket}/runs/clean/{weights}")
    assert sorted(p.rsplit("/", 1)[1] for p in s3.ls(f"{s3.bucket}/runs/faulty/checkpoints")) == [
        "step-000006",
        "step-000008",
    ]


def test_an_upload_that_keeps_failing_ends_the_job_and_keeps_the_last_commit(
    tiny_model_dir, spec_path, workdir, s3, fault_proxy, caplog
):
    import threading
    import time

    from job.errors import JobError

    spec = s3_spec(tiny_model_dir, workdir, fault_proxy, s3.bucket, total_max_attempts=2)
    first_commit = f"{s3.bucket}/runs/r/checkpoints/step-000002/COMMITTED"

    def cut_the_line_after_the_first_commit():
        deadline = time.monotonic() + 120
        while not s3.exists(first_commit) and time.monotonic() < deadline:
            time.sleep(0.02)
        fault_proxy.outage("503")

    threading.Thread(target=cut_the_line_after_the_first_commit, daemon=True).start()
    with pytest.raises(JobError) as failure:
        train_in_process(spec)
    assert failure.value.exit_code == 1
    assert "cannot upload" in str(failure.value) or "checkpoint upload" in str(failure.value)

    fault_proxy.heal()
    s3.invalidate_cache()
    committed = [p for p in s3.ls(f"{s3.bucket}/runs/r/checkpoints") if s3.exists(f"{p}/COMMITTED")]
    assert committed  # the committed checkpoint survived the outage...
    with caplog.at_level("INFO", logger="job"):
        resumed = train_in_process(spec)  # ...and a new attempt resumes from it and finishes
    assert len(resumed.history) == 8
    assert any("resuming from the checkpoint at step" in r.getMessage() for r in caplog.records)
