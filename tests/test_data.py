"""The data path's pure logic: formats, tokens and labels, padding, sources, shuffling, budget, sharding."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from job.data.batching import pad_batch
from job.data.formats import BadRow, Example, alpaca_prompt, render_prompt, to_example
from job.data.pipeline import BadRowBudget, DataPipeline, shuffled
from job.data.sources import Row, expand, read_jsonl
from job.data.tokens import IGNORE_INDEX, TokenizedExample, tokenize_example
from job.errors import DataError, UserError
from job.spec import BadRowsSpec, validate_spec

# ---------------------------------------------------------------------------------------------
# formats


def test_alpaca_without_input():
    example = to_example({"instruction": "Say hi", "output": "hi"}, "alpaca", {})
    assert example == Example("### Instruction:\nSay hi\n\n### Response:\n", "hi")
    assert "### Input" not in example.prompt


def test_alpaca_with_input():
    example = to_example({"instruction": "Add one", "input": "41", "output": "42"}, "alpaca", {})
    assert example.prompt == "### Instruction:\nAdd one\n\n### Input:\n41\n\n### Response:\n"
    assert example.completion == "42"
    assert example.prompt == alpaca_prompt("Add one", "41")


def test_alpaca_empty_or_null_input_is_no_input():
    with_empty = to_example({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca", {})
    with_null = to_example({"instruction": "Say hi", "input": None, "output": "hi"}, "alpaca", {})
    assert with_empty.prompt == with_null.prompt == alpaca_prompt("Say hi")


def test_completion_format():
    example = to_example({"prompt": "2+2=", "completion": "4"}, "completion", {})
    assert example == Example("2+2=", "4")


def test_fields_mapping():
    row = {"question": "Say hi", "context": "politely", "answer": "hello"}
    fields = {"instruction": "question", "input": "context", "output": "answer"}
    example = to_example(row, "alpaca", fields)
    assert example.prompt == alpaca_prompt("Say hi", "politely")
    assert example.completion == "hello"

    example = to_example({"q": "2+2=", "a": "4"}, "completion", {"prompt": "q", "completion": "a"})
    assert example == Example("2+2=", "4")


def test_render_prompt_matches_training():
    assert render_prompt("alpaca", "Say hi") == alpaca_prompt("Say hi")
    assert render_prompt("completion", "2+2=") == "2+2="


@pytest.mark.parametrize(
    ("row", "fmt", "fields", "reason"),
    [
        ({"instruction": "x"}, "alpaca", {}, "missing field 'output'"),
        ({"instruction": "x", "output": "y"}, "alpaca", {"output": "answer"}, "missing field 'answer'"),
        ({"prompt": "x"}, "completion", {}, "missing field 'completion'"),
        ({"instruction": "x", "output": 5}, "alpaca", {}, "field 'output' must be a string, got int"),
        ({"prompt": ["x"], "completion": "y"}, "completion", {}, "field 'prompt' must be a string, got list"),
        ([1, 2], "alpaca", {}, "expected a JSON object, got list"),
        ("just text", "completion", {}, "expected a JSON object, got str"),
        (None, "completion", {}, "expected a JSON object, got NoneType"),
        ({"prompt": "x", "completion": ""}, "completion", {}, "empty 'completion'"),
        ({"instruction": "x", "output": "  \n"}, "alpaca", {}, "empty 'output'"),
        ({"instruction": "x", "a": " "}, "alpaca", {"output": "a"}, "empty 'a'"),
    ],
)
def test_bad_rows(row, fmt, fields, reason):
    with pytest.raises(BadRow) as info:
        to_example(row, fmt, fields)
    assert str(info.value) == reason


# ---------------------------------------------------------------------------------------------
# tokens


PROMPT = alpaca_prompt("Reverse the words: red green blue")
COMPLETION = "blue green red"


def test_eos_appended(tokenizer):
    example = tokenize_example(PROMPT, COMPLETION, tokenizer, 512)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert example.input_ids.count(tokenizer.eos_token_id) == 1


def test_prompt_masked_when_train_on_completion(tokenizer):
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    completion_ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    example = tokenize_example(PROMPT, COMPLETION, tokenizer, 512, "completion")
    n = len(prompt_ids)
    assert len(example.labels) == len(example.input_ids) == n + len(completion_ids) + 1
    assert example.input_ids[:n] == prompt_ids
    assert example.labels[:n] == [IGNORE_INDEX] * n
    # labels aligned with input_ids (transformers shifts them): completion labels are its own ids
    assert example.labels[n:] == example.input_ids[n:] == completion_ids + [tokenizer.eos_token_id]
    assert example.loss_tokens == len(completion_ids) + 1
    assert tokenizer.decode(example.input_ids[n:-1]) == COMPLETION


def test_labels_equal_input_ids_when_train_on_all(tokenizer):
    example = tokenize_example(PROMPT, COMPLETION, tokenizer, 512, "all")
    assert example.labels == example.input_ids
    assert IGNORE_INDEX not in example.labels
    assert example.loss_tokens == len(example.input_ids)


def test_truncation_keeps_the_head(tokenizer):
    full = tokenize_example(PROMPT, COMPLETION, tokenizer, 512)
    n_prompt = len(tokenizer(PROMPT)["input_ids"])
    limit = n_prompt + 2
    cut = tokenize_example(PROMPT, COMPLETION, tokenizer, limit)
    assert len(cut.input_ids) == len(cut.labels) == limit
    assert cut.input_ids == full.input_ids[:limit]
    assert cut.labels == full.labels[:limit]
    assert cut.loss_tokens == 2

    short = tokenize_example(PROMPT, COMPLETION, tokenizer, 3)
    assert short.input_ids == full.input_ids[:3]
    assert short.labels == [IGNORE_INDEX] * 3


# ---------------------------------------------------------------------------------------------
# batching


def test_pad_batch_right_pads():
    pad = 0
    examples = [
        TokenizedExample([5, 6, 7], [-100, 6, 7]),
        TokenizedExample([8, 9, 10, 11, 12], [8, 9, 10, 11, 12]),
        TokenizedExample([13], [13]),
    ]
    batch = pad_batch(examples, pad)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for tensor in batch.values():
        assert tensor.shape == (3, 5)
        assert tensor.dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100, -100],
        [8, 9, 10, 11, 12],
        [13, -100, -100, -100, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_pad_batch_uses_the_given_pad_id(tokenizer):
    examples = [
        tokenize_example(PROMPT, COMPLETION, tokenizer, 512),
        tokenize_example(alpaca_prompt("Say hi"), "hi", tokenizer, 512),
    ]
    batch = pad_batch(examples, 299)
    short = len(examples[1].input_ids)
    assert batch["input_ids"][1, short:].eq(299).all()
    assert batch["labels"][1, short:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][1, :short].tolist() == examples[1].input_ids
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(e.input_ids) for e in examples]


# ---------------------------------------------------------------------------------------------
# sources


def test_read_jsonl_line_numbers_and_errors(tmp_path):
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"n": 1}, "", {"n": 2}, "{not json", "   ", {"n": 3}],
    )
    rows = list(read_jsonl(str(path), {}))
    assert [r.line for r in rows] == [1, 3, 4, 6]
    assert [r.value for r in rows] == [{"n": 1}, {"n": 2}, None, {"n": 3}]
    assert rows[2].error is not None and rows[2].error.startswith("invalid JSON")
    assert all(r.error is None for r in rows if r.line != 4)
    assert rows[2].where == f"{path}:4"
    assert rows[3] == Row(str(path), 6, value={"n": 3})


def test_read_jsonl_gzip_inferred(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"n": 1}\n\n{"n": 2}\n')
    rows = list(read_jsonl(str(path), {}))
    assert [(r.line, r.value, r.error) for r in rows] == [(1, {"n": 1}, None), (3, {"n": 2}, None)]


def test_read_jsonl_truncated_gzip_is_a_data_error(tmp_path):
    data = gzip.compress(b"".join(b'{"n": %d}\n' % i for i in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jsonl.gz:"):
        list(read_jsonl(str(path), {}))


def test_expand_glob_sorted(tmp_path):
    for name in ["c.jsonl", "a.jsonl", "b.jsonl", "skip.txt"]:
        write_jsonl(tmp_path / "d" / name, [{"n": 1}])
    (tmp_path / "d" / "dir.jsonl").mkdir()  # a directory is not a file
    files = expand(["d/*.jsonl"], {}, "data.train")
    assert [Path(f).name for f in files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert all(Path(f).resolve() == (tmp_path / "d" / Path(f).name).resolve() for f in files)


def test_expand_keeps_pattern_order(tmp_path):
    write_jsonl(tmp_path / "z.jsonl", [{"n": 1}])
    write_jsonl(tmp_path / "a.jsonl", [{"n": 1}])
    files = expand(["z.jsonl", "a.jsonl"], {}, "data.train")
    assert [Path(f).name for f in files] == ["z.jsonl", "a.jsonl"]


def test_expand_missing_file_names_the_key(tmp_path):
    with pytest.raises(UserError) as info:
        expand(["missing.jsonl"], {}, "data.train")
    assert info.value.exit_code == 2
    assert str(info.value).startswith("data.train[0]: no such file: missing.jsonl")

    write_jsonl(tmp_path / "ok.jsonl", [{"n": 1}])
    with pytest.raises(UserError, match=r"^data\.eval\[1\]: no such file: none-\*\.jsonl"):
        expand(["ok.jsonl", "none-*.jsonl"], {}, "data.eval")


# ---------------------------------------------------------------------------------------------
# S3 (moto server over HTTP, reached through AWS_ENDPOINT_URL)


def put_gzipped_jsonl(fs, key: str, rows: list) -> str:
    body = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    fs.pipe(f"{fs.bucket}/{key}", body)
    return f"s3://{fs.bucket}/{key}"


def test_s3_read_gzipped_jsonl(s3):
    url = put_gzipped_jsonl(s3, "data/train.jsonl.gz", [{"n": 1}, {"n": 2}])
    rows = list(read_jsonl(url, {}))
    assert [r.value for r in rows] == [{"n": 1}, {"n": 2}]
    assert rows[1].where == f"{url}:2"


def test_s3_expand_glob(s3):
    put_gzipped_jsonl(s3, "data/train.jsonl.gz", [{"n": 1}])
    put_gzipped_jsonl(s3, "data/a-extra.jsonl.gz", [{"n": 2}])
    put_gzipped_jsonl(s3, "other/b.jsonl.gz", [{"n": 3}])
    files = expand([f"s3://{s3.bucket}/data/*.jsonl.gz"], {}, "data.train")
    assert files == [f"s3://{s3.bucket}/data/a-extra.jsonl.gz", f"s3://{s3.bucket}/data/train.jsonl.gz"]
    values = [r.value for f in files for r in read_jsonl(f, {})]
    assert values == [{"n": 2}, {"n": 1}]


def test_s3_missing_object_names_the_key(s3):
    with pytest.raises(UserError, match=r"^data\.train\[0\]: no such file: s3://"):
        expand([f"s3://{s3.bucket}/data/nope.jsonl"], {}, "data.train")


def test_s3_storage_options_endpoint(s3, s3_server, monkeypatch):
    """storage_options per protocol reach s3fs (here: the endpoint without AWS_ENDPOINT_URL)."""
    url = put_gzipped_jsonl(s3, "data/train.jsonl.gz", [{"n": 1}])
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {"s3": {"endpoint_url": s3_server}}
    assert expand([f"s3://{s3.bucket}/data/*.jsonl.gz"], options, "data.train") == [url]
    assert [r.value for r in read_jsonl(url, options)] == [{"n": 1}]


# ---------------------------------------------------------------------------------------------
# pipeline: shuffling, bad-row budget, sharding


def test_shuffled_is_a_seeded_permutation():
    items = list(range(200))
    first = list(shuffled(items, 16, random.Random(1)))
    again = list(shuffled(items, 16, random.Random(1)))
    other = list(shuffled(items, 16, random.Random(2)))
    assert sorted(first) == items
    assert first != items
    assert first == again
    assert other != first
    assert sorted(other) == items


def test_shuffled_buffer_is_bounded():
    items = list(range(200))
    out = list(shuffled(items, 8, random.Random(0)))
    # an item cannot come out before it was read: at most buffer_size positions early
    assert all(out.index(i) >= i - 8 for i in items)


@pytest.mark.parametrize("buffer_size", [0, 1])
def test_shuffled_without_buffer_keeps_order(buffer_size):
    items = list(range(50))
    assert list(shuffled(iter(items), buffer_size, random.Random(3))) == items


def test_shuffled_fewer_items_than_buffer():
    out = list(shuffled(range(5), 100, random.Random(0)))
    assert sorted(out) == [0, 1, 2, 3, 4]


def test_budget_policy_fail_raises_at_once():
    budget = BadRowBudget(BadRowsSpec(policy="fail"), "data.train")
    with pytest.raises(DataError) as info:
        budget.record_bad("train.jsonl:7", "missing field 'output'")
    assert info.value.exit_code == 3
    assert "train.jsonl:7: missing field 'output'" in str(info.value)


def test_budget_skip_within_fraction_passes():
    budget = BadRowBudget(BadRowsSpec(policy="skip", max_fraction=0.1), "data.train", quiet=True)
    budget.rows = 20
    budget.record_bad("a.jsonl:3", "invalid JSON")
    budget.record_bad("a.jsonl:9", "invalid JSON")
    budget.check()  # 2/20 = 0.1: at the limit, allowed
    assert budget.bad == 2
    assert budget.first_bad == ["a.jsonl:3: invalid JSON", "a.jsonl:9: invalid JSON"]


def test_budget_over_fraction_names_first_bad_row():
    budget = BadRowBudget(BadRowsSpec(policy="skip", max_fraction=0.1), "data.train", quiet=True)
    budget.rows = 10
    budget.record_bad("a.jsonl:3", "invalid JSON")
    budget.record_bad("a.jsonl:5", "empty 'output'")
    with pytest.raises(DataError) as info:
        budget.check()
    message = str(info.value)
    assert info.value.exit_code == 3
    assert message.startswith("data.train: 2 of 10 rows are bad")
    assert "max_fraction=0.1" in message
    assert "first: a.jsonl:3: invalid JSON" in message


def make_spec(train: list[str], **data):
    return validate_spec(
        {
            "model": {"source": "unused"},
            "data": {"train": train, **data},
            "train": {"max_steps": 1},
        }
    )


def test_pipeline_fail_policy_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    spec = make_spec([str(path)], bad_rows={"policy": "fail"})
    pipeline = DataPipeline(spec, tokenizer)
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'output'"):
        list(pipeline.examples(pipeline.train_files, pipeline.train_budget))


def test_pipeline_skip_policy_counts_and_checks(tmp_path, tokenizer):
    rows = [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(9)] + ["{broken"]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    within = DataPipeline(make_spec([str(path)], bad_rows={"max_fraction": 0.1}), tokenizer)
    budget = BadRowBudget(within.data.bad_rows, "data.train", quiet=True)
    assert [e.completion for e in within.examples(within.train_files, budget)] == [f"o{i}" for i in range(9)]
    assert (budget.rows, budget.bad) == (10, 1)
    budget.check()

    over = DataPipeline(make_spec([str(path)], bad_rows={"max_fraction": 0.05}), tokenizer)
    with pytest.raises(DataError, match=rf"first: {path}:10: invalid JSON"):
        over.count_train_examples()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharding_covers_every_example_once(tmp_path, tokenizer, world_size):
    write_jsonl(tmp_path / "d" / "part-0.jsonl", [{"instruction": "x", "output": f"a{i}"} for i in range(7)])
    write_jsonl(tmp_path / "d" / "part-1.jsonl", [{"instruction": "x", "output": f"b{i}"} for i in range(4)])
    spec = make_spec(["d/part-*.jsonl"])
    expected = [f"a{i}" for i in range(7)] + [f"b{i}" for i in range(4)]
    per_rank = []
    for rank in range(world_size):
        pipeline = DataPipeline(spec, tokenizer, rank, world_size)
        budget = BadRowBudget(spec.data.bad_rows, "data.train")
        per_rank.append([e.completion for e in pipeline.examples(pipeline.train_files, budget)])
        assert budget.rows == len(per_rank[-1])
    union = [c for rank in per_rank for c in rank]
    assert sorted(union) == sorted(expected)
    assert len(union) == len(set(union)) == 11
    sizes = [len(r) for r in per_rank]
    assert max(sizes) - min(sizes) <= 1  # balanced
    if world_size == 1:
        assert per_rank[0] == expected  # one rank reads everything, in file order


def test_sharding_over_s3(s3, tokenizer):
    put_gzipped_jsonl(s3, "data/p0.jsonl.gz", [{"prompt": "p", "completion": f"c{i}"} for i in range(5)])
    put_gzipped_jsonl(s3, "data/p1.jsonl.gz", [{"prompt": "p", "completion": f"d{i}"} for i in range(4)])
    spec = make_spec([f"s3://{s3.bucket}/data/*.jsonl.gz"], format="completion")
    seen = []
    for rank in range(2):
        pipeline = DataPipeline(spec, tokenizer, rank, 2)
        seen += [e.completion for e in pipeline.examples(pipeline.train_files, pipeline.train_budget)]
    assert sorted(seen) == sorted([f"c{i}" for i in range(5)] + [f"d{i}" for i in range(4)])


def test_train_batches_end_to_end(tmp_path, tokenizer):
    rows = [{"instruction": f"Say {w}", "output": w} for w in ["hi", "hello there", "yo", "hey"]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    pipeline = DataPipeline(make_spec([str(path)], shuffle_buffer=0), tokenizer)
    batch = next(pipeline.train_batches(2))
    assert batch["input_ids"].shape[0] == 2
    assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape
    first = tokenize_example(alpaca_prompt("Say hi"), "hi", tokenizer, 2048)
    assert batch["input_ids"][0, : len(first.input_ids)].tolist() == first.input_ids
    assert batch["labels"][0, : len(first.labels)].tolist() == first.labels
