"""The objective: summed next-token loss over the tokens that carry it, and the eval split's mean."""

from __future__ import annotations

import inspect
import logging
import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from job.data.batching import Batch, empty_batch
from job.data.tokens import IGNORE_INDEX

log = logging.getLogger(__name__)


CHUNK_LOGITS = 2**26  # logits computed at once by linear_cross_entropy: 256 MiB in float32


def loss_sum(model, batch: Batch, head: torch.nn.Linear | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over the tokens that carry loss (labels != -100).

    Only the positions whose next token carries loss are scored (prompts and padding are not).
    With `head`, the model's output layer (see output_head), the model returns its last hidden states
    and linear_cross_entropy applies the head: the whole [tokens, vocabulary] logits never exist.
    Packed rows come with their examples laid end to end (stack_packed), which the model gets as
    transformers' variable-length attention arguments: flash attention and packed_sdpa_attention then
    need not find them in the position ids."""
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch.get("attention_mask"),  # padded batches
        "position_ids": batch.get("position_ids"),  # packed rows: positions restart at each example
        "use_cache": False,  # no KV cache in training; with one, transformers ignores packed positions
    }
    if "cu_seq_lens" in batch:
        offsets, longest = batch["cu_seq_lens"], int(batch["max_length"])  # max_length: on the CPU
        inputs |= {
            "cu_seq_lens_q": offsets,
            "cu_seq_lens_k": offsets,
            "max_length_q": longest,
            "max_length_k": longest,
        }
    positions = loss_positions(batch)
    targets = batch["labels"].flatten().index_select(0, positions + 1)  # the next tokens' labels
    if head is None:
        logits = model(**inputs).logits.flatten(0, 1).index_select(0, positions)
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    # -1: only the last hidden state (transformers 5.25; earlier 5.x return them all, the last the same)
    hidden = model(**inputs, output_hidden_states=-1, logits_to_keep=1).hidden_states[-1]
    return linear_cross_entropy(hidden.flatten(0, 1).index_select(0, positions), head.weight, targets)


def loss_positions(batch: Batch) -> torch.Tensor:
    """The positions, in the batch's flattened [rows x length] tokens, whose next token in the same row
    carries loss, as an integer index (a boolean mask would make CUDA wait for its count): those that
    device_batch computed on the CPU, else computed here (on CUDA that waits for the device)."""
    if "loss_positions" in batch:
        return batch["loss_positions"]
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return predicts.flatten().nonzero().flatten()


def device_batch(batch: Batch, device: torch.device) -> Batch:
    """The batch on `device`, its loss_positions computed first, on the CPU; real_tokens and a packed
    batch's max_length, counts that the host reads, stay there."""
    batch = {**batch, "loss_positions": loss_positions(batch)}
    on_host = ("real_tokens", "max_length")
    return {key: value if key in on_host else to_device(value, device) for key, value in batch.items()}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On CUDA through pinned memory, so that the copy does not make the host wait for the device (a
    copy from pageable memory does)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, labels, reduction="sum", ignore_index=-100), one chunk of rows
    at a time (float32 softmax). The logits are computed as the model's own layer would: in autocast's
    dtype where autocast is on (the caller's job: accelerate's autocast covers only the model's forward,
    whose outputs it hands back in float32), else in the weight's dtype."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if not torch.is_grad_enabled():  # eval: a trained weight would still have its gradient computed
        hidden, weight = hidden.detach(), weight.detach()
    rows = max(1, CHUNK_LOGITS // weight.shape[0])
    return LinearCrossEntropy.apply(hidden, weight, labels, rows)


class LinearCrossEntropy(torch.autograd.Function):
    """The forward pass computes the loss and, chunk by chunk, its gradients with respect to the hidden
    states and (where it trains) the weight: softmax minus one-hot, times the other factor. Backward
    only scales them. So no pass holds more than one chunk's logits, and no matmul is done twice."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(hidden), rows):
                part, targets = hidden[start : start + rows], labels[start : start + rows, None]
                counted = (targets != IGNORE_INDEX).float()
                targets = targets.clamp(min=0)  # an ignored row's target: any id, its terms times 0
                logits = (part @ weight.T).float()
                log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
                total += ((log_norm - logits.gather(1, targets)) * counted).sum()
                if not (want_hidden or want_weight):
                    continue
                gradient = logits.sub_(log_norm).exp_()  # softmax, in place of the logits
                gradient.scatter_add_(1, targets, -counted).mul_(counted)
                gradient = gradient.to(hidden.dtype)
                if want_hidden:
                    grad_hidden[start : start + rows] = gradient @ weight
                if want_weight:
                    grad_weight += (gradient.T @ part).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if want_weight else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output.float()  # in float32: a float16 loss scale over few tokens can pass 65504
        grad_hidden, grad_weight = (
            (g.float() * scale).to(g.dtype) if g is not None else None for g in ctx.saved_tensors
        )
        return grad_hidden, grad_weight, None, None


# Config fields of transformers models that change the logits after the output layer (Gemma 2/3,
# Cohere, Granite, ...): none of them is left to the probe, whose few tokens may not show them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model) -> torch.nn.Linear | None:
    """The model's output layer, for loss_sum's `head`, where linear_cross_entropy reproduces the
    model's own loss with it (chunkable_head); the log says which way the loss goes."""
    head = chunkable_head(model)
    log.info(
        "the loss %s", "goes through the output layer chunk by chunk" if head else "uses the model's logits"
    )
    return head


def chunkable_head(model) -> torch.nn.Linear | None:
    """The model's output layer; None where the head is not a plain bias-free Linear (quantized, adapted
    by LoRA), the model's forward takes no logits_to_keep, its config transforms the logits
    (LOGIT_TRANSFORMS), or the loss on a few tokens differs (anything else done to the logits)."""
    head, config = model.get_output_embeddings(), model.config
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
        return None  # it would compute the whole logits anyway
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    device = head.weight.device
    ids = torch.arange(1, 9, device=device)[None] % head.weight.shape[0]
    batch = {"input_ids": ids, "labels": ids}
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected, chunked = loss_sum(model, batch), loss_sum(model, batch, head)
    except TypeError:  # a forward that takes no output_hidden_states
        return None
    finally:
        model.train(training)
    return head if torch.allclose(chunked, expected, rtol=1e-3) else None


def loss_tokens(batch: Batch) -> int:
    return len(loss_positions(batch))


def eval_metrics(
    model, batches: list[Batch], accelerator: Accelerator, head: torch.nn.Linear | None = None
) -> dict[str, float]:
    """eval/loss and eval/perplexity; none when the eval split has no loss-bearing token on any rank."""
    loss = evaluate(model, batches, accelerator, head)
    if loss is None:
        log.warning("the eval split has no token to score: no eval metric is logged")
        return {}
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50))}


@torch.no_grad()
def evaluate(
    model, batches: list[Batch], accelerator: Accelerator, head: torch.nn.Linear | None = None
) -> float | None:
    """Token-weighted mean loss over the eval split of every rank; None when it has no loss-bearing
    token at all (a small data.eval_fraction can leave it empty).

    Every rank calls it, with or without eval rows of its own (the reduce needs all). The unwrapped
    model: DDP's forward would sync buffers per batch, and ranks may have different batch counts. A
    model sharded by FSDP gathers its layers in each forward, which every rank must join: a rank with
    fewer batches adds empty ones.
    """
    model = accelerator.unwrap_model(model)
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    most = int(accelerator.reduce(torch.tensor(len(batches), device=accelerator.device), reduction="max"))
    for batch in batches + [empty_batch(0)] * (most - len(batches)):
        batch = device_batch(batch, accelerator.device)
        with accelerator.autocast():
            loss = loss_sum(model, batch, head)
        total[0] += loss
        total[1] += loss_tokens(batch)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] else None
