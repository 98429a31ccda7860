"""Row streams with a cursor: one source's rows for one rank, epoch after epoch, resumable exactly.

Every stream keeps, in plain attributes, where it will read next; a stream rebuilt from
`state_dict()` continues with exactly the rows the original would have produced next, without
re-reading what came before (uncompressed JSONL seeks to a byte offset; other formats skip rows
without parsing them). State holds where rows are, never what they say (rows may carry personal
data, and checkpoints are copied to output.uri): a shuffle buffer saves the places of its rows and
reads them again when loaded.

Sharding: when the files can be split into per-rank shares of nearly equal size (file_shares), each
rank reads only its own files, whole. Otherwise (fewer files than ranks, or sizes too uneven) every
rank reads every file: in each epoch the files are read in a seeded order that is the same on every
rank, and row k of that epoch (counted over all files) belongs to rank k % world_size. Either way
every row goes to exactly one rank once per epoch.
"""

from __future__ import annotations

import hashlib
import posixpath
import random
from collections.abc import Callable, Iterator
from typing import Any

from job.data.sources import MAX_ROW_BYTES, Position, Row, read_rows
from job.errors import DataError
from job.rng import random_state, set_random_state


class EpochEnd:
    """The marker every stage passes on between two epochs (never a row, example or batch)."""

    def __repr__(self) -> str:
        return "EPOCH_END"


EPOCH_END = EpochEnd()
MAX_SHARE_IMBALANCE = 0.1  # per-rank shares of whole files may differ by this fraction of their mean


def file_shares(sized: list[tuple[str, int]], world_size: int) -> list[list[str]] | None:
    """Whole files for each rank from (file, bytes) pairs (a file listed twice is two entries),
    balanced by bytes (largest to the lightest rank first, ties in listed order), each share in the
    listed order; None when rows should be striped across ranks instead: one rank, fewer files than
    ranks, or shares more than MAX_SHARE_IMBALANCE apart (a rank whose share is smaller would see its
    rows more often than the others in a max_steps run)."""
    if world_size == 1 or len(sized) < world_size:
        return None
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in sorted(range(len(sized)), key=lambda i: -sized[i][1]):
        lightest = loads.index(min(loads))
        shares[lightest].append(i)
        loads[lightest] += sized[i][1]
    mean = sum(loads) / world_size
    if not mean or max(loads) - min(loads) > MAX_SHARE_IMBALANCE * mean:
        return None
    return [[sized[i][0] for i in sorted(share)] for share in shares]


def held_out(url: str, row: int, fraction: float) -> bool:
    """The stable eval split: the same rows on every rank and every restart, and wherever the file
    lies (the file's name, not its full URL, goes into the hash: ./d.jsonl, /abs/d.jsonl and
    s3://bucket/d.jsonl split alike)."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{posixpath.basename(url)}\0{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class SourceStream:
    """The rows of one source that belong to one rank, epoch after epoch (or for `epochs` epochs)."""

    def __init__(
        self,
        files: list[str],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        keep_row: Callable[[str, int], bool] | None = None,
        epochs: int | None = None,
        shuffle_files: bool = True,
        transform: Callable[[Row], Row] | None = None,
        striped: bool = True,
        max_row_bytes: int = MAX_ROW_BYTES,
    ):
        """`striped`: every rank reads `files` and keeps its rows (k % world_size); False when `files`
        is this rank's own share, read whole. A row over `max_row_bytes` is a bad row."""
        self.files = files
        self.striped = striped
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.keep_row = keep_row or (lambda url, row: True)
        self.epochs = epochs
        self.shuffle_files = shuffle_files
        self.transform = transform or (lambda row: row)  # applied to each row as it is read
        self.max_row_bytes = max_row_bytes
        # the cursor: epoch, file within the epoch's order, rows before that file, position inside it
        self.epoch = 0
        self.file_index = 0
        self.rows_before = 0
        self.position = Position()

    def file_order(self, epoch: int) -> list[str]:
        order = list(self.files)
        if self.shuffle_files:
            random.Random(f"{self.seed}-files-{epoch}").shuffle(order)
        return order

    @property
    def progress(self) -> float:
        """Epochs completed, with the fraction of the current epoch's files done."""
        return self.epoch + self.file_index / max(len(self.files), 1)

    def __iter__(self) -> Iterator[Row | EpochEnd]:
        """Rows; EPOCH_END after each epoch (the cursor already points at the next one)."""
        while self.epochs is None or self.epoch < self.epochs:
            produced, whole_epoch = False, self.file_index == 0 and self.position.row == 0
            order = self.file_order(self.epoch)
            while self.file_index < len(order):
                url = order[self.file_index]
                seen = [self.position.row]  # rows of the file looked at so far (the reader asks about each)

                def mine(row: int, url: str = url, seen: list[int] = seen) -> bool:
                    seen[0] = row + 1
                    owner = (self.rows_before + row) % self.world_size if self.striped else self.rank
                    return owner == self.rank and self.keep_row(url, row)

                for row, position in read_rows(url, self.position, mine, self.max_row_bytes):
                    self.position = position
                    produced = True
                    yield self.transform(row)
                self.rows_before += max(seen[0], self.position.row)
                self.file_index += 1
                self.position = Position()
            if whole_epoch and not produced and self.epochs is None:  # an endless stream would wait forever
                raise DataError(
                    f"rank {self.rank} of {self.world_size} got no rows in a whole epoch over "
                    f"{', '.join(self.files)} ({self.rows_before} lines or rows in all)"
                )
            self.epoch += 1
            self.file_index = 0
            self.rows_before = 0
            yield EPOCH_END

    def read_again(self, places: list[tuple[str, Position]]) -> list[Row]:
        """The rows that begin at these places (a file and a Row.start), read and transformed again as
        when first read, in the order given. Each file is read once, from its first place to its last."""
        starts: dict[str, dict[int, Position]] = {}
        for url, start in places:
            starts.setdefault(url, {})[start.row] = start
        rows: dict[tuple[str, int], Row] = {}
        for url, in_file in starts.items():
            left = set(in_file)
            for row, _ in read_rows(url, in_file[min(in_file)], in_file.__contains__, self.max_row_bytes):
                rows[url, row.start.row] = self.transform(row)
                left.discard(row.start.row)
                if not left:
                    break
        for url, start in places:
            if (url, start.row) not in rows:
                raise DataError(
                    f"{url}: row {start.row + 1}, saved in the data cursor, is gone: the file changed "
                    "since the checkpoint; cannot resume exactly"
                )
        return [rows[url, start.row] for url, start in places]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "file_index": self.file_index,
            "rows_before": self.rows_before,
            "position": self.position.to_dict(),
            "files": self.files,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["files"] != self.files:
            raise DataError(
                "the data files differ from those of the saved data cursor; cannot resume exactly"
            )
        self.epoch = state["epoch"]
        self.file_index = state["file_index"]
        self.rows_before = state["rows_before"]
        self.position = Position.from_dict(state["position"])


