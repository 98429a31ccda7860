"""The objective: summed next-token loss over the tokens that carry it, and the eval split's mean."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from job.data.batching import Batch
from job.data.tokens import IGNORE_INDEX

log = logging.getLogger(__name__)


def loss_sum(model, batch: Batch) -> torch.Tensor:
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


def loss_tokens(batch: Batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def eval_metrics(model, batches: list[Batch], accelerator: Accelerator) -> dict[str, float]:
    """eval/loss and eval/perplexity; none when the eval split has no loss-bearing token on any rank."""
    loss = evaluate(model, batches, accelerator)
    if loss is None:
        log.warning("the eval split has no token to score: no eval metric is logged")
        return {}
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50))}


@torch.no_grad()
def evaluate(model, batches: list[Batch], accelerator: Accelerator) -> float | None:
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
