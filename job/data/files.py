"""Which files a data entry names, and how each is read: URLs and globs expanded, a directory written
by datasets' save_to_disk as one source, a Hugging Face dataset repo
(`hf://datasets/OWNER/NAME[@REVISION][?config=C&split=S]`) resolved by datasets to the data files of
one split (its card's configs, else its file layout), pinned to the commit; and the format a file's
name says (JSON Lines, JSON, Parquet, CSV, text, each optionally compressed: .gz, .bz2, .zst, .xz).
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Sequence
from urllib.parse import parse_qs, unquote

import fsspec
from fsspec.utils import infer_compression

from job.errors import UserError
from job.storage import filesystem, storage_errors

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
SAVED_DATASET_MARKER = "state.json"  # what datasets' save_to_disk writes beside its Arrow files
# A revision is a branch, tag or commit (one with "/" URL-encoded, %2F), or a pull request's refs/pr/N.
HUB_REPO = re.compile(
    r"^hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>refs/pr/\d+|[^/?]+))?/?(?:\?(?P<query>.*))?$"
)


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
    with storage_errors(f"{name}: cannot read {pattern}"):
        fs, path = filesystem(pattern)
        if fsspec.core.has_magic(path):
            matches = sorted(p for p in fs.glob(path) if fs.isfile(p) or is_saved_dataset(fs, p))
        else:
            matches = [path] if _is_input(fs, path) else []
    if not matches and fs.isfile(f"{path.rstrip('/')}/dataset_dict.json"):
        raise UserError(
            f"{name}: {pattern} holds a DatasetDict; name one split's directory, e.g. {pattern}/train"
        )
    if not matches:
        raise UserError(f"{name}: no such file: {pattern}")
    return [_checked(fs.unstrip_protocol(match) if "://" in pattern else match, name) for match in matches]


def _is_input(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether path is a file or a saved dataset. Unlike fs.isfile, an error that is not "no such
    file" (access denied, say) is raised, not taken for absence."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return False
    return info["type"] == "file" or is_saved_dataset(fs, path)


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
