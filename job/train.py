"""The training recipe, top to bottom: spec -> checks -> model + adapter -> loop -> published adapter.

Everything that can fail because of the user's input (model path, data files, output location) is
checked before the model is loaded and before anything is written under output.uri.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch.optim.lr_scheduler import LambdaLR

from job.checkpoint import Checkpointer, fingerprint, remove_all, remove_uncommitted, set_rng_state
from job.data.batching import Batch, empty_batch, flatten_packed
from job.data.pipeline import DataPipeline
from job.data.tokens import IGNORE_INDEX
from job.errors import DataError, Preempted
from job.export import (
    is_published,
    publish,
    publish_merged,
    remove_published,
    save_trained,
    write_manifest,
    write_run_files,
)
from job.model import apply_adapter, count_parameters, load_model, load_tokenizer, quiet_libraries
from job.model_source import resolve_model_dir
from job.progress import Progress
from job.restart import record_restart, restart_pending
from job.signals import StopRequest
from job.spec import Spec
from job.storage import check_writable, filesystem, is_local
from job.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Any  # the trained model, unwrapped from accelerate (a peft model for lora/dora)
    tokenizer: Any
    adapter_uri: str
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None


def cpu_supports_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_mixed_precision(requested: str, cuda: bool) -> str:
    """auto: bf16 on GPUs that have it, else fp16 on GPUs, none on CPUs. Unsupported choices fall back."""
    if requested == "auto":
        if not cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "bf16" and not (torch.cuda.is_bf16_supported() if cuda else cpu_supports_bf16()):
        log.warning(
            "train.mixed_precision bf16: this %s has no bf16 support; training in float32",
            "GPU" if cuda else "CPU",
        )
        return "no"
    if requested == "fp16" and not cuda:
        log.warning("train.mixed_precision fp16 needs a GPU; training in float32 on the CPU")
        return "no"
    return requested


def lr_factor(step: int, name: str, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then constant, linear decay to 0, or cosine decay to 0 (held at 0 past the end)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "linear":
        return 1.0 - progress
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    return LambdaLR(
        optimizer, partial(lr_factor, name=name, warmup_steps=warmup_steps, total_steps=total_steps)
    )


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the tokens that carry loss (labels != -100)."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),  # padded batches
        position_ids=batch.get("position_ids"),  # packed rows: positions restart at each example
        use_cache=False,  # no KV cache in training; with one, transformers ignores packed positions
    ).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(model, batches: list[dict[str, torch.Tensor]], accelerator: Accelerator) -> float | None:
    """Token-weighted mean loss over the eval split of every rank; None when it has no loss-bearing
    token at all (a small data.eval_fraction can leave it empty).

    Every rank calls it, with or without eval rows of its own (the reduce needs all). The unwrapped
    model: DDP's forward would sync buffers per batch, and ranks may have different batch counts.
    """
    model = accelerator.unwrap_model(model)
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        total += torch.tensor([loss_sum(model, batch).item(), loss_tokens(batch)], device=accelerator.device)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] else None


def train(spec: Spec, restart: bool = False, stop: StopRequest | None = None) -> TrainResult | None:
    """Train and publish; None when the run had already finished (its adapter is published).

    `stop` is the stop handling that `ftjob run` installs as it starts; without one, train installs
    its own for its whole length (a stop during the model download is a stop too)."""
    if stop is None:
        with StopRequest(spec.train.stop_grace_seconds) as own:
            return train(spec, restart, own)
    quiet_libraries()
    cuda = torch.cuda.is_available()
    cfg = spec.train
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cuda),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_seconds))],
    )
    is_main = accelerator.is_main_process
    set_seed(cfg.seed)

    # 1. Checks that need no model: inputs exist, output is writable. Nothing is written before this.
    restart = restart and restart_pending(spec)  # once per scheduler job: a requeued restart resumes
    if not restart and is_published(spec):
        if is_main and spec.output.merge and not is_published(spec, "merged"):
            model_dir = resolve_model_dir(spec.model.source, spec.model.revision, spec.storage_options)
            log.info("merged model published to %s", publish_merged(spec, model_dir))
        log.info("%s is already published: nothing to do (ftjob run --restart trains again)", spec.output_uri)
        return None
    model_dir = resolve_model_dir(spec.model.source, spec.model.revision, spec.storage_options)
    tokenizer = load_tokenizer(model_dir, spec.model, spec.data.chat_template)
    data = DataPipeline(spec, tokenizer, accelerator.process_index, accelerator.num_processes)
    if is_main:
        check_writable(spec.output_uri, spec.storage_options)
        if not restart:
            remove_uncommitted(spec)
    accelerator.wait_for_everyone()
    checkpointer = Checkpointer(
        spec, accelerator.process_index, accelerator.num_processes, spec.output.keep_checkpoints
    )
    saved = None if restart else checkpointer.load_latest()
    total_steps = cfg.max_steps or epoch_run_steps(data, accelerator, cfg.micro_batch_size, cfg.grad_accum)

    # 2. Model and adapter.
    full = spec.adapter.method == "full"
    model = load_model(model_dir, spec.model, accelerator.device, full_finetune=full)
    model = apply_adapter(model, spec.adapter, bool(spec.model.quantization), cfg.gradient_checkpointing)
    if restart:  # only now that the model and adapter load is anything deleted
        if is_main:
            remove_published(spec)
            remove_all(spec)
            record_restart(spec)
        accelerator.wait_for_everyone()
    if stop_agreed(stop, accelerator):
        kept = f"the checkpoint at step {saved['step']} stays" if saved else "nothing to resume yet"
        raise Preempted(f"stopped by a signal before training began ({kept}); exit 75 to be requeued")
    trainable, total = count_parameters(model)
    log.info(
        "model %s: %d of %d parameters trainable (%.2f%%)",
        spec.model.source,
        trainable,
        total,
        100 * trainable / total,
    )

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        fused=accelerator.device.type in ("cuda", "cpu"),
    )
    scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.warmup_steps, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    first_step, history = 1, []
    if saved:  # continue exactly where the checkpoint left off: weights, optimizer, data, RNG
        rank_state = checkpointer.restore(saved, model, optimizer, scheduler, accelerator)
        data.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        first_step, history = saved["step"] + 1, saved["history"]
        log.info("resuming from the checkpoint at step %d", saved["step"])

    tracker = Tracker(spec, active=is_main, resume_run_id=saved.get("run_id") if saved else None)
    model_flops, device_flops = flops_per_token(total, trainable), peak_flops(accelerator)
    flat_packing = spec.data.packing and spec.model.attn_implementation.startswith("flash")
    progress = Progress(total_steps, cfg.log_every, enabled=is_main, first_step=first_step)
    progress.message(
        f"training {spec.name}: {total_steps} steps, micro batch {cfg.micro_batch_size} x grad_accum "
        f"{cfg.grad_accum} x {accelerator.num_processes} process(es), {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}"
    )
    tags = {
        "world_size": str(accelerator.num_processes),
        "adapter.method": spec.adapter.method,
        "device": torch.cuda.get_device_name(accelerator.device) if cuda else "cpu",
    }
    with tracker.run(tags):
        # 3. The loop: each optimizer step consumes grad_accum micro-batches. With train.epochs the data
        # ends after the last epoch; the loop ends when it has ended on every rank.
        train_batches = data.train_batches(cfg.micro_batch_size)
        has_eval = bool(data.eval_files)  # the same on every rank, unlike a rank's own share of eval rows
        eval_batches = data.eval_batches(cfg.micro_batch_size) if has_eval else []
        model.train()
        for step in itertools.count(first_step):
            if cfg.max_steps and step > cfg.max_steps:
                break
            window = list(itertools.islice(train_batches, cfg.grad_accum))
            if flat_packing:
                window = [flatten_packed(batch) for batch in window]
            metrics = optimizer_step(
                model, optimizer, scheduler, window, accelerator, cfg, tokenizer.pad_token_id
            )
            if metrics is None:
                break
            metrics["train/epoch"] = data.epoch
            if device_flops:
                achieved = metrics["train/tokens_per_second"] * model_flops
                metrics["train/mfu"] = achieved / (device_flops * accelerator.num_processes)
            if step % cfg.log_every == 0:
                metrics.update(data_metrics(data, accelerator))
                metrics["train/peak_memory_gib"] = peak_memory_gib(accelerator)
            if has_eval and cfg.eval_every and step % cfg.eval_every == 0:
                scores = eval_metrics(model, eval_batches, accelerator)
                has_eval = bool(scores)  # an eval split with nothing to score stays so (warned once)
                metrics.update(scores)
            history.append({"step": step, **metrics})
            tracker.log_metrics(metrics, step)
            progress.update(step, metrics)
            stopping = stop_agreed(stop, accelerator)
            if stopping or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                run = {
                    "history": history,
                    "run_id": tracker.resume_id,
                    "fingerprint": fingerprint(spec, accelerator.num_processes),
                }
                checkpointer.save(step, model, optimizer, scheduler, accelerator, data.state_dict(), run)
            if stopping:
                checkpointer.wait_committed(accelerator)  # every rank: exit 75 only once it is committed
                raise Preempted(
                    f"stopped by a signal at step {step}: checkpoint committed {stop.seconds_since():.1f} s after the signal; exit 75 to be requeued"
                )
        progress.close()
        data.budget.check()  # a run that ends before the data does still answers for its bad rows
        final = {**data_metrics(data, accelerator)}
        if has_eval and "eval/loss" not in history[-1]:
            final.update(eval_metrics(model, eval_batches, accelerator))
        history[-1].update(final)
        tracker.log_metrics(final, history[-1]["step"])
        progress.message(data_summary(final))
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        if not is_main:
            return TrainResult(unwrapped, tokenizer, "", history, None)

        # 4. Publish, on rank 0 alone and outside any collective: the other ranks are done, so a slow
        # upload or merge cannot run into the process group's timeout.
        checkpointer.wait()
        run_metrics = {"history": history, "final": history[-1]}
        adapter_uri = publish(unwrapped, tokenizer, spec, run_metrics)
        progress.message(f"adapter published to {adapter_uri}")
        log_adapter(tracker, adapter_uri, unwrapped, tokenizer, spec, run_metrics)
        if spec.output.merge:
            progress.message(f"merged model published to {publish_merged(spec, model_dir)}")
        if tracker.run_id:
            progress.message(f"MLflow run {tracker.run_id} in {tracker.uri}")
    return TrainResult(unwrapped, tokenizer, adapter_uri, history, tracker.run_id)


def log_adapter(tracker: Tracker, adapter_uri: str, model, tokenizer, spec: Spec, metrics: dict) -> None:
    """The published adapter as MLflow artifacts: the local directory itself or, when it went to an
    object store, a local copy written the same way (nothing is downloaded)."""
    if is_local(adapter_uri):
        tracker.log_adapter(Path(filesystem(adapter_uri)[1]))
        return
    directory = tracker.artifact_dir("adapter")
    if directory is not None:
        save_trained(model, tokenizer, directory)
        write_run_files(directory, spec, metrics)
        write_manifest(directory)
        tracker.log_adapter(directory)


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


def peak_flops(accelerator: Accelerator) -> float | None:
    """The device's peak FLOP/s for 16-bit mixed precision; None on CPUs, in float32 and for unknown GPUs."""
    if accelerator.device.type != "cuda" or accelerator.mixed_precision not in ("bf16", "fp16"):
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(accelerator.device))


