"""The lease on output.uri, in this process: who holds it, when it is taken over, renewed, released or refused
(with runs: tests/integration/test_lease_runs.py)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import pytest
from helpers import (
    COLLECTIVE_TIMEOUT,
    LEASE_SECONDS,
    lease_record,
    make_spec,
    messages,
    read_lease,
    write_lease,
)

from job.errors import JobError, UserError


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

    output = isolated / "out"
    ahead = time.time() + 180
    stale = lease_record(job=job, renewed_at=ahead, expires_at=ahead + LEASE_SECONDS)
    write_lease(output, stale)
    owners = []  # (seconds waited, the lease's owner) at each of the job's sleeps
    fake = fake_clock(monkeypatch, lambda elapsed: owners.append((elapsed, read_lease(output)["owner"])))
    lease = Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT, job="slurm-5")
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
        Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT, job="slurm-5").take()
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

    output = isolated / "out"
    ended = int(time.time()) - 60  # whole seconds: expires_at - renewed_at is exactly `seconds`
    stale = lease_record(job=job, renewed_at=ended - seconds, expires_at=ended)
    write_lease(output, stale)
    fake = fake_clock(monkeypatch)
    with pytest.raises(UserError) as refused:
        Lease(str(output), LEASE_SECONDS, COLLECTIVE_TIMEOUT, job="slurm-5").take()
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
    from job.output.manifest import write_manifest

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
    spec = validate_spec(make_spec(model="m", train={"max_steps": 9}))
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


def test_a_lease_as_long_as_the_collective_timeout_is_refused():
    """Rank 0 may wait for an expired lease for up to lease_seconds while the other ranks wait for it in a
    collective, which fails after collective_timeout_seconds."""
    from job.spec import validate_spec

    with pytest.raises(
        UserError, match=r"train.lease_seconds: 120 must be under train.collective_timeout_seconds \(120\)"
    ):
        validate_spec(make_spec(model="m", train={"collective_timeout_seconds": 120}))
    validate_spec(make_spec(model="m", train={"collective_timeout_seconds": 120, "lease_seconds": 60}))


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
