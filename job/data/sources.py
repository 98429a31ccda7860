"""The rows of one file (or saved dataset), streamed resumably, each with its file and line.

Which files a data entry names, and the format of each, is files.py's. Reading streams: rows are
parsed as bytes arrive and memory stays bounded (Parquet: a batch of rows at a time; JSON arrays: item
by item). A row over data.max_row_bytes is a bad row, read past in blocks, never held whole; so are
the rows of a Parquet row group over max_row_bytes per row, which is not decoded. Every row comes with
the Position just after it, so a reader stopped anywhere continues later with exactly the next row,
and knows the Position it starts at, so that it can be read again from there.

What the store raises while a file is read (access denied, an outage that outlasted the retries) is a
storage error (job.storage.storage_error: exit 2 or 1); only damaged content is a DataError (exit 3).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import lzma
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.compression import compr
from fsspec.utils import infer_compression
from zstandard import ZstdError

from job.data.files import source_format
from job.data.json_array import advance, json_items, text_blocks, utf8_size
from job.errors import DataError
from job.spec import DataSpec
from job.storage import filesystem, storage_error

BUFFER_SIZE = 1 << 20  # fsspec's own readline re-reads a whole block per line: read through a buffer
# Bytes fetched per request from object stores. s3fs's default (50 MB) would make the first batch of a
# large file wait for 50 MB and hold them in memory; small blocks keep both flat in the file's size.
REMOTE_BLOCK_SIZE = 4 << 20
# Parquet rows decoded at a time: PARQUET_BATCH_ROWS, or fewer when a row group's rows are large, so
# that a batch holds about PARQUET_BATCH_BYTES (by the group's average row size).
PARQUET_BATCH_ROWS = 1024
PARQUET_BATCH_BYTES = 16 << 20
MAX_ROW_BYTES: int = DataSpec.model_fields["max_row_bytes"].default
TOO_LONG = "longer than data.max_row_bytes ({} bytes)"
GROUP_TOO_LONG = (
    "in a row group of {rows} rows and {size} bytes uncompressed, over data.max_row_bytes ({limit} bytes) "
    "per row: not read"
)
# What damaged content raises as it is decoded: truncated or corrupt compression (gzip's BadGzipFile
# and bz2's invalid streams are OSErrors, as are Parquet's damaged pages), bytes that are not UTF-8
# (CSV), a CSV header that cannot be read, not Parquet. The store's own errors never come as these:
# _StoredFile raises them as StorageFailure.
DAMAGED: tuple[type[Exception], ...] = (
    OSError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    UnicodeDecodeError,
    csv.Error,
    pa.ArrowException,
    ZstdError,
)

Keep = Callable[[int], bool]


@dataclass(frozen=True)
class Row:
    """One row of a file: its parsed value, or why it could not be parsed; and where it begins."""

    source: str
    line: int  # 1-based: line (JSONL, text), line the record starts on (CSV), row number (JSON, Parquet)
    value: Any = None
    error: str | None = None
    # Its 0-based index in the file, and its byte offset where the file can seek: read_rows(source,
    # start) yields it first. What a checkpoint saves in place of the row itself.
    start: Position = field(kw_only=True)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Position:
    """Where to resume reading a file: the next row's 0-based index, and its byte offset when the
    file can seek there (uncompressed JSONL and text); other files skip `row` rows unparsed."""

    row: int = 0
    offset: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return {"row": self.row, "offset": self.offset}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Position:
        offset = d.get("offset")
        return Position(int(d["row"]), None if offset is None else int(offset))


def read_rows(
    url: str, start: Position = Position(), keep: Keep | None = None, max_row_bytes: int = MAX_ROW_BYTES
) -> Iterator[tuple[Row, Position]]:
    """Stream the rows of one file from `start`, each with the Position just after it.

    `keep(i)` (i: the row's 0-based index in the file) selects rows: the others are skipped unparsed
    and not yielded, though the next Position yielded counts them. keep is asked about every row from
    start.row on, once each, in order (JSONL and text: every line, blank ones too). Rows that cannot
    be parsed come with Row.error, as do rows over max_row_bytes. A file whose content is damaged
    raises DataError naming file and line; one that the store fails to give, storage_error's error.
    """
    fs, path = filesystem(url)
    reader = READERS[source_format(fs, path, url)]
    return reader(url, fs, path, start, keep or (lambda _: True), max_row_bytes)


class StorageFailure(Exception):
    """What the store raised while a file was read, carried up through the decompressors and parsers
    above it, so that _reading tells it from damaged content."""

    def __init__(self, error: Exception):
        super().__init__(error)
        self.error = error


@contextmanager
def _from_storage() -> Iterator[None]:
    """Around calls to the store only: what they raise becomes StorageFailure."""
    try:
        yield
    except Exception as e:  # every backend raises its own types
        raise StorageFailure(e) from e


class _StoredFile(io.RawIOBase):
    """A file's bytes as the store gives them, unbuffered; the store's errors come as StorageFailure."""

    def __init__(self, file: io.IOBase):
        self.file = file

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with _from_storage():
            return self.file.read(size)

    def readinto(self, buffer: memoryview | bytearray) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        with _from_storage():
            return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        if not self.closed:
            self.file.close()
        super().close()


@contextmanager
def _reading(url: str, where: Callable[[], int]) -> Iterator[None]:
    """While a file is read: the store's failures -> storage_error (exit 2: access denied, ...; exit
    1: an outage), damaged content -> DataError (exit 3), at the line where() names when they happen."""
    try:
        yield
    except StorageFailure as e:
        raise storage_error(e.error, f"{url}:{where()}: cannot read") from None
    except DAMAGED as e:
        raise DataError(f"{url}:{where()}: cannot read: {type(e).__name__}: {e}") from None


def _stored(fs: fsspec.AbstractFileSystem, path: str) -> _StoredFile:
    with _from_storage():
        return _StoredFile(fs.open(path, "rb", block_size=REMOTE_BLOCK_SIZE))


@contextmanager
def _open(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[io.BufferedReader]:
    """The file's bytes, decompressed as its name says."""
    with (
        _stored(fs, path) as stored,
        io.BufferedReader(compr[infer_compression(path)](stored, mode="rb"), BUFFER_SIZE) as f,
    ):
        yield f