def flops_per_token(total_params: int, trainable_params: int) -> float:
    """Model FLOPs per trained token: 2N forward, 2N backward through all N weights, and 2N' for the
    gradients of the N' trainable ones (6N for a full fine-tune). Attention's sequence-length term is
    left out, so MFU reads a little low for long sequences."""
    return 2.0 * (2 * total_params + trainable_params)


def peak_memory_gib(accelerator: Accelerator) -> float:
    """Peak memory of the busiest rank: allocated GPU memory, or on CPUs the process's peak RSS."""
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(accelerator.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    peak = torch.tensor(float(peak), device=accelerator.device)
    if accelerator.num_processes > 1:
        peak = accelerator.reduce(peak, reduction="max")
    return float(peak) / 2**30


def stop_agreed(stop: StopRequest, accelerator: Accelerator) -> bool:
    """Whether any rank got a stop signal: all ranks stop after the same step."""
    flag = torch.tensor([int(stop.requested)], device=accelerator.device)
    return (
        bool(accelerator.reduce(flag, reduction="max")) if accelerator.num_processes > 1 else stop.requested
    )


def optimizer_step(
    model, optimizer, scheduler, window: list[Batch], accelerator: Accelerator, cfg, pad_token_id: int
) -> dict[str, float] | None:
    """One optimizer step over up to grad_accum micro-batches (gradient accumulation); None when no
    rank had any micro-batch left.

    The loss is the mean over every loss-bearing token of the window on all ranks, so it does not
    depend on padding, packing, or how the tokens are split into micro-batches and ranks. A rank whose
    data ran out first fills its window with empty batches, so that all ranks run the same steps.
    """
    started = time.perf_counter()
    counts = torch.tensor(
        [sum(loss_tokens(b) for b in window), sum(int(b["real_tokens"]) for b in window), len(window)],
        device=accelerator.device,
    )
    step_tokens, step_inputs, batches = (int(x) for x in accelerator.reduce(counts, reduction="sum"))
    if batches == 0:
        return None
    window = window + [empty_batch(pad_token_id)] * (cfg.grad_accum - len(window))
    scale = accelerator.num_processes / max(step_tokens, 1)  # DDP averages gradients over ranks
    step_loss = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(window):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = i == len(window) - 1
        with nullcontext() if last else accelerator.no_sync(model):  # gradients sync once per step
            loss = loss_sum(model, batch)
            accelerator.backward(loss * scale)
        step_loss += loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "train/loss": float(accelerator.reduce(step_loss, reduction="sum")) / max(step_tokens, 1),
        "train/learning_rate": scheduler.get_last_lr()[0],
        "train/grad_norm": float(grad_norm),
        "train/tokens_per_second": step_inputs / (time.perf_counter() - started),
    }


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


