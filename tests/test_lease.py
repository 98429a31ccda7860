"""Fencing between jobs on one output.uri (issue 12, point 7): <output.uri>/lease.json names the one job
that may write there; a second job is refused, an expired lease is taken over with the next generation,
a job that lost its lease stops and deletes nothing, each generation writes checkpoint folders of its
own, a damaged lease is a clear error on every rank, and retention failures are only warnings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    ALPACA_ROWS,
    REPO,
    free_port,
    read_until,
    run_ftjob,
    spec_dict,
    start_run,
    train_in_process,
    write_jsonl,
    write_stop_spec,
)

from job.errors import JobError, UserError

STEPS = 3000  # far more than a test lets a job train: each one is stopped or fails first
LEASE_SECONDS = 6
COLLECTIVE_TIMEOUT = 1800  # train.collective_timeout_seconds, the longest a job waits for a lease


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lease")


@pytest.fixture(scope="module")
def spec_path(tiny_model_dir, workdir):
    return write_stop_spec(
        workdir,
        tiny_model_dir,
        "lease",
        STEPS,
        checkpoint_every=10,
        seed=3,
        train={"lease_seconds": LEASE_SECONDS},
    )


def small_spec(tiny_model_dir, data_files, **train) -> dict:
    """Four steps, a checkpoint every two, a short lease, no MLflow; output in ./runs/t."""
    settings = {"max_steps": 4, "checkpoint_every": 2, "lease_seconds": LEASE_SECONDS, **train}
    return spec_dict(tiny_model_dir, data_files, train=settings, tracking={"enabled": False})


def lease_record(**fields) -> dict:
    """A lease.json another job wrote, renewed now and live for a minute unless fields say otherwise."""
    now = time.time()
    return {"owner": "f" * 32, "host": "node-7", "pid": 4242, "job": None, "generation": 1,
            "renewed_at": now, "expires_at": now + 60, "released": False, **fields}  # fmt: skip


def write_lease(output: Path, record: dict | str) -> None:
    """As another job writes it (a record, or damaged text): whole at once (a rename), so the job under
    test never reads half of it."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "lease.json.tmp").write_text(record if isinstance(record, str) else json.dumps(record))
    os.replace(output / "lease.json.tmp", output / "lease.json")


def read_lease(output: Path) -> dict:
    return json.loads((output / "lease.json").read_text())


