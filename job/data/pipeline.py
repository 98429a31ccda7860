"""The data stages put together: rows -> examples -> (packed rows) -> micro-batches, with one cursor.

    SourceStream(s)  files in a seeded order per epoch, sharded by rank          (stream.py)
    ShuffleBuffer    bounded seeded shuffle, drained at each epoch's end         (stream.py)
    Mixture          several sources drawn by weight, when data.train has weights (stream.py)
    ExampleStream    format, tokenize, fit to max_seq_len; bad rows within budget
    Packer           examples side by side in max_seq_len rows (data.packing)
    micro-batches    padded or stacked tensors                                   (batching.py)

`state_dict()` taken between two micro-batches holds every stage's cursor, buffer and carry-over, so a
pipeline given it by `load_state_dict()` yields exactly the micro-batches the first would have yielded
next. It holds where rows are, never what they say or their token ids (rows may carry personal data,
and checkpoints are copied to output.uri): the rows in the shuffle buffer, and those whose examples
are still to come or in the packer's open rows, are read and tokenized again on load; nothing before
them is. A saved cursor is input like the spec: load_state_dict() checks it whole (job/data/cursor.py)
before it reads a row.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

from job.data.batching import Batch, pack_row, pad_batch, stack_packed
from job.data.cursor import saved_plan
from job.data.formats import BadRow, Example, Formatter
from job.data.plan import DataPlan
from job.data.sources import Position, Row
from job.data.stream import EPOCH_END, EpochEnd, Mixture, ShuffleBuffer, SourceStream, held_out
from job.data.tokens import Fitted, TokenizedExample, fit, tokenize
from job.errors import DataError
from job.spec import BadRowsSpec, DataSpec

log = logging.getLogger(__name__)
LOGGED_BAD_ROWS = 5
BUDGET_MIN_ROWS = 1000  # before the end of the data, judge the bad-row fraction only on this many rows


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
        if self.rows >= BUDGET_MIN_ROWS:
            self.check()

    def check(self) -> None:
        if self.rows and self.bad / self.rows > self.policy.max_fraction:
            raise DataError(
                f"{self.split}: {self.bad} of {self.rows} rows are bad, over data.bad_rows.max_fraction="
                f"{self.policy.max_fraction}; first: " + "; ".join(self.first_bad)
            )


@dataclass
class FitCounts:
    examples: int = 0  # pieces that reached training
    truncated: int = 0
    dropped: int = 0


def format_row(formatter: Formatter, row: Row) -> Row:
    """A row as the format reads it: its value becomes an Example's plain form, or the row an error.

    Done as rows are read, before the shuffle buffer: the buffer then holds only the text the format
    uses, whatever other columns the file has (Parquet timestamps, decimals, bytes)."""
    if row.error:
        return row
    try:
        return replace(row, value=formatter(row.value).to_dict())
    except BadRow as e:
        return replace(row, value=None, error=str(e))


def origin_state(example: TokenizedExample) -> list:
    """Where an example comes from, as state saves it: [file, row index, byte offset, piece]."""
    url, start, piece = example.origin
    return [url, start.row, start.offset, piece]


class ExampleStream:
    """Formatted rows -> tokenized examples that fit max_seq_len; bad rows are counted against the budget."""

    def __init__(self, rows: Iterable[Row], tokenizer, data: DataSpec, budget: BadRowBudget):
        self.rows = rows
        self.tokenizer = tokenizer
        self.config = data
        self.budget = budget
        self.counts = FitCounts()
        self.pending: list[TokenizedExample] = []  # the rest of a long text's pieces

    def __iter__(self) -> Iterator[TokenizedExample | EpochEnd]:
        """Examples, and EPOCH_END where the rows' epoch ends."""
        while self.pending:
            yield self.pending.pop(0)
        source = getattr(self.rows, "source", None)  # the cursor whose epochs we watch, for training
        fruitful_epoch = source.epoch if source else 0
        for row in self.rows:
            if row is EPOCH_END:
                yield EPOCH_END
                continue
            if source and source.epoch > fruitful_epoch + 1:
                raise DataError(
                    f"data.train: a whole epoch gave no example to train on: {self.budget.rows} rows read, "
                    f"{self.budget.bad} bad, {self.counts.dropped} dropped (longer than data.max_seq_len="
                    f"{self.config.max_seq_len}, or no completion left after truncation)"
                )
            self.budget.rows += 1
            if row.error:
                self.budget.record_bad(row.where, row.error)
                continue
            fitted = self._fit(row)
            self.counts.truncated += fitted.truncated
            self.counts.dropped += fitted.dropped
            self.counts.examples += len(fitted.pieces)
            self.pending = list(fitted.pieces)
            if self.pending and source:
                fruitful_epoch = source.epoch
            while self.pending:
                yield self.pending.pop(0)
        self.budget.check()

    def _fit(self, row: Row) -> Fitted:
        """A formatted row's example, tokenized and fitted to max_seq_len; each piece knows its origin."""
        example = Example.from_dict(row.value)
        length = self.config.max_seq_len
        # the first max_seq_len tokens are all that truncate and drop look at; a split document needs all
        tokenized = tokenize(example, self.tokenizer, None if example.split_long else length)
        fitted = fit(tokenized, length, example.split_long, self.config.truncation)
        pieces = [replace(p, origin=(row.source, row.start, k)) for k, p in enumerate(fitted.pieces)]
        return replace(fitted, pieces=pieces)

    def examples_at(self, origins: list[list]) -> list[TokenizedExample]:
        """The examples that origin_state() saved: their rows read again (every source of a pipeline
        reads and formats rows alike) and tokenized again, once each."""
        rows = self.rows.source.read_again([(url, Position(row, offset)) for url, row, offset, _ in origins])
        fitted: dict[tuple[str, int], Fitted] = {}
        examples = []
        for row, (url, index, _, piece) in zip(rows, origins, strict=True):
            if (url, index) not in fitted:
                fitted[url, index] = self._fit(row)
            pieces = fitted[url, index].pieces
            if piece >= len(pieces):
                raise DataError(
                    f"{row.where}: the data cursor holds piece {piece + 1} of this row's {len(pieces)}: the "
                    "file changed since the checkpoint; cannot resume exactly"
                )
            examples.append(pieces[piece])
        return examples

    def state_dict(self) -> dict[str, Any]:
        return {
            "pending": [origin_state(e) for e in self.pending],
            "counts": asdict(self.counts),
            "budget": {"rows": self.budget.rows, "bad": self.budget.bad, "first_bad": self.budget.first_bad},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = self.examples_at(state["pending"])
        self.counts = FitCounts(**state["counts"])
        for key, value in state["budget"].items():
            setattr(self.budget, key, value)


class Packer:
    """Examples side by side in rows of max_seq_len, by best fit over a few open rows.

    Each example goes into the open row it fills most tightly; when it fits none, it opens a row, and
    with OPEN_ROWS rows open the oldest is closed. On length-skewed data that makes fewer, fuller rows
    than a greedy packer (one open row, closed when the next example won't fit; bench/RESULTS.md): a
    short example fills a gap that a long one left instead of starting the next row. It still streams (an example waits at most OPEN_ROWS rows), rows never
    span epochs, and the state is the open rows' origins.
    """

    OPEN_ROWS = 8

    def __init__(self, examples: ExampleStream, length: int, pad_token_id: int):
        self.examples = examples
        self.length = length
        self.pad_token_id = pad_token_id
        self.open: list[list[TokenizedExample]] = []
        self.closing_epoch = False
        self.rows = 0
        self.real_tokens = 0

    @property
    def efficiency(self) -> float:
        """Real tokens / row capacity over the rows packed so far."""
        return packing_efficiency(self.real_tokens, self.rows, self.length)

    def __iter__(self) -> Iterator[dict[str, list[int]] | EpochEnd]:
        """Packed rows; a row never spans two epochs (EPOCH_END closes every open row and is passed on)."""
        if self.closing_epoch:  # saved while the rows of an epoch's end were being closed
            yield from self._close_epoch()
        for example in self.examples:
            if example is EPOCH_END:
                self.closing_epoch = True
                yield from self._close_epoch()
                continue
            size = len(example.input_ids)
            fitting = [row for row in self.open if self._free(row) >= size]
            if fitting:
                min(fitting, key=self._free).append(example)
                continue
            self.open.append([example])  # before the yield: a state saved there must hold the example
            if len(self.open) > self.OPEN_ROWS:
                yield self._close_oldest()
        while self.open:
            yield self._close_oldest()

    def _close_epoch(self) -> Iterator[dict[str, list[int]] | EpochEnd]:
        while self.open:
            yield self._close_oldest()
        self.closing_epoch = False
        yield EPOCH_END

    def _free(self, row: list[TokenizedExample]) -> int:
        return self.length - sum(len(e.input_ids) for e in row)

    def _close_oldest(self) -> dict[str, list[int]]:
        row = pack_row(self.open.pop(0), self.length, self.pad_token_id)
        self.rows += 1
        self.real_tokens += row["real_tokens"]
        return row

    def state_dict(self) -> dict[str, Any]:
        return {
            "open_rows": [[origin_state(e) for e in row] for row in self.open],
            "closing_epoch": self.closing_epoch,
            "rows": self.rows,
            "real_tokens": self.real_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["open_rows"]
        examples = iter(self.examples.examples_at([origin for row in saved for origin in row]))  # one read
        self.open = [[next(examples) for _ in row] for row in saved if row]
        self.closing_epoch = state["closing_epoch"]
        self.rows = state["rows"]
        self.real_tokens = state["real_tokens"]


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items; a shorter one at the end and at each EPOCH_END, so no batch spans epochs."""
    batch = []
    for item in items:
        if item is not EPOCH_END:
            batch.append(item)
        if batch and (len(batch) == size or item is EPOCH_END):
            full, batch = batch, []
            yield full
    if batch:
        yield batch


def packing_efficiency(real_tokens: float, rows: float, length: int) -> float:
    """Real tokens over the capacity of the packed rows."""
    return real_tokens / (rows * length) if rows else 0.0


class DataPipeline:
    """Training micro-batches (resumable) and eval micro-batches of one rank."""

    def __init__(
        self,
        config: DataSpec,
        tokenizer,
        seed: int,
        epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        plan: DataPlan | None = None,
    ):
        """`epochs`: train.epochs (the data ends after them), or None for max_steps (endless);
        `plan`: which files (every rank follows rank 0's), made here when not given."""
        self.config = config
        self.tokenizer = tokenizer
        self.seed = seed
        self.epochs = epochs
        self.rank = rank
        self.world_size = world_size
        self.formatter = Formatter.of(config, tokenizer)
        self.plan = plan or DataPlan.make(config, world_size)
        self.epochs_ended = 0  # epochs whose last micro-batch this process has handed to training
        self._build()

    @property
    def eval_files(self) -> list[str]:
        return self.plan.eval_files

    def _build(self) -> None:
        """Fresh stages at the start of the data (load_state_dict then moves their cursors)."""
        fraction, seed = self.config.eval_fraction, self.seed
        streams = [
            ShuffleBuffer(
                SourceStream(
                    files,
                    seed,
                    self.rank,
                    self.world_size,
                    keep_row=lambda url, row: not held_out(url, row, fraction),
                    epochs=self.epochs,
                    transform=partial(format_row, self.formatter),
                    striped=striped,
                    max_row_bytes=self.config.max_row_bytes,
                ),
                self.config.shuffle_buffer,
                seed,
                self.rank,
            )
            for files, striped in self.plan.rank_files(self.rank)
        ]
        weights = [weight for _, weight in self.plan.sources]
        self.rows = streams[0] if len(streams) == 1 else Mixture(streams, weights, seed, self.rank)
        self.budget = BadRowBudget(self.config.bad_rows, "data.train")
        self.examples = ExampleStream(self.rows, self.tokenizer, self.config, self.budget)
        self.packer = (
            Packer(self.examples, self.config.max_seq_len, self.tokenizer.pad_token_id)
            if self.config.packing
            else None
        )

    @property
    def epoch(self) -> float:
        return self.rows.source.progress

    def train_batches(self, micro_batch_size: int) -> Iterator[Batch]:
        """Micro-batches from the cursor on; ends after train.epochs epochs (never, with max_steps)."""
        if self.packer:
            for rows in batched(self._counting_epochs(self.packer), micro_batch_size):
                yield stack_packed(rows)
        else:
            for examples in batched(self._counting_epochs(self.examples), micro_batch_size):
                yield pad_batch(examples, self.tokenizer.pad_token_id)

    def _counting_epochs(self, items: Iterable) -> Iterator:
        for item in items:
            if item is EPOCH_END:  # read as the first micro-batch after it is asked for (batched)
                self.epochs_ended += 1
            yield item

    def stats(self) -> dict[str, float]:
        """Counters of this rank so far (for logs and metrics)."""
        stats = {
            "data/rows_read": self.budget.rows,
            "data/bad_rows": self.budget.bad,
            "data/examples": self.examples.counts.examples,
            "data/truncated": self.examples.counts.truncated,
            "data/dropped": self.examples.counts.dropped,
        }
        if self.packer:
            stats["data/packed_rows"] = self.packer.rows
            stats["data/packed_real_tokens"] = self.packer.real_tokens
        return stats

    def state_dict(self) -> dict[str, Any]:
        state = {
            "plan": asdict(self.plan),
            "rows": self.rows.state_dict(),
            "examples": self.examples.state_dict(),
        }
        if self.packer:
            state["packer"] = self.packer.state_dict()
        return state

    def load_state_dict(self, state: Any, where: str = "the data cursor") -> None:
        """The cursor, over the files and by the layout it was saved with (a glob or a dataset repo
        may name other files by now, and file sizes may have changed), once saved_plan() has checked
        it whole: nothing is read before. `where`: the cursor's file, for messages."""
        self.plan = saved_plan(state, self.config, self.plan, self.rank, self.world_size, where)
        self._build()
        self.rows.load_state_dict(state["rows"])
        self.examples.load_state_dict(state["examples"])
        if self.packer:
            self.packer.load_state_dict(state["packer"])

    def count_micro_batches(self, micro_batch_size: int) -> tuple[int, dict[str, float]]:
        """Micro-batches of this rank over all of train.epochs (a separate pass from the start of the
        data), to size an epoch-based run; and that pass's data counters."""
        counter = copy.copy(self)  # the same files and layout, fresh stages from the start
        counter._build()
        counter.budget.quiet = True
        return sum(1 for _ in counter.train_batches(micro_batch_size)), counter.stats()

    def eval_batches(self, micro_batch_size: int) -> list[Batch]:
        """The eval split of this rank (data.eval, or the held-out data.eval_fraction), read once and kept."""
        fraction = self.config.eval_fraction
        rows = SourceStream(
            self.eval_files,
            self.seed,
            self.rank,
            self.world_size,
            keep_row=(lambda url, row: held_out(url, row, fraction)) if fraction else None,
            epochs=1,
            shuffle_files=False,
            transform=partial(format_row, self.formatter),
            max_row_bytes=self.config.max_row_bytes,
        )
        budget = BadRowBudget(self.config.bad_rows, "data.eval")
        examples = [e for e in ExampleStream(rows, self.tokenizer, self.config, budget) if e is not EPOCH_END]
        return [
            pad_batch(batch, self.tokenizer.pad_token_id) for batch in batched(examples, micro_batch_size)
        ]
