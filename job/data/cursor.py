"""A saved data cursor is input: checked against the spec before a row is read.

A checkpoint's rank file holds its rank's cursor (DataPipeline.state_dict()); saved_plan() checks it
as strictly as the spec, whole, so that an edited cursor cannot make a resumed run read a file the spec
does not name: its structure, every file it names against data.train and data.eval (a dataset repo's
file against the split they name, at the file's commit), its layout against the world size, and its
streams against this rank's files.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Collection
from functools import cache
from typing import Annotated, Any
from urllib.parse import unquote

import fsspec
from fsspec.utils import glob_translate
from pydantic import Field, StrictBool, StrictStr

from job.data.files import HUB_REPO, expand_pattern
from job.data.plan import DataPlan, source_entries
from job.errors import UserError
from job.rng import RandomState
from job.saved import Count, Saved, refuse, validated
from job.spec import DataSpec
from job.storage import filesystem, is_local

log = logging.getLogger(__name__)
HUB_FILE = re.compile(r"hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)@(?P<revision>[0-9a-f]{40})/(?P<path>[^?#]+)")
COMMIT_ID = re.compile(r"[0-9a-f]{40}")


def plain_path(path: str) -> bool:
    """No empty, `.` or `..` part: the path names the file where it says (a glob's `**` matches `..`)."""
    return all(part not in ("", ".", "..") for part in path.strip("/").split("/"))


def namer(pattern: str, name: str, resolved_now: Collection[str]) -> Callable[[str], bool]:
    """Whether a file is one that expand_pattern(pattern, name) can give: the URL itself, in the form
    expand gives it, or a match of the glob, told from names alone (nothing is listed or read); for a
    dataset repo, see repo_namer (`resolved_now`: the files the spec's entries resolve to now)."""
    if repo := HUB_REPO.match(pattern):
        return repo_namer(repo, name, resolved_now)
    fs, path = filesystem(pattern)
    glob = re.compile(glob_translate(path)) if fsspec.core.has_magic(path) else None

    def names(url: str) -> bool:
        inside = fs._strip_protocol(url)
        if (fs.unstrip_protocol(inside) if "://" in pattern else inside) != url:
            return False  # another store's URL, or not as expand gives it
        return glob.match(inside) is not None and plain_path(inside) if glob else inside == path

    return names


def repo_namer(repo: re.Match, name: str, resolved_now: Collection[str]) -> Callable[[str], bool]:
    """Whether a file is one the dataset repo entry `repo` names (its config's split; `name`, where
    the entry is in the spec, sets the default split) at the commit the file is pinned to, which must
    be the entry's when it names a commit: one of `resolved_now`, else one of the files the repo
    resolves to at that commit (a branch that moved since the checkpoint), asked of the Hub."""
    revision = unquote(repo["revision"] or "")
    query = "" if repo["query"] is None else f"?{repo['query']}"

    @cache
    def split_at(commit: str) -> frozenset[str]:
        entry = f"hf://datasets/{repo['repo']}@{commit}{query}"
        try:
            return frozenset(expand_pattern(entry, name))
        except UserError as e:
            log.warning("cannot tell which files %s names at commit %s, to check a saved data cursor: %s", name, commit, e)  # fmt: skip
            return frozenset()

    def in_split(url: str) -> bool:
        pinned = HUB_FILE.fullmatch(url)
        if pinned is None or pinned["repo"] != repo["repo"]:
            return False
        if COMMIT_ID.fullmatch(revision) and pinned["revision"] != revision:
            return False
        return url in resolved_now or url in split_at(pinned["revision"])

    return in_split


def relative_paths_hint(patterns: list[str]) -> str:
    """Why a resumed run may not find the files a relative path named: it resolves against the
    working directory, which may not be the one the run started in."""
    relative = [p for p in patterns if is_local(p) and not posixpath.isabs(local_path(p))]
    if not relative:
        return ""
    return (
        f" ({relative[0]} is a relative path: it resolves against the working directory, {os.getcwd()} "
        "now; resume the run from the directory it started in)"
    )


def local_path(url: str) -> str:
    """A local path or file:// URL as the path it names, before it is made absolute."""
    return posixpath.expanduser(url.removeprefix("file://"))


Files = list[StrictStr]
Place = tuple[StrictStr, Count, Count | None]  # a row: its file, index and byte offset
Origin = tuple[StrictStr, Count, Count | None, Count]  # an example: its row's place, and which piece


class SavedPlan(Saved):
    sources: list[tuple[Annotated[Files, Field(min_length=1)], Annotated[float, Field(gt=0, strict=True)]]]
    eval_files: Files
    layout: list[list[Files] | None]


class SavedPosition(Saved):
    row: Count
    offset: Count | None


class SavedSource(Saved):
    epoch: Count
    file_index: Count
    rows_before: Count
    position: SavedPosition
    files: Files


class SavedBuffer(Saved):
    rng: RandomState
    buffer: list[Place]
    draining: StrictBool
    source: SavedSource


class SavedMixture(Saved):
    rng: RandomState
    streams: list[SavedBuffer]


class SavedCounts(Saved):
    examples: Count
    truncated: Count
    dropped: Count


class SavedBudget(Saved):
    rows: Count
    bad: Count
    first_bad: list[StrictStr]


class SavedExamples(Saved):
    pending: list[Origin]
    counts: SavedCounts
    budget: SavedBudget


class SavedPacker(Saved):
    open_rows: list[list[Origin]]
    closing_epoch: StrictBool
    rows: Count
    real_tokens: Count


class SavedCursor(Saved):
    plan: SavedPlan
    rows: dict[str, Any]  # a SavedBuffer, or a SavedMixture of several sources: checked by the plan
    examples: SavedExamples
    packer: SavedPacker | None = None


def saved_plan(
    state: Any, data: DataSpec, current: DataPlan, rank: int, world_size: int, where: str
) -> DataPlan:
    """The plan of a saved data cursor (a checkpoint's rank file), once the whole cursor is checked:
    its structure, every file it names against the spec (so that none other is read), its layout
    against the world size, and its streams against this rank's files. UserError (exit 2) names
    `where` and what is wrong. `current`: the plan the spec makes now (the files its dataset repos
    resolve to, and its eval files, see _eval_files)."""
    cursor = validated(SavedCursor, state, where)
    saved = cursor.plan
    plan = DataPlan([(files, weight) for files, weight in saved.sources], saved.eval_files, saved.layout)
    _check_sources(plan, data, current, where)
    _check_layout(plan, world_size, where)
    _check_streams(cursor, plan, rank, where)
    packing = bool(data.packing)  # null where Spec.for_device was not applied (tests): none
    if (cursor.packer is None) == packing:
        refuse(
            where, f"{'no' if cursor.packer is None else 'a'} packer state, where data.packing is {packing}"
        )
    plan.eval_files = _eval_files(plan, data, current, where)
    return plan


def _check_sources(plan: DataPlan, data: DataSpec, current: DataPlan, where: str) -> None:
    """Each source of the plan is the spec's, with its weight, and every file of it one the spec names."""
    entries = source_entries(data)
    if len(plan.sources) != len(entries):
        refuse(where, f"plan.sources has {len(plan.sources)} sources, data.train makes {len(entries)}")
    sources = zip(plan.sources, entries, current.sources, strict=True)
    for i, ((files, weight), (name, patterns, wanted), (files_now, _)) in enumerate(sources):
        if weight != wanted:
            refuse(where, f"plan.sources[{i}] has the weight {weight}, {name} {wanted}")
        namers = [namer(pattern, name, files_now) for pattern in patterns]
        for url in files:
            if not any(names(url) for names in namers):
                hint = relative_paths_hint(patterns)
                refuse(where, f"plan.sources[{i}] names {url}, a file {name} does not name{hint}")


def _check_layout(plan: DataPlan, world_size: int, where: str) -> None:
    """Each source is striped (None) or shared out whole: each of its files to one of world_size ranks."""
    if len(plan.layout) != len(plan.sources):
        refuse(where, f"plan.layout has {len(plan.layout)} entries for {len(plan.sources)} sources")
    for i, ((files, _), shares) in enumerate(zip(plan.sources, plan.layout, strict=True)):
        shared = shares is None or (
            len(shares) == world_size and Counter(f for share in shares for f in share) == Counter(files)
        )
        if not shared:
            refuse(
                where, f"plan.layout[{i}] does not share plan.sources[{i}]'s files among {world_size} ranks"
            )


def _check_streams(cursor: SavedCursor, plan: DataPlan, rank: int, where: str) -> None:
    """Each stream reads this rank's files of its source, and every row the cursor holds (buffered,
    or an example still to come or in an open packed row) is in one of them."""
    mixed = len(plan.sources) > 1
    rows = validated(SavedMixture if mixed else SavedBuffer, cursor.rows, where, "rows")
    buffers = rows.streams if mixed else [rows]
    if len(buffers) != len(plan.sources):
        refuse(where, f"rows.streams has {len(buffers)} streams for {len(plan.sources)} sources")
    places = [("examples.pending", url) for url, *_ in cursor.examples.pending]
    if cursor.packer is not None:
        places += [("packer.open_rows", url) for row in cursor.packer.open_rows for url, *_ in row]
    for i, (buffer, (files, _)) in enumerate(zip(buffers, plan.rank_files(rank), strict=True)):
        at = f"rows.streams[{i}]" if mixed else "rows"
        if buffer.source.files != files:
            refuse(where, f"{at}.source.files are not the files of plan.sources[{i}] for rank {rank}")
        if buffer.source.file_index > len(files):
            refuse(where, f"{at}.source.file_index is past the source's {len(files)} files")
        places += [(f"{at}.buffer", url) for url, *_ in buffer.buffer]
    readable = {url for files, _ in plan.rank_files(rank) for url in files}
    for at, url in places:
        if url not in readable:
            refuse(where, f"{at} names {url}, not a file of the plan for rank {rank}")


def _eval_files(plan: DataPlan, data: DataSpec, current: DataPlan, where: str) -> list[str]:
    """The eval files a resumed run reads: with data.eval_fraction, the train files (their held-out
    rows); else the saved ones while they are what data.eval names (a glob may name more files by
    now), or the files data.eval names now when it changed since the checkpoint, which resuming
    allows (so an edited list is never read either)."""
    if data.eval_fraction:
        return [url for files, _ in plan.sources for url in files]
    namers = [namer(pattern, "data.eval", current.eval_files) for pattern in data.eval]
    saved = plan.eval_files
    named = all(any(names(url) for names in namers) for url in saved)
    if named and all(any(names(url) for url in saved) for names in namers):
        return saved
    log.warning("%s: its eval files are not those data.eval names (data.eval changed since the checkpoint, or the file was edited): evaluating on the files data.eval names now", where)  # fmt: skip
    return current.eval_files
