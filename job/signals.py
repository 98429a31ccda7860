"""Stop requests from the scheduler: SIGTERM (Kubernetes eviction, preemption), SIGUSR1/SIGUSR2 (Slurm
`--signal`), SIGINT. The first one asks the loop to finish its step, publish a checkpoint and exit 75;
the grace period running out, or a second Ctrl-C (SIGINT, REPEAT_SECONDS or more after the first),
exits at once (the last committed checkpoint stays).

Exit 75 asks to be requeued, which helps only when the requeued job will not stop where this one did.
So the grace period running out exits 75 when this run has committed a checkpoint (progress to resume
from) or had not begun training (nothing new to save), and 1 when it trained but committed nothing: its
checkpoint does not fit in the grace period, and every requeue would end the same way.

Any other repeat is the same stop: scancel signals every process of the step and a launcher passes its
own copy on, Slurm follows its warning signal with SIGTERM at the time limit. Its timing says nothing:
Python runs a handler only when the main thread is back in the interpreter, so a copy that arrived
with the first runs seconds later when it came during a collective operation (a worker waiting for
the checkpoint's commit). Exiting on it would lose the checkpoint being written; the scheduler's own
SIGKILL and the grace period bound the stop anyway.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

from job.errors import EXIT_REQUEUE, JobError, Preempted

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
REPEAT_SECONDS = 2.0
LAUNCHER_CHECK_SECONDS = 0.2
LAUNCHER_PID = "FTJOB_LAUNCHER_PID"  # set by job/node_workers.py for its workers


class Committing(Protocol):
    """What a stop asks of the checkpointer (job/output/checkpoint.py): the step of the newest
    checkpoint this run committed, None before its first."""

    committed_step: int | None


class StopRequest:
    """Installed when `ftjob run` starts (a stop may come during the model download or the counting pass,
    not only in the loop); `requested` turns true at the first stop signal."""

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.signal: int | None = None
        self.received_at: float | None = None
        self.checkpoint_committed = False  # once it is, any later signal still means exit 75
        self.checkpointer: Committing | None = None  # set as training begins
        self.previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        if self.requested:  # leaving with 75: a late repeat of the stop (scheduler and launcher both
            return  # deliver it) meets this handler, not the default action that would kill the process
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def ignore_from_now(self) -> None:
        """The process's work is done: stop signals from now on are ignored (not their default action,
        which would end a finished run with 128 + the signal instead of 0, nor this handler's stop)."""
        self.previous = {s: signal.SIG_IGN for s in self.previous}
        for s in self.previous:  # installed from the main thread, which is the one calling this
            signal.signal(s, signal.SIG_IGN)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal is not None else None

    def agreed(self, accelerator) -> bool:
        """Whether any rank got a stop signal: every rank calls it at the same point (a collective
        operation), so all stop after the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor([int(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="max"))

    def training_begins(self, checkpointer: Committing) -> None:
        """From here on a stop is answered with a checkpoint: the grace period running out exits 75 only
        once `checkpointer` has committed one in this run."""
        self.checkpointer = checkpointer

    def raise_if_agreed(self, accelerator, saved: dict | None) -> None:
        """Between the phases of setup: a stop on any rank ends every rank with exit 75, nothing new saved."""
        if self.agreed(accelerator):
            kept = f"the checkpoint at step {saved['step']} stays" if saved else "nothing to resume yet"
            raise Preempted(f"stopped by a signal before training began ({kept}); exit 75 to be requeued")

    def committed_at(self, step: int) -> Preempted:
        """The exit 75 of a stop whose checkpoint at `step` is committed; later signals keep it 75."""
        self.checkpoint_committed = True
        signalled = (
            f"{self.seconds_since():.1f} s after the signal"
            if self.requested
            else "(another rank was signalled)"
        )
        return Preempted(
            f"stopped by a signal at step {step}: checkpoint committed {signalled}; exit 75 to be requeued"
        )

    def seconds_since(self) -> float:
        return time.monotonic() - self.received_at if self.received_at else 0.0

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            if signum == signal.SIGINT and self.seconds_since() >= REPEAT_SECONDS:
                log.warning("%s again: exiting now; the last committed checkpoint is kept", name)
                logging.shutdown()
                os._exit(EXIT_REQUEUE if self.checkpoint_committed else 128 + signum)
            log.warning("%s again: the same stop, already under way", name)
            return
        self.signal, self.received_at = signum, time.monotonic()
        log.warning(
            "%s: finishing this step, then a checkpoint and exit %d (at most %.0f s)",
            name,
            EXIT_REQUEUE,
            self.grace_seconds,
        )
        watchdog = threading.Timer(self.grace_seconds, self._out_of_time)
        watchdog.daemon = True
        watchdog.start()

    def grace_over(self) -> tuple[int, str]:
        """The exit code and message for the grace period running out (see the module's docstring)."""
        over = f"grace period of {self.grace_seconds:g} s (train.stop_grace_seconds) over"
        if self.checkpointer is None:
            return (
                EXIT_REQUEUE,
                f"{over} before training began: exiting, nothing new to save; exit 75 to be requeued",
            )
        step = self.checkpointer.committed_step
        if step is not None:
            return EXIT_REQUEUE, (
                f"{over}: exiting; the requeued job resumes from the checkpoint at step {step}, committed by "
                "this run; exit 75 to be requeued"
            )
        return JobError.exit_code, (
            f"{over} before the stop checkpoint was committed, and this run committed no checkpoint: exit 1, "
            "not 75, since a requeued job would end the same way, without progress. Raise "
            "train.stop_grace_seconds (and the time the scheduler gives between its signal and its kill) or "
            "lower train.checkpoint_every; the last committed checkpoint, if any, stays"
        )

    def _out_of_time(self) -> None:
        code, message = self.grace_over()
        log.error("%s", message)
        logging.shutdown()
        os._exit(code)


@contextmanager
def time_limit(seconds: float, error: Exception) -> Iterator[None]:
    """Raise `error` in the body once it has run `seconds` (SIGALRM). Only the main thread gets signals:
    in any other thread the body runs without a limit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise error

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def stop_when_orphaned(environ: Mapping[str, str]) -> None:
    """In a worker of an elastic launcher (`ftjob run --nproc-per-node`, torchrun: TORCHELASTIC_RUN_ID is
    set), a launcher that is gone (SIGKILLed, taken by the OOM killer) is a stop: SIGTERM to this process,
    so the workers checkpoint and exit together instead of running on as orphans that hold the lease.
    The launcher is ftjob's (FTJOB_LAUNCHER_PID), else the parent this worker started with; a thread
    looks for this process's parent changing every LAUNCHER_CHECK_SECONDS."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return
    given = environ.get(LAUNCHER_PID, "")
    launcher = int(given) if given.isdigit() else os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(LAUNCHER_CHECK_SECONDS)
        log.warning("the launcher (pid %d) is gone: stopping as on SIGTERM", launcher)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="ftjob-launcher-watch", daemon=True).start()
