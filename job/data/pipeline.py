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
them is. A saved cursor is input like the spec: load_state_dict() checks it whole (saved_plan), every
file it names against data.train and data.eval (a dataset repo's file against the split they name,
at the file's commit), before it reads a row.
"""

from __future__ import annotations

import copy
import logging
import os
import posixpath
import random
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cache, partial
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import unquote

import fsspec
from fsspec.utils import glob_translate
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from job.data.batching import Batch, pack_row, pad_batch, stack_packed
from job.data.files import HUB_REPO, expand, expand_pattern, file_sizes
from job.data.formats import BadRow, Example, Formatter
from job.data.sources import Position, Row
from job.data.stream import (
    EPOCH_END,
    EpochEnd,
    Mixture,
    ShuffleBuffer,
    SourceStream,
    file_shares,
    held_out,
    set_random_state,
)
from job.data.tokens import Fitted, TokenizedExample, fit, tokenize
from job.errors import DataError, JobError, UserError
from job.spec import BadRowsSpec, DataSpec, _json_path, echo
from job.storage import filesystem, is_local

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
    with OPEN_ROWS rows open the oldest is closed. A greedy packer (one open row, closed when the next
    example won't fit) took 61 optimizer steps for the bench's length-skewed data (87% of the rows'
    tokens real at most), this one 55 (96%): a short example fills a gap that a long one left instead
    of starting the next row. It still streams (an example waits at most OPEN_ROWS rows), rows never
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


def source_entries(data: DataSpec) -> list[tuple[str, list[str], float]]:
    """data.train as the plan's sources, each as (its spec field, its URLs and globs, its weight): one
    source of every entry, or one per entry when weighted."""
    groups = data.train_groups()
    if not data.weighted:
        return [("data.train", [p for patterns, _ in groups for p in patterns], 1.0)]
    return [(f"data.train[{i}]", patterns, weight) for i, (patterns, weight) in enumerate(groups)]


def train_sources(data: DataSpec) -> list[tuple[list[str], float]]:
    """data.train as (files, weight) sources: one source of every file, or one per entry when weighted."""
    return [(expand(patterns, name), weight) for name, patterns, weight in source_entries(data)]


@dataclass
class DataPlan:
    """Which files the run reads, made once (by rank 0) and followed by every rank, then saved with
    the cursor so that a resumed run reads the same files even where a glob or a dataset repo names
    other files by then: data.train's sources as (files, weight), the eval files, and for each source
    every rank's share of whole files (None where ranks stripe its rows)."""

    sources: list[tuple[list[str], float]]
    eval_files: list[str]
    layout: list[list[list[str]] | None]

    @staticmethod
    def make(config: DataSpec, world_size: int) -> DataPlan:
        sources = train_sources(config)
        if config.eval_fraction:
            eval_files = [f for files, _ in sources for f in files]
        else:
            eval_files = expand(config.eval, "data.eval")
        layout = []
        for files, _ in sources:
            sized = file_sizes(files) if len(files) >= world_size > 1 else None
            layout.append(file_shares(sized, world_size) if sized else None)
        return DataPlan(sources, eval_files, layout)

    def rank_files(self, rank: int) -> list[tuple[list[str], bool]]:
        """For each source: (the files `rank` reads, whether it keeps only its stripe of their rows)."""
        return [
            (files, True) if shares is None else (shares[rank], False)
            for (files, _), shares in zip(self.sources, self.layout, strict=True)
        ]


def shared_plan(config: DataSpec, accelerator) -> DataPlan:
    """Rank 0's plan, on every rank (each rank resolving globs and repos itself could see other files,
    or other sizes); an input error there is raised on every rank, not only on rank 0."""
    from accelerate.utils import broadcast_object_list

    plan: DataPlan | JobError | None = None
    if accelerator.is_main_process:
        try:
            plan = DataPlan.make(config, accelerator.num_processes)
        except JobError as e:
            plan = e
    if accelerator.num_processes > 1:
        plan = broadcast_object_list([plan])[0]
    if isinstance(plan, JobError):
        raise plan
    return plan


# ---------------------------------------------------------------------------------------------
# A saved cursor is input: a checkpoint's rank file is checked as strictly as the spec, whole, before
# a row is read (an edited cursor must not make a resumed run read a file the spec does not name).

HUB_FILE = re.compile(r"hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)@(?P<revision>[0-9a-f]{40})/(?P<path>[^?#]+)")
COMMIT_ID = re.compile(r"[0-9a-f]{40}")
SHOWN_PROBLEMS = 5


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


def _random_state(state: tuple) -> tuple:
    try:
        set_random_state(random.Random(), list(state))
    except (TypeError, ValueError, OverflowError):
        raise ValueError("not the state of a random generator") from None
    return state


Count = Annotated[int, Field(ge=0, strict=True)]
Files = list[StrictStr]
Place = tuple[StrictStr, Count, Count | None]  # a row: its file, index and byte offset
Origin = tuple[StrictStr, Count, Count | None, Count]  # an example: its row's place, and which piece
RandomState = Annotated[tuple[StrictInt, list[StrictInt], StrictFloat | None], AfterValidator(_random_state)]


class Saved(BaseModel):
    """A record ftjob saved and reads back (a data cursor, a checkpoint's rank file or run.json): input,
    validated with validated(), so a key it does not define is refused."""

    model_config = ConfigDict(extra="forbid")


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


def refuse(where: str, problem: str) -> NoReturn:
    """End the job with exit 2 (UserError) for something read back from a checkpoint: `where` names the
    file, `problem` the key and what is wrong with it; the message says --restart is the way on."""
    raise UserError(
        f"{where}: {problem}. A checkpoint is input, checked as strictly as the spec: run with --restart "
        "to start over (checkpoints and published outputs are deleted)"
    )


SavedT = TypeVar("SavedT", bound=Saved)


def validated(model: type[SavedT], value: Any, where: str, *at: str | int) -> SavedT:
    """value (read back from `where`, at the keys `at` within it) as the Saved model, else refused with
    the first problems, each naming its key."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        errors = e.errors()
        problems = [
            f"{_json_path((*at, *error['loc']))}: {error['msg']}"
            + ("" if isinstance(error["input"], dict | list) else f" (got {echo(error['input'])})")
            for error in errors[:SHOWN_PROBLEMS]
        ]
        more = f"; and {len(errors) - SHOWN_PROBLEMS} more" if len(errors) > SHOWN_PROBLEMS else ""
        refuse(where, "not as ftjob writes it: " + "; ".join(problems) + more)


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
    if (cursor.packer is None) == data.packing:
        refuse(
            where,
            f"{'no' if cursor.packer is None else 'a'} packer state, where data.packing is {data.packing}",
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
            for rows in batched(self.packer, micro_batch_size):
                yield stack_packed(rows)
        else:
            for examples in batched(self.examples, micro_batch_size):
                yield pad_batch(examples, self.tokenizer.pad_token_id)

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
