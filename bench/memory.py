"""Memory readings for the benchmarks."""

from __future__ import annotations


def proc_status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB.

    Not resource.getrusage's ru_maxrss: Linux carries that across exec, so a child started by a big
    parent reports the parent's peak.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def tree_peak_mb(pid: int) -> float:
    """The sum of VmHWM (each process's own peak RSS) over pid and its descendants, in MiB."""
    import psutil

    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration):  # gone meanwhile; a zombie has no VmHWM
            pass
    return total
