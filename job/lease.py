"""One writer per output.uri: <output.uri>/lease.json names the job that may write there.

    {"owner": "<random, per process>", "host": ..., "pid": ..., "pid_namespace": "<boot id:inode>",
     "job": "<scheduler job id or null>", "generation": 3, "renewed_at": <unix time>,
     "expires_at": <unix time>, "released": false}

Rank 0 takes the lease before it changes anything under output.uri (but a write probe) and renews
it every third of train.lease_seconds from a thread, from the moment it writes its claim. A lease
that is absent, released or expired is taken with the next generation, and so is one whose process has
ended on this machine (same boot and pid namespace, so its pid can be looked up); a live one held by
another job is refused (UserError, exit 2).
Checkpoints are written in folders of the generation that writes them (job/checkpoint.py), so two
generations never write the same folder. Before a checkpoint is committed and before publishing, rank 0
reads the lease again: a job whose lease another job took (it stopped renewing for longer than
lease_seconds, say a frozen node), or that has released it, stops with LeaseLost (exit 1), writing and
deleting nothing more.

A lease.json that is not a lease record (damaged) is an error: exit 2 while taking the lease (nothing is
written under output.uri yet), exit 1 once it is held (the job may have committed checkpoints, which
exit 2 would deny). So is one that cannot be read or written: while taking the lease, exit 2 or 1 as
job.storage.storage_error says; once it is held, exit 1.

Object stores offer no compare-and-swap through fsspec, so taking the lease is write (claim), wait
SETTLE_SECONDS, read back (confirm; train() loads the model in between): of two jobs whose writes
land within that time, the later write wins and the other is refused. When one job's write takes
longer than SETTLE_SECONDS while another job takes the lease, both start, with the same generation;
the one whose lease was overwritten stops at its next checkpoint, before committing. Best effort, not
a lock service.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import NoneType
from typing import Any, TypeVar

from job.errors import JobError, Preempted, UserError
from job.restart import restart_id
from job.signals import StopRequest
from job.storage import filesystem, is_local, join, storage_error

log = logging.getLogger(__name__)
LEASE = "lease.json"
SETTLE_SECONDS = 1.0  # between writing the lease and reading it back, to see a rival's write
FIELDS: dict[str, tuple[type, ...]] = {
    "owner": (str,), "host": (str,), "pid": (int,), "pid_namespace": (str, NoneType), "job": (str, NoneType),
    "generation": (int,), "renewed_at": (int, float), "expires_at": (int, float), "released": (bool,),
}  # fmt: skip
T = TypeVar("T")


class LeaseLost(JobError):
    """Another job took output.uri's lease: this one writes and deletes nothing more there. Exit 1."""


def holder(record: dict[str, Any]) -> str:
    job = f", scheduler job {record['job']}" if record.get("job") else ""
    return f"host {record['host']}, pid {record['pid']}{job}"


def clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def record_problem(record: Any) -> str | None:
    """What makes a parsed lease.json no lease record (as this module writes it), or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key, types in FIELDS.items():
        if type(record.get(key)) not in types:  # type(), not isinstance(): true is no pid
            return f"{key} is missing" if key not in record else f"{key} is a {type(record[key]).__name__}"
    if not (math.isfinite(record["renewed_at"]) and math.isfinite(record["expires_at"])):
        return "a time that is not finite"
    return None


def rank_0_outcome(accelerator, work: Callable[[], T]) -> T:
    """Every rank: rank 0 does work, and its result, or its error as a JobError, comes out on every rank,
    so that no rank is left waiting in a collective for a rank 0 that failed before it."""
    from accelerate.utils import broadcast_object_list

    outcome: T | JobError | None = None
    if accelerator.is_main_process:
        try:
            outcome = work()
        except Exception as e:  # a bug as much as a JobError: the other ranks must not wait for it
            outcome = e if isinstance(e, JobError) else JobError(f"rank 0: {type(e).__name__}: {e}")
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list([outcome])[0]
    if isinstance(outcome, JobError):
        raise outcome
    return outcome


def process_namespace() -> str | None:
    """This kernel boot and pid namespace, where another process's pid means that process (Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


