"""Files of a split: expand URLs and globs, then stream JSONL rows with their file and line.

Reading is streaming: rows are parsed as lines arrive, compression (.gz, .bz2, .zst, ...) is inferred
from the name by fsspec, and nothing is downloaded whole first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.utils import infer_compression

from job.errors import DataError, UserError
from job.storage import StorageOptions, filesystem


@dataclass(frozen=True)
class Row:
    """One line of a file: its parsed value, or why it could not be parsed."""

    source: str
    line: int
    value: Any = None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def expand(patterns: Sequence[str], storage_options: StorageOptions, key: str) -> list[str]:
    """URLs and globs -> the files they name (sorted within a glob). Missing input is exit 2, now."""
    files: list[str] = []
    for i, pattern in enumerate(patterns):
        try:
            fs, path = filesystem(pattern, storage_options)
            if fsspec.core.has_magic(path):
                matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
            else:
                matches = [path] if fs.isfile(path) else []
        except Exception as e:  # unreachable bucket, bad credentials, bad URL: all "cannot read"
            raise UserError(f"{key}[{i}]: cannot read {pattern}: {type(e).__name__}: {e}") from None
        if not matches:
            raise UserError(f"{key}[{i}]: no such file: {pattern}")
        files += [fs.unstrip_protocol(m) if "://" in pattern else m for m in matches]
    return files


def read_jsonl(url: str, storage_options: StorageOptions) -> Iterator[Row]:
    """Stream the rows of one JSON Lines file; blank lines are skipped, bad JSON becomes Row.error."""
    fs, path = filesystem(url, storage_options)
    line_no = 0
    try:
        with fs.open(path, "rb", compression=infer_compression(path)) as raw:
            for line_no, line in enumerate(raw, 1):  # noqa: B007 (line_no is read after the loop)
                if not line.strip():
                    continue
                try:
                    yield Row(url, line_no, value=json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield Row(url, line_no, error=f"invalid JSON: {getattr(e, 'msg', e)}")
    except (OSError, EOFError) as e:  # a truncated .gz, a connection lost for good
        raise DataError(f"{url}:{line_no + 1}: cannot read: {type(e).__name__}: {e}") from None
