"""Example segments -> token ids and labels, fitted to max_seq_len.

Labels are aligned with input_ids as in transformers (the model shifts them); -100 marks tokens that
carry no loss. Segments are tokenized one by one, so no token merges across a prompt/response boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from job.data.formats import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def to_dict(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


@dataclass(frozen=True)
class Fitted:
    """What became of one example: the pieces to train on, and whether it was truncated or dropped."""

    pieces: list[TokenizedExample]
    truncated: bool = False
    dropped: bool = False


def tokenize(example: Example, tokenizer) -> TokenizedExample:
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, loss) in enumerate(example.segments):
        ids = tokenizer(text, add_special_tokens=example.add_bos_eos and i == 0)["input_ids"]
        input_ids += ids
        labels += ids if loss else [IGNORE_INDEX] * len(ids)
    if example.add_bos_eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return TokenizedExample(input_ids, labels)


def fit(tokenized: TokenizedExample, max_seq_len: int, split_long: bool, truncation: str) -> Fitted:
    """Fit an example to max_seq_len: split (text), truncate keeping the head, or drop.

    A truncated example that keeps no loss-bearing token is dropped: it would teach nothing.
    """
    ids, labels = tokenized.input_ids, tokenized.labels
    if len(ids) <= max_seq_len:
        return Fitted([tokenized])
    if split_long:
        starts = range(0, len(ids), max_seq_len)
        return Fitted(
            [TokenizedExample(ids[s : s + max_seq_len], labels[s : s + max_seq_len]) for s in starts]
        )
    head = TokenizedExample(ids[:max_seq_len], labels[:max_seq_len])
    if truncation == "drop" or head.loss_tokens == 0:
        return Fitted([], dropped=True)
    return Fitted([head], truncated=True)
