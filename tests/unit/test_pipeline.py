"""The streaming pipeline: chat masking, packing, sharding, exact resume, mixing, eval split, preview."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import CHATML, make_spec, pipeline_for, write_jsonl

from job.data import stream as stream_module
from job.data import tokens as tokens_module
from job.data.formats import BadRow, Formatter
from job.data.stream import EPOCH_END, SourceStream
from job.data.tokens import IGNORE_INDEX, TokenizedExample, fit, tokenize
from job.errors import UserError
from job.spec import Spec, validate_spec

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "weather in Oslo?"},
    {"role": "assistant", "content": "Let me look."},
    {"role": "tool", "content": "rain, 4C"},
    {"role": "assistant", "content": "Rainy and 4C."},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "Welcome."},
]


def text_spec(files, endless: bool = False, **data) -> Spec:
    """A text-format spec over files: one epoch of data, or endless (max_steps) to cross epochs."""
    length = {"max_steps": 1} if endless else {"epochs": 1, "max_steps": None}
    data = {"train": [str(f) for f in files], "format": "text", "shuffle_buffer": 0, **data}
    return validate_spec(make_spec(data=data, train={**length, "seed": 7}))


def text_rows(n: int, prefix: str = "row") -> list[dict]:
    return [{"text": f"{prefix} {i} " + "word " * (i % 7)} for i in range(n)]


def decode_loss(tokenizer, ids, labels) -> list[str]:
    """The decoded runs of loss-bearing tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# --- chat ---------------------------------------------------------------------------------------


def test_chat_loss_on_every_assistant_turn_and_its_end_marker_only(tokenizer):
    formatter = Formatter("chat", {}, "completion", tokenizer, CHATML)
    example = tokenize(formatter({"messages": CONVERSATION}), tokenizer)
    assert decode_loss(tokenizer, example.input_ids, example.labels) == [
        "Let me look.<|im_end|>\n",
        "Rainy and 4C.<|im_end|>\n",
        "Welcome.<|im_end|>\n",
    ]
    whole = tokenizer.decode(example.input_ids)
    rendered = tokenizer.apply_chat_template(CONVERSATION, chat_template=CHATML, tokenize=False)
    assert whole == rendered  # nothing added or lost around the template


def test_chat_train_on_all_puts_loss_everywhere(tokenizer):
    formatter = Formatter("chat", {}, "all", tokenizer, CHATML)
    example = tokenize(formatter({"messages": CONVERSATION}), tokenizer)
    assert example.labels == example.input_ids


def test_chat_with_mapped_column_and_bad_conversations(tokenizer):
    formatter = Formatter("chat", {"messages": "conv"}, "completion", tokenizer, CHATML)
    assert formatter({"conv": CONVERSATION[1:3]}).segments[-1] == ("Let me look.<|im_end|>\n", True)
    with pytest.raises(BadRow, match="no assistant turn"):
        formatter({"conv": CONVERSATION[:2]})
    with pytest.raises(BadRow, match=r"conv\[0\]: needs a role"):
        formatter({"conv": [{"role": "wizard", "content": "x"}]})
    with pytest.raises(BadRow, match="non-empty list"):
        formatter({"conv": "hello"})


def test_chat_without_template_is_a_spec_error(tokenizer):
    assert not tokenizer.chat_template
    with pytest.raises(UserError, match="no chat template; set data.chat_template"):
        Formatter("chat", {}, "completion", tokenizer)


def test_chat_generate_prompt_ends_with_assistant_header(tokenizer):
    formatter = Formatter("chat", {}, "completion", tokenizer, CHATML)
    assert formatter.render_prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- text, truncation ---------------------------------------------------------------------------