class ShuffleBuffer:
    """A bounded seeded shuffle over a row stream; drained at each epoch's end so epochs never mix."""

    def __init__(self, source: SourceStream, size: int, seed: int, rank: int):
        self.source = source
        self.size = size
        self.rng = random.Random(f"{seed}-buffer-{rank}")
        self.buffer: list[Row] = []
        self.draining = False  # an epoch ended: empty the buffer before reading on

    def __iter__(self) -> Iterator[Row | EpochEnd]:
        """Shuffled rows; EPOCH_END after the last row of each epoch, so later stages can flush."""
        rows = iter(self.source)
        while True:
            while self.draining and self.buffer:
                yield self._pop_random()
            if self.draining:
                self.draining = False
                yield EPOCH_END
            row = next(rows, StopIteration)
            if row is StopIteration:
                return
            if row is EPOCH_END:
                self.draining = True
            elif self.size <= 1:
                yield row
            else:
                self.buffer.append(row)
                if len(self.buffer) >= self.size:
                    yield self._pop_random()

    def _pop_random(self) -> Row:
        i = self.rng.randrange(len(self.buffer))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": random_state(self.rng),
            "buffer": [[r.source, r.start.row, r.start.offset] for r in self.buffer],  # where, not what
            "draining": self.draining,
            "source": self.source.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_random_state(self.rng, state["rng"])
        places = [(url, Position(row, offset)) for url, row, offset in state["buffer"]]
        self.buffer = self.source.read_again(places)
        self.draining = state["draining"]
        self.source.load_state_dict(state["source"])


class Mixture:
    """Rows drawn from several sources by weight (a seeded choice per row); each source cycles alone."""

    def __init__(self, streams: list[ShuffleBuffer], weights: list[float], seed: int, rank: int):
        self.streams = streams
        self.weights = weights
        self.rng = random.Random(f"{seed}-mix-{rank}")
        self.iterators: list[Iterator[Row]] | None = None

    @property
    def source(self) -> SourceStream:
        """The source whose epochs count for reporting: the one with the largest weight."""
        return self.streams[self.weights.index(max(self.weights))].source

    def __iter__(self) -> Iterator[Row]:
        iterators = [iter(stream) for stream in self.streams]
        while True:
            (chosen,) = self.rng.choices(range(len(iterators)), weights=self.weights)
            row = EPOCH_END
            while row is EPOCH_END:  # each source has its own epochs; the mixture has none
                row = next(iterators[chosen], StopIteration)
            if row is StopIteration:  # sources cycle forever; only a source limited to some epochs ends
                return
            yield row

    def state_dict(self) -> dict[str, Any]:
        return {"rng": random_state(self.rng), "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_random_state(self.rng, state["rng"])
        for stream, stream_state in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(stream_state)
