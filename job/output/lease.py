"""One writer per output.uri: <output.uri>/lease.json names the job that may write there.

    {"owner": "<random, per process>", "host": ..., "pid": ..., "pid_namespace": "<boot id:inode>",
     "job": "<scheduler job id or null>", "generation": 3, "renewed_at": <unix time>,
     "expires_at": <unix time>, "released": false}

Rank 0 takes the lease before it changes anything under output.uri (but a write probe) and renews
it every third of train.lease_seconds from a thread, from the moment it writes its claim. A lease that
is absent or released is taken with the next generation, and so is one whose process has ended on this
machine (same boot and pid namespace, so its pid can be looked up). Any other lease has expired only once
this job has seen it unchanged for its holder's lease_seconds (expires_at - renewed_at) on its own
monotonic clock: renewed_at and expires_at are the holder's wall clock, which may be minutes off this
host's. A lease of another job that looks live on this host's clock is refused at once (UserError, exit
2); one that looks expired, or that was renewed in this host's future (a clock ahead, warned about), is
watched, and refused as soon as it changes (its holder renewed it). A run of the same scheduler job
watches even a live-looking one: its predecessor's, killed before it could release it. But one whose
lease_seconds (as lease.json, which may be damaged, says) are not under this job's
train.collective_timeout_seconds is refused instead (UserError, exit 2): the other ranks wait for rank 0
in a collective no longer than that.
Checkpoints are written in folders of the generation that writes them (job/output/checkpoint.py), so two
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
from pathlib import Path
from types import NoneType
from typing import Any

from job.collective import rank_0_outcome
from job.errors import JobError, Preempted, UserError
from job.output.layout import LEASE, OutputLayout
from job.signals import StopRequest
from job.storage import filesystem, is_local, storage_error

log = logging.getLogger(__name__)
SETTLE_SECONDS = 1.0  # between writing the lease and reading it back, to see a rival's write
CLOCK_TOLERANCE_SECONDS = 5.0  # hosts' clocks this far apart count as agreeing; further: warned about
FIELDS: dict[str, tuple[type, ...]] = {
    "owner": (str,), "host": (str,), "pid": (int,), "pid_namespace": (str, NoneType), "job": (str, NoneType),
    "generation": (int,), "renewed_at": (int, float), "expires_at": (int, float), "released": (bool,),
}  # fmt: skip


class LeaseLost(JobError):
    """Another job took output.uri's lease: this one writes and deletes nothing more there. Exit 1."""


def holder(record: dict[str, Any]) -> str:
    job = f", scheduler job {record['job']}" if record.get("job") else ""
    return f"host {record['host']}, pid {record['pid']}{job}"


def lease_seconds(record: dict[str, Any]) -> float:
    """The holder's train.lease_seconds: how long its lease lasts unless renewed."""
    return record["expires_at"] - record["renewed_at"]


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
    if not record["released"] and lease_seconds(record) <= 0:
        return "expires_at is not after renewed_at"
    return None


def read_lease(output_uri: str) -> dict[str, Any] | None:
    """output.uri's lease record, checked as this module writes one; None when there is none. A damaged
    one is a UserError, a storage failure storage_error's."""
    uri = OutputLayout(output_uri).lease
    try:
        fs, path = filesystem(uri)
        text = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as e:  # every backend raises its own types; an outage that outlasted the retries
        raise storage_error(e, f"cannot read {uri}") from None
    try:
        record = json.loads(text)
        problem = record_problem(record)
    except ValueError as e:
        problem = str(e)
    if problem:
        raise UserError(f"{uri} is damaged ({problem}); delete it once no job writes to {output_uri}")
    return record


