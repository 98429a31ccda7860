"""How ftjob's processes start, outside torch: the C allocator, torch's threads, the libraries they leave
out, the Hub kernel code they never run and the library chatter they keep out of the log."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30
ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # and as glibc's tunables:
ALLOCATOR_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def keep_freed_memory(largest_kept: int = MMAP_THRESHOLD) -> bool:
    """Have glibc keep freed memory for the next allocation instead of handing it back to the kernel.

    Every training step allocates the same large activations again. By default glibc gives them fresh
    pages (mmap, or a heap it trims after each step), which the kernel zero-fills on first touch: page
    faults in every step, which make it slower (bench/RESULTS.md). Blocks up to `largest_kept` (32 MiB)
    come from glibc's arenas, each of which keeps up to 1 GiB of freed memory at its top: the process's
    memory does not shrink between steps. For CPU runs, where activations live in this allocator. False
    where this is not glibc, or where the environment already sets either threshold (its choice stands).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in ALLOCATOR_SETTINGS) or any(
        t in tunables for t in ALLOCATOR_TUNABLES
    ):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, largest_kept) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def use_the_cpus_given() -> None:
    """As many torch threads as the CPUs this process was given (job/cluster.py: cpu_threads)."""
    import torch

    from job.cluster import cpu_threads

    threads, why = cpu_threads(os.environ, len(os.sched_getaffinity(0)), cgroup_cpu_quota())
    torch.set_num_threads(threads)
    # accelerate sets its own count (physical cores over local processes) where OMP_NUM_THREADS is unset
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    log.debug("torch threads: %d (%s)", threads, why)  # the progress line says how many


def cgroup_cpu_quota(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPUs this process's cgroup may use (quota over period; the tightest of it and its parents'),
    None when unlimited or unknown. cgroup v2: cpu.max ("400000 100000", or "max 100000") along the
    path /proc/self/cgroup names; v1: cpu.cfs_quota_us and cpu.cfs_period_us where it is mounted."""
    try:
        quotas = []
        if (root / "cgroup.controllers").is_file():  # v2
            own = next(line[3:] for line in membership.read_text().splitlines() if line.startswith("0::"))
            folder = root / own.strip().lstrip("/")
            for directory in (folder, *folder.parents):
                if (directory / "cpu.max").is_file():
                    quotas.append((directory / "cpu.max").read_text().split()[:2])
                if directory == root:
                    break
        else:
            v1 = root / "cpu"
            quotas.append([(v1 / f"cpu.cfs_{name}_us").read_text().strip() for name in ("quota", "period")])
        limits = [int(quota) / int(period) for quota, period in quotas if quota not in ("max", "-1")]
        return min(limits) if limits else None
    except (
        OSError,
        ValueError,
        ZeroDivisionError,
        StopIteration,
    ):  # no cgroup here, or not as the kernel writes it
        return None


def leave_out_bitsandbytes() -> None:
    """Keep peft, transformers and accelerate from importing bitsandbytes, for a run that quantizes nothing.

    They import it whenever it is installed, and its import costs about a second of start-up (it wraps
    its kernels in torch.compile, which imports the compiler). A module that is None in sys.modules
    cannot be imported and reads as not installed. Only before any of them is imported: they remember
    what they found.
    """
    if not {"bitsandbytes", "peft", "transformers", "accelerate"} & sys.modules.keys():
        sys.modules["bitsandbytes"] = None


def refuse_hub_kernels() -> None:
    """Keep every library from downloading and running kernel code from the Hugging Face Hub.

    transformers swaps layers of every model it loads for Hub kernels unless USE_HUB_KERNELS says no
    (on GPUs: RMSNorm, rotary embeddings, activations), and some libraries call `kernels.get_kernel`
    without asking it: bitsandbytes as it is imported (on CPUs with AVX512-BF16), transformers for
    flash attention when flash-attn is missing. ftjob runs no code from a hub (or from a cache one was
    downloaded to), whatever the environment says, so the switch is set and the `kernels` package made
    unimportable (a None module reads as not installed): each library keeps its own implementation, for
    bitsandbytes its built-in CPU kernels, as when the download fails. Called as the `job` package is
    imported, before those libraries are: transformers remembers whether it found `kernels`.
    """
    os.environ["USE_HUB_KERNELS"] = "NO"
    sys.modules["kernels"] = None
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(is_not_the_refused_kernel)


def is_not_the_refused_kernel(record: logging.LogRecord) -> bool:
    """False for bitsandbytes' warning that it could not load its Hub kernel: refused on purpose."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def quiet_libraries() -> None:
    """Keep the job's log readable: no per-load progress bars or library chatter."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning
    )