def test_text_long_documents_become_pieces_with_loss_everywhere(tokenizer):
    example = Formatter("text", {}, "completion", tokenizer)({"text": "Say hi " * 40})
    fitted = fit(tokenize(example, tokenizer), 16, example.split_long, "truncate")
    assert len(fitted.pieces) > 2 and not fitted.truncated
    assert all(len(p.input_ids) <= 16 and p.labels == p.input_ids for p in fitted.pieces)
    joined = [t for p in fitted.pieces for t in p.input_ids]
    assert joined == tokenize(example, tokenizer).input_ids


def test_truncate_keeps_head_drop_drops(tokenizer):
    example = Formatter("completion", {}, "completion", tokenizer)(
        {"prompt": "Say hi", "completion": "hi " * 50}
    )
    tokenized = tokenize(example, tokenizer)
    kept = fit(tokenized, 12, False, "truncate")
    assert kept.truncated and kept.pieces[0].input_ids == tokenized.input_ids[:12]
    assert fit(tokenized, 12, False, "drop").dropped
    prompt_only = fit(tokenized, 2, False, "truncate")  # no completion token fits: nothing to learn
    assert prompt_only.dropped and not prompt_only.pieces


def test_pipeline_counts_truncated_and_dropped(tokenizer, isolated):
    rows = [{"prompt": "Say hi", "completion": "hi " * n} for n in (1, 30, 2, 40)]
    data = write_jsonl(isolated / "c.jsonl", rows)
    for policy, expected in (("truncate", (2, 0, 4)), ("drop", (0, 2, 2))):
        spec = text_spec([data], format="completion", max_seq_len=16, truncation=policy)
        pipeline = pipeline_for(spec, tokenizer)
        batches = list(pipeline.train_batches(8))
        counts = pipeline.examples.counts
        assert (counts.truncated, counts.dropped, counts.examples) == expected
        assert sum(b["input_ids"].shape[0] for b in batches) == expected[2]


# --- packing ------------------------------------------------------------------------------------


def test_packing_fills_rows_and_reports_efficiency(tokenizer, isolated):
    data = write_jsonl(isolated / "t.jsonl", text_rows(40))
    spec = text_spec([data], packing=True, max_seq_len=32)
    pipeline = pipeline_for(spec, tokenizer)
    batches = list(pipeline.train_batches(4))
    assert all(b["input_ids"].shape[1] == 32 for b in batches)
    positions = torch.cat([b["position_ids"] for b in batches])
    assert (positions[:, 0] == 0).all()
    assert pipeline.examples.counts.examples == 40
    assert (positions == 0).sum() >= 40  # one restart per example (plus padding tails)
    assert 0.5 < pipeline.packer.efficiency <= 1.0
    real = sum(int(b["real_tokens"]) for b in batches)
    assert pipeline.packer.efficiency == pytest.approx(real / (pipeline.packer.rows * 32))


def test_best_fit_packing_fills_95_percent_of_rows_of_length_skewed_data_as_it_streams():
    """Pareto lengths, as instruction data has them: most examples short, a few near max_seq_len."""
    from job.data.pipeline import Packer

    rng = random.Random(0)
    lengths = [min(int(rng.paretovariate(1.3) * 40), 512) for _ in range(1200)]
    stream = [TokenizedExample([k] * n, [k] * n) for k, n in enumerate(lengths)]
    stream.insert(600, EPOCH_END)
    rows_when_read = []  # rows closed when each example was read

    def examples():
        for example in stream:
            rows_when_read.append(packer.rows)
            yield example

    packer = Packer(examples(), 512, pad_token_id=0)
    rows = [row for row in packer if row is not EPOCH_END]

    packed = [[k for k, _ in itertools.groupby(row["input_ids"][: row["real_tokens"]])] for row in rows]
    assert sorted(k for row in packed for k in row) == list(range(1200))  # each example once, whole
    assert all(max(row) < 600 or min(row) >= 600 for row in packed)  # no row spans the epochs
    assert packer.efficiency >= 0.95
    waits = [closed - rows_when_read[k + (k >= 600)] for closed, row in enumerate(packed) for k in row]
    assert max(waits) <= Packer.OPEN_ROWS  # it streams