def files_under(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_a_second_job_is_refused_while_the_first_runs_and_takes_over_at_once_after_its_stop(
    spec_path, workdir
):
    first = start_run(spec_path, "./shared")
    read_until(first, f"step 2/{STEPS}")
    second = run_ftjob("run", str(spec_path), "--set", "output.uri=./shared", cwd=workdir)
    assert second.returncode == 2, second.stderr
    assert "held by another job" in second.stderr and "Traceback" not in second.stderr
    assert f"host {socket.gethostname()}, pid {first.pid}" in second.stderr and "until" in second.stderr
    assert first.poll() is None  # the first job trains on, untouched

    first.send_signal(signal.SIGTERM)
    out = first.stdout.read()
    assert first.wait(timeout=120) == 75, out
    lease = read_lease(workdir / "shared")
    assert lease["released"] and lease["generation"] == 1 and lease["pid"] == first.pid

    requeued = start_run(spec_path, "./shared")
    took = "".join(read_until(requeued, "resuming from the checkpoint at step"))
    requeued.send_signal(signal.SIGTERM)
    out = requeued.stdout.read()
    assert requeued.wait(timeout=120) == 75, took + out
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


def test_an_expired_lease_is_taken_over_with_the_next_generation(
    tiny_model_dir, data_files, isolated, caplog
):
    output = isolated / "runs" / "t"
    gone = time.time() - 100  # a lease of 1 s: taken once this job has seen it unrenewed for 1 s
    write_lease(
        output, lease_record(host="node-3", pid=77, generation=4, renewed_at=gone, expires_at=gone + 1)
    )
    with caplog.at_level("INFO", logger="job"):
        train_in_process(small_spec(tiny_model_dir, data_files))
    assert "as generation 5 from host node-3, pid 77 (expired" in messages(caplog)
    newest = output / "checkpoints" / "step-000004-g5"
    assert json.loads((newest / "run.json").read_text())["lease_generation"] == 5
    writer = f"lease generation 5, host {socket.gethostname()}, pid {os.getpid()}"
    assert (newest / "COMMITTED").read_text() == f"step 4, {writer}\n"
    lease = read_lease(output)
    assert lease["generation"] == 5 and lease["pid"] == os.getpid() and lease["released"]


def test_a_job_that_fails_releases_its_lease(tiny_model_dir, data_files, isolated):
    output = isolated / "runs" / "t"
    train_in_process(small_spec(tiny_model_dir, data_files, max_steps=2))
    (output / "adapter" / "MANIFEST.json").unlink()  # not published: the next run resumes
    with pytest.raises(UserError, match="train.seed: 42 -> 7"):
        train_in_process(small_spec(tiny_model_dir, data_files, max_steps=2, seed=7))
    lease = read_lease(output)
    assert lease["generation"] == 2 and lease["released"] and lease["expires_at"] <= time.time()


@pytest.mark.parametrize("before", ["commit", "publish"])
def test_a_job_that_loses_its_lease_commits_and_publishes_nothing_more(
    tiny_model_dir, data_files, isolated, monkeypatch, before
):
    """The lease is taken over at the last moment: after a checkpoint's files are uploaded and before
    its COMMITTED marker, or after training and before publishing."""
    from job.output import checkpoint
    from job.output.lease import LeaseLost

    output = isolated / "runs" / "t"
    rival = lease_record(generation=2)
    upload_dir, wait = checkpoint.upload_dir, checkpoint.Checkpointer.wait

    def upload_then_taken_over(local_dir, uri, last=""):
        upload_dir(local_dir, uri, last)
        if last == "COMMITTED":  # the checkpoint's files are up; its marker would come next
            write_lease(output, rival)

    def taken_over_then_wait(self):
        write_lease(output, rival)
        wait(self)

    if before == "commit":
        monkeypatch.setattr(checkpoint, "upload_dir", upload_then_taken_over)
        spec = small_spec(tiny_model_dir, data_files)
    else:
        monkeypatch.setattr(checkpoint.Checkpointer, "wait", taken_over_then_wait)
        spec = small_spec(tiny_model_dir, data_files, checkpoint_every=0)
    with pytest.raises(LeaseLost, match="to another job \\(host node-7, pid 4242, generation 2\\)") as lost:
        train_in_process(spec)
    assert lost.value.exit_code == 1
    if before == "commit":
        assert files_under(output / "checkpoints") == [
            "step-000002-g1/MANIFEST.json", "step-000002-g1/optimizer.pt", "step-000002-g1/rank-00000.json",
            "step-000002-g1/run.json", "step-000002-g1/trainable.safetensors",
        ]  # fmt: skip
    assert not (output / "adapter").exists() and read_lease(output) == rival


def test_a_lease_whose_process_has_ended_on_this_machine_is_taken_over_at_once(isolated, monkeypatch, caplog):
    """Killed on this machine (SIGKILL, the OOM killer): its pid is free, so its lease is not waited for."""
    from job.output import lease as lease_module

    if lease_module.process_namespace() is None:
        pytest.skip("needs Linux's /proc")
    monkeypatch.setattr(lease_module, "SETTLE_SECONDS", 0)
    ended = subprocess.Popen(["true"])
    ended.wait()
    output = isolated / "out"
    here = {"host": socket.gethostname(), "pid_namespace": lease_module.process_namespace()}
    write_lease(output, lease_record(pid=ended.pid, **here))
    lease = lease_module.Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT)
    with caplog.at_level("INFO", logger="job"):
        lease.take()
    lease.release()
    assert f"as generation 2 from host {here['host']}, pid {ended.pid} (its process had ended)" in messages(
        caplog
    )


def test_a_rerun_of_the_same_scheduler_job_waits_for_the_lease_its_predecessor_left(
    tiny_model_dir, data_files, isolated, caplog, monkeypatch
):
    """A predecessor killed before it could release the lease (OOM, SIGKILL, a lost node): its
    successor in the same scheduler job waits for the lease to expire rather than fail."""
    monkeypatch.setenv("FTJOB_RESTART_ID", "k8s-job-uid")
    expires = time.time() + 4
    write_lease(
        isolated / "runs" / "t", lease_record(job="k8s-job-uid", host="pod-0", pid=1, expires_at=expires)
    )
    with caplog.at_level("INFO", logger="job"):
        train_in_process(small_spec(tiny_model_dir, data_files, max_steps=2))
    assert time.time() >= expires
    assert "host pod-0, pid 1, scheduler job k8s-job-uid (this same scheduler job)" in messages(caplog)
    assert "waiting until it expires" in messages(caplog)
    assert "as generation 2 from host pod-0, pid 1, scheduler job k8s-job-uid (expired" in messages(caplog)


