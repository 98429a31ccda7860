"""Examples -> tensors: padded batches (dynamic padding), or packed rows of fixed length.

Every batch carries `real_tokens`, the number of non-padding tokens, for throughput and efficiency.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from job.data.tokens import IGNORE_INDEX, TokenizedExample

Batch = dict[str, torch.Tensor]
# A packed micro-batch's examples laid end to end (stack_packed): their offsets, the longest's length.
PACKED_OFFSETS = ("cu_seq_lens", "max_length")


def pad_batch(examples: Sequence[TokenizedExample], pad_token_id: int) -> Batch:
    """Right-pad input_ids with pad_token_id and labels with -100; attention_mask marks real tokens."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "real_tokens": attention_mask.sum(),
    }


def pack_row(examples: Sequence[TokenizedExample], length: int, pad_token_id: int) -> dict[str, list[int]]:
    """Examples side by side in one row of `length` tokens.

    position_ids restart at 0 for each example; transformers reads the restarts as sequence boundaries
    (a block-diagonal causal mask for sdpa/eager, varlen kernels for flash attention), so no token
    attends across examples. The first label of each example is -100: it would otherwise be predicted
    from the previous example's last token. The padding tail is one more block, without loss.
    segment_lengths are the blocks' lengths, the padding tail's included.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX, *example.labels[1:]]
        position_ids += range(len(example.input_ids))
    pad = length - len(input_ids)
    return {
        "input_ids": input_ids + [pad_token_id] * pad,
        "labels": labels + [IGNORE_INDEX] * pad,
        "position_ids": position_ids + list(range(pad)),
        "segment_lengths": [len(e.input_ids) for e in examples] + ([pad] if pad else []),
        "real_tokens": length - pad,
    }


def stack_packed(rows: Sequence[dict[str, list[int]]]) -> Batch:
    """Packed rows as one micro-batch [rows, length]. Its segments (examples and padding tails) laid end
    to end over the rows are given as the variable-length kernels take them, so that attention need
    not find them in the position ids on the device: `cu_seq_lens`, the offsets where each starts and
    where the last ends (int32), and `max_length`, the longest's length."""
    batch = {key: torch.tensor([row[key] for row in rows]) for key in ("input_ids", "labels", "position_ids")}
    segments = [n for row in rows for n in row["segment_lengths"]]
    batch["cu_seq_lens"] = torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32)
    batch["max_length"] = torch.tensor(max(segments))
    batch["real_tokens"] = torch.tensor(sum(row["real_tokens"] for row in rows))
    return batch


def flatten_packed(batch: Batch) -> Batch:
    """A packed micro-batch [B, L] as one row [1, B*L], for flash attention.

    transformers reads restarting position_ids as example boundaries (and calls the variable-length
    kernel) only for a batch of one row; [B, L] rows would get dense causal attention across their
    examples. Flattened, every example stays a segment of its own: each row starts an example at
    position 0, and so does its padding tail. The loss is unchanged: each example's first label is
    already -100. The segments laid end to end (cu_seq_lens, max_length) are those of the one row.
    """
    flat = {key: batch[key].reshape(1, -1) for key in ("input_ids", "labels", "position_ids")}
    return {**batch, **flat}


def empty_batch(pad_token_id: int) -> Batch:
    """One padding token without loss: what a rank whose data ran out contributes, so that every rank
    still takes part in each step's collective operations."""
    return {
        "input_ids": torch.tensor([[pad_token_id]]),
        "labels": torch.tensor([[IGNORE_INDEX]]),
        "attention_mask": torch.tensor([[1]]),
        "real_tokens": torch.tensor(0),
    }
