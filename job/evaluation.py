"""What the loop evaluates between steps: the eval split's loss (train.eval_every), lm-evaluation-harness
tasks (eval.harness: at each checkpoint, or only at the end) and generations of a few prompts (eval.samples:
at each of those evals), logged as an MLflow table. Every rank runs every eval, in step: a sharded
model's forwards are collectives."""

from __future__ import annotations

import torch

from job.data.formats import Formatter
from job.data.pipeline import DataPipeline
from job.loss import eval_metrics
from job.signals import StopRequest
from job.spec import Spec
from job.tracking.tracker import Tracker

SAMPLES_TABLE = "eval_samples.json"


class Evaluator:
    def __init__(self, spec: Spec, data: DataPipeline, tokenizer, head, tracker: Tracker, accelerator):
        """Loads eval.harness's tasks (exit 2 for one that cannot be loaded, or without the eval extra)."""
        from job.harness import load_harness_tasks

        self.every = spec.train.eval_every
        self.has_split = bool(data.eval_files)  # the same on every rank, unlike a rank's share of its rows
        self.batches = data.eval_batches(spec.train.micro_batch_size) if self.has_split else []
        self.harness = load_harness_tasks(spec.eval.harness) if spec.eval.harness else None
        self.prompts, self.sample_length = spec.eval.samples, spec.eval.sample_length
        self.formatter = Formatter.of(spec.data, tokenizer) if self.prompts else None
        self.tokenizer, self.head, self.tracker, self.accelerator = tokenizer, head, tracker, accelerator

    def at_step(self, model, step: int, checkpointing: bool, stop: StopRequest) -> dict[str, float]:
        """The scores due at this step: the split's loss every train.eval_every steps, the harness's at a
        checkpoint (eval.harness.every: checkpoint), samples with either."""
        split = self.has_split and bool(self.every) and step % self.every == 0
        harness = bool(self.harness) and self.harness.config.every == "checkpoint" and checkpointing
        return self._evaluate(model, step, split, harness, stop)

    def at_end(self, model, last: dict[str, float], stop: StopRequest) -> dict[str, float]:
        """The scores of the run's end that its last step did not log already."""
        split = self.has_split and "eval/loss" not in last
        harness = bool(self.harness) and not any(key.startswith("harness/") for key in last)
        return self._evaluate(model, int(last["step"]), split, harness, stop)

    def _evaluate(self, model, step: int, split: bool, harness: bool, stop: StopRequest) -> dict[str, float]:
        from job.harness import harness_metrics, sample_generations, samples_table

        scores: dict[str, float] = {}
        if split:
            scores = eval_metrics(model, self.batches, self.accelerator, self.head)
            self.has_split = bool(scores)  # an eval split with nothing to score stays so (warned once)
        unwrapped = self.accelerator.unwrap_model(model)
        if harness:
            should_stop = lambda: stop.agreed(self.accelerator)  # noqa: E731  (every rank, each forward)
            scores |= harness_metrics(
                unwrapped, self.tokenizer, self.harness, should_stop, self.autocast_dtype
            )
        if self.prompts and (split or harness) and not stop.requested:  # a stop's grace is for its checkpoint
            samples = sample_generations(
                unwrapped, self.tokenizer, self.prompts, self.sample_length, self.formatter
            )
            self.tracker.log_table(samples_table(samples, step), SAMPLES_TABLE)
        return scores

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision)