def test_a_lease_renewed_while_its_successor_waits_belongs_to_a_live_job(
    tiny_model_dir, data_files, isolated, monkeypatch
):
    """The same scheduler job's lease, but renewed: its holder runs on (a zombie). Exit 2, naming it."""
    monkeypatch.setenv("FTJOB_RESTART_ID", "slurm-5")
    output = isolated / "runs" / "t"
    zombie = lease_record(job="slurm-5", host="node-2", pid=31, expires_at=time.time() + 4)
    write_lease(output, zombie)

    def renew():
        time.sleep(1.5)
        write_lease(output, {**zombie, "renewed_at": time.time(), "expires_at": time.time() + 4})

    threading.Thread(target=renew, daemon=True).start()
    with pytest.raises(UserError) as refused:
        train_in_process(small_spec(tiny_model_dir, data_files, max_steps=2))
    assert refused.value.exit_code == 2
    assert "held by another job: host node-2, pid 31, scheduler job slurm-5" in str(refused.value)
    assert not (output / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# Expiry as seen on this host's clock: the holder's host's clock may be minutes off


class FakeClock:
    """time.monotonic and time.sleep of the job under test: a sleep first runs `meanwhile(elapsed)` (what
    another job does in the meantime), then moves the clock on at once."""

    def __init__(self, meanwhile: Callable[[float], None]):
        self.elapsed = 0.0
        self.meanwhile = meanwhile

    def monotonic(self) -> float:
        return 1000.0 + self.elapsed

    def sleep(self, seconds: float) -> None:
        if self.elapsed > 600:
            raise AssertionError("the job under test is still waiting for the lease after 600 s")
        self.meanwhile(self.elapsed)
        self.elapsed += seconds


def fake_clock(monkeypatch, meanwhile: Callable[[float], None] = lambda elapsed: None) -> FakeClock:
    from job.output import lease as lease_module

    fake = FakeClock(meanwhile)
    monkeypatch.setattr(lease_module, "SETTLE_SECONDS", 0)
    monkeypatch.setattr(lease_module.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(lease_module.time, "sleep", fake.sleep)
    return fake


SCHEDULER_JOBS = {"another job": None, "the same scheduler job": "slurm-5"}


@pytest.mark.parametrize("job", SCHEDULER_JOBS.values(), ids=SCHEDULER_JOBS.keys())
def test_a_lease_from_a_clock_ahead_is_taken_once_seen_unrenewed_for_its_lease_seconds(
    isolated, monkeypatch, caplog, job
):
    """Its holder's host is 3 minutes ahead and its process is gone: its times say it is live for 3
    minutes more, but unrenewed for its lease_seconds on this host's monotonic clock, it has expired."""
    from job.output.lease import Lease

    monkeypatch.setenv("FTJOB_RESTART_ID", "slurm-5")
    output = isolated / "out"
    ahead = time.time() + 180
    stale = lease_record(job=job, renewed_at=ahead, expires_at=ahead + LEASE_SECONDS)
    write_lease(output, stale)
    owners = []  # (seconds waited, the lease's owner) at each of the job's sleeps
    fake = fake_clock(monkeypatch, lambda elapsed: owners.append((elapsed, read_lease(output)["owner"])))
    lease = Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT)
    with caplog.at_level("INFO", logger="job"):
        lease.take()
    lease.release()
    taken_at = min(elapsed for elapsed, owner in owners if owner != stale["owner"])
    assert taken_at == pytest.approx(LEASE_SECONDS) and fake.elapsed == pytest.approx(LEASE_SECONDS)
    assert "waiting until it expires" in messages(caplog)
    assert "as generation 2 from host node-7, pid 4242" in messages(caplog)
    assert "(expired)" in messages(caplog)


@pytest.mark.parametrize("job", SCHEDULER_JOBS.values(), ids=SCHEDULER_JOBS.keys())
def test_a_lease_from_a_clock_behind_that_is_renewed_is_not_taken(isolated, monkeypatch, job):
    """Its holder's host is 3 minutes behind: its lease looks expired here, but its holder renews it, at
    the last moment: the job is refused (exit 2) and leaves it alone."""
    from job.output.lease import Lease

    monkeypatch.setenv("FTJOB_RESTART_ID", "slurm-5")
    output = isolated / "out"
    behind = time.time() - 180
    live = lease_record(job=job, renewed_at=behind, expires_at=behind + LEASE_SECONDS)
    renewed = {**live, "renewed_at": behind + 5, "expires_at": behind + 5 + LEASE_SECONDS}
    write_lease(output, live)

    def renew_in_the_last_second(elapsed: float) -> None:
        if elapsed >= LEASE_SECONDS - 1:
            write_lease(output, renewed)

    fake_clock(monkeypatch, renew_in_the_last_second)
    with pytest.raises(UserError, match="held by another job: host node-7, pid 4242") as refused:
        Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT).take()
    assert refused.value.exit_code == 2
    assert read_lease(output) == renewed


