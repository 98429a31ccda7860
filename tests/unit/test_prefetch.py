"""The data thread (job/data/prefetch.py): the same windows as on the training thread, a cursor of what
was consumed (not of what was made ahead), errors raised where the loop gets to them, and a thread
that ends when the loop leaves it."""

from __future__ import annotations

import json
import threading
import time

import pytest
from helpers import make_spec, pipeline_for, write_jsonl

from job.data.prefetch import DATA_THREAD, Feed
from job.errors import DataError
from job.spec import validate_spec

GRAD_ACCUM = 2


def text_spec(path, endless: bool, **data):
    length = {"max_steps": 1} if endless else {"epochs": 2, "max_steps": None}
    data = {"train": [str(path)], "format": "text", "shuffle_buffer": 4, **data}
    return validate_spec(make_spec(data=data, train={**length, "seed": 3}))


def as_lists(window) -> list[dict]:
    return [{key: value.tolist() for key, value in batch.items()} for batch in window]


def windows(feed: Feed, count: int) -> list[list[dict]]:
    return [as_lists(feed.next_window()) for _ in range(count)]


@pytest.fixture
def data_file(isolated):
    path = isolated / "rows.jsonl"
    write_jsonl(path, [{"text": f"row {i} " + "word " * (i % 5)} for i in range(23)])
    return path


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_windows_and_cursor_are_those_of_the_training_thread_and_resume_exactly(
    tokenizer, data_file, packing
):
    spec = text_spec(data_file, endless=True, packing=packing, max_seq_len=16)
    inline = Feed(pipeline_for(spec, tokenizer), 2, GRAD_ACCUM, lambda b: b, depth=0)
    expected = windows(inline, 6)
    with Feed(pipeline_for(spec, tokenizer), 2, GRAD_ACCUM, lambda b: b, depth=3) as ahead:
        assert windows(ahead, 4) == expected[:4]
        wait_until_full(ahead)  # the data thread is 3 windows further, and making a fourth
        consumed = ahead.consumed
    saved = json.loads(json.dumps(consumed.state_dict()))  # as a checkpoint holds it
    assert saved == inline_state_after(spec, tokenizer, 4)  # the cursor of what was trained on
    resumed = pipeline_for(spec, tokenizer)
    resumed.load_state_dict(saved)
    with Feed(resumed, 2, GRAD_ACCUM, lambda b: b, depth=2) as again:
        assert windows(again, 2) == expected[4:]


def inline_state_after(spec, tokenizer, count: int) -> str:
    data = pipeline_for(spec, tokenizer)
    batches = data.train_batches(2)
    for _ in range(count * GRAD_ACCUM):
        next(batches)
    return json.loads(json.dumps(data.state_dict()))


def wait_until_full(feed: Feed) -> None:
    deadline = time.monotonic() + 10
    while not feed.queue.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feed.queue.full()


def test_the_consumed_counters_and_epochs_are_those_after_the_window(tokenizer, data_file):
    spec = text_spec(data_file, endless=False)
    inline = Feed(pipeline_for(spec, tokenizer), 2, GRAD_ACCUM, lambda b: b, depth=0)
    with Feed(pipeline_for(spec, tokenizer), 2, GRAD_ACCUM, lambda b: b, depth=2) as ahead:
        while window := inline.next_window():
            assert as_lists(ahead.next_window()) == as_lists(window)
            seen, expected = ahead.consumed, inline.consumed
            assert (seen.stats, seen.epoch, seen.epochs_ended) == (
                expected.stats,
                expected.epoch,
                expected.epochs_ended,
            )
        assert ahead.next_window() == [] and ahead.next_window() == []  # ended: empty from then on
    assert seen.epochs_ended == 2 and seen.stats["data/rows_read"] == 46


def test_a_data_error_is_raised_when_the_loop_reaches_it_after_the_good_windows(tokenizer, isolated):
    path = isolated / "rows.jsonl"
    write_jsonl(path, [{"text": f"row {i}"} for i in range(8)] + [{"no_text": 1}])
    spec = text_spec(path, endless=False, bad_rows={"policy": "fail"}, shuffle_buffer=0)
    with Feed(pipeline_for(spec, tokenizer), 1, 1, lambda b: b, depth=2) as feed:
        feed.next_window()
        wait_until_full(feed)  # then it meets the bad row, which the loop has not reached
        assert len(windows(feed, 7)) == 7
        with pytest.raises(DataError, match=r"rows.jsonl:9: missing field 'text'"):
            feed.next_window()


def test_the_data_thread_ends_when_the_loop_leaves_the_feed(tokenizer, data_file):
    spec = text_spec(data_file, endless=True)  # endless: the thread would fill the queue and wait forever
    with Feed(pipeline_for(spec, tokenizer), 2, GRAD_ACCUM, lambda b: b, depth=2) as feed:
        feed.next_window()
        assert data_thread_alive()
    deadline = time.monotonic() + 5
    while data_thread_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not data_thread_alive()


def data_thread_alive() -> bool:
    return any(thread.name == DATA_THREAD for thread in threading.enumerate())


@pytest.mark.parametrize("depth", [0, 2])
def test_the_read_that_finds_the_end_of_the_data_counts_in_what_was_consumed(tokenizer, isolated, depth):
    """8 good rows make two full windows; the read after them meets 2 bad rows and the epoch's end."""
    path = isolated / "rows.jsonl"
    write_jsonl(path, [{"text": f"row {i}"} for i in range(8)] + [{"no_text": 1}, {"no_text": 2}])
    spec = text_spec(path, endless=False, shuffle_buffer=0, bad_rows={"max_fraction": 0.5})
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 1})})
    with Feed(pipeline_for(spec, tokenizer), 2, GRAD_ACCUM, lambda b: b, depth) as feed:
        assert len(windows(feed, 2)) == 2 and feed.next_window() == []
        consumed = feed.consumed
    assert (consumed.stats["data/rows_read"], consumed.stats["data/bad_rows"]) == (10, 2)
    assert (consumed.epochs_ended, consumed.epoch) == (1, 1.0)