# --- sharding and epochs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes,world_size,expected",
    [
        ({"a": 10, "b": 10, "c": 10, "d": 10}, 2, [["a", "c"], ["b", "d"]]),
        ({"a": 40, "b": 10, "c": 10, "d": 10, "e": 10}, 2, [["a"], ["b", "c", "d", "e"]]),
        ({"a": 10, "b": 10, "c": 10}, 2, None),  # 20 vs 10: striped instead
        ({"a": 10}, 2, None),  # fewer files than ranks
        ({"a": 10, "b": 10}, 1, None),  # one rank reads everything anyway
        ([("a", 10), ("a", 10), ("b", 10), ("c", 10)], 2, [["a", "b"], ["a", "c"]]),  # a listed twice: twice
    ],
)
def test_file_shares_are_whole_files_balanced_by_bytes(sizes, world_size, expected):
    from job.data.stream import file_shares

    sized = list(sizes.items()) if isinstance(sizes, dict) else sizes
    assert file_shares(sized, world_size) == expected


def test_ranks_read_only_their_share_of_the_files_exactly_once_and_resume_exactly(
    tokenizer, isolated, monkeypatch
):
    """4 files of one size, 2 ranks: each rank opens its 2 files only (half the bytes), every row is
    trained on once an epoch, and a rank's cursor resumes exactly within its share."""
    files = [write_jsonl(isolated / f"part-{k}.jsonl", text_rows(9, prefix=f"f{k}")) for k in range(4)]
    opened: dict[int, list[str]] = {0: [], 1: []}
    real_read_rows = stream_module.read_rows
    seen = Counter()
    for rank in (0, 1):
        monkeypatch.setattr(
            stream_module, "read_rows",
            lambda url, start, keep, limit, rank=rank: opened[rank].append(url) or real_read_rows(url, start, keep, limit),
        )  # fmt: skip
        spec = text_spec(files, shuffle_buffer=4)
        for batch in pipeline_for(spec, tokenizer, rank, 2).train_batches(3):
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                seen[tokenizer.decode(row[mask.bool()], skip_special_tokens=True)] += 1
    assert len(opened[0]) == len(opened[1]) == 2 and not set(opened[0]) & set(opened[1])
    read = [sum(Path(url).stat().st_size for url in opened[rank]) for rank in (0, 1)]
    assert read[0] == read[1] == sum(f.stat().st_size for f in files) / 2
    assert set(seen.values()) == {1} and len(seen) == 36

    monkeypatch.setattr(stream_module, "read_rows", real_read_rows)
    spec = text_spec(files, endless=True, shuffle_buffer=4)
    reference = pipeline_for(spec, tokenizer, 1, 2)
    batches = reference.train_batches(2)
    for _ in range(5):
        next(batches)
    state = json.loads(json.dumps(reference.state_dict()))
    expected = batches_as_lists(next(batches) for _ in range(12))  # into the next epochs
    resumed = pipeline_for(spec, tokenizer, 1, 2)
    resumed.load_state_dict(state)
    assert batches_as_lists(next(resumed.train_batches(2)) for _ in range(12)) == expected

    with open(files[0], "a") as f:  # the sizes change: a fresh plan would stripe, the cursor keeps its plan
        f.write("".join(json.dumps(r) + "\n" for r in text_rows(30, prefix="late")))
    assert pipeline_for(spec, tokenizer, 1, 2).plan.layout == [None]
    again = pipeline_for(spec, tokenizer, 1, 2)
    again.load_state_dict(state)
    assert again.plan.layout == state["plan"]["layout"] and again.plan.layout != [None]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n_files", [1, 5])