def test_a_lease_renewed_in_this_hosts_future_is_warned_about_once(isolated, monkeypatch, caplog):
    """3 minutes ahead: warned about, once, however often it is read while it is watched. 2 seconds ahead
    is within the tolerance: no warning, and another job's live lease is refused at once."""
    from job.output.lease import Lease

    output = isolated / "out"
    fake_clock(monkeypatch)
    now = time.time()
    write_lease(output, lease_record(renewed_at=now + 2, expires_at=now + 2 + LEASE_SECONDS))
    with caplog.at_level("WARNING", logger="job"), pytest.raises(UserError, match="held by another job"):
        Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT).take()
    assert "clocks disagree" not in messages(caplog)

    write_lease(output, lease_record(renewed_at=now + 180, expires_at=now + 180 + LEASE_SECONDS))
    lease = Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT)
    with caplog.at_level("WARNING", logger="job"):
        lease.take()
    lease.release()
    warned = [r.getMessage() for r in caplog.records if "clocks disagree" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "by the clock of host node-7, pid 4242, 180 s ahead of this host's clock" in warned[0]


def test_a_stop_while_watching_a_lease_is_exit_75(isolated, monkeypatch):
    from job.errors import Preempted
    from job.output.lease import Lease
    from job.signals import StopRequest

    output = isolated / "out"
    gone = time.time() - 100
    write_lease(output, lease_record(renewed_at=gone, expires_at=gone + LEASE_SECONDS))
    stop = StopRequest(90)
    fake_clock(monkeypatch, lambda elapsed: setattr(stop, "signal", signal.SIGTERM))
    with pytest.raises(Preempted, match="while waiting for .*lease.json; exit 75"):
        Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT).take(stop)
    assert read_lease(output)["owner"] == "f" * 32


TOO_LONG = {"damaged": 10**9, "as long as the collective timeout": COLLECTIVE_TIMEOUT}


@pytest.mark.parametrize("job", SCHEDULER_JOBS.values(), ids=SCHEDULER_JOBS.keys())
@pytest.mark.parametrize("seconds", TOO_LONG.values(), ids=TOO_LONG.keys())
def test_a_lease_too_long_to_wait_for_is_exit_2_at_once(isolated, monkeypatch, job, seconds):
    """A lease.json whose lease_seconds (expires_at - renewed_at) are not under the job's
    train.collective_timeout_seconds: watching it that long, rank 0 would keep the other ranks waiting
    in a collective past their timeout. Refused at once (exit 2); the lease is left as it was."""
    from job.output.lease import Lease

    monkeypatch.setenv("FTJOB_RESTART_ID", "slurm-5")
    output = isolated / "out"
    ended = int(time.time()) - 60  # whole seconds: expires_at - renewed_at is exactly `seconds`
    stale = lease_record(job=job, renewed_at=ended - seconds, expires_at=ended)
    write_lease(output, stale)
    fake = fake_clock(monkeypatch)
    with pytest.raises(UserError) as refused:
        Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT).take()
    assert refused.value.exit_code == 2 and fake.elapsed == 0
    message = str(refused.value)
    assert f"{output}/lease.json says that host node-7, pid 4242" in message
    assert f"holds it for {seconds} s unless renewed" in message
    assert f"not under this job's train.collective_timeout_seconds ({COLLECTIVE_TIMEOUT} s)" in message
    assert f"delete {output}/lease.json once no job writes to {output}" in message
    assert read_lease(output) == stale


