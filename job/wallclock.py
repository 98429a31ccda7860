"""Where an attempt's wall-clock time goes (an attempt: one process's run, from its start to its stop or
its end), for the run's report (job/report.py).

Start-up counts from the process's start, as the kernel records it (/proc/self/stat: Python's start,
the imports, reading the spec, the model load and the rest of setup, up to the loop), not from the time
train() is called. The loop's phases are timed around the code that does them, but for the training
steps: their time on the device (job/step.py; on a GPU the host runs ahead of the device, and what it
waits for, where it reads a value, is the device's time, not its own). `other` is what is left
(logging, metrics, the tracker's spool, the host's waits for the device).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("startup", "data", "steps", "checkpoint", "eval", "publish", "other")
IMPORTED_AT = time.time()  # where /proc cannot say when the process started


def process_started_at() -> float:
    """This process's start as a Unix time: /proc/self/stat's start (clock ticks after boot) plus the
    boot time in /proc/stat; where those cannot be read, the time this module was imported."""
    try:
        with open("/proc/self/stat") as stat:
            # the command name (field 2) may hold spaces: the fields after it follow its ")"
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as stat:
            boot = next(int(line.split()[1]) for line in stat if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return IMPORTED_AT
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class WallClock:
    """This attempt's seconds by phase. `phase(name)` times a block; start-up ends at `loop_begins()`."""

    def __init__(self, started_at: float | None = None):
        self.started_at = process_started_at() if started_at is None else started_at
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] += time.monotonic() - began

    def loop_begins(self) -> None:
        self.seconds["startup"] = self.elapsed()

    def add(self, name: str, seconds: float) -> None:
        """Seconds measured elsewhere: the training steps' on the device (job/step.py)."""
        self.seconds[name] += seconds

    def elapsed(self) -> float:
        return max(0.0, time.time() - self.started_at)

    def split(self) -> dict[str, float]:
        """Every phase's seconds so far, `other` the rest of the elapsed time: they sum to elapsed()."""
        elapsed = self.elapsed()
        timed = {name: seconds for name, seconds in self.seconds.items() if name != "other"}
        return timed | {"other": max(0.0, elapsed - sum(timed.values()))}
