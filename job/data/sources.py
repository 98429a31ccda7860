"""Files of a split: expand URLs and globs, then stream their rows, resumably, with file and line.

Formats come from the file name: JSON Lines, JSON arrays, Parquet, CSV and plain text, each optionally
compressed (.gz, .bz2, .zst, .xz; inferred by fsspec); a directory written by datasets' save_to_disk
is one source too, read through datasets; a Hugging Face dataset repo
(`hf://datasets/OWNER/NAME[@REVISION][?config=C&split=S]`) names the data files of one split, which
datasets resolves from the repo (its card's configs, else its file layout), pinned to the commit, and
which are then read like any other files. Reading streams: rows are parsed as bytes
arrive and memory stays bounded (Parquet: one row group at a time), except for JSON arrays, which
are read whole. Every row comes with the Position just after it, so a reader stopped anywhere
continues later with exactly the next row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import lzma
import posixpath
import re
import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qs, unquote

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import infer_compression
from zstandard import ZstdError

from job.errors import DataError, UserError
from job.storage import filesystem

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
}
BUFFER_SIZE = 1 << 20  # fsspec's own readline re-reads a whole block per line: read through a buffer
# Bytes fetched per request from object stores. s3fs's default (50 MB) would make the first batch of a
# large file wait for 50 MB and hold them in memory; small blocks keep both flat in the file's size.
REMOTE_BLOCK_SIZE = 4 << 20
PARQUET_BATCH_ROWS = 1024
SAVED_DATASET_MARKER = "state.json"  # what datasets' save_to_disk writes beside its Arrow files
# A revision is a branch, tag or commit (one with "/" URL-encoded, %2F), or a pull request's refs/pr/N.
HUB_REPO = re.compile(
    r"^hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>refs/pr/\d+|[^/?]+))?/?(?:\?(?P<query>.*))?$"
)
# What a damaged or vanishing file raises while it is read: truncated or corrupt compression, a
# connection lost for good, bytes that are not UTF-8 (CSV), a CSV field over the size limit, not Parquet.
READ_ERRORS: tuple[type[Exception], ...] = (
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
    """One row of a file: its parsed value, or why it could not be parsed."""

    source: str
    line: int  # 1-based: line (JSONL, text), line the record starts on (CSV), row number (JSON, Parquet)
    value: Any = None
    error: str | None = None

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


def file_format(url: str) -> str:
    """The format a file's name says ("jsonl", "json", "parquet", "csv", "text"); UserError if none."""
    name = url.rsplit("/", 1)[-1]
    compression = infer_compression(name)
    suffix = posixpath.splitext(posixpath.splitext(name)[0] if compression else name)[1].lower()
    if suffix not in FORMATS:
        supported = ", ".join(FORMATS)
        raise UserError(
            f"{url}: unsupported file type; supported: {supported}, optionally compressed (.gz, .bz2, .zst, .xz)"
        )
    if compression and FORMATS[suffix] == "parquet":  # Parquet needs random access to its footer
        raise UserError(
            f"{url}: a Parquet file cannot be read through {compression}; Parquet compresses itself"
        )
    return FORMATS[suffix]