def test_a_rival_whose_write_lands_during_the_settle_delay_wins(isolated, monkeypatch):
    """Object stores have no compare-and-swap: a job writes the lease, waits, reads it back. A rival
    whose write lands in between wins; this job is refused (exit 2) and leaves the rival's lease."""
    from job.output import lease as lease_module

    output = isolated / "out"
    output.mkdir()
    rival = lease_record(host="node-9", pid=99)
    monkeypatch.setattr(lease_module.time, "sleep", lambda seconds: write_lease(output, rival))
    with pytest.raises(UserError, match="held by another job: host node-9, pid 99"):
        lease_module.Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT).take()
    assert read_lease(output) == rival


def test_the_settle_delay_runs_while_the_job_works_and_a_rival_writing_meanwhile_still_wins(
    isolated, monkeypatch
):
    """train() claims the lease, loads the model, then settles: the wait is what is left of
    SETTLE_SECONDS after the work, and a rival whose write lands during the work wins as before."""
    from job.output import lease as lease_module

    output = isolated / "out"
    output.mkdir()
    waits = []
    monkeypatch.setattr(lease_module.time, "sleep", waits.append)
    lease = lease_module.Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT)
    lease.claim()
    clock = time.monotonic()
    monkeypatch.setattr(lease_module.time, "monotonic", lambda: clock + 0.7)  # 0.7 s of model loading
    lease.confirm()
    assert waits == [pytest.approx(lease_module.SETTLE_SECONDS - 0.7, abs=0.05)]
    lease.release()

    rival = lease_record(host="node-9", pid=99, generation=2)
    late = lease_module.Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT)
    late.claim()
    assert read_lease(output)["generation"] == 2  # after a released one
    monkeypatch.setattr(lease_module.time, "monotonic", lambda: clock + 5)  # a load longer than the delay
    write_lease(output, rival)
    with pytest.raises(UserError, match="held by another job: host node-9, pid 99"):
        late.confirm()
    assert waits[1:] == [0.0]
    late.release()
    assert read_lease(output) == rival  # a lost claim is not released: it is not ours


def test_a_job_that_fails_between_claiming_the_lease_and_confirming_it_releases_it(
    tiny_model_dir, data_files, isolated, tmp_path
):
    """The model loads between the claim and its confirmation: a model that fails to load leaves the
    lease released, so that the next job takes it at once."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    spec = small_spec(tiny_model_dir, data_files)
    spec["model"]["source"] = str(broken)
    with pytest.raises(UserError, match="model.source: cannot load"):
        train_in_process(spec)
    lease = read_lease(isolated / "runs" / "t")
    assert lease["generation"] == 1 and lease["released"] and lease["expires_at"] <= time.time()
    assert files_under(isolated / "runs" / "t") == ["lease.json"]


def test_a_retention_delete_that_fails_is_a_warning(
    tiny_model_dir, data_files, isolated, monkeypatch, caplog
):
    """The store refuses to delete the oldest checkpoint (a permission, an object lock): training and
    publishing go on; the checkpoint stays."""
    from fsspec.implementations.local import LocalFileSystem

    rm = LocalFileSystem.rm

    def refuse_step_2(self, path, recursive=False, maxdepth=None):
        if "step-000002" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return rm(self, path, recursive=recursive, maxdepth=maxdepth)

    monkeypatch.setattr(LocalFileSystem, "rm", refuse_step_2)
    spec = small_spec(tiny_model_dir, data_files, max_steps=6)
    spec["output"] = {"keep_checkpoints": 1}
    with caplog.at_level("INFO", logger="job"):
        result = train_in_process(spec)
    assert result.adapter_uri and (isolated / "runs" / "t" / "adapter" / "MANIFEST.json").is_file()
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "step 2" in r.getMessage()]
    assert len(warned) == 2 and "Permission denied" in warned[0].getMessage()  # after steps 4 and 6
    checkpoints = isolated / "runs" / "t" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002-g1", "step-000006-g1"]


# ---------------------------------------------------------------------------------------------
# A damaged or unreadable lease, on one rank and on two


DAMAGED = {"a list": "[]", "no fields": "{}", "a string": '"str"', "not JSON": "{not json",
           "no time to last": json.dumps(lease_record(renewed_at=100.0, expires_at=100.0))}  # fmt: skip


@pytest.mark.parametrize("text", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_lease_is_exit_2_while_taking_it_and_exit_1_once_held(isolated, monkeypatch, text):
    """Taking the lease, nothing is written yet: exit 2, the user deletes it. Once the lease is held,
    the job may have committed checkpoints, which exit 2 would deny: exit 1."""
    from job.output import lease as lease_module

    monkeypatch.setattr(lease_module, "SETTLE_SECONDS", 0)
    output = isolated / "out"
    write_lease(output, text)
    with pytest.raises(UserError, match="lease.json is damaged") as refused:
        lease_module.Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT).take()
    assert f"delete it once no job writes to {output}" in str(refused.value)

    (output / "lease.json").unlink()
    # renewed every 200 s: no renewal overwrites the damage
    held = lease_module.Lease(str(output), 600, COLLECTIVE_TIMEOUT)
    held.take()
    try:
        write_lease(output, text)
        with pytest.raises(JobError, match="lease.json is damaged") as damaged:
            held.check()
    finally:
        held.release()
    assert damaged.value.exit_code == 1


def test_a_lease_the_store_cannot_serve_at_start_is_exit_2_or_1_as_for_any_storage_failure(s3, fault_proxy):
    """An endpoint that cannot be reached is the user's to fix (exit 2); an outage may pass (exit 1)."""
    from job.output.lease import Lease
    from job.storage import configure_storage

    once = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    configure_storage({"s3": {"endpoint_url": f"http://127.0.0.1:{free_port()}", **once}})
    with pytest.raises(UserError, match="lease.json: cannot reach the storage endpoint"):
        Lease(f"s3://{s3.bucket}/out", LEASE_SECONDS, COLLECTIVE_TIMEOUT).take()

    configure_storage({"s3": {"endpoint_url": fault_proxy.url, **once}})
    fault_proxy.outage("503")
    with pytest.raises(JobError, match="lease.json: storage failed") as outage:
        Lease(f"s3://{s3.bucket}/out", LEASE_SECONDS, COLLECTIVE_TIMEOUT).take()
    assert outage.value.exit_code == 1


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