def _lines(
    url: str, fs: fsspec.AbstractFileSystem, path: str, start: Position, max_row_bytes: int
) -> Iterator[tuple[bytes | None, Position, Position]]:
    """(line, Position of it, Position after it) for every line from start.row on; None in place of a
    line over max_row_bytes (its newline included), which is read past in blocks, never held whole.

    An uncompressed file seeks to start.offset; a compressed one reads and drops start.row lines.
    """
    seekable = infer_compression(path) is None
    done, offset = (start.row, start.offset) if seekable and start.offset is not None else (0, 0)
    with _reading(url, lambda: done + 1), _open(fs, path) as f:
        if offset:
            f.seek(offset)
        while line := f.readline(max_row_bytes + 1):
            size = len(line)
            if size > max_row_bytes:
                line, size = None, size + _rest_of_line(f, line)
            if done >= start.row:
                at = Position(done, offset if seekable else None)
                yield line, at, Position(done + 1, offset + size if seekable else None)
            done, offset = done + 1, offset + size


def _rest_of_line(f: io.BufferedReader, head: bytes) -> int:
    """Read past the rest of a line that begins with `head`, a block at a time; its size in bytes."""
    size, block = 0, head
    while block and not block.endswith(b"\n"):
        block = f.readline(BUFFER_SIZE)
        size += len(block)
    return size


def _parsed_lines(
    url: str,
    fs: fsspec.AbstractFileSystem,
    path: str,
    start: Position,
    keep: Keep,
    max_row_bytes: int,
    parse: Callable[[bytes], Any],
) -> Iterator[tuple[Row, Position]]:
    """Each kept non-blank line as a row: parse(line), or the ValueError it raised as the row's error."""
    for line, at, after in _lines(url, fs, path, start, max_row_bytes):
        if not keep(at.row):
            continue
        if line is None:
            yield Row(url, at.row + 1, error=TOO_LONG.format(max_row_bytes), start=at), after
        elif line.strip():
            try:
                value = parse(line)
            except ValueError as e:
                yield Row(url, at.row + 1, error=str(e), start=at), after
            else:
                yield Row(url, at.row + 1, value=value, start=at), after


def _json_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"invalid JSON: {getattr(e, 'msg', e)}") from None


def _text_line(line: bytes) -> dict[str, str]:
    try:
        return {"text": line.decode("utf-8-sig").rstrip("\r\n")}  # -sig: a leading byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8: {e.reason}") from None


