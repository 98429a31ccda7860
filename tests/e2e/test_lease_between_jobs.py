"""The lease between jobs that are processes: a live rival, a takeover, every rank's exit code."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    LEASE_SECONDS,
    REPO,
    StopAfterSteps,
    files_under,
    free_port,
    ftjob,
    lease_record,
    make_spec,
    read_lease,
    read_until,
    start_run,
    train_in_process,
    write_lease,
    write_spec,
)

from job.errors import Preempted

STEPS = 3000  # far more than a test lets a job train: each one is stopped or fails first


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lease")


@pytest.fixture(scope="module")
def spec_path(tiny_model_dir, workdir):
    train = {"max_steps": STEPS, "checkpoint_every": 10, "lease_seconds": LEASE_SECONDS}
    spec = make_spec("stop", model=tiny_model_dir, files=workdir, name="lease", train=train)
    return write_spec(workdir / "spec.json", spec)


def test_a_second_job_is_refused_while_the_first_runs_and_takes_over_at_once_after_its_stop(
    spec_path, workdir, caplog
):
    """The first job a process; the second and the requeued one in this process."""
    first = start_run(spec_path, "./shared")
    read_until(first, f"step 2/{STEPS}")
    second = ftjob("run", str(spec_path), "--set", "output.uri=./shared", cwd=workdir)
    assert second.returncode == 2, second.stderr
    assert "held by another job" in second.stderr and "Traceback" not in second.stderr
    assert f"host {socket.gethostname()}, pid {first.pid}" in second.stderr and "until" in second.stderr
    assert first.poll() is None  # the first job trains on, untouched

    first.send_signal(signal.SIGTERM)
    out = first.stdout.read()
    assert first.wait(timeout=120) == 75, out
    lease = read_lease(workdir / "shared")
    assert lease["released"] and lease["generation"] == 1 and lease["pid"] == first.pid

    requeued = json.loads(spec_path.read_text()) | {"output": {"uri": str(workdir / "shared")}}
    with caplog.at_level(logging.INFO, logger="job"), pytest.raises(Preempted) as stopped:
        train_in_process(requeued, stop=StopAfterSteps(1))
    assert stopped.value.exit_code == 75
    took = caplog.text
    assert "resuming from the checkpoint at step" in took
    assert "as generation 2" in took and "(released" in took and "waiting" not in took
    assert read_lease(workdir / "shared")["generation"] == 2


def test_a_job_whose_lease_is_taken_over_stops_and_writes_or_deletes_nothing(spec_path, workdir):
    """keep_checkpoints 1: the next commit would delete step 10. The job stops at its next checkpoint
    (step 20) without writing it, and deletes nothing."""
    output = workdir / "taken"
    process = start_run(spec_path, "./taken", "--set", "output.keep_checkpoints=1")
    read_until(process, "checkpoint step 10 committed")
    read_until(process, f"step 11/{STEPS}")
    held = read_lease(output)
    rival = lease_record(job="slurm-99", generation=held["generation"] + 1)
    write_lease(output, rival)
    before = files_under(output)
    assert "checkpoints/step-000010-g1/COMMITTED" in before

    out = process.stdout.read()
    assert process.wait(timeout=120) == 1, out
    assert "lost the lease" in out and "host node-7, pid 4242, scheduler job slurm-99" in out
    assert "Traceback" not in out
    assert files_under(output) == before  # no step 20, step 10 kept, nothing published
    assert read_lease(output) == rival  # neither renewed nor released over the new holder's lease


def two_ranks(spec_path: Path, output: str) -> tuple[subprocess.Popen, subprocess.Popen, Path]:
    """Rank 0 and rank 1 as srun starts them (one process each, torch's variables, no launcher), so that
    each one's exit code is seen; a collective waits 15 s at most, so a rank left waiting fails fast.
    Rank 0's output is piped; rank 1's goes to the returned log file."""
    base = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    command = [sys.executable, "-m", "job", "run", str(spec_path), "--set", f"output.uri={output}",
               "--set", "train.collective_timeout_seconds=15"]  # fmt: skip
    log = spec_path.parent / f"{Path(output).name}-rank-1.log"
    processes = [
        subprocess.Popen(
            command,
            cwd=spec_path.parent,
            stdout=subprocess.PIPE if rank == 0 else log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in (0, 1)
    ]
    return processes[0], processes[1], log


LEASE_ERRORS = {  # what rank 0 meets in lease.json: what every rank then says
    "damaged at start": "lease.json is damaged (a JSON list, not an object)",
    "held at start": "held by another job",
    "too long to wait for at start": "holds it for 1000000000 s unless renewed",
    "damaged while held": "lease.json is damaged (a JSON list, not an object)",
}


@pytest.mark.parametrize("case", LEASE_ERRORS)
def test_every_rank_exits_with_rank_0s_lease_error(spec_path, workdir, case):
    """Rank 0 alone reads the lease; what it meets (a damaged lease, another job's, one it would wait
    for past the collective timeout) ends every rank with the same message and exit code, at once: no
    rank waits in a collective for a rank 0 that failed."""
    output = workdir / case.replace(" ", "-")
    gone = time.time() - 60
    at_start = {
        "damaged at start": "[]",
        "held at start": lease_record(),
        "too long to wait for at start": lease_record(renewed_at=gone - 10**9, expires_at=gone),
    }
    if case in at_start:
        write_lease(output, at_start[case])
    rank0, rank1, rank1_log = two_ranks(spec_path, f"./{output.name}")
    if case == "damaged while held":
        read_until(rank0, "checkpoint step 10 committed")
        write_lease(output, "[]")  # found at the next checkpoint (step 20), before anything is written
    rank0_out = rank0.stdout.read()
    codes = rank0.wait(timeout=120), rank1.wait(timeout=120)
    outputs = rank0_out, rank1_log.read_text()
    why = LEASE_ERRORS[case]
    assert codes == ((1, 1) if case == "damaged while held" else (2, 2)), outputs
    for out in outputs:
        assert "ftjob: error: " in out and why in out, out
        assert "Traceback" not in out
    assert not (output / "checkpoints" / "step-000020-g1").exists()
