"""What the job cost, over all its attempts: the numbers of report.json (job/output/report.py), built as
the loop trains.

An attempt is one process's run, from its start to its stop (exit 75), its crash or its end. Each
attempt adds to what the earlier ones left in report.json (read back when the run resumes from a
checkpoint; not after --restart, and not on a fresh start):

- tokens trained: the real (non-padding) tokens of every optimizer step of every attempt, so a step
  trained again after a resume counts again (the devices did that work);
- wall time: each attempt's, from its process's start (job/wallclock.py), split into start-up, data
  stalls, training steps, checkpoints on the step path, eval, publish and the rest;
- device-hours: the sum over attempts of wall seconds x processes / 3600; money when a price per
  device-hour is given (report.price_per_device_hour, else FTJOB_PRICE_PER_DEVICE_HOUR);
- preemption: a stop records its step and time with the checkpoint it starts; the next attempt that
  resumes counts a resume with the steps it trains again (the step the report last recorded minus
  the checkpoint step it resumed from: 0 after a stop whose checkpoint committed, more when the newest
  checkpoints did not commit, and, after a crash, counting only up to the last checkpoint's report,
  whose steps after it are unknown) and the seconds lost (from the recorded stop, or the last report
  of a crashed attempt, to the resumed attempt's first completed step).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import torch
from accelerate import Accelerator
from pydantic import ValidationError

from job.data.batching import Batch
from job.errors import UserError
from job.metrics import device_name, flops_per_token, mfu, peak_bytes, peak_flops
from job.output.report import (
    MAX_RESTARTS_KEPT,
    REPORT_FORMAT,
    Cost,
    Flops,
    PeakMemory,
    Phases,
    Preemption,
    Report,
    Restart,
    as_metrics,
    problem,
    read_report,
    write_report,
)
from job.spec import ReportSpec, echo
from job.tracking.tracker import Tracker
from job.wallclock import PHASES, WallClock

log = logging.getLogger(__name__)

PRICE_VARIABLE = "FTJOB_PRICE_PER_DEVICE_HOUR"
MAX_PRICE = 1e6
NO_PREEMPTION = Preemption(stops=0, resumes=0, steps_retrained=0, seconds_lost=0.0, restarts=[])


def device_hour_price(config: ReportSpec, environ: Mapping[str, str]) -> float | None:
    """report.price_per_device_hour, else FTJOB_PRICE_PER_DEVICE_HOUR, else None. A variable that is not
    a price is a UserError (exit 2), whichever is used."""
    text = environ.get(PRICE_VARIABLE, "").strip()
    price = None
    if text:
        try:
            price = float(text)
        except ValueError:
            price = math.nan
        if not 0 <= price <= MAX_PRICE:
            raise UserError(
                f"{PRICE_VARIABLE}={echo(text)}: not a price per device-hour (a number from 0 to {MAX_PRICE:g})"
            )
    return config.price_per_device_hour if config.price_per_device_hour is not None else price


def flop_count(trainable: int, total: int, peak: float | None, peak_source: str) -> Flops:
    """The FLOPs per token MFU counts (job/metrics.py: 2N forward, 2N backward, 2N' weight gradients)."""
    return Flops(
        formula="6N" if trainable == total else "4N+2N'",
        parameters=total,
        trainable_parameters=trainable,
        per_token=flops_per_token(total, trainable),
        peak_per_device=peak,
        peak_source=peak_source,
        mfu=None,
    )


def peak_source(device: str, mixed_precision: str, peak: float | None) -> str:
    if peak is not None:
        return "datasheet (dense bf16/fp16)"
    if device == "cpu":
        return "n/a: no known peak for cpu"
    return f"n/a: no known peak for {device} in {mixed_precision} (known GPUs in bf16/fp16 only)"


def cost_of(device_hours: float, price: float | None, tokens: int) -> Cost:
    """Money for the device-hours at the price (None without one), and per million tokens trained."""
    total = device_hours * price if price is not None else None
    per_million = total / tokens * 1e6 if total is not None and tokens else None
    return Cost(
        device_hours=device_hours, price_per_device_hour=price, total=total, per_million_tokens=per_million
    )


def resume_of(earlier: Report, resumed_from: int, first_step_at: float) -> Restart:
    """A resume from the checkpoint at step `resumed_from` of the attempt that wrote `earlier` (its last
    report: at its stop, or at its last checkpoint when it ended otherwise), whose first step ended at
    `first_step_at`."""
    return Restart(
        stopped_at_step=earlier.step,
        stopped_at=earlier.updated_at,
        stopped_by_signal=earlier.status == "stopped",
        resumed_from_step=resumed_from,
        steps_retrained=max(0, earlier.step - resumed_from),
        seconds_lost=max(0.0, first_step_at - earlier.updated_at),
    )


def preemption_after(before: Preemption, resume: Restart | None, stopped: bool) -> Preemption:
    """The earlier attempts' stops and resumes, with this attempt's resume and its stop."""
    restarts = before.restarts + [resume] if resume else before.restarts
    return Preemption(
        stops=before.stops + stopped,
        resumes=before.resumes + (resume is not None),
        steps_retrained=before.steps_retrained + (resume.steps_retrained if resume else 0),
        seconds_lost=before.seconds_lost + (resume.seconds_lost if resume else 0.0),
        restarts=restarts[-MAX_RESTARTS_KEPT:],
    )


def earlier_report(output_uri: str, resumed: bool) -> Report | None:
    """What earlier attempts left in report.json, when this attempt resumes their checkpoint. One that
    cannot be read or is not as ftjob writes it is left out with a warning: never the run's end."""
    if not resumed:
        return None
    try:
        return read_report(output_uri)
    except FileNotFoundError:
        log.info("no report.json in %s: the run's report starts with this attempt", output_uri)
    except ValueError as e:
        log.warning("%s/report.json is not as ftjob writes it (%s): ignored, the run's report (its preemption history) starts afresh with this attempt", output_uri, e)  # fmt: skip
    except Exception as e:  # every storage backend raises its own types
        log.warning("%s/report.json cannot be read (%s: %s): the run's report (its preemption history) starts afresh with this attempt", output_uri, type(e).__name__, e)  # fmt: skip
    return None


class RunReport:
    """This attempt's share of the job's report. Every rank counts its tokens (trained()) and takes part
    in measure() at the same steps (a collective); rank 0 alone writes report.json (save()), under
    output.uri's lease."""

    def __init__(
        self,
        output_uri: str,
        accelerator: Accelerator,
        parameters: tuple[int, int],
        total_steps: int,
        price: float | None,
        resumed_from: int | None,
        precision: str,
    ):
        """`parameters`: (trainable, total), as count_parameters gives them; `resumed_from`: the step of
        the checkpoint this attempt resumed, None for a fresh start or a restart; `precision`: what the
        step computes in (job/accelerator.py: step_precision)."""
        self.output_uri = output_uri
        self.is_main = accelerator.is_main_process
        self.processes = accelerator.num_processes
        self.device = accelerator.device
        self.device_name = device_name(accelerator)
        peak = peak_flops(accelerator, precision)
        self.flops = flop_count(*parameters, peak, peak_source(self.device_name, precision, peak))
        self.total_steps = total_steps
        self.price = price
        self.resumed_from = resumed_from
        self.earlier = earlier_report(output_uri, resumed_from is not None) if self.is_main else None
        self.clock = WallClock()
        self.tokens = 0  # this rank's, this attempt
        self.first_step_at: float | None = None
        self.measured: tuple[int, float, float | None] = (0, 0.0, None)  # all ranks' tokens; peak GiB
        self.packing_efficiency: float | None = None

    def trained(self, window: list[Batch], step: int) -> None:
        """After each optimizer step: its tokens on this rank. The first step of a resumed attempt writes
        report.json (rank 0), so that the resume counts even if the attempt ends before it checkpoints."""
        self.tokens += sum(int(batch["real_tokens"]) for batch in window)
        if self.first_step_at is None:
            self.first_step_at = time.time()
            if self.resumed_from is not None:
                self.save(step, "training")

    def measure(self, accelerator: Accelerator, history: list[dict[str, float]]) -> None:
        """Every rank at once: the tokens of all ranks, the peak memory of the busiest."""
        if self.first_step_at is None:  # a resumed run with no step left to train
            self.first_step_at = time.time()
        host_peak, device_peak = peak_bytes(self.device)
        local = torch.tensor(
            [self.tokens, host_peak, -1 if device_peak is None else device_peak],
            dtype=torch.float64,
            device=self.device,
        )
        ranks = accelerator.gather(local).view(-1, 3) if self.processes > 1 else local.view(1, 3)
        tokens, host, device = int(ranks[:, 0].sum()), float(ranks[:, 1].max()), float(ranks[:, 2].max())
        self.measured = (tokens, host / 2**30, device / 2**30 if device >= 0 else None)
        efficiencies = [h["data/packing_efficiency"] for h in history if "data/packing_efficiency" in h]
        self.packing_efficiency = efficiencies[-1] if efficiencies else None

    def checkpointed(
        self, step: int, accelerator: Accelerator, history: list[dict[str, float]], stopping: bool
    ) -> None:
        """Every rank, as a checkpoint (or a stop's) is started: measured, and written by rank 0."""
        self.measure(accelerator, history)
        self.save(step, "stopped" if stopping else "training")

    def finished(self, step: int, tracker: Tracker) -> None:
        """Rank 0, once the run is published: the final report.json, and its numbers as report/* metrics
        at the last step. Its peak memory includes rank 0's while it gathered and published."""
        tokens, host_gib, device_gib = self.measured
        host_peak, device_peak = peak_bytes(self.device)
        host_gib = max(host_gib, host_peak / 2**30)
        if device_peak is not None:
            device_gib = max(device_gib or 0.0, device_peak / 2**30)
        self.measured = (tokens, host_gib, device_gib)
        report = self.save(step, "finished")
        if report:
            tracker.log_metrics(as_metrics(report), step)

    def save(self, step: int, status: str) -> Report | None:
        """Rank 0: report.json as of now, and the report written (None where there is none). A report
        that cannot be made or written is a warning: the report is not worth a run."""
        if not self.is_main:
            return None
        try:
            report = self.record(step, status)
        except ValidationError as e:  # sums past any real run's: numbers an earlier report.json made up
            log.warning("%s/report.json's numbers do not add up with this attempt's (%s): the run's report (its preemption history) starts afresh with this attempt", self.output_uri, problem(e))  # fmt: skip
            self.earlier = None
            try:
                report = self.record(step, status)
            except ValidationError as e:
                log.warning("no report.json this time: %s", problem(e))
                return None
        try:
            write_report(self.output_uri, report)
        except Exception as e:  # every storage backend raises its own types
            log.warning("could not write %s/report.json (%s: %s); the next checkpoint tries again", self.output_uri, type(e).__name__, e)  # fmt: skip
        return report

    def record(self, step: int, status: str) -> Report:
        earlier, now = self.earlier, time.time()
        split = self.clock.split()
        attempt_seconds = sum(split.values())
        phases = {name: split[name] + (getattr(earlier.phases, name) if earlier else 0.0) for name in PHASES}
        tokens, host_gib, device_gib = self.measured
        tokens += earlier.tokens_trained if earlier else 0
        per_second = tokens / phases["steps"] if phases["steps"] > 0 else None
        peak = self.flops.peak_per_device
        utilization = (
            mfu(per_second, self.flops.per_token, peak * self.processes) if peak and per_second else None
        )
        device_hours = (
            earlier.cost.device_hours if earlier else 0.0
        ) + attempt_seconds * self.processes / 3600
        resume = resume_of(earlier, self.resumed_from, self.first_step_at or now) if earlier else None
        before = earlier.preemption if earlier else NO_PREEMPTION
        if earlier:
            host_gib = max(host_gib, earlier.peak_memory.host_gib)
            if earlier.peak_memory.device_gib is not None:
                device_gib = max(device_gib or 0.0, earlier.peak_memory.device_gib)
        return Report(
            format=REPORT_FORMAT,
            status=status,
            updated_at=now,
            device=self.device_name,
            processes=self.processes,
            attempts=(earlier.attempts if earlier else 0) + 1,
            step=step,
            total_steps=self.total_steps,
            tokens_trained=tokens,
            tokens_per_second=per_second,
            flops=self.flops.model_copy(update={"mfu": utilization}),
            wall_seconds=sum(phases.values()),
            phases=Phases(**phases),
            peak_memory=PeakMemory(host_gib=host_gib, device_gib=device_gib),
            packing_efficiency=self.packing_efficiency,
            preemption=preemption_after(before, resume, stopped=status == "stopped"),
            cost=cost_of(device_hours, self.price, tokens),
        )
