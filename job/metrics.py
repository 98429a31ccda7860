"""What the loop reports besides its loss and the data's counts (job/data/counting.py): FLOPs and MFU,
peak memory."""

from __future__ import annotations

import re
import resource

import torch
from accelerate import Accelerator

# Dense bf16/fp16 tensor-core peak of one GPU in FLOP/s (NVIDIA datasheets): (model, variant, peak).
GPU_PEAK_FLOPS = [
    ("H200", "NVL", 835e12),
    ("H200", None, 989e12),
    ("H100", "PCIe", 756e12),
    ("H100", "NVL", 835e12),
    ("H100", None, 989e12),
    ("A100", None, 312e12),
    ("L40S", None, 362e12),
    ("L4", None, 121e12),
    ("A10", None, 125e12),
    ("V100", None, 125e12),
    ("T4", None, 65e12),
]


def gpu_peak_flops(device_name: str) -> float | None:
    """'NVIDIA H100 80GB HBM3' -> 989e12; None for a GPU not in GPU_PEAK_FLOPS."""
    words = set(re.split(r"[\s-]+", device_name))
    for model, variant, flops in GPU_PEAK_FLOPS:
        if model in words and (variant is None or variant in words):
            return flops
    return None


def device_name(accelerator: Accelerator) -> str:
    return torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else "cpu"


def peak_flops(accelerator: Accelerator, precision: str) -> float | None:
    """The device's peak FLOP/s for 16-bit mixed precision (`precision`: accelerator.py's step_precision);
    None on CPUs, in float32 and for unknown GPUs."""
    if accelerator.device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(accelerator.device))


def flops_per_token(total_params: int, trainable_params: int) -> float:
    """Model FLOPs per trained token: 2N forward, 2N backward through all N weights, and 2N' for the
    gradients of the N' trainable ones (6N for a full fine-tune). Attention's sequence-length term is
    left out, so MFU reads a little low for long sequences."""
    return 2.0 * (2 * total_params + trainable_params)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: FLOPs achieved over the peak of every device together (`peak_flops`)."""
    return tokens_per_second * flops_per_token / peak_flops


def peak_memory_gib(accelerator: Accelerator) -> float:
    """Peak memory of the busiest rank: allocated GPU memory, or on CPUs the process's peak RSS."""
    host, device = peak_bytes(accelerator.device)
    peak = torch.tensor(float(host if device is None else device), device=accelerator.device)
    if accelerator.num_processes > 1:
        peak = accelerator.reduce(peak, reduction="max")
    return float(peak) / 2**30


def peak_bytes(device: torch.device) -> tuple[int, int | None]:
    """This process's peaks: host memory (peak_rss_bytes), and on CUDA what torch allocated on the device
    (None elsewhere)."""
    return peak_rss_bytes(), torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program (VmHWM). Not ru_maxrss: Linux
    carries that across exec, so a worker that torchrun started would report its launcher's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux without /proc: KiB