def eval_metrics(model, batches: list[Batch], accelerator: Accelerator) -> dict[str, float]:
    """eval/loss and eval/perplexity; none when the eval split has no loss-bearing token on any rank."""
    loss = evaluate(model, batches, accelerator)
    if loss is None:
        log.warning("the eval split has no token to score: no eval metric is logged")
        return {}
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50))}


def data_metrics(data: DataPipeline, accelerator: Accelerator) -> dict[str, float]:
    """The data counters of all ranks, summed; packing efficiency when packing."""
    names = list(data.stats())
    totals = accelerator.reduce(
        torch.tensor([data.stats()[n] for n in names], dtype=torch.float64, device=accelerator.device),
        reduction="sum",
    )
    metrics = dict(zip(names, (float(t) for t in totals), strict=True))
    if data.packer:
        real, rows = metrics.pop("data/packed_real_tokens"), metrics["data/packed_rows"]
        metrics["data/packing_efficiency"] = real / (rows * data.data.max_seq_len) if rows else 0.0
    return metrics


def data_summary(metrics: dict[str, float]) -> str:
    line = (
        f"data: {metrics['data/rows_read']:.0f} rows read, {metrics['data/bad_rows']:.0f} bad rows skipped, "
        f"{metrics['data/truncated']:.0f} truncated, {metrics['data/dropped']:.0f} dropped"
    )
    if "data/packing_efficiency" in metrics:
        line += f", packing efficiency {metrics['data/packing_efficiency']:.1%}"
    return line
