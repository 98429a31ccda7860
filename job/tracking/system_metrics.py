"""system/* metrics: CPU, memory, disk and network of the node (psutil), and its NVIDIA GPUs when
nvidia-ml-py is installed, sampled by a thread every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds
(default 10) and logged through the tracker's spool like every other metric.

The step of a sample is its time in milliseconds since the epoch: unique and increasing across the
restarts of a resumed run without asking the tracking server where the last run left off.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

import psutil

log = logging.getLogger(__name__)
PREFIX = "system/"
MB = 1 << 20


def sampling_interval(environ: Mapping[str, str] = os.environ) -> float:
    return float(environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "10"))


def host_sample(disk_path: str = "/") -> dict[str, float]:
    """One reading of the node: the names MLflow's own system metrics use."""
    memory, disk, network = psutil.virtual_memory(), psutil.disk_usage(disk_path), psutil.net_io_counters()
    return {
        "cpu_utilization_percentage": psutil.cpu_percent(),
        "system_memory_usage_megabytes": (memory.total - memory.available) / MB,
        "system_memory_usage_percentage": memory.percent,
        "disk_usage_percentage": disk.percent,
        "disk_usage_megabytes": disk.used / MB,
        "disk_available_megabytes": disk.free / MB,
        "network_receive_megabytes": network.bytes_recv / MB,
        "network_transmit_megabytes": network.bytes_sent / MB,
    }


@functools.cache
def nvml():
    """pynvml, initialized once; None without nvidia-ml-py or without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # not installed, or no driver: no GPU metrics
        return None
    return pynvml


def gpu_sample() -> dict[str, float]:
    """Per GPU utilization, memory and power; {} without nvidia-ml-py or without a GPU."""
    pynvml = nvml()
    if pynvml is None:
        return {}
    sample = {}
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        sample[f"gpu_{i}_utilization_percentage"] = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        sample[f"gpu_{i}_memory_usage_megabytes"] = memory.used / MB
        sample[f"gpu_{i}_memory_usage_percentage"] = 100 * memory.used / memory.total
        sample[f"gpu_{i}_power_usage_watts"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000
    return sample


class SystemSampler:
    """A daemon thread that hands a sample to `log(metrics, step)` every interval, and one more at stop."""

    def __init__(self, log_metrics: Callable[[dict[str, float], int], None], interval: float | None = None):
        self.log_metrics = log_metrics
        self.interval = sampling_interval() if interval is None else interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftjob-system-metrics", daemon=True)

    def start(self) -> None:
        psutil.cpu_percent()  # the first reading starts the CPU measurement interval
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self._sample()
            self._sample()
        except Exception as e:  # a sensor that fails ends the sampling, not the run
            log.warning("system metrics stopped: %s: %s", type(e).__name__, e)

    def _sample(self) -> None:
        sample = {**host_sample(), **gpu_sample()}
        self.log_metrics({PREFIX + k: float(v) for k, v in sample.items()}, int(time.time() * 1000))