# ---------------------------------------------------------------------------------------------
# Released leases, uploads in flight, retention


def test_a_released_lease_is_no_longer_held(isolated, monkeypatch):
    """Once released, the next job may take it at any moment: nothing more is committed under it."""
    from job.output import lease as lease_module

    monkeypatch.setattr(lease_module, "SETTLE_SECONDS", 0)
    (isolated / "out").mkdir()
    lease = lease_module.Lease(str(isolated / "out"), LEASE_SECONDS, COLLECTIVE_TIMEOUT)
    lease.take()
    lease.check()
    lease.release()
    with pytest.raises(
        lease_module.LeaseLost, match="released the lease on output.uri .* \\(generation 1\\)"
    ):
        lease.check()


def test_a_run_that_fails_while_a_checkpoint_uploads_releases_the_lease_only_after_that_upload(
    tiny_model_dir, isolated, s3, fault_proxy
):
    """A bad row (policy fail) ends the run while step 1's checkpoint is still uploading (every request
    to the store is a third of a second late). train() ends, and the lease is released, only once that
    upload has ended: a released lease may already be another job's."""
    train_file = write_jsonl(isolated / "data" / "bad.jsonl", ALPACA_ROWS + ["{not json"] + ALPACA_ROWS * 5)
    evaluation = write_jsonl(isolated / "data" / "eval.jsonl", ALPACA_ROWS)
    spec = small_spec(tiny_model_dir, (train_file, evaluation), max_steps=20, checkpoint_every=1)
    spec["data"].update(bad_rows={"policy": "fail"}, shuffle_buffer=0)  # the bad row comes at step 2
    spec["output"] = {"uri": f"s3://{s3.bucket}/out"}
    spec["storage_options"] = {"s3": {"endpoint_url": fault_proxy.url}}
    fault_proxy.slow_seconds = 0.3
    fault_proxy.outage("slow")
    with pytest.raises(JobError, match="data.bad_rows.policy is 'fail'"):
        train_in_process(spec)
    assert [t for t in threading.enumerate() if t.name == "ftjob-checkpoint"] == []
    fault_proxy.heal()
    s3.invalidate_cache()
    assert [folder.rsplit("/", 1)[1] for folder in s3.ls(f"{s3.bucket}/out/checkpoints")] == [
        "step-000001-g1"
    ]
    assert s3.exists(f"{s3.bucket}/out/checkpoints/step-000001-g1/COMMITTED")
    lease = json.loads(s3.cat(f"{s3.bucket}/out/lease.json"))
    assert lease["released"] and lease["generation"] == 1