def test_every_row_exactly_once_per_epoch_across_ranks(tokenizer, isolated, world_size, n_files):
    files = [write_jsonl(isolated / f"part-{k}.jsonl", text_rows(7, prefix=f"f{k}")) for k in range(n_files)]
    seen = Counter()
    for rank in range(world_size):
        spec = text_spec(files, shuffle_buffer=4)
        spec = spec.model_copy(
            update={"train": spec.train.model_copy(update={"epochs": 1, "max_steps": None})}
        )
        pipeline = pipeline_for(spec, tokenizer, rank=rank, world_size=world_size)
        for batch in pipeline.train_batches(3):
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                seen[tokenizer.decode(row[mask.bool()], skip_special_tokens=True)] += 1
    expected = {f"f{k} {i} " + "word " * (i % 7) for k in range(n_files) for i in range(7)}
    assert set(seen) == expected
    assert set(seen.values()) == {1}


def test_file_order_is_reshuffled_each_epoch_and_the_same_on_every_rank():
    stream_a = SourceStream([f"f{i}" for i in range(8)], seed=1, rank=0, world_size=2)
    stream_b = SourceStream([f"f{i}" for i in range(8)], seed=1, rank=1, world_size=2)
    assert stream_a.file_order(0) == stream_b.file_order(0)
    assert stream_a.file_order(0) != stream_a.file_order(1)
    assert sorted(stream_a.file_order(1)) == [f"f{i}" for i in range(8)]


# --- exact resume -------------------------------------------------------------------------------


def batches_as_lists(batches) -> list[dict]:
    return [{k: v.tolist() for k, v in b.items()} for b in batches]


@pytest.mark.parametrize(
    "options,compress",
    [
        ({"shuffle_buffer": 5}, False),
        ({"shuffle_buffer": 5}, True),
        ({"shuffle_buffer": 5, "packing": True, "max_seq_len": 24}, False),
        ({"shuffle_buffer": 0, "packing": True, "max_seq_len": 8}, True),  # long texts split into pieces
    ],
    ids=["jsonl-shuffle", "gz-shuffle", "packed", "packed-split-gz"],
)
@pytest.mark.parametrize("cut", [1, 3, 7, 12])
def test_resume_yields_exactly_what_an_uninterrupted_run_yields(tokenizer, isolated, options, compress, cut):
    files = []
    for k in range(2):
        rows = "".join(json.dumps(r) + "\n" for r in text_rows(9, prefix=f"f{k}"))
        path = isolated / f"p{k}.jsonl{'.gz' if compress else ''}"
        path.write_bytes(gzip.compress(rows.encode()) if compress else rows.encode())
        files.append(path)
    spec = text_spec(files, endless=True, **options)
    reference = pipeline_for(spec, tokenizer)
    batches = reference.train_batches(2)
    first = [next(batches) for _ in range(cut)]
    state = json.loads(json.dumps(reference.state_dict()))  # it travels as JSON in a checkpoint
    expected = batches_as_lists(next(batches) for _ in range(10))  # crosses into the next epochs

    resumed = pipeline_for(spec, tokenizer)
    resumed.load_state_dict(state)
    assert batches_as_lists(next(resumed.train_batches(2)) for _ in range(10)) == expected
    assert first  # the cut really was after some batches


