"""The data's own counts: the optimizer steps of an epoch-based run, and the data metrics (the pipeline's
counters of every rank, summed)."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from job.data.pipeline import DataPipeline, packing_efficiency
from job.errors import DataError


def epoch_run_steps(
    data: DataPipeline, accelerator: Accelerator, micro_batch_size: int, grad_accum: int
) -> int:
    """Optimizer steps of an epoch-based run, exactly: a counting pass over all its epochs (packing,
    splitting and the rank shares differ from epoch to epoch), then the busiest rank's micro-batches
    over grad_accum, as the loop takes them."""
    micro_batches, stats = data.count_micro_batches(micro_batch_size)
    count = torch.tensor(micro_batches, device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="max")
    if int(count) == 0:
        raise DataError(f"data.train: no example to train on; {data_summary(stats)}")
    return math.ceil(int(count) / grad_accum)


def data_metrics(stats: dict[str, float], max_seq_len: int, accelerator: Accelerator) -> dict[str, float]:
    """A rank's data counters (DataPipeline.stats) summed over all ranks; packing efficiency when packing."""
    names = list(stats)
    totals = accelerator.reduce(
        torch.tensor([stats[n] for n in names], dtype=torch.float64, device=accelerator.device),
        reduction="sum",
    )
    metrics = dict(zip(names, (float(t) for t in totals), strict=True))
    if "data/packed_real_tokens" in metrics:
        real, rows = metrics.pop("data/packed_real_tokens"), metrics["data/packed_rows"]
        metrics["data/packing_efficiency"] = packing_efficiency(real, rows, max_seq_len)
    return metrics


def data_summary(metrics: dict[str, float]) -> str:
    line = (
        f"data: {metrics['data/rows_read']:.0f} rows read, {metrics['data/bad_rows']:.0f} bad rows skipped, "
        f"{metrics['data/truncated']:.0f} truncated, {metrics['data/dropped']:.0f} dropped"
    )
    if "data/packing_efficiency" in metrics:
        line += f", packing efficiency {metrics['data/packing_efficiency']:.1%}"
    return line
