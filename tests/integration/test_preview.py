"""ftjob preview: the rows a run would train on, as it would tokenize them, and their statistics."""

from __future__ import annotations

import json

from helpers import ALPACA_ROWS, ftjob, make_spec, write_jsonl, write_spec

from job.data.tokens import IGNORE_INDEX


def test_preview_json_lines_and_statistics(tiny_model_dir, isolated):
    data = write_jsonl(isolated / "a.jsonl", ALPACA_ROWS + ["{not json"])
    data_section = {"train": [str(data)], "shuffle_buffer": 0, "bad_rows": {"max_fraction": 0.5}}
    write_spec(isolated / "spec.json", make_spec(model=tiny_model_dir, data=data_section))
    result = ftjob("preview", "spec.json", "-n", "2", "--json", cwd=isolated)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert len(first["input_ids"]) == len(first["labels"])
    assert first["text"].startswith("<|bos|>### Instruction:\nReverse the words: red green blue")
    assert IGNORE_INDEX in first["labels"] and first["labels"][-1] != IGNORE_INDEX
    assert "4 examples from 5 rows; 1 bad, 0 truncated, 0 dropped" in result.stderr
    assert f"bad row {data}:5: invalid JSON" in result.stderr

    plain = ftjob("preview", "spec.json", "-n", "1", cwd=isolated)
    assert "«blue green red<|eos|>»" in plain.stdout