class RowTooLong(csv.Error):
    """A CSV record over data.max_row_bytes, read past (a csv.Error, as the csv module's own limit is)."""


class _CsvLines:
    """A CSV file's lines for csv.reader, those of one record no longer than max_row_bytes together:
    the line that takes a record over is read past, and RowTooLong raised (and so for each further
    line of that record). Counts the lines read, and whether the quotes of the record being read are
    open, so that a record that could not be read can be read past to its end."""

    def __init__(self, text: io.TextIOWrapper, max_row_bytes: int):
        self.text = text
        self.max_row_bytes = max_row_bytes
        self.read = 0
        self.quoted = False  # an odd number of quote characters since the record began
        self.record_bytes = 0  # of the record's lines read so far

    def start_record(self) -> None:
        self.quoted = False
        self.record_bytes = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        room = max(self.max_row_bytes - self.record_bytes, 0)
        line = self._readline(room + 1)  # characters, each a byte or more: enough to tell it is over
        if not line:
            raise StopIteration
        self.read += 1
        self.record_bytes += utf8_size(line)
        if self.record_bytes > self.max_row_bytes:
            while not line.endswith(("\n", "\r")) and (line := self._readline(BUFFER_SIZE)):
                pass
            raise RowTooLong(TOO_LONG.format(self.max_row_bytes))
        return line

    def _readline(self, limit: int) -> str:
        line = self.text.readline(limit)
        self.quoted ^= line.count('"') % 2 == 1
        return line

    def read_past_record(self) -> None:
        """After a record csv.reader gave up on, mid-line: on to the end of the line where its quotes
        close. Parity tells, as csv writes quotes: around a field, and doubled inside it."""
        while self.quoted:
            try:
                next(self)
            except RowTooLong:
                pass
            except StopIteration:
                break


def _read_csv(
    url: str, fs: fsspec.AbstractFileSystem, path: str, start: Position, keep: Keep, max_row_bytes: int
) -> Iterator[tuple[Row, Position]]:
    """Rows are the records after the header (blank lines are none); values stay strings. A record
    over max_row_bytes (all its lines), or with a field over the csv module's field_size_limit(), is
    a bad row."""
    line = 1  # where the record being read begins
    with _reading(url, lambda: line), _open(fs, path) as f:
        lines = _CsvLines(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""), max_row_bytes)
        records = csv.reader(lines)
        header = next((r for r in records if r), None)
        if header is None:
            return
        index = 0
        while True:
            line, error = lines.read + 1, None
            lines.start_record()
            try:
                record = next(records)
            except StopIteration:
                return
            except csv.Error as e:
                lines.read_past_record()
                record, error = None, str(e)
            if record == []:
                continue
            if index >= start.row and keep(index):
                if record is not None and len(record) != len(header):
                    error = f"expected {len(header)} fields, got {len(record)}"
                value = None if error else dict(zip(header, record, strict=True))
                yield Row(url, line, value=value, error=error, start=Position(index)), Position(index + 1)
            index += 1