def test_checkpointed_shuffle_buffer_holds_only_what_the_format_reads(tokenizer, isolated):
    """Parquet columns JSON cannot hold (timestamps, dates, decimals, bytes) beside the format's own:
    the data cursor still goes into a checkpoint, holds none of them, and resumes exactly."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 24
    table = pa.table(
        {
            "instruction": [f"Say {i}" for i in range(n)],
            "output": [f"{i} " * (i % 5 + 1) for i in range(n)],
            "created": [datetime.datetime(2026, 1, 1, 12, i) for i in range(n)],
            "day": [datetime.date(2026, 1, 1 + i % 28) for i in range(n)],
            "price": pa.array([decimal.Decimal(f"{i}.25") for i in range(n)], pa.decimal128(6, 2)),
            "blob": [bytes([i]) * 1000 for i in range(n)],
        }
    )
    pq.write_table(table, isolated / "rows.parquet", row_group_size=8)
    data = {"train": [str(isolated / "rows.parquet")], "shuffle_buffer": 16}
    spec = validate_spec(make_spec(data=data, train={"seed": 7}))
    reference = pipeline_for(spec, tokenizer)
    batches = reference.train_batches(2)
    for _ in range(3):
        next(batches)
    text = json.dumps(reference.state_dict())  # raised "datetime is not JSON serializable" before
    buffered = reference.state_dict()["rows"]["buffer"]
    assert len(buffered) >= 8 and not any(name in text for name in ("created", "day", "price", "blob"))
    expected = batches_as_lists(next(batches) for _ in range(12))

    resumed = pipeline_for(spec, tokenizer)
    resumed.load_state_dict(json.loads(text))
    assert batches_as_lists(next(resumed.train_batches(2)) for _ in range(12)) == expected


def test_resume_continues_reading_where_it_stopped(tokenizer, isolated, monkeypatch):
    """No re-reading: the resumed stream opens the file at the saved offset, not at its start."""
    data = write_jsonl(isolated / "big.jsonl", text_rows(50))
    spec = text_spec([data], endless=True)
    reference = pipeline_for(spec, tokenizer)
    batches = reference.train_batches(4)
    for _ in range(5):
        next(batches)
    state = reference.state_dict()
    starts = []
    real_read_rows = stream_module.read_rows
    monkeypatch.setattr(
        stream_module,
        "read_rows",
        lambda url, start, keep, limit: starts.append(start) or real_read_rows(url, start, keep, limit),
    )
    resumed = pipeline_for(spec, tokenizer)
    resumed.load_state_dict(state)
    next(resumed.train_batches(4))
    assert starts[0].row == 20 and starts[0].offset == len(
        "".join(json.dumps(r) + "\n" for r in text_rows(20))
    )


def test_a_resumed_cursor_reads_the_files_it_was_saved_with(tokenizer, isolated):
    """A glob naming one more file by the time of the resume: the cursor goes on over its own files."""
    write_jsonl(isolated / "a.jsonl", text_rows(12))
    write_jsonl(isolated / "eval-a.txt", text_rows(3))
    spec = text_spec([str(isolated / "*.jsonl")], endless=True, eval=[str(isolated / "eval-*")])
    reference = pipeline_for(spec, tokenizer)
    batches = reference.train_batches(2)
    next(batches)
    state = reference.state_dict()
    write_jsonl(isolated / "b.jsonl", text_rows(12))
    write_jsonl(isolated / "eval-b.txt", text_rows(3))
    resumed = pipeline_for(spec, tokenizer)
    assert len(resumed.plan.sources[0][0]) == 2  # what the glob names now...
    resumed.load_state_dict(state)
    assert resumed.plan.sources[0][0] == [str(isolated / "a.jsonl")]  # ...and what the cursor reads
    assert resumed.eval_files == [str(isolated / "eval-a.txt")]  # the eval split too
    following = resumed.train_batches(2)
    for _ in range(8):
        assert torch.equal(next(following)["input_ids"], next(batches)["input_ids"])


def long_number_lists(state, key: str = "") -> list[list]:
    """Lists of more than four numbers in a JSON state (token ids would be), RNG states left out."""
    if isinstance(state, dict):
        return [found for k, v in state.items() if k != "rng" for found in long_number_lists(v, k)]
    if isinstance(state, list):
        own = [state] if len(state) > 4 and all(isinstance(v, int) for v in state) else []
        return own + [found for v in state for found in long_number_lists(v, key)]
    return []


def buffered_rows(rows_state: dict) -> int:
    streams = rows_state.get("streams", [rows_state])
    return sum(len(stream["buffer"]) for stream in streams)


@pytest.mark.parametrize("sources", ["jsonl", "csv.gz", "weighted"])
def test_a_saved_data_state_holds_where_rows_are_not_what_they_say(tokenizer, isolated, sources):
    """Checkpoints go to output.uri: the shuffle buffer, the pieces of a long text still to come and
    the packer's open row are saved as places in the files (rows may hold personal data; token ids
    are the text too), read and tokenized again on resume, which stays exact."""
    texts, files = [], []
    for k in range(2):
        rows = text_rows(9, prefix=f"f{k}")
        texts += [r["text"] for r in rows]
        if sources == "csv.gz":
            lines = ["text", *(r["text"] for r in rows)]
            files.append(isolated / f"p{k}.csv.gz")
            files[-1].write_bytes(gzip.compress("\n".join(lines).encode()))
        else:
            files.append(write_jsonl(isolated / f"p{k}.jsonl", rows))
    weighted = {"train": [{"path": str(f), "weight": w} for f, w in zip(files, (2, 1), strict=True)]}
    options = {"shuffle_buffer": 5, "packing": True, "max_seq_len": 8}  # texts longer: split into pieces
    spec = text_spec(files, endless=True, **options, **(weighted if sources == "weighted" else {}))
    held = Counter()
    for cut in range(1, 13):
        reference = pipeline_for(spec, tokenizer)
        batches = reference.train_batches(2)
        for _ in range(cut):
            next(batches)
        state = json.loads(json.dumps(reference.state_dict()))  # it travels as JSON in a checkpoint
        saved = json.dumps(state)
        assert [t for t in texts if t in saved] == [] and long_number_lists(state) == []
        held.update(
            buffered=buffered_rows(state["rows"]),
            pending=len(state["examples"]["pending"]),
            open=sum(map(len, state["packer"]["open_rows"])),
        )
        expected = batches_as_lists(next(batches) for _ in range(6))

        resumed = pipeline_for(spec, tokenizer)
        resumed.load_state_dict(state)
        assert batches_as_lists(next(resumed.train_batches(2)) for _ in range(6)) == expected, f"cut {cut}"
    assert held["buffered"] and held["pending"] and held["open"]  # each kind of carry-over was saved


class RecordingTokenizer:
    """A tokenizer that records the length of every text it is given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, text: str, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def random_text(rng: random.Random, words: int) -> str:
    vocabulary = ["word", "a", "été", "😀", "1234567", "\n", "  ", "-", "lorem,", "x" * 40, "(ok)", "\t"]
    return " ".join(rng.choices(vocabulary, k=words))


