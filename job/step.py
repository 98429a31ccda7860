"""One optimizer step, and its numbers read from the device only when they are logged.

The step does not wait for the device: the tokens are counted on the CPU before the batches move, the
loss and gradient norm stay tensors on the device, and its time is marked on the device's own timeline
(on CUDA by events the device records as it gets there). HeldSteps keeps the steps trained since the
last log and reads them in one go: at train.log_every, a checkpoint, a stop and the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from job.accelerator import clip_gradients, gradient_sync
from job.data.batching import PACKED_OFFSETS, Batch, empty_batch, flatten_packed
from job.loss import device_batch, loss_positions, loss_sum, loss_tokens
from job.metrics import mfu
from job.model.packed_attention import takes_offsets
from job.spec import TrainSpec

Mark = float | torch.cuda.Event  # a point on the device's timeline (DeviceClock)


class OptimizerStep:
    """One optimizer step over up to grad_accum micro-batches (gradient accumulation).

    The loss is the mean over every loss-bearing token of the window on all ranks, so it does not
    depend on padding, packing, or how the tokens are split into micro-batches and ranks. A rank whose
    data ran out first fills its window with empty batches, so that all ranks run the same steps.
    """

    def __init__(
        self, model, optimizer, scheduler, head: torch.nn.Linear | None, cfg: TrainSpec, pad_id: int,
        accelerator: Accelerator,
    ):  # fmt: skip
        """`head`: the output layer the loss is computed through, chunk by chunk (job/loss.py)."""
        self.model, self.optimizer, self.scheduler, self.head = model, optimizer, scheduler, head
        self.cfg, self.pad_id, self.accelerator = cfg, pad_id, accelerator
        self.clock = DeviceClock(accelerator.device)

    def __call__(self, window: list[Batch]) -> dict[str, Any] | None:
        """The step's metrics, held on the device (HeldSteps reads them): the loss and gradient norm as
        tensors, the tokens/s as the step's StepTime until then; None when no rank had any micro-batch
        left."""
        model, optimizer, scheduler, accelerator = (
            self.model,
            self.optimizer,
            self.scheduler,
            self.accelerator,
        )
        began = self.clock.mark()
        window = [device_batch(batch, accelerator.device) for batch in window]  # every copy under way at once
        step_tokens, step_inputs, batches = window_counts(window, accelerator)
        if batches == 0:
            return None
        empty = device_batch(empty_batch(self.pad_id), accelerator.device)
        window += [empty] * (self.cfg.grad_accum - len(window))
        scale = accelerator.num_processes / max(step_tokens, 1)  # DDP averages gradients over ranks
        step_loss = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(window):
            with gradient_sync(model, accelerator, last=i == len(window) - 1):
                with accelerator.autocast():  # over the loss's output layer too (head)
                    loss = loss_sum(model, batch, self.head)
                accelerator.backward(loss * scale)
            step_loss += loss.detach()
        grad_norm = clip_gradients(optimizer, self.cfg.max_grad_norm, accelerator)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {
            # float64: the value float(sum) / tokens had when it was read at once
            "train/loss": accelerator.reduce(step_loss, reduction="sum").double() / max(step_tokens, 1),
            "train/learning_rate": scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm,
            "train/tokens": step_inputs,
            "train/tokens_per_second": StepTime(began, self.clock.mark()),
        }


@dataclass(frozen=True)
class HostReady:
    """What the step needs done to a micro-batch on the host, which the data thread does ahead
    (job/data/prefetch.py); device_batch then only copies."""

    flatten: bool  # packed rows into one row, for flash attention (flatten_packed)
    offsets: bool  # keep packed rows' example offsets (PACKED_OFFSETS): the model's attention takes them
    pin: bool  # into pinned memory (CUDA), from which the step's copies do not make the host wait

    @classmethod
    def of(cls, model, flatten: bool, device: torch.device) -> HostReady:
        """For `model` as prepare_model made it (`flatten`: its packed_rows_flattened); the offsets where
        its attention takes them (takes_offsets: flash on flattened rows, or ftjob's packed attention)."""
        return cls(flatten, offsets=flatten or takes_offsets(model), pin=device.type == "cuda")

    def __call__(self, batch: Batch) -> Batch:
        if self.flatten:
            batch = flatten_packed(batch)
        if not self.offsets:
            batch = {key: value for key, value in batch.items() if key not in PACKED_OFFSETS}
        batch = {**batch, "loss_positions": loss_positions(batch)}
        return {key: value.pin_memory() for key, value in batch.items()} if self.pin else batch


def window_counts(window: list[Batch], accelerator: Accelerator) -> tuple[int, int, int]:
    """The window's loss-bearing tokens, real tokens and micro-batches, counted on the CPU (device_batch);
    with several ranks, summed over them: the step's one read of the device, since whether any rank
    has a micro-batch left decides whether the step runs."""
    counts = [sum(loss_tokens(b) for b in window), sum(int(b["real_tokens"]) for b in window), len(window)]
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(torch.tensor(counts, device=accelerator.device), reduction="sum").tolist()
    return tuple(counts)


class DeviceClock:
    """Points on the device's timeline: on CUDA, events the device records when its work gets there (the
    host does not wait); elsewhere the host's clock, since the work is done when the host is."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Mark:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


@dataclass
class StepTime:
    """A step's time on the device, known once the device has run it."""

    began: Mark
    ended: Mark

    def seconds(self) -> float:
        if isinstance(self.began, float):
            return self.ended - self.began
        self.ended.synchronize()  # the held steps' tensors were read: the device is past it already
        return self.began.elapsed_time(self.ended) / 1000


class HeldSteps:
    """The steps trained since the last log, whose metrics the device still holds (tensors, and their
    StepTime); read() reads them in one go, with each step's tokens/s and, where the peak is known, MFU."""

    def __init__(self, flops_per_token: float, peak_flops: float | None):
        """`peak_flops`: of all the job's devices together; None where MFU means nothing."""
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.entries: list[dict[str, Any]] = []

    def add(self, entry: dict[str, Any]) -> None:
        """A step's history entry, whose values read() turns into numbers in place."""
        self.entries.append(entry)

    def read(self) -> tuple[list[dict[str, Any]], float]:
        """The held steps' entries, every value now a number, and the seconds the device took for them;
        none held afterwards."""
        held, self.entries = self.entries, []
        tensors = [
            (entry, key) for entry in held for key, value in entry.items() if isinstance(value, torch.Tensor)
        ]
        if tensors:
            values = torch.stack([entry[key].double() for entry, key in tensors]).tolist()  # the one read
            for (entry, key), value in zip(tensors, values, strict=True):
                entry[key] = value
        total = 0.0
        for entry in held:
            seconds = entry["train/tokens_per_second"].seconds()
            entry["train/tokens_per_second"] = per_second = entry["train/tokens"] / max(seconds, 1e-9)
            if self.peak_flops:
                entry["train/mfu"] = mfu(per_second, self.flops_per_token, self.peak_flops)
            total += seconds
        return held, total
