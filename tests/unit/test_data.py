"""The data path's pure logic: formats, tokens and labels, padding, shuffle buffer, budget, sharding."""

from __future__ import annotations

import pytest
import torch
from helpers import completion_text, one_epoch_spec, pipeline_for, write_jsonl

from job.data.batching import pad_batch
from job.data.formats import BadRow, Example, Formatter, alpaca_prompt
from job.data.pipeline import BUDGET_MIN_ROWS, BadRowBudget
from job.data.stream import EPOCH_END, ShuffleBuffer, SourceStream
from job.data.tokens import IGNORE_INDEX, TokenizedExample, fit, tokenize
from job.errors import DataError
from job.spec import BadRowsSpec

# ---------------------------------------------------------------------------------------------
# formats


def to_example(row, fmt: str, fields: dict) -> Example:
    return Formatter(fmt, fields, "completion")(row)


def test_alpaca_without_input():
    example = to_example({"instruction": "Say hi", "output": "hi"}, "alpaca", {})
    assert example == Example((("### Instruction:\nSay hi\n\n### Response:\n", False), ("hi", True)))
    assert example.add_bos_eos and not example.split_long
    assert "### Input" not in example.segments[0][0]


def test_alpaca_with_input():
    example = to_example({"instruction": "Add one", "input": "41", "output": "42"}, "alpaca", {})
    (prompt, prompt_loss), (completion, completion_loss) = example.segments
    assert prompt == "### Instruction:\nAdd one\n\n### Input:\n41\n\n### Response:\n"
    assert completion == "42"
    assert (prompt_loss, completion_loss) == (False, True)
    assert prompt == alpaca_prompt("Add one", "41")


def test_alpaca_empty_or_null_input_is_no_input():
    with_empty = to_example({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca", {})
    with_null = to_example({"instruction": "Say hi", "input": None, "output": "hi"}, "alpaca", {})
    assert with_empty.segments[0][0] == with_null.segments[0][0] == alpaca_prompt("Say hi")


def test_completion_format():
    example = to_example({"prompt": "2+2=", "completion": "4"}, "completion", {})
    assert example == Example((("2+2=", False), ("4", True)))
    # train_on 'all': the prompt carries loss too
    all_loss = Formatter("completion", {}, "all")({"prompt": "2+2=", "completion": "4"})
    assert all_loss == Example((("2+2=", True), ("4", True)))


def test_fields_mapping():
    row = {"question": "Say hi", "context": "politely", "answer": "hello"}
    fields = {"instruction": "question", "input": "context", "output": "answer"}
    example = to_example(row, "alpaca", fields)
    assert example.segments == ((alpaca_prompt("Say hi", "politely"), False), ("hello", True))

    example = to_example({"q": "2+2=", "a": "4"}, "completion", {"prompt": "q", "completion": "a"})
    assert example == Example((("2+2=", False), ("4", True)))


def test_render_prompt_matches_training():
    alpaca = Formatter("alpaca", {}, "completion")
    assert alpaca.render_prompt("Say hi") == alpaca_prompt("Say hi")
    assert alpaca.render_prompt("Say hi") == alpaca({"instruction": "Say hi", "output": "x"}).segments[0][0]
    completion = Formatter("completion", {}, "completion")
    assert completion.render_prompt("2+2=") == "2+2="


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


def encode(tokenizer, prompt: str, completion: str, train_on: str = "completion") -> TokenizedExample:
    """Prompt and completion -> one tokenized example that fits 512 tokens, unchanged by fitting."""
    example = Formatter("completion", {}, train_on)({"prompt": prompt, "completion": completion})
    tokenized = tokenize(example, tokenizer)
    fitted = fit(tokenized, 512, example.split_long, "truncate")
    assert fitted.pieces == [tokenized] and not fitted.truncated and not fitted.dropped
    return tokenized


def test_eos_appended(tokenizer):
    example = encode(tokenizer, PROMPT, COMPLETION)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert example.input_ids.count(tokenizer.eos_token_id) == 1


def test_prompt_masked_when_train_on_completion(tokenizer):
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    completion_ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    example = encode(tokenizer, PROMPT, COMPLETION, "completion")
    n = len(prompt_ids)
    assert len(example.labels) == len(example.input_ids) == n + len(completion_ids) + 1
    assert example.input_ids[:n] == prompt_ids
    assert example.labels[:n] == [IGNORE_INDEX] * n
    # labels aligned with input_ids (transformers shifts them): completion labels are its own ids
    assert example.labels[n:] == example.input_ids[n:] == completion_ids + [tokenizer.eos_token_id]
    assert example.loss_tokens == len(completion_ids) + 1
    assert tokenizer.decode(example.input_ids[n:-1]) == COMPLETION


def test_labels_equal_input_ids_when_train_on_all(tokenizer):
    example = encode(tokenizer, PROMPT, COMPLETION, "all")
    assert example.labels == example.input_ids
    assert IGNORE_INDEX not in example.labels
    assert example.loss_tokens == len(example.input_ids)


def test_truncation_keeps_the_head(tokenizer):
    full = encode(tokenizer, PROMPT, COMPLETION)
    n_prompt = len(tokenizer(PROMPT)["input_ids"])
    limit = n_prompt + 2
    fitted = fit(full, limit, False, "truncate")
    assert fitted.truncated and not fitted.dropped
    (cut,) = fitted.pieces
    assert len(cut.input_ids) == len(cut.labels) == limit
    assert cut.input_ids == full.input_ids[:limit]
    assert cut.labels == full.labels[:limit]
    assert cut.loss_tokens == 2

    # the old code kept a 3-token head of prompt only (all labels -100); now such an example,
    # which would teach nothing, is dropped
    assert full.labels[:3] == [IGNORE_INDEX] * 3
    short = fit(full, 3, False, "truncate")
    assert short.dropped and not short.truncated and short.pieces == []

    # truncation 'drop' drops whatever does not fit, even with loss tokens in its head
    dropped = fit(full, limit, False, "drop")
    assert dropped.dropped and dropped.pieces == []


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
    assert set(batch) == {"input_ids", "labels", "attention_mask", "real_tokens"}
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].shape == (3, 5)
        assert batch[key].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100, -100],
        [8, 9, 10, 11, 12],
        [13, -100, -100, -100, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert batch["real_tokens"].shape == ()
    assert batch["real_tokens"].item() == 3 + 5 + 1


def test_pad_batch_uses_the_given_pad_id(tokenizer):
    examples = [
        encode(tokenizer, PROMPT, COMPLETION),
        encode(tokenizer, alpaca_prompt("Say hi"), "hi"),
    ]
    batch = pad_batch(examples, 299)
    short = len(examples[1].input_ids)
    assert batch["input_ids"][1, short:].eq(299).all()
    assert batch["labels"][1, short:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][1, :short].tolist() == examples[1].input_ids
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(e.input_ids) for e in examples]
    assert batch["real_tokens"].item() == sum(len(e.input_ids) for e in examples)