def process_namespace() -> str | None:
    """This kernel boot and pid namespace, where another process's pid means that process (Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


class Lease:
    """This process's claim on output.uri (taken and renewed by rank 0; other ranks learn its generation)."""

    def __init__(self, output_uri: str, seconds: float, max_wait: float, job: str | None = None):
        """seconds: train.lease_seconds. max_wait: train.collective_timeout_seconds, the longest this job
        may wait for another's lease to expire, since its other ranks wait for rank 0 no longer. job: the
        scheduler's job this process belongs to (job.cluster.restart_id), None outside a scheduler."""
        self.output_uri = output_uri
        self.uri = OutputLayout(output_uri).lease
        self.seconds = seconds
        self.max_wait = max_wait
        self.me = {
            "owner": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": process_namespace(),
            "job": job,
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
        """Write this job's lease with the next generation, once the current one is free (_await_free()),
        and renew it from now on."""
        current, how = self._await_free(stop)
        self.generation = (current["generation"] if current else 0) + 1
        self._write(self._renewed())
        self._claimed_at = time.monotonic()
        if current is not None:
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

    def _await_free(self, stop: StopRequest | None) -> tuple[dict[str, Any] | None, str]:
        """The lease record once this job may take it (None: there is none), and why it may: released,
        its process had ended, or expired: seen unchanged here for its holder's lease_seconds, on this
        process's monotonic clock. A change meanwhile (a renewal) means its holder runs: a UserError
        naming it."""
        watched, since = None, 0.0
        while (current := self._read()) is not None:
            if current["released"]:
                return current, "released"
            if self._holder_ended(current):
                return current, "its process had ended"
            if watched is None:
                self._start_watching(current)
                watched, since = current, time.monotonic()
            elif current != watched:  # renewed, or taken by a third job: not expired
                raise UserError(self._held_by(current))
            left = since + lease_seconds(current) - time.monotonic()
            if left <= 0:
                return current, "expired"
            if stop is not None and stop.requested:
                raise Preempted(f"stopped by a signal while waiting for {self.uri}; exit 75 to be requeued")
            time.sleep(min(1.0, left))
        return None, ""

    def _start_watching(self, record: dict[str, Any]) -> None:
        """Refuse another job's lease that looks live on this host's clock (when that clock can be
        compared with its holder's at all), and one too long to wait for; else say that this job waits
        for it to expire."""
        now = time.time()
        ahead = record["renewed_at"] - now
        if ahead > CLOCK_TOLERANCE_SECONDS:
            log.warning(
                "%s was renewed at %s by the clock of %s, %.0f s ahead of this host's clock: the two "
                "clocks disagree (is NTP running on both?)", self.uri, clock(record["renewed_at"]),
                holder(record), ahead,
            )  # fmt: skip
        same_job = self.me["job"] is not None and record["job"] == self.me["job"]
        if not same_job and ahead <= CLOCK_TOLERANCE_SECONDS and record["expires_at"] > now:
            raise UserError(self._held_by(record))
        if lease_seconds(record) >= self.max_wait:
            raise UserError(self._too_long_to_wait_for(record))
        log.warning(
            "%s is held by %s%s, last renewed at %s by its host's clock: waiting until it expires, once "
            "this job has seen it go %.0f s (its train.lease_seconds) without renewal", self.uri,
            holder(record), " (this same scheduler job)" if same_job else "", clock(record["renewed_at"]),
            lease_seconds(record),
        )  # fmt: skip

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
            f"{record['generation']}, until {clock(record['expires_at'])} by its host's clock unless it "
            f"renews it). Stop that job, or let it finish; a job that died without releasing the lease "
            f"gives it up once it goes {lease_seconds(record):.0f} s without renewal "
            f"({self.uri})"
        )

    def _too_long_to_wait_for(self, record: dict[str, Any]) -> str:
        return (
            f"{self.uri} says that {holder(record)} holds it for {lease_seconds(record):.0f} s unless "
            f"renewed (expires_at - renewed_at): not under this job's train.collective_timeout_seconds "
            f"({self.max_wait:.0f} s), the longest it may wait for a lease to expire while its other ranks "
            f"wait. If that job still runs, let it finish (it releases the lease) and run again; if not, "
            f"delete {self.uri} once no job writes to {self.output_uri}"
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
            return read_lease(self.output_uri)
        except JobError as e:
            raise self._failure(e) from None

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
