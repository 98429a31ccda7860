"""The training recipe, read top to bottom: setup, the loop, publish.

setup() checks everything that can fail because of the user's input (model, data files, output
location) before the model is loaded and before anything is written under output.uri, then builds
what the loop needs. The loop trains, evaluates and checkpoints. Publishing runs on rank 0 alone,
after the last collective operation.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from job.accelerator import fsdp_compute_dtype, step_precision, trained, wrap_for_ranks
from job.cluster import restart_id
from job.data.counting import data_metrics, data_summary, epoch_run_steps
from job.data.pipeline import DataPipeline
from job.data.plan import shared_plan
from job.data.prefetch import Feed
from job.evaluation import Evaluator
from job.loss import output_head
from job.metrics import device_name, flops_per_token, peak_flops, peak_memory_gib
from job.model.adapter import count_parameters
from job.model.loading import model_dir_and_tokenizer
from job.model.prepare import prepare_model
from job.model.sharding import resharded
from job.output.checkpoint import Cadence, fingerprint, resume_copies_removed, saved_total_steps
from job.output.curve import remove_segments, write_curve
from job.output.lease import Lease
from job.output.publish import publish, publish_merged
from job.output.takeover import Takeover, merge_published, restart_decision
from job.progress import Progress
from job.report import RunReport, device_hour_price
from job.schedule import make_optimizer, make_scheduler
from job.signals import StopRequest
from job.spec import Spec
from job.startup import quiet_libraries
from job.step import HeldSteps, HostReady, OptimizerStep
from job.storage import absolute, configure_storage
from job.tracking.tracker import Tracker, run_record

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Any  # the trained model, unwrapped from accelerate (a peft model for lora/dora)
    tokenizer: Any
    adapter_uri: str  # "" on ranks other than 0
    history: list[dict[str, float]]
    run_id: str | None = None


@dataclass
class Run:
    """What setup() makes for the loop."""

    spec: Spec
    model_dir: Path
    tokenizer: Any
    data: DataPipeline
    model: Any  # prepared by accelerate
    optimizer: Any
    scheduler: Any
    takeover: Takeover  # output.uri's lease (held by rank 0) and checkpointer
    tracker: Tracker
    total_steps: int
    first_step: int
    history: list[dict[str, float]]
    optimizer_step: OptimizerStep
    held: HeldSteps  # the steps whose metrics are still on the device, until they are logged
    progress: Progress
    evaluator: Evaluator
    host_ready: HostReady  # what the data thread does to each micro-batch for the step
    precision: str  # what the step computes in: "bf16", "fp16" or "no" (step_precision)
    report: RunReport  # what the job cost: report.json, with the attempt's wall clock


def train(
    spec: Spec, accelerator: Accelerator, restart: bool = False, stop: StopRequest | None = None
) -> TrainResult | None:
    """Train and publish; None when the run had already finished (its adapter is published).

    `stop` is the stop handling that `ftjob run` installs as it starts; without one, train installs
    its own for its whole length (a stop during the model download is a stop too)."""
    if stop is None:
        with StopRequest(spec.train.stop_grace_seconds) as own:
            return train(spec, accelerator, restart, own)
    quiet_libraries()
    spec = spec.for_device(accelerator.device.type)  # the device's defaults, where the spec sets none
    configure_storage(spec.storage_options)
    set_seed(spec.train.seed)
    job = restart_id(os.environ)
    restart, published = restart_decision(spec.output_uri, restart, job)
    lease = Lease(spec.output_uri, spec.train.lease_seconds, spec.train.collective_timeout_seconds, job)
    if published:
        if accelerator.is_main_process and spec.output.merge:
            merge_published(spec.output_uri, lease, spec.model, stop)
        log.info("%s is already published: nothing to do (ftjob run --restart trains again)", spec.output_uri)
        return None

    tags = {
        "world_size": str(accelerator.num_processes),
        "adapter.method": spec.adapter.method,
        "device": device_name(accelerator),
    }
    # The lease is released however train() ends, so that the next job (a requeued one) takes over at
    # once; but only once the checkpoint upload in flight has ended (the checkpointer's block).
    with Takeover(
        spec.output_uri, lease, spec.output.keep_checkpoints, accelerator, restart, job
    ) as takeover:
        with resume_copies_removed():  # a stop or an error in setup leaves no checkpoint copy on disk
            run = setup(spec, accelerator, stop, takeover)
        with takeover.checkpointer, run.tracker.run(tags):
            history = train_loop(run, accelerator, stop)
            with run.report.clock.phase("publish"):  # under fsdp a collective: every rank
                model, weights = trained(run.model, accelerator)
            if not accelerator.is_main_process:
                return TrainResult(model, run.tokenizer, "", history)
            # Rank 0 alone from here, after the last collective: a slow upload or merge cannot run into
            # the process group's timeout, the other ranks are done.
            with run.report.clock.phase("checkpoint"):
                takeover.checkpointer.wait()
            with run.report.clock.phase("publish"):
                takeover.lease.check()  # a job that lost output.uri to another publishes nothing there
                adapter_uri = publish_adapter(run, model, history, weights)
                run.progress.message(f"adapter published to {adapter_uri}")
                if spec.output.merge:
                    merged_uri = publish_merged(spec.output_uri, spec.model, run.model_dir)
                    run.progress.message(f"merged model published to {merged_uri}")
            run.report.finished(history[-1]["step"], run.tracker)
            run.progress.message(f"what it cost: ftjob report {spec.output_uri}")
        if run.tracker.run_id:  # ended and delivered: the run exists unless MLflow was unreachable
            run.progress.message(f"MLflow run {run.tracker.run_id} in {run.tracker.uri}")
    return TrainResult(model, run.tokenizer, adapter_uri, history, run.tracker.run_id)


# ---------------------------------------------------------------------------------------------
# 1. Setup


def setup(spec: Spec, accelerator: Accelerator, stop: StopRequest, takeover: Takeover) -> Run:
    """The components the loop needs, built in the order job/output/takeover.py explains."""
    cfg, is_main = spec.train, accelerator.is_main_process
    price = device_hour_price(spec.report, os.environ)  # a bad FTJOB_PRICE_PER_DEVICE_HOUR: exit 2 now
    model_dir, tokenizer = model_dir_and_tokenizer(spec.model, spec.data.chat_template)
    plan = shared_plan(spec.data, accelerator)  # rank 0 resolves the files; every rank follows it
    rank, world = accelerator.process_index, accelerator.num_processes
    own_tokenizer = copy.deepcopy(tokenizer)  # the data thread's (job/data/prefetch.py)
    data = DataPipeline(spec.data, own_tokenizer, cfg.seed, cfg.epochs, rank, world, plan)
    takeover.claim(stop)
    compute_dtype = fsdp_compute_dtype(cfg)
    model, flatten = prepare_model(model_dir, spec, accelerator, compute_dtype)
    head = output_head(model)
    host_ready = HostReady.of(model, flatten, accelerator.device)
    takeover.settle(fingerprint(spec, world))
    takeover.resume_data(data)
    takeover.stop_if_agreed(stop)
    total_steps = (
        cfg.max_steps
        or saved_total_steps(takeover.saved)
        or epoch_run_steps(data, accelerator, cfg.micro_batch_size, cfg.grad_accum)
    )
    takeover.stop_if_agreed(stop)
    takeover.clear_if_restart()
    trainable, total = count_parameters(model)
    optimizer = make_optimizer(resharded(model), cfg, accelerator.device.type)
    scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.warmup_steps, total_steps)
    model, optimizer = wrap_for_ranks(model, optimizer, accelerator)
    first_step, history = takeover.restore(model, optimizer, scheduler)
    record = run_record(spec, data.plan) if is_main and spec.tracking.enabled else None
    tracker = Tracker(spec.tracking, record, resume_run_id=takeover.run_id)
    evaluator = Evaluator(spec, data, tokenizer, head, tracker, accelerator)
    progress = Progress(total_steps, cfg.log_every, enabled=is_main, first_step=first_step)
    step = OptimizerStep(model, optimizer, scheduler, head, cfg, tokenizer.pad_token_id, accelerator)
    precision = step_precision(accelerator, compute_dtype)
    peak = peak_flops(accelerator, precision)
    held = HeldSteps(flops_per_token(total, trainable), peak * world if peak else None)
    resumed_from = first_step - 1 if takeover.saved else None
    report = RunReport(
        spec.output_uri, accelerator, (trainable, total), total_steps, price, resumed_from, precision
    )
    return Run(
        spec, model_dir, tokenizer, data, model, optimizer, scheduler, takeover, tracker, total_steps,
        first_step, history, step, held, progress, evaluator, host_ready, precision, report,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 2. The loop


def train_loop(run: Run, accelerator: Accelerator, stop: StopRequest) -> list[dict[str, float]]:
    """Train (train_steps), then the end of run: the final data counters and eval. Returns the metric
    history, the end of run included."""
    spec, cfg, history, progress = run.spec, run.spec.train, run.history, run.progress
    progress.message(
        f"training {spec.name}: {run.total_steps} steps, micro batch {cfg.micro_batch_size} x grad_accum "
        f"{cfg.grad_accum} x {accelerator.num_processes} process(es), {accelerator.device} "
        f"({torch.get_num_threads()} threads), mixed precision {run.precision}"
    )
    run.model.train()
    stop.training_begins(run.takeover.checkpointer)
    run.report.clock.loop_begins()
    with Feed(run.data, cfg.micro_batch_size, cfg.grad_accum, run.host_ready, spec.data.prefetch) as feed:
        train_steps(run, feed, accelerator, stop)
    log_held_steps(run)
    progress.close()
    feed.consumed.budget.check()  # a run that ends before the data does still answers for its bad rows
    final = data_metrics(feed.consumed.stats, spec.data.max_seq_len, accelerator)
    with run.report.clock.phase("eval"):
        final |= run.evaluator.at_end(run.model, history[-1], stop)
    history[-1].update(final)
    run.tracker.log_metrics(final, history[-1]["step"])
    progress.message(data_summary(final))
    run.report.measure(accelerator, history)
    return history


def train_steps(run: Run, feed: Feed, accelerator: Accelerator, stop: StopRequest) -> None:
    """Optimizer steps of grad_accum micro-batches until max_steps, or until the data of train.epochs has
    ended on every rank; checkpoints as train.checkpoint_every says, and at a stop, which then raises."""
    spec, cfg, history = run.spec, run.spec.train, run.history
    cadence, clock = Cadence(cfg.checkpoint_every), run.report.clock
    for step in itertools.count(run.first_step):
        if cfg.max_steps and step > cfg.max_steps:
            break
        with clock.phase("data"):
            window = feed.next_window()
        metrics = run.optimizer_step(window)  # its time: the device's, when log_held_steps reads it
        if metrics is None:
            break
        data = feed.consumed  # the data as it stands after this step's micro-batches
        run.report.trained(window, step)
        metrics["train/epoch"] = data.epoch
        if step % cfg.log_every == 0:
            metrics.update(data_metrics(data.stats, spec.data.max_seq_len, accelerator))
            metrics["train/peak_memory_gib"] = peak_memory_gib(accelerator)
        checkpointing = cadence.due(step, data.epochs_ended, accelerator)
        with clock.phase("eval"):
            metrics.update(run.evaluator.at_step(run.model, step, checkpointing, stop))
        history.append({"step": step, **metrics})
        run.held.add(history[-1])
        stopping = stop.agreed(accelerator)
        first_or_last = step in (run.first_step, run.total_steps)  # the first at once: a sign it trains
        if stopping or checkpointing or first_or_last or step % cfg.log_every == 0:
            log_held_steps(run)
        if stopping or checkpointing:
            state = {
                "run_id": run.tracker.resume_id,
                "fingerprint": fingerprint(spec, accelerator.num_processes),
                "total_steps": run.total_steps,
            }
            with clock.phase("checkpoint"):
                run.takeover.checkpointer.save(
                    step, run.model, run.optimizer, run.scheduler, accelerator, data.state_dict(), state, history
                )  # fmt: skip
            run.report.checkpointed(step, accelerator, history, stopping)  # a stop's: its step and time
        if stopping:
            raise run.takeover.stop_for_requeue(stop, step)


def log_held_steps(run: Run) -> None:
    """The steps held on the device since the last log, read in one go with their time on the device,
    then logged to the tracker and the progress."""
    held, seconds = run.held.read()
    run.report.clock.add("steps", seconds)
    for entry in held:
        metrics = {key: value for key, value in entry.items() if key != "step"}
        run.tracker.log_metrics(metrics, entry["step"])
        run.progress.update(entry["step"], metrics)


# ---------------------------------------------------------------------------------------------
# 3. Publish (rank 0)


def publish_adapter(
    run: Run, model, history: list[dict[str, float]], weights: dict | tempfile.TemporaryDirectory | None
) -> str:
    """adapter/, written once: into the tracker's artifact folder when MLflow is on, so that MLflow
    logs those same files; for a full fine-tune MLflow gets only the URI (no second copy of a model)."""
    full = run.spec.adapter.method == "full"
    with tempfile.TemporaryDirectory(prefix="ftjob-publish-") as tmp:
        logged = None if full else run.tracker.artifact_dir("adapter")
        metrics = {"history": history, "final": history[-1]}
        write_curve(run.spec.output_uri, history)
        uri = publish(model, run.tokenizer, run.spec, metrics, logged or Path(tmp), weights)
        remove_segments(run.spec.output_uri)  # only now: a publish that failed resumes from them
        run.tracker.log_adapter(logged, absolute(uri))
    return uri