def test_a_retention_listing_that_fails_after_the_commit_is_a_warning(isolated, s3, fault_proxy, caplog):
    """The store fails from the moment COMMITTED is written: retention cannot list the checkpoints. The
    checkpoint is committed and the job goes on (it used to end with exit 1, saying the upload failed)."""
    from job.output.checkpoint import Checkpointer
    from job.output.lease import Lease
    from job.storage import configure_storage

    configure_storage(
        {"s3": {"endpoint_url": fault_proxy.url, "config_kwargs": {"retries": {"total_max_attempts": 1}}}}
    )
    output = f"s3://{s3.bucket}/out"
    lease = Lease(output, 600, COLLECTIVE_TIMEOUT)
    lease.take()
    checkpointer = Checkpointer(output, 0, 1, keep=1, lease=lease)
    staging, segment = isolated / "staging", isolated / "segment"
    write_jsonl(staging / "run.json", [{"step": 2}])
    write_jsonl(segment / "000002.jsonl", [{"step": 2}])
    uri = checkpointer.step_uri(2)
    committed = f"{uri.removeprefix('s3://')}/COMMITTED"

    def fail_once_committed():  # the commit's answer comes half a second late: the outage is on by then
        deadline = time.monotonic() + 60
        while not s3.exists(committed) and time.monotonic() < deadline:
            s3.invalidate_cache()
            time.sleep(0.02)
        fault_proxy.outage("503")

    fault_proxy.slow_seconds = 0.5
    fault_proxy.outage("slow")
    threading.Thread(target=fail_once_committed, daemon=True).start()
    try:
        with caplog.at_level("WARNING", logger="job"):
            checkpointer._upload(staging, segment, uri, 2)
            checkpointer.wait()
    finally:
        fault_proxy.heal()
        lease.release()
    assert s3.exists(committed)
    assert "could not list the checkpoints in" in messages(caplog)


# ---------------------------------------------------------------------------------------------
# Checkpoint folders of each generation


def test_each_generation_writes_its_own_folders_and_the_newest_is_the_highest_step_then_generation(isolated):
    """A job frozen mid-upload and the job that took over never write the same folder, even for the same
    step. Folders named step-NNNNNN (before generations) are generation 0 and still load."""
    from job.output.checkpoint import (
        FINGERPRINT_VERSION,
        Checkpointer,
        committed_checkpoints,
        remove_uncommitted,
    )
    from job.output.lease import Lease
    from job.output.publish import write_manifest

    output = isolated / "out"
    expected = {"fingerprint_version": FINGERPRINT_VERSION}
    for name, step, committed in [("step-000003-g7", 3, True), ("step-000004", 4, True), ("step-000004-g10", 4, True),
                                  ("step-000004-g2", 4, True), ("step-000005-g1", 5, False), ("step-000002", 2, False)]:  # fmt: skip
        folder = output / "checkpoints" / name
        folder.mkdir(parents=True)
        run = {"step": step, "run_id": None, "fingerprint": expected, "total_steps": 9, "last_metrics": {"step": step},
               "checkpoint_format": 2, "lease_generation": int(name.partition("-g")[2] or 0)}  # as ftjob writes it  # fmt: skip
        (folder / "run.json").write_text(json.dumps(run))
        (folder / "rank-00000.json").write_text("{}")
        write_manifest(folder)
        if committed:
            (folder / "COMMITTED").write_text(f"step {step}\n")

    remove_uncommitted(str(output))
    oldest_first = ["step-000003-g7", "step-000004", "step-000004-g2", "step-000004-g10"]
    assert [f.name for f in committed_checkpoints(str(output))] == oldest_first
    lease = Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT)
    lease.generation = 11
    checkpointer = Checkpointer(str(output), 0, 1, keep=2, lease=lease)
    assert checkpointer.step_uri(4) == f"{output}/checkpoints/step-000004-g11"
    saved = checkpointer.load_latest(expected)
    assert saved["uri"] == f"{output}/checkpoints/step-000004-g10"
    checkpointer._apply_retention()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-000004-g10", "step-000004-g2"]


