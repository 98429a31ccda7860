"""The training steps' micro-batches, made ahead on a thread of their own (data.prefetch).

Reading, tokenizing, packing and collating the next step's micro-batches is host work; done on the
training thread between steps, the device waits for it. Feed runs the pipeline on a background thread
while the training thread keeps the device busy: data.prefetch steps' micro-batches wait in a bounded
queue, and the thread makes the next one.

What the loop logs and checkpoints is what it has consumed, never what was made ahead: each window
of micro-batches comes with the pipeline as it stood just after it (its cursor, counters, epoch), taken
on the producing thread as the window was made. A checkpoint holds the cursor of the last window
trained on, so a resumed run starts at the first micro-batch not trained on, as without prefetch.

The pipeline must have a tokenizer of its own (train.py gives it a copy): a fast tokenizer is not safe
to use from two threads at once (its settings change per call), and the evaluator's generation uses
the run's on the training thread.
"""

from __future__ import annotations

import itertools
import marshal
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from job.data.batching import Batch
from job.data.pipeline import BadRowBudget, DataPipeline

Window = list[Batch]  # the micro-batches of one optimizer step (grad_accum, fewer at the data's end)
DATA_THREAD = "ftjob-data"
PUT_WAIT_SECONDS = 0.1  # how often a producer waiting on a full queue looks whether the feed was closed
CLOSE_WAIT_SECONDS = 1.0


@dataclass(frozen=True)
class Consumed:
    """The pipeline as it stood after a window: what the loop logs and checkpoints once it took it."""

    # state_dict() serialized: a snapshot that later reading cannot change. marshal, made and read in
    # this process only (never stored): it copies a 10000-row shuffle buffer's cursor in about 1 ms, 6x
    # faster than JSON, while the training thread waits for the interpreter lock.
    state: bytes
    stats: dict[str, float]
    epoch: float
    epochs_ended: int
    budget: BadRowBudget

    def state_dict(self) -> dict[str, Any]:
        return marshal.loads(self.state)


@dataclass(frozen=True)
class Ended:
    """The producer's last item: the data ended, the pipeline as it stood then (the read that found the
    end may have read more rows, bad ones, and passed the last epoch's end); or reading it failed."""

    consumed: Consumed | None = None
    error: BaseException | None = None


class Feed:
    """Windows of grad_accum micro-batches from `data`, each `prepare`d (whatever the step wants done on
    the host), made on a thread of their own with up to `depth` windows waiting, or on the caller's
    thread where depth is 0. A context manager: leaving it stops the producer."""

    def __init__(
        self, data: DataPipeline, micro_batch_size: int, grad_accum: int, prepare: Callable[[Batch], Batch],
        depth: int,
    ):  # fmt: skip
        self.data, self.grad_accum, self.prepare = data, grad_accum, prepare
        self.batches = data.train_batches(micro_batch_size)
        self.consumed = self._snapshot()  # before any window: the cursor the run started from
        self.ended = False
        self.closed = threading.Event()
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.producer = None
        if depth:
            self.producer = threading.Thread(target=self._produce, name=DATA_THREAD, daemon=True)

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc) -> None:
        """Stop the producer: it ends once the window it is making is made, and is waited for only
        briefly (a slow read must not eat a stop's grace time; it holds nothing the loop still uses)."""
        self.closed.set()
        if self.producer and self.producer.ident is not None:
            self.producer.join(timeout=CLOSE_WAIT_SECONDS)

    def next_window(self) -> Window:
        """The next step's micro-batches; an empty list once the data has ended (train.epochs)."""
        if self.ended:
            return []
        if self.producer and self.producer.ident is None:
            self.producer.start()  # at the first window: a feed never read starts no thread
        item = self.queue.get() if self.producer else self._make_window()
        if isinstance(item, Ended):
            self.ended = True
            if item.error:
                raise item.error
            self.consumed = item.consumed
            return []
        window, self.consumed = item
        return window

    def _make_window(self) -> tuple[Window, Consumed] | Ended:
        window = [self.prepare(batch) for batch in itertools.islice(self.batches, self.grad_accum)]
        return (window, self._snapshot()) if window else Ended(self._snapshot())

    def _snapshot(self) -> Consumed:
        data = self.data
        budget = replace(data.budget, first_bad=list(data.budget.first_bad))
        return Consumed(marshal.dumps(data.state_dict()), data.stats(), data.epoch, data.epochs_ended, budget)

    def _produce(self) -> None:
        item = None
        try:
            while not (self.closed.is_set() or isinstance(item, Ended)):
                item = self._make_window()
                self._put(item)
        except BaseException as error:  # raised on the training thread when it gets there
            self._put(Ended(error=error))

    def _put(self, item) -> None:
        while not self.closed.is_set():
            try:
                return self.queue.put(item, timeout=PUT_WAIT_SECONDS)
            except queue.Full:
                continue