@pytest.mark.parametrize(
    "chars_per_token",
    [None, 2, 1],
    ids=["as-shipped", "cut-close-to-the-tokens-kept", "cut-too-short-so-tokenized-whole"],
)
def test_long_texts_are_cut_before_tokenizing_and_keep_the_same_tokens(
    tokenizer, monkeypatch, chars_per_token
):
    if chars_per_token:
        monkeypatch.setattr(tokens_module, "CHARS_PER_TOKEN", chars_per_token)
    bound = (32 + tokens_module.CUT_MARGIN) * tokens_module.CHARS_PER_TOKEN
    rng = random.Random(0)
    recording = RecordingTokenizer(tokenizer)
    formatter = Formatter("completion", {}, "completion")
    for _ in range(150):
        row = {
            "prompt": random_text(rng, rng.randint(1, 900)),
            "completion": random_text(rng, rng.randint(1, 900)),
        }
        example = formatter(row)
        for truncation in ("truncate", "drop"):
            whole = fit(tokenize(example, tokenizer), 32, False, truncation)
            assert fit(tokenize(example, recording, max_tokens=32), 32, False, truncation) == whole
    assert max(recording.lengths) > bound if chars_per_token == 1 else max(recording.lengths) == bound


def test_the_pipeline_cuts_long_texts_but_not_documents_split_into_pieces(tokenizer, isolated):
    huge = "word " * 200_000
    rows = [{"prompt": "p", "completion": huge}, {"prompt": huge, "completion": "c"}]
    data = write_jsonl(isolated / "d.jsonl", rows)
    recording = RecordingTokenizer(tokenizer)
    truncated = pipeline_for(text_spec([data], format="completion", max_seq_len=16), recording)
    assert len([e for e in truncated.examples if e is not EPOCH_END]) == 1  # the prompt-only head is dropped
    assert (truncated.examples.counts.truncated, truncated.examples.counts.dropped) == (1, 1)
    assert max(recording.lengths) <= (16 + tokens_module.CUT_MARGIN) * tokens_module.CHARS_PER_TOKEN

    document = write_jsonl(isolated / "t.jsonl", [{"text": "word " * 2000}])
    pieces = [
        e
        for e in pipeline_for(text_spec([document], max_seq_len=16), tokenizer).examples
        if e is not EPOCH_END
    ]
    assert sum(len(p.input_ids) for p in pieces) == len(
        tokenize(Formatter("text", {}, "all")({"text": "word " * 2000}), tokenizer).input_ids
    )


