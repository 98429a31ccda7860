"""`ftjob preview` and `ftjob validate --check-access`: look at the data and inputs without training.

preview prints the first N examples (or packed rows) exactly as training would see them, with the
tokens that carry loss highlighted, and statistics on standard error.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter
from typing import TextIO

import torch

from job.data.files import expand
from job.data.formats import BadRow, Formatter
from job.data.pipeline import DataPipeline
from job.data.plan import train_sources
from job.data.sources import read_rows
from job.data.stream import EPOCH_END
from job.data.tokens import IGNORE_INDEX, tokenize
from job.errors import UserError
from job.model.loading import model_dir_and_tokenizer
from job.spec import Spec
from job.startup import quiet_libraries
from job.storage import check_writable, configure_storage

STATS_ROWS = 1000  # statistics cover at least this many examples, even when fewer are shown
LOSS_ON, LOSS_OFF = "\033[1;32m", "\033[0m"


def spans(tokenizer, input_ids: list[int], labels: list[int], tty: bool) -> str:
    """The row's text, loss-bearing spans in green on a terminal, else between « and »."""
    start, end = (LOSS_ON, LOSS_OFF) if tty else ("«", "»")
    text = []
    for loss, group in itertools.groupby(
        zip(input_ids, labels, strict=True), key=lambda p: p[1] != IGNORE_INDEX
    ):
        piece = tokenizer.decode([token for token, _ in group])
        text.append(f"{start}{piece}{end}" if loss else piece)
    return "".join(text)


def histogram(lengths: list[int], max_len: int, buckets: int = 8) -> list[str]:
    width = max(1, -(-max_len // buckets))
    counts = Counter(min(n // width, buckets - 1) for n in lengths)
    most = max(counts.values(), default=1)
    return [
        f"  {b * width:>6}-{(b + 1) * width - 1:<6} {counts[b]:>6} {'#' * round(40 * counts[b] / most)}"
        for b in range(buckets)
    ]


def preview(spec: Spec, n: int, as_json: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
    out, err = out or sys.stdout, err or sys.stderr  # at call time: a redirected sys.stdout gets the output
    quiet_libraries()
    configure_storage(spec.storage_options)
    if spec.data.packing is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        spec = spec.for_device(device)
        print(
            f"data.packing is null: shown as a job on this machine's {device} would train (GPUs pack)",
            file=err,
        )
    _, tokenizer = model_dir_and_tokenizer(spec.model, spec.data.chat_template)
    data = DataPipeline(spec.data, tokenizer, spec.train.seed, epochs=1)
    stage = data.packer if data.packer else data.examples
    items = list(itertools.islice((i for i in stage if i is not EPOCH_END), max(n, STATS_ROWS)))
    tty = out.isatty() and not as_json
    for item in items[:n]:
        ids, labels = (item["input_ids"], item["labels"]) if data.packer else (item.input_ids, item.labels)
        if data.packer:
            ids, labels = ids[: item["real_tokens"]], labels[: item["real_tokens"]]
        if as_json:
            record = {"input_ids": ids, "labels": labels, "text": tokenizer.decode(ids)}
            if data.packer:
                record["position_ids"] = item["position_ids"][: item["real_tokens"]]
            print(json.dumps(record), file=out)
        else:
            loss = sum(label != IGNORE_INDEX for label in labels)
            print(f"--- {len(ids)} tokens, {loss} with loss", file=out)
            print(spans(tokenizer, ids, labels, tty), file=out)
    stats = data.stats()
    lengths = [len(e.input_ids) for e in items] if not data.packer else [row["real_tokens"] for row in items]
    print(
        f"preview: {len(items)} {'packed rows' if data.packer else 'examples'} from {stats['data/rows_read']} rows; "
        f"{stats['data/bad_rows']} bad, {stats['data/truncated']} truncated, {stats['data/dropped']} dropped"
        + (f"; packing efficiency {data.packer.efficiency:.1%}" if data.packer else ""),
        file=err,
    )
    print(f"lengths (tokens, max_seq_len {spec.data.max_seq_len}):", file=err)
    for line in histogram(lengths, spec.data.max_seq_len):
        print(line, file=err)
    for bad in data.budget.first_bad:
        print(f"bad row {bad}", file=err)


def check_access(spec: Spec, out: TextIO | None = None) -> None:
    """Reach every input and the output: the model (fetched into the node's cache as for training) and
    its tokenizer, the first row of every data file turned into an example, and a write probe."""
    out = out or sys.stdout
    quiet_libraries()
    configure_storage(spec.storage_options)
    _, tokenizer = model_dir_and_tokenizer(spec.model, spec.data.chat_template)
    print(f"ok  model.source {spec.model.source}", file=out)
    data = spec.data
    formatter = Formatter.of(data, tokenizer)
    train_files = [f for files, _ in train_sources(spec.data) for f in files]
    for key, files in (
        ("data.train", train_files),
        ("data.eval", expand(data.eval, "data.eval")),
    ):
        for url in files:
            problem = first_row_problem(url, spec, formatter, tokenizer)
            print(f"{'BAD' if problem else 'ok '} {key} {url}{': ' + problem if problem else ''}", file=out)
            if problem:
                raise UserError(f"{key}: {problem}")
    check_writable(spec.output_uri)
    print(f"ok  output.uri {spec.output_uri} is writable", file=out)


def first_row_problem(url: str, spec: Spec, formatter: Formatter, tokenizer) -> str | None:
    """Why the file's first row cannot become an example, or None when it can."""
    first = next(read_rows(url), None)
    if first is None:
        return f"{url}: no rows"
    row = first[0]
    try:
        if row.error:
            raise BadRow(row.error)
        tokenize(formatter(row.value), tokenizer)
    except BadRow as e:
        return f"{row.where}: {e}"
    return None
