"""Training progress: a bar on a terminal, plain log lines in a batch job's log file."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO


def format_metrics(step: int, total: int, metrics: dict[str, float], eta_seconds: float) -> str:
    parts = [f"step {step}/{total}"]
    for key, label, spec in (
        ("train/loss", "loss", ".4f"),
        ("train/learning_rate", "lr", ".2e"),
        ("train/grad_norm", "grad_norm", ".3f"),
        ("train/tokens_per_second", "tok/s", ".0f"),
        ("eval/loss", "eval_loss", ".4f"),
    ):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:{spec}}")
    parts.append(f"eta {timedelta(seconds=round(eta_seconds))}")
    return " ".join(parts)


class Progress:
    """tqdm on a TTY; otherwise a line every `log_every` steps (and at the last one). Silent off rank 0."""

    def __init__(
        self,
        total_steps: int,
        log_every: int,
        enabled: bool,
        stream: TextIO | None = None,
        first_step: int = 1,
    ):
        self.total = total_steps
        self.first_step = first_step
        self.log_every = log_every
        self.enabled = enabled
        self.stream = stream = stream or sys.stdout
        self.started = time.monotonic()
        self.bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=first_step - 1, file=stream, unit="step", dynamic_ncols=True
            )

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/learning_rate']:.2e}"
            )
            return
        if step % self.log_every == 0 or step == self.total:
            elapsed = time.monotonic() - self.started
            eta = elapsed / (step - self.first_step + 1) * max(self.total - step, 0)
            print(format_metrics(step, self.total, metrics, eta), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