def test_a_row_over_max_row_bytes_is_a_bad_row_and_a_resumed_cursor_is_past_it(tokenizer, isolated):
    rows = text_rows(6)
    rows[2] = {"text": "long " * 100}
    data = write_jsonl(isolated / "d.jsonl", rows)
    spec = text_spec([data], max_row_bytes=200, bad_rows={"max_fraction": 0.5})
    reference = pipeline_for(spec, tokenizer)
    reference.budget.quiet = True
    batches = reference.train_batches(1)
    while not reference.budget.bad:
        next(batches)
    assert reference.budget.first_bad == [f"{data}:3: longer than data.max_row_bytes (200 bytes)"]
    state = json.loads(json.dumps(reference.state_dict()))
    expected = batches_as_lists(batches)

    resumed = pipeline_for(spec, tokenizer)
    resumed.load_state_dict(state)
    assert batches_as_lists(resumed.train_batches(1)) == expected and len(expected) == 2  # rows 5 and 6
    assert resumed.budget.bad == reference.budget.bad == 1


# --- mixing, eval split ------------------------------------------------------------------------


def test_weighted_sources_are_drawn_by_weight_and_cycle(tokenizer, isolated):
    big = write_jsonl(isolated / "big.jsonl", text_rows(30, prefix="big"))
    small = write_jsonl(isolated / "small.jsonl", text_rows(3, prefix="small"))
    train = [{"path": str(big), "weight": 3}, {"path": [str(small)], "weight": 1}]
    spec = validate_spec(make_spec(data={"train": train, "format": "text", "shuffle_buffer": 0}))
    pipeline = pipeline_for(spec, tokenizer)
    batches = pipeline.train_batches(10)
    texts = [
        tokenizer.decode(row, skip_special_tokens=True)
        for _ in range(40)
        for row in next(batches)["input_ids"]
    ]
    share = sum(t.startswith("small") for t in texts) / len(texts)
    assert 0.18 < share < 0.32  # 1/4 by weight, over 400 draws
    assert sum(t.startswith("small 0 ") for t in texts) > 5  # the small source went round many times


def test_epochs_with_weighted_sources_is_refused():
    with pytest.raises(UserError, match="train.epochs: sources mixed by weight"):
        validate_spec(
            make_spec(
                model="m",
                data={"train": [{"path": "a", "weight": 2}]},
                train={"max_steps": None, "epochs": 1},
            )
        )


def test_eval_fraction_holds_out_the_same_rows_on_every_rank(tokenizer, isolated):
    data = write_jsonl(isolated / "d.jsonl", text_rows(200))
    spec = text_spec([data], eval_fraction=0.2)

    def texts(batches):
        return {
            tokenizer.decode(r[m.bool()], skip_special_tokens=True)
            for b in batches
            for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)
        }

    train, held = set(), set()
    for rank in range(2):
        pipeline = pipeline_for(spec, tokenizer, rank=rank, world_size=2)
        train |= texts(pipeline.train_batches(8))
        held |= texts(pipeline.eval_batches(8))
    assert not train & held
    assert len(train) + len(held) == 200
    assert 20 < len(held) < 60
    again = pipeline_for(spec, tokenizer, rank=0, world_size=1)
    assert texts(again.eval_batches(8)) == held  # stable across restarts and world sizes