# ---------------------------------------------------------------------------------------------
# shuffle buffer


def numbered_files(tmp_path, n: int, per_file: int = 50) -> list[str]:
    """Rows {"n": 0}, {"n": 1}, ... n-1 in files of per_file rows."""
    files = []
    for k, start in enumerate(range(0, n, per_file)):
        rows = [{"n": i} for i in range(start, min(start + per_file, n))]
        files.append(str(write_jsonl(tmp_path / f"part-{k}.jsonl", rows)))
    return files


def shuffled(files: list[str], buffer_size: int, seed: int, epochs: int = 1) -> list[int]:
    """What a ShuffleBuffer yields over files read in the order given, less the EPOCH_END markers,
    after checking that exactly one closes each epoch."""
    source = SourceStream(files, seed=0, epochs=epochs, shuffle_files=False)
    out = [
        None if row is EPOCH_END else row.value["n"]
        for row in ShuffleBuffer(source, buffer_size, seed, rank=0)
    ]
    per_epoch = (len(out) - epochs) // epochs
    assert [i for i, v in enumerate(out) if v is None] == [
        (k + 1) * (per_epoch + 1) - 1 for k in range(epochs)
    ]
    return [v for v in out if v is not None]


def test_shuffle_buffer_is_a_seeded_permutation(tmp_path):
    files = numbered_files(tmp_path, 200)
    items = list(range(200))
    first = shuffled(files, 16, seed=1)
    again = shuffled(files, 16, seed=1)
    other = shuffled(files, 16, seed=2)
    assert sorted(first) == items
    assert first != items
    assert first == again
    assert other != first
    assert sorted(other) == items


def test_shuffle_buffer_never_mixes_epochs(tmp_path):
    files = numbered_files(tmp_path, 200)
    out = shuffled(files, 16, seed=1, epochs=2)
    assert len(out) == 400
    assert sorted(out[:200]) == sorted(out[200:]) == list(range(200))
    assert out[:200] != out[200:]


def test_shuffle_buffer_is_bounded(tmp_path):
    files = numbered_files(tmp_path, 200)
    out = shuffled(files, 8, seed=0)
    # an item cannot come out before it was read: at most buffer_size positions early
    assert all(out.index(i) >= i - 8 for i in range(200))


@pytest.mark.parametrize("buffer_size", [0, 1])
def test_shuffle_buffer_without_buffer_keeps_order(tmp_path, buffer_size):
    files = numbered_files(tmp_path, 50, per_file=20)
    assert shuffled(files, buffer_size, seed=3) == list(range(50))