def is_saved_dataset(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """A directory written by datasets' Dataset.save_to_disk."""
    return fs.isfile(f"{path.rstrip('/')}/{SAVED_DATASET_MARKER}")


def source_format(fs: fsspec.AbstractFileSystem, path: str, url: str) -> str:
    """The reader for a source: "datasets" for a saved dataset's directory, else what its name says."""
    return "datasets" if is_saved_dataset(fs, path) else file_format(url)


def file_sizes(urls: Sequence[str]) -> list[tuple[str, int]] | None:
    """(file, bytes) for each entry, when bytes are a fair measure of rows: None for a saved dataset's
    directory, a size the store does not tell, or files of different formats or compressions."""
    kinds = {(posixpath.splitext(url)[1], infer_compression(url)) for url in urls}
    if len(kinds) > 1:
        return None
    sized = []
    for url in urls:
        fs, path = filesystem(url)
        info = fs.info(path)
        if info.get("type") != "file" or info.get("size") is None:
            return None
        sized.append((url, int(info["size"])))
    return sized


def expand(patterns: Sequence[str], key: str) -> list[str]:
    """URLs and globs -> the files they name; errors name the entry as key[i]."""
    return [url for i, pattern in enumerate(patterns) for url in expand_pattern(pattern, f"{key}[{i}]")]


def expand_pattern(pattern: str, name: str) -> list[str]:
    """One URL, glob or dataset repo -> the files it names (sorted). Missing input, or a file of a
    format that cannot be read, is exit 2, now; `name` says where the pattern is in the spec."""
    if repo := HUB_REPO.match(pattern):
        default_split = "validation" if name.startswith("data.eval") else "train"
        return [_named_format(url, name) for url in hub_split_files(pattern, repo, name, default_split)]
    try:
        fs, path = filesystem(pattern)
        if fsspec.core.has_magic(path):
            matches = sorted(p for p in fs.glob(path) if fs.isfile(p) or is_saved_dataset(fs, p))
        else:
            matches = [path] if fs.isfile(path) or is_saved_dataset(fs, path) else []
    except Exception as e:  # unreachable bucket, bad credentials, bad URL: all "cannot read"
        raise UserError(f"{name}: cannot read {pattern}: {type(e).__name__}: {e}") from None
    if not matches and fs.isfile(f"{path.rstrip('/')}/dataset_dict.json"):
        raise UserError(
            f"{name}: {pattern} holds a DatasetDict; name one split's directory, e.g. {pattern}/train"
        )
    if not matches:
        raise UserError(f"{name}: no such file: {pattern}")
    return [_checked(fs.unstrip_protocol(match) if "://" in pattern else match, name) for match in matches]


def _checked(url: str, name: str) -> str:
    """url, once a reader for it is known."""
    fs, path = filesystem(url)
    try:
        source_format(fs, path, url)
    except UserError as e:
        raise UserError(f"{name}: {e}") from None
    return url


def _named_format(url: str, name: str) -> str:
    """A file a dataset repo names (never a saved dataset's folder), once its name says its format."""
    try:
        file_format(url)
    except UserError as e:
        raise UserError(f"{name}: {e}") from None
    return url


def hub_split_files(url: str, repo: re.Match, name: str, default_split: str) -> list[str]:
    """The data files of one split of a Hugging Face dataset repo, as datasets resolves them (no
    loading script is run: datasets has none since 4.0), pinned to the commit it resolved."""
    query = parse_qs(repo["query"] or "", keep_blank_values=True)
    unknown = sorted(set(query) - {"config", "split"})
    if unknown:
        raise UserError(
            f"{name}: {url}: unknown parameter {unknown[0]!r}; a dataset repo takes ?config=...&split=..."
        )
    split = query.get("split", [default_split])[-1]
    config = query.get("config", [None])[-1]
    from datasets import load_dataset_builder

    revision = unquote(repo["revision"]) if repo["revision"] else None
    try:
        builder = load_dataset_builder(repo["repo"], config, revision=revision)
    except Exception as e:  # no such repo, revision or config; no access; hub unreachable; a script
        raise UserError(f"{name}: cannot resolve the dataset repo {url}: {type(e).__name__}: {e}") from None
    defaults = type(builder.config)(name=builder.config.name)
    options = [
        f.name
        for f in dataclasses.fields(builder.config)
        if f.name not in ("name", "version", "data_dir", "data_files", "description")
        and getattr(builder.config, f.name) != getattr(defaults, f.name)
    ]
    if options:
        raise UserError(
            f"{name}: {url}: the dataset card sets reader options ftjob does not apply ({', '.join(options)}); "
            "name the data files directly instead"
        )
    splits = builder.config.data_files or {}
    if split not in splits:
        known = ", ".join(str(s) for s in splits) or "none"
        raise UserError(
            f"{name}: {url} has no split {split!r} (its splits: {known}); choose one with ?split="
        )
    return [str(f) for f in splits[split]]


def read_rows(
    url: str, start: Position = Position(), keep: Keep | None = None
) -> Iterator[tuple[Row, Position]]:
    """Stream the rows of one file from `start`, each with the Position just after it.

    `keep(i)` (i: the row's 0-based index in the file) selects rows: the others are skipped unparsed
    and not yielded, though the next Position yielded counts them. keep is asked about every row from
    start.row on, once each, in order (JSONL and text: every line, blank ones too). Rows that cannot
    be parsed come with Row.error; a file that cannot be read raises DataError naming file and line.
    """
    fs, path = filesystem(url)
    reader = READERS[source_format(fs, path, url)]
    return reader(url, fs, path, start, keep or (lambda _: True))


@contextmanager
def _reading(url: str, where: Callable[[], int]) -> Iterator[None]:
    """Read errors -> DataError at the line where() names when they happen."""
    try:
        yield
    except READ_ERRORS as e:
        raise DataError(f"{url}:{where()}: cannot read: {type(e).__name__}: {e}") from None


def _open(fs: fsspec.AbstractFileSystem, path: str) -> io.BufferedReader:
    """The file's bytes, decompressed as its name says."""
    raw = fs.open(path, "rb", block_size=REMOTE_BLOCK_SIZE, compression=infer_compression(path))
    return io.BufferedReader(raw, BUFFER_SIZE)


def _lines(
    url: str, fs: fsspec.AbstractFileSystem, path: str, start: Position
) -> Iterator[tuple[int, bytes, Position]]:
    """(0-based line index, line, Position after it) for every line from start.row on.

    An uncompressed file seeks to start.offset; a compressed one reads and drops start.row lines.
    """
    seekable = infer_compression(path) is None
    done, offset = (start.row, start.offset) if seekable and start.offset is not None else (0, 0)
    with _reading(url, lambda: done + 1), _open(fs, path) as f:
        if offset:
            f.seek(offset)
        for line in f:
            done, offset = done + 1, offset + len(line)
            if done > start.row:
                yield done - 1, line, Position(done, offset if seekable else None)


def _parsed_lines(
    url: str,
    fs: fsspec.AbstractFileSystem,
    path: str,
    start: Position,
    keep: Keep,
    parse: Callable[[bytes], Any],
) -> Iterator[tuple[Row, Position]]:
    """Each kept non-blank line as a row: parse(line), or the ValueError it raised as the row's error."""
    for index, line, after in _lines(url, fs, path, start):
        if keep(index) and line.strip():
            try:
                value = parse(line)
            except ValueError as e:
                yield Row(url, index + 1, error=str(e)), after
            else:
                yield Row(url, index + 1, value=value), after


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


def _read_csv(
    url: str, fs: fsspec.AbstractFileSystem, path: str, start: Position, keep: Keep
) -> Iterator[tuple[Row, Position]]:
    """Rows are the records after the header (blank lines are none); values stay strings."""
    lines_read = 0
    with _reading(url, lambda: lines_read + 1), _open(fs, path) as f:
        records = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
        header = next((r for r in records if r), None)
        if header is None:
            return
        index, lines_read = 0, records.line_num
        for record in records:
            line, lines_read = lines_read + 1, records.line_num  # a quoted field may span lines
            if not record:
                continue
            if index >= start.row and keep(index):
                if len(record) == len(header):
                    yield Row(url, line, value=dict(zip(header, record, strict=True))), Position(index + 1)
                else:
                    error = f"expected {len(header)} fields, got {len(record)}"
                    yield Row(url, line, error=error), Position(index + 1)
            index += 1


def _read_json(
    url: str, fs: fsspec.AbstractFileSystem, path: str, start: Position, keep: Keep
) -> Iterator[tuple[Row, Position]]:
    """A JSON array: rows are its items. Read whole: streaming a JSON array needs an extra library.
    A .json file of JSON Lines (common in dataset repos) is read as JSON Lines."""
    with _reading(url, lambda: 1), _open(fs, path) as f:
        json_lines = f.peek(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{"
        data = b"" if json_lines else f.read()
    if json_lines:
        yield from _parsed_lines(url, fs, path, start, keep, _json_line)
        return
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line, col = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{url}:{line}:{col}: invalid UTF-8: {e.reason}") from None
    except json.JSONDecodeError as e:
        hint = " (JSON Lines? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{url}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}{hint}") from None
    if not isinstance(items, list):
        raise DataError(f"{url}:1:1: expected a JSON array of rows, got {type(items).__name__}")
    for index in range(start.row, len(items)):
        if keep(index):
            yield Row(url, index + 1, value=items[index]), Position(index + 1)


def _read_parquet(
    url: str, fs: fsspec.AbstractFileSystem, path: str, start: Position, keep: Keep
) -> Iterator[tuple[Row, Position]]:
    """One row group in memory at most; groups before start.row, or with no row kept, are not read."""
    row = start.row  # the first row of the batch being read, for messages
    with _reading(url, lambda: row + 1), fs.open(path, "rb", block_size=REMOTE_BLOCK_SIZE) as f:
        parquet = pq.ParquetFile(f)
        first = 0  # the group's first row
        for group in range(parquet.metadata.num_row_groups):
            end = first + parquet.metadata.row_group(group).num_rows
            wanted = [i for i in range(max(first, start.row), end) if keep(i)]
            if wanted:
                row = first
                for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group]):
                    rows = wanted[bisect_left(wanted, row) : bisect_left(wanted, row + batch.num_rows)]
                    values = batch.take(pa.array([i - row for i in rows], pa.int64())).to_pylist()
                    for i, value in zip(rows, values, strict=True):
                        yield Row(url, i + 1, value=value), Position(i + 1)
                    row += batch.num_rows
            first = end


def _read_saved_dataset(
    url: str, fs: fsspec.AbstractFileSystem, path: str, start: Position, keep: Keep
) -> Iterator[tuple[Row, Position]]:
    """A Dataset saved with save_to_disk, through datasets itself (memory-mapped Arrow; an object-store
    copy is fetched first): rows by index, PARQUET_BATCH_ROWS at a time, from start.row on."""
    from datasets import load_from_disk

    with _reading(url, lambda: start.row + 1):
        dataset = load_from_disk(url, storage_options=fs.storage_options)
    for first in range(start.row, len(dataset), PARQUET_BATCH_ROWS):
        wanted = [i for i in range(first, min(first + PARQUET_BATCH_ROWS, len(dataset))) if keep(i)]
        if wanted:
            for i, value in zip(wanted, dataset.select(wanted).to_list(), strict=True):
                yield Row(url, i + 1, value=value), Position(i + 1)


READERS: dict[str, Callable[..., Iterator[tuple[Row, Position]]]] = {
    "datasets": _read_saved_dataset,
    "jsonl": partial(_parsed_lines, parse=_json_line),
    "json": _read_json,
    "parquet": _read_parquet,
    "csv": _read_csv,
    "text": partial(_parsed_lines, parse=_text_line),
}