class Lease:
    """This process's claim on output.uri (taken and renewed by rank 0; other ranks learn its generation)."""

    def __init__(self, output_uri: str, seconds: float):
        self.output_uri = output_uri
        self.uri = join(output_uri, LEASE)
        self.seconds = seconds
        self.me = {
            "owner": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": process_namespace(),
            "job": restart_id(os.environ),
        }
        self.generation = 0
        self._claimed_at = 0.0  # time.monotonic() of the claim's write
        self._taken_from = ""  # whose lease the claim replaced, for the log
        self._held = False  # claimed and confirmed: from now on no error here is exit 2
        self._released = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self, accelerator, stop: StopRequest) -> None:
        """Every rank: rank 0 claims the lease; its error (held by another job, a damaged lease, a stop
        while waiting) is raised on every rank, not only on rank 0. The claim holds once settle() has
        confirmed it: work in between may write nothing under output.uri."""

        def claim() -> int:
            self.claim(stop)
            return self.generation

        self.generation = rank_0_outcome(accelerator, claim)

    def settle(self, accelerator) -> None:
        """Every rank: rank 0 confirms its claim (a rival's later write wins); its error is raised on
        every rank."""
        rank_0_outcome(accelerator, self.confirm)

    def take(self, stop: StopRequest | None = None) -> None:
        """Claim the lease and confirm the claim: held from now on, renewed until release()."""
        self.claim(stop)
        self.confirm()

    def claim(self, stop: StopRequest | None = None) -> None:
        """Write this job's lease with the next generation and renew it from now on. A live lease of
        another job is a UserError naming it, except one left by a run of this same scheduler job (killed
        before it could release it): that one is waited for until it expires, unless it is renewed
        meanwhile."""
        waited_for, ended = None, False
        while (current := self._read()) is not None and current["expires_at"] > time.time():
            if ended := self._holder_ended(current):
                break
            same_job = self.me["job"] is not None and current["job"] == self.me["job"]
            if not same_job or (waited_for is not None and current != waited_for):
                raise UserError(self._held_by(current))
            if waited_for is None:
                log.warning(
                    "%s is held by %s (this same scheduler job), not renewed since %s: waiting until it "
                    "expires at %s", self.uri, holder(current), clock(current["renewed_at"]),
                    clock(current["expires_at"]),
                )  # fmt: skip
            if stop is not None and stop.requested:
                raise Preempted(f"stopped by a signal while waiting for {self.uri}; exit 75 to be requeued")
            waited_for = current
            time.sleep(min(1.0, max(0.0, current["expires_at"] - time.time())))

        self.generation = (current["generation"] if current else 0) + 1
        self._write(self._renewed())
        self._claimed_at = time.monotonic()
        if current is not None:
            how = "its process had ended" if ended else "released" if current["released"] else "expired"
            self._taken_from = f" from {holder(current)} ({how})"
        self._heartbeat = threading.Thread(target=self._renew, name="ftjob-lease", daemon=True)
        self._heartbeat.start()  # from the claim on: the work before confirm() may outlast the lease

    def confirm(self) -> None:
        """SETTLE_SECONDS after the claim was written, read the lease back: still this job's, it is held
        until release(); a rival's is a UserError naming it."""
        time.sleep(max(0.0, self._claimed_at + SETTLE_SECONDS - time.monotonic()))
        winner = self._read()
        if winner is None or winner["owner"] != self.me["owner"]:
            raise UserError(self._held_by(winner) if winner else f"{self.uri} vanished as this job took it")
        self._held = True
        log.info(
            "took the lease on %s as generation %d%s", self.output_uri, self.generation, self._taken_from
        )

    def check(self) -> None:
        """Rank 0, before committing or publishing: LeaseLost unless the lease is still ours and not
        released (once released, the next job may take it at any moment)."""
        if self._released.is_set():
            raise LeaseLost(
                f"released the lease on output.uri {self.output_uri} (generation {self.generation}): this "
                "job writes and deletes nothing more there"
            )
        current = self._read()
        if current is None or current["owner"] != self.me["owner"]:
            raise LeaseLost(self._lost_to(current))

    def release(self) -> None:
        """Stop renewing. A lease still ours is marked released, so that the next job (a requeued one)
        takes over at once; a lease another job took is left alone."""
        if self._heartbeat is None:  # never claimed, or released already
            return
        self._released.set()
        self._heartbeat.join()
        self._heartbeat = None
        try:
            current = self._read()
            if current is not None and current["owner"] == self.me["owner"]:
                self._write({**current, "expires_at": time.time(), "released": True})
        except Exception as e:  # every backend raises its own types; the lease then simply expires
            log.warning("could not release %s (%s: %s); it expires in %.0f s", self.uri, type(e).__name__, e, self.seconds)  # fmt: skip

    def _renew(self) -> None:
        while not self._released.wait(self.seconds / 3):
            try:
                current = self._read()
                if current is None or current["owner"] != self.me["owner"]:
                    log.error("%s; stopping at the next checkpoint", self._lost_to(current))
                    return
                self._write(self._renewed())
            except Exception as e:  # an outage: the next beat tries again; check() tells whether it was lost
                log.warning("could not renew %s: %s: %s", self.uri, type(e).__name__, e)

    def _holder_ended(self, record: dict[str, Any]) -> bool:
        """Whether the holder's process is known to have ended: it ran where its pid can be looked up from
        here, and no process has that pid (or this one has: the holder was an earlier process)."""
        if self.me["pid_namespace"] is None or record.get("pid_namespace") != self.me["pid_namespace"]:
            return False
        if record["pid"] == os.getpid():
            return True
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        return False

    def _renewed(self) -> dict[str, Any]:
        now = time.time()
        return {**self.me, "generation": self.generation, "renewed_at": now,
                "expires_at": now + self.seconds, "released": False}  # fmt: skip

    def _held_by(self, record: dict[str, Any]) -> str:
        return (
            f"output.uri {self.output_uri} is held by another job: {holder(record)} (lease generation "
            f"{record['generation']}, until {clock(record['expires_at'])} unless it renews it). Stop that "
            f"job, or let it finish; a job that died without releasing the lease gives it up when it "
            f"expires ({self.uri})"
        )

    def _lost_to(self, record: dict[str, Any] | None) -> str:
        taker = f"{holder(record)}, generation {record['generation']}" if record else f"{LEASE} was deleted"
        return (
            f"lost the lease on output.uri {self.output_uri} (generation {self.generation}) to another "
            f"job ({taker}): this job writes and deletes nothing more there"
        )

    def _read(self) -> dict[str, Any] | None:
        """The lease record; None when there is none."""
        try:
            fs, path = filesystem(self.uri)
            text = fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as e:  # every backend raises its own types; an outage that outlasted the retries
            raise self._failure(storage_error(e, f"cannot read {self.uri}")) from None
        try:
            record = json.loads(text)
            problem = record_problem(record)
        except ValueError as e:
            problem = str(e)
        if problem:
            damaged = f"{self.uri} is damaged ({problem}); delete it once no job writes to {self.output_uri}"
            raise self._failure(UserError(damaged))
        return record

    def _write(self, record: dict[str, Any]) -> None:
        data = json.dumps(record).encode()
        try:
            fs, path = filesystem(self.uri)
            if is_local(self.uri):  # whole or not at all for readers (an object store's PUT already is)
                fs.pipe_file(f"{path}.{self.me['owner']}", data)
                fs.mv(f"{path}.{self.me['owner']}", path)
            else:
                fs.pipe_file(path, data)
        except Exception as e:  # every backend raises its own types
            raise self._failure(storage_error(e, f"cannot write {self.uri}")) from None

    def _failure(self, error: JobError) -> JobError:
        """error while the lease is being taken; exit 1 once it is held (checkpoints may be committed)."""
        return JobError(str(error)) if self._held else error