def _read_json(
    url: str, fs: fsspec.AbstractFileSystem, path: str, start: Position, keep: Keep, max_row_bytes: int
) -> Iterator[tuple[Row, Position]]:
    """A JSON array: rows are its items, found one by one as the file streams, each parsed only when
    kept. A .json file of JSON Lines (common in dataset repos) is read as JSON Lines."""
    with _reading(url, lambda: 1), _open(fs, path) as f:
        json_lines = f.peek(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{"
    if json_lines:
        yield from _parsed_lines(url, fs, path, start, keep, max_row_bytes, _json_line)
        return
    index = 0
    with _reading(url, lambda: index + 1), _open(fs, path) as f:
        items = json_items(url, text_blocks(url, f, BUFFER_SIZE), max_row_bytes)
        for index, (text, line, column) in enumerate(items):
            if index < start.row or not keep(index):
                continue
            at, after = Position(index), Position(index + 1)
            if text is None:
                yield Row(url, index + 1, error=TOO_LONG.format(max_row_bytes), start=at), after
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                line, column = advance(line, column, text, 0, e.pos)
                raise DataError(f"{url}:{line}:{column}: invalid JSON: {e.msg}") from None
            yield Row(url, index + 1, value=value, start=at), after


def _read_parquet(
    url: str, fs: fsspec.AbstractFileSystem, path: str, start: Position, keep: Keep, max_row_bytes: int
) -> Iterator[tuple[Row, Position]]:
    """Row group by row group, a batch of rows at a time; groups before start.row, or with no row
    kept, are not read. Nor is a group whose uncompressed size (the file's metadata) is over
    max_row_bytes per row, which surely holds rows over the limit: its rows are bad rows. keep is
    asked about the rows of a group batch by batch, as they are read."""
    row = start.row  # the first row of the batch being read, for messages
    with _reading(url, lambda: row + 1), _stored(fs, path) as f:
        parquet = pq.ParquetFile(f)
        first = 0  # the group's first row
        for group in range(parquet.metadata.num_row_groups):
            metadata = parquet.metadata.row_group(group)
            end = first + metadata.num_rows
            kept = (i for i in range(max(first, start.row), end) if keep(i))
            wanted = next(kept, None)  # the next row to yield
            size = sum(metadata.column(c).total_uncompressed_size for c in range(metadata.num_columns))
            if wanted is not None and size > metadata.num_rows * max_row_bytes:
                error = GROUP_TOO_LONG.format(rows=metadata.num_rows, size=size, limit=max_row_bytes)
                for i in itertools.chain([wanted], kept):
                    yield Row(url, i + 1, error=error, start=Position(i)), Position(i + 1)
            elif wanted is not None:
                row = first
                batch_rows = min(PARQUET_BATCH_ROWS, PARQUET_BATCH_BYTES * metadata.num_rows // max(size, 1))
                for batch in parquet.iter_batches(batch_size=max(batch_rows, 1), row_groups=[group]):
                    rows = []
                    while wanted is not None and wanted < row + batch.num_rows:
                        rows.append(wanted)
                        wanted = next(kept, None)
                    values = _arrow_rows(batch, [i - row for i in rows], max_row_bytes)
                    for i, value in zip(rows, values, strict=True):
                        error = TOO_LONG.format(max_row_bytes) if value is None else None
                        yield Row(url, i + 1, value=value, error=error, start=Position(i)), Position(i + 1)
                    row += batch.num_rows
            first = end


def _arrow_rows(batch: pa.RecordBatch, rows: list[int], max_row_bytes: int) -> list[dict[str, Any] | None]:
    """These rows of a batch as Python values; None for a row whose Arrow data is over max_row_bytes
    (its size read from the batch's offsets), which is neither copied nor converted."""
    fits = rows
    if batch.nbytes > max_row_bytes:  # some row may be over
        fits = [i for i in rows if batch.slice(i, 1).nbytes <= max_row_bytes]
    chosen = batch if len(fits) == batch.num_rows else batch.take(pa.array(fits, pa.int64()))
    values = dict(zip(fits, chosen.to_pylist(), strict=True))
    return [values.get(i) for i in rows]


def _read_saved_dataset(
    url: str, fs: fsspec.AbstractFileSystem, path: str, start: Position, keep: Keep, max_row_bytes: int
) -> Iterator[tuple[Row, Position]]:
    """A Dataset saved with save_to_disk, through datasets itself (memory-mapped Arrow; an object-store
    copy is fetched first): rows by index, PARQUET_BATCH_ROWS at a time, from start.row on.
    max_row_bytes is not applied: datasets decodes its rows itself."""
    from datasets import load_from_disk

    with _reading(url, lambda: start.row + 1):
        try:
            dataset = load_from_disk(url, storage_options=fs.storage_options)
        except pa.ArrowException:  # damaged Arrow files
            raise
        except Exception as e:  # the store's failures, as datasets passes them on
            raise StorageFailure(e) from e
    for first in range(start.row, len(dataset), PARQUET_BATCH_ROWS):
        wanted = [i for i in range(first, min(first + PARQUET_BATCH_ROWS, len(dataset))) if keep(i)]
        if wanted:
            for i, value in zip(wanted, dataset.select(wanted).to_list(), strict=True):
                yield Row(url, i + 1, value=value, start=Position(i)), Position(i + 1)


READERS: dict[str, Callable[..., Iterator[tuple[Row, Position]]]] = {
    "datasets": _read_saved_dataset,
    "jsonl": partial(_parsed_lines, parse=_json_line),
    "json": _read_json,
    "parquet": _read_parquet,
    "csv": _read_csv,
    "text": partial(_parsed_lines, parse=_text_line),
}