def test_shuffle_buffer_fewer_items_than_buffer(tmp_path):
    files = numbered_files(tmp_path, 5)
    out = shuffled(files, 100, seed=0)
    assert sorted(out) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# bad-row budget, sharding


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


def test_budget_checked_on_each_bad_row_once_enough_rows_were_read():
    budget = BadRowBudget(BadRowsSpec(policy="skip", max_fraction=0.001), "data.train", quiet=True)
    budget.rows = BUDGET_MIN_ROWS - 1
    budget.record_bad("a.jsonl:1", "invalid JSON")
    budget.record_bad("a.jsonl:2", "invalid JSON")  # 2/999 is over, but too few rows to judge yet
    budget.rows = BUDGET_MIN_ROWS
    with pytest.raises(DataError, match=r"^data\.train: 3 of 1000 rows are bad.*first: a\.jsonl:1"):
        budget.record_bad("a.jsonl:3", "invalid JSON")

    within = BadRowBudget(BadRowsSpec(policy="skip", max_fraction=0.01), "data.train", quiet=True)
    within.rows = BUDGET_MIN_ROWS
    within.record_bad("a.jsonl:1", "invalid JSON")  # 1/1000: within the budget, no error
    assert within.bad == 1


def test_pipeline_fail_policy_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    spec = one_epoch_spec([str(path)], bad_rows={"policy": "fail"})
    pipeline = pipeline_for(spec, tokenizer)
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'output'"):
        list(pipeline.train_batches(2))


def test_pipeline_skip_policy_counts_and_checks(tmp_path, tokenizer):
    rows = [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(9)] + ["{broken"]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    within = pipeline_for(
        one_epoch_spec([str(path)], bad_rows={"max_fraction": 0.1}, shuffle_buffer=0), tokenizer
    )
    within.budget.quiet = True
    assert [completion_text(tokenizer, e) for e in within.examples if e is not EPOCH_END] == [
        f"o{i}" for i in range(9)
    ]
    assert (within.budget.rows, within.budget.bad) == (10, 1)
    assert within.examples.counts.examples == 9
    within.budget.check()

    over = pipeline_for(one_epoch_spec([str(path)], bad_rows={"max_fraction": 0.05}), tokenizer)
    over.budget.quiet = True
    with pytest.raises(DataError, match=rf"first: {path}:10: invalid JSON"):
        over.count_micro_batches(4)
    with pytest.raises(DataError, match=rf"first: {path}:10: invalid JSON"):
        list(over.train_batches(4))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharding_is_balanced_and_counts_rows_per_rank(tmp_path, tokenizer, world_size):
    """Exactly-once coverage is tested in test_pipeline.py; here: balance, row counts, one-rank order."""
    write_jsonl(tmp_path / "d" / "part-0.jsonl", [{"instruction": "x", "output": f"a{i}"} for i in range(7)])
    write_jsonl(tmp_path / "d" / "part-1.jsonl", [{"instruction": "x", "output": f"b{i}"} for i in range(4)])
    spec = one_epoch_spec(["d/part-*.jsonl"], shuffle_buffer=0)
    per_rank = []
    for rank in range(world_size):
        pipeline = pipeline_for(spec, tokenizer, rank, world_size)
        per_rank.append([completion_text(tokenizer, e) for e in pipeline.examples if e is not EPOCH_END])
        assert pipeline.budget.rows == pipeline.examples.counts.examples == len(per_rank[-1])
    sizes = [len(r) for r in per_rank]
    assert sum(sizes) == 11
    assert max(sizes) - min(sizes) <= 1  # balanced
    if world_size == 1:
        # one rank reads everything: the files in the epoch's seeded order, each file's rows in order
        (files,) = [files for files, _ in pipeline_for(spec, tokenizer).plan.sources]
        order = SourceStream(files, spec.train.seed).file_order(0)
        by_file = {files[0]: [f"a{i}" for i in range(7)], files[1]: [f"b{i}" for i in range(4)]}
        assert per_rank[0] == [c for f in order for c in by_file[f]]


def test_train_batches_end_to_end(tmp_path, tokenizer):
    rows = [{"instruction": f"Say {w}", "output": w} for w in ["hi", "hello there", "yo", "hey"]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    pipeline = pipeline_for(one_epoch_spec([str(path)], shuffle_buffer=0), tokenizer)
    batches = list(pipeline.train_batches(2))  # epochs=1: one pass, then the iterator ends
    assert len(batches) == 2
    batch = batches[0]
    assert batch["input_ids"].shape[0] == 2
    assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["real_tokens"].item() == batch["attention_mask"].sum().item()
    first = tokenize(Formatter("alpaca", {}, "completion")(rows[0]), tokenizer)
    assert batch["input_ids"][0, : len(first.input_ids)].tolist() == first.input_ids
    assert batch["labels"][0, : len(first.labels)].tolist() == first.labels
