"""Memory readings for the benchmarks."""

from __future__ import annotations


def proc_status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB.

    Not resource.getrusage's ru_maxrss: Linux carries that across exec, so a child started by a big
    parent reports the parent's peak.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024
