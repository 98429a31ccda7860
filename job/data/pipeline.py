"""The data stages put together for training and evaluation.

Rows are sharded round-robin across ranks by their position in the split (every row exactly once per
epoch over all ranks), shuffled in a bounded seeded buffer, formatted, tokenized and batched.
Bad rows are skipped within the `data.bad_rows` budget or end the job with exit 3.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from job.data.batching import pad_batch
from job.data.formats import BadRow, Example, to_example
from job.data.sources import expand, read_jsonl
from job.data.tokens import TokenizedExample, tokenize_example
from job.errors import DataError
from job.spec import BadRowsSpec, Spec

log = logging.getLogger(__name__)
T = TypeVar("T")
LOGGED_BAD_ROWS = 5


@dataclass
class BadRowBudget:
    """Counts rows and bad rows; enforces data.bad_rows."""

    policy: BadRowsSpec
    split: str
    rows: int = 0
    bad: int = 0
    first_bad: list[str] = field(default_factory=list)
    quiet: bool = False

    def record_bad(self, where: str, reason: str) -> None:
        self.bad += 1
        if self.policy.policy == "fail":
            raise DataError(f"{where}: {reason} (data.bad_rows.policy is 'fail')")
        if len(self.first_bad) < LOGGED_BAD_ROWS:
            self.first_bad.append(f"{where}: {reason}")
            if not self.quiet:
                log.warning("skipping bad row %s: %s", where, reason)

    def check(self) -> None:
        if self.rows and self.bad / self.rows > self.policy.max_fraction:
            raise DataError(
                f"{self.split}: {self.bad} of {self.rows} rows are bad, over data.bad_rows.max_fraction="
                f"{self.policy.max_fraction}; first: " + "; ".join(self.first_bad)
            )


def shuffled(items: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """A bounded shuffle: hold buffer_size items, emit a random one as each new item arrives."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class DataPipeline:
    """Training and eval examples of one rank, as padded micro-batches."""

    def __init__(self, spec: Spec, tokenizer, rank: int = 0, world_size: int = 1):
        self.spec = spec
        self.data = spec.data
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.train_files = expand(self.data.train, spec.storage_options, "data.train")
        self.eval_files = expand(self.data.eval, spec.storage_options, "data.eval")
        self.train_budget = BadRowBudget(self.data.bad_rows, "data.train")
        self.epoch = 0

    def examples(self, files: list[str], budget: BadRowBudget) -> Iterator[Example]:
        """One pass over files: this rank's rows, formatted; bad rows go to the budget."""
        rows = itertools.chain.from_iterable(read_jsonl(url, self.spec.storage_options) for url in files)
        for index, row in enumerate(rows):
            if index % self.world_size != self.rank:
                continue
            budget.rows += 1
            try:
                if row.error:
                    raise BadRow(row.error)
                yield to_example(row.value, self.data.format, self.data.fields)
            except BadRow as e:
                budget.record_bad(row.where, str(e))

    def tokenize(self, example: Example) -> TokenizedExample:
        return tokenize_example(
            example.prompt, example.completion, self.tokenizer, self.data.max_seq_len, self.data.train_on
        )

    def count_train_examples(self) -> int:
        """Usable training examples on this rank (one pass without tokenizing), for epoch-based length."""
        budget = BadRowBudget(self.data.bad_rows, "data.train", quiet=True)
        count = sum(1 for _ in self.examples(self.train_files, budget))
        budget.check()
        return count

    def train_examples(self) -> Iterator[TokenizedExample]:
        """Tokenized training examples, epoch after epoch, reshuffled each epoch; self.epoch follows."""
        for self.epoch in itertools.count():
            rng = random.Random(f"{self.spec.train.seed}-{self.epoch}")
            produced = 0
            for example in shuffled(
                self.examples(self.train_files, self.train_budget), self.data.shuffle_buffer, rng
            ):
                produced += 1
                yield self.tokenize(example)
            self.train_budget.check()
            if not produced:
                raise DataError(
                    f"data.train: no usable rows for rank {self.rank} in {', '.join(self.train_files)}"
                )

    def train_batches(self, micro_batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for batch in batched(self.train_examples(), micro_batch_size):
            yield pad_batch(batch, self.tokenizer.pad_token_id)

    def eval_batches(self, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
        """The eval split of this rank, read once and kept (eval sets are small)."""
        budget = BadRowBudget(self.data.bad_rows, "data.eval")
        examples = [self.tokenize(e) for e in self.examples(self.eval_files, budget)]
        budget.check()
        return [
            pad_batch(batch, self.tokenizer.pad_token_id) for batch in batched(examples, micro_batch_size)
        ]