def test_a_checkpoint_from_before_data_cursors_held_row_positions_is_refused_as_another_version(isolated):
    """Its data cursor holds rows, not positions: resuming from it is refused, saying why, not with a
    diff of spec fields."""
    from job.output.checkpoint import Checkpointer, fingerprint
    from job.output.lease import Lease
    from job.spec import validate_spec

    output = isolated / "out"
    spec = validate_spec(
        {"model": {"source": "m"}, "data": {"train": ["d.jsonl"]}, "train": {"max_steps": 9}}
    )
    (isolated / "m").mkdir()  # the model source, whose identity the fingerprint holds
    (isolated / "m" / "model.safetensors").write_bytes(b"weights")
    current = fingerprint(spec, world_size=1)
    folder = output / "checkpoints" / "step-000004-g1"
    folder.mkdir(parents=True)
    older = {**current, "fingerprint_version": 2}
    (folder / "run.json").write_text(json.dumps({"step": 4, "fingerprint": older}))
    (folder / "rank-00000.json").write_text("{}")
    (folder / "COMMITTED").write_text("step 4\n")
    checkpointer = Checkpointer(
        str(output), 0, 1, keep=2, lease=Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT)
    )
    with pytest.raises(UserError, match="written by another version of ftjob") as refused:
        checkpointer.load_latest(current)
    assert "--restart" in str(refused.value) and "->" not in str(refused.value)


# ---------------------------------------------------------------------------------------------
# The lease's settings and its other writers


def test_a_lease_as_long_as_the_collective_timeout_is_refused():
    """Rank 0 may wait for an expired lease for up to lease_seconds while the other ranks wait for it in a
    collective, which fails after collective_timeout_seconds."""
    from job.spec import validate_spec

    base = {"model": {"source": "m"}, "data": {"train": ["d.jsonl"]}}
    with pytest.raises(
        UserError, match=r"train.lease_seconds: 120 must be under train.collective_timeout_seconds \(120\)"
    ):
        validate_spec({**base, "train": {"max_steps": 1, "collective_timeout_seconds": 120}})
    validate_spec({**base, "train": {"max_steps": 1, "collective_timeout_seconds": 120, "lease_seconds": 60}})


def test_the_lease_is_renewed_every_third_of_its_time(isolated, monkeypatch):
    from job.output import lease as lease_module

    monkeypatch.setattr(lease_module, "SETTLE_SECONDS", 0)
    output = isolated / "out"
    output.mkdir()
    lease = lease_module.Lease(str(output), 5, COLLECTIVE_TIMEOUT)
    lease.take()
    try:
        taken = read_lease(output)
        time.sleep(2.5)  # one renewal, after 5/3 s
        renewed = read_lease(output)
    finally:
        lease.release()
    assert renewed["renewed_at"] >= taken["renewed_at"] + 5 / 3
    assert renewed["expires_at"] == renewed["renewed_at"] + 5 and not renewed["released"]
    assert (renewed["owner"], renewed["generation"]) == (taken["owner"], taken["generation"])


def test_merging_an_already_published_adapter_takes_the_lease(tiny_model_dir, data_files, isolated):
    """`ftjob run` of a published spec with output.merge writes merged/: only while no other job holds
    output.uri."""
    output = isolated / "runs" / "t"
    train_in_process(small_spec(tiny_model_dir, data_files, max_steps=2))
    write_lease(output, lease_record())
    spec = small_spec(tiny_model_dir, data_files, max_steps=2)
    spec["output"] = {"merge": True}
    with pytest.raises(UserError, match="held by another job: host node-7, pid 4242"):
        train_in_process(spec)
    assert not (output / "merged").exists() and read_lease(output)["pid"] == 4242


def test_a_claim_is_renewed_while_the_job_loads_its_model(isolated):
    """A model load can outlast train.lease_seconds: the claim must not expire under a live job."""
    from job.output import lease as lease_module

    output = isolated / "out"
    output.mkdir()
    lease = lease_module.Lease(str(output), 0.3, COLLECTIVE_TIMEOUT)  # renewed every 0.1 s
    lease.claim()
    claimed = read_lease(output)
    time.sleep(0.6)  # twice the lease's length, unconfirmed
    renewed = read_lease(output)
    assert renewed["owner"] == claimed["owner"] and renewed["renewed_at"] > claimed["renewed_at"] + 0.3
    assert renewed["expires_at"] > time.time()
    lease.confirm()
    lease.release()
    assert read_lease(output)["released"]