# --- preview ------------------------------------------------------------------------------------


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_errors_are_bad_rows_or_spec_errors(tokenizer):
    formatter = Formatter("chat", {}, "completion", tokenizer, STRICT_TEMPLATE)
    with pytest.raises(BadRow, match="chat template: no system role"):
        formatter({"messages": CONVERSATION})
    with pytest.raises(BadRow, match="starts with an assistant turn"):
        Formatter("chat", {}, "completion", tokenizer, CHATML)({"messages": CONVERSATION[2:3]})
    with pytest.raises(UserError, match="data.chat_template .*cannot render"):
        Formatter("chat", {}, "completion", tokenizer, "{% for m in messages %}{{ m['content'] }")


def test_one_bos_in_chat_training_and_generation_when_the_template_writes_it(tokenizer):
    template = "{{ bos_token }}" + CHATML
    formatter = Formatter("chat", {}, "completion", tokenizer, template)
    example = tokenize(formatter({"messages": CONVERSATION[1:3]}), tokenizer)
    assert example.input_ids[:2].count(tokenizer.bos_token_id) == 1
    prompt = formatter.render_prompt("hi")
    ids = tokenizer(prompt, add_special_tokens=formatter.adds_bos)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_completion_formats_start_with_the_tokenizers_bos(tokenizer):
    example = tokenize(
        Formatter("completion", {}, "completion", tokenizer)({"prompt": "a", "completion": "b"}), tokenizer
    )
    assert (
        example.input_ids[0] == tokenizer.bos_token_id
        and example.input_ids.count(tokenizer.bos_token_id) == 1
    )


@pytest.mark.parametrize(
    "files,ranks,packing,eval_fraction,grad_accum",
    [
        (1, 1, False, 0.0, 1),
        (3, 2, True, 0.0, 2),
        (3, 3, False, 0.2, 1),
        (2, 2, True, 0.25, 3),
        (4, 3, True, 0.1, 2),
    ],
)
def test_epoch_runs_plan_the_steps_the_loop_takes(
    tokenizer, isolated, files, ranks, packing, eval_fraction, grad_accum
):
    """Over several files, ranks, packing (rows differ per epoch: another file order, other
    neighbours) and an eval split, the planned count is what the loop takes: each step takes
    grad_accum micro-batches per rank and the run ends when every rank is out of them."""
    import itertools
    import random

    rng = random.Random(files * 10 + ranks)
    paths = []
    for i in range(files):
        rows = [
            {
                "instruction": " ".join(["word"] * rng.randint(1, 12)),
                "output": " ".join(["out"] * rng.randint(1, 9)),
            }
            for _ in range(rng.randint(5, 17))
        ]
        paths.append(str(write_jsonl(isolated / f"f{i}.jsonl", rows)))
    data = {
        "train": paths,
        "packing": packing,
        "max_seq_len": 64,
        "eval_fraction": eval_fraction,
        "shuffle_buffer": 4,
    }
    train = {"max_steps": None, "epochs": 3, "micro_batch_size": 2, "grad_accum": grad_accum}
    spec = validate_spec(make_spec(data=data, train=train))
    planned_per_rank = [
        pipeline_for(spec, tokenizer, rank, ranks).count_micro_batches(2)[0] for rank in range(ranks)
    ]
    streams = [pipeline_for(spec, tokenizer, rank, ranks).train_batches(2) for rank in range(ranks)]
    taken = 0
    while any([len(list(itertools.islice(s, grad_accum))) for s in streams]):
        taken += 1
    assert math.ceil(max(planned_per_rank) / grad_accum) == taken
