"""Heartbeats between the ranks while they train: a node that vanishes without resetting its connections
(powered off, cut from the network, frozen) is noticed within train.peer_timeout_seconds, not after the
process group's timeout (train.collective_timeout_seconds, half an hour by default, which long waits
elsewhere need).

Each rank's thread writes its heartbeat to the rendezvous store (MASTER_ADDR:MASTER_PORT) every
BEAT_SECONDS; rank 0 reads every other rank's, the others rank 0's: a rank whose heartbeat has not
changed for the timeout, or a store that cannot be reached for as long once it was, is a lost peer. The
main thread is then stuck in a collective that will not return, so the thread ends the process itself
with exit 76 (job/errors.py PeerLost). A rank or a store that has not come up yet (a node that starts
late) is left to the rendezvous' own timeout; a rank that ends (done, stopped, failed) says so first, and
the others stop watching it. Rank 0 goes on alone after the others are done (it publishes), unwatched.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from job.cluster import ProcessGroup
from job.errors import EXIT_PEER_LOST
from job.signals import StopRequest

log = logging.getLogger(__name__)
BEAT_SECONDS = 2.0
DONE = b"done"


def key(rank: int) -> str:
    return f"ftjob/heartbeat/{rank}"


@contextmanager
def peers_watched(group: ProcessGroup | None, timeout: float, stop: StopRequest) -> Iterator[None]:
    """Around a run of several processes (job/cluster.py: the launcher's process group); nothing for one.
    timeout: train.peer_timeout_seconds. Once `stop` is requested nobody is judged: ranks leave at their
    own pace, and a launcher that died (job/signals.py: stop_when_orphaned) took the store with it."""
    if group is None or group.world_size == 1:
        yield
        return
    watch = Heartbeats(group, timeout, stop)
    watch.start()
    try:
        yield
    finally:
        watch.stop()


class Heartbeats(threading.Thread):
    def __init__(self, group: ProcessGroup, timeout: float, stop: StopRequest):
        super().__init__(name="ftjob-heartbeats", daemon=True)
        self.host, self.port, self.rank, self.world_size = (
            group.master_addr,
            group.master_port,
            group.rank,
            group.world_size,
        )
        self.timeout, self.stop_request = timeout, stop
        self.stopped = threading.Event()
        self.store = None

    def run(self) -> None:
        watched = [r for r in range(self.world_size) if r != self.rank] if self.rank == 0 else [0]
        last_seen: dict[int, tuple[bytes | None, float]] = {r: (None, time.monotonic()) for r in watched}
        unreachable_since: float | None = None
        reached, count = False, 0
        while not self.stopped.wait(BEAT_SECONDS):
            now = time.monotonic()
            try:
                count += 1
                self._store().set(key(self.rank), str(count))
                beats = {r: self._beat(r) for r in watched}
                reached, unreachable_since = True, None
            except Exception as e:  # a store that is gone, or silent: every backend raises its own
                if not reached or self.stop_request.requested:  # not up yet: rank 0's process starts it
                    continue
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= self.timeout:
                    self._lost(f"the rendezvous store at {self.host}:{self.port} cannot be reached ({e})")
                continue
            if self.stop_request.requested:
                continue
            for rank, beat in beats.items():
                seen, since = last_seen[rank]
                if beat != seen:
                    last_seen[rank] = (beat, now)
                elif seen not in (None, DONE) and now - since >= self.timeout:
                    self._lost(f"rank {rank} has sent no heartbeat for {now - since:.0f} s")

    def _beat(self, rank: int) -> bytes | None:
        """rank's latest heartbeat; None before its first (a get would wait for it)."""
        store = self._store()
        return store.get(key(rank)) if store.check([key(rank)]) else None

    def stop(self) -> None:
        """This rank leaves the loop: it stops watching, and tells the others so that they stop watching
        it. Neither waits longer than a beat: with the store gone (a launcher that died hosted it), a
        store call waits out its timeout, and the others learn that by themselves."""
        self.stopped.set()
        self.join(timeout=BEAT_SECONDS)
        if self.store is None:
            return
        done = threading.Thread(target=self._say_done, name="ftjob-heartbeats-done", daemon=True)
        done.start()
        done.join(timeout=BEAT_SECONDS)

    def _say_done(self) -> None:
        try:
            self.store.set(key(self.rank), DONE)
        except Exception:  # every backend raises its own types
            log.debug("could not tell the other ranks that rank %d is done", self.rank)

    def _store(self):
        if self.store is None:
            from torch.distributed import TCPStore

            self.store = TCPStore(
                self.host,
                self.port,
                is_master=False,
                timeout=timedelta(seconds=self.timeout),
                wait_for_workers=False,
            )
        return self.store

    def _lost(self, why: str) -> None:
        """The main thread waits in a collective that will not return: end the process from here."""
        log.error("another process of this job is gone (%s); exit 76: rerun every node of the job, which resumes from the last committed checkpoint", why)  # fmt: skip
        logging.shutdown()
        os._exit(EXIT_PEER_LOST)
