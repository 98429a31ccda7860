"""Sources, specs and checks of access over object storage: moto's S3 server over HTTP."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import completion_text, make_spec, one_epoch_spec, pipeline_for, values, write_spec

from job.data.files import expand
from job.data.sources import Position, read_rows
from job.data.stream import EPOCH_END
from job.errors import UserError
from job.spec import load_spec
from job.storage import configure_storage

FROM_S3 = make_spec(name="from-s3", model="./model", data={"train": ["train.jsonl"]}, train={"max_steps": 10})


def test_load_from_s3_url(s3):
    s3.pipe(f"{s3.bucket}/specs/spec.yaml", yaml.safe_dump(FROM_S3).encode())
    spec = load_spec(f"s3://{s3.bucket}/specs/spec.yaml")
    assert spec.name == "from-s3"
    assert spec.train.max_steps == 10


ROWS = [{"id": str(i), "text": f"row {i}"} for i in range(10)]


def jsonl_bytes(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def put(fs, key: str, body: bytes) -> str:
    fs.pipe(f"{fs.bucket}/{key}", body)
    return f"s3://{fs.bucket}/{key}"


def test_s3_read_gzipped_jsonl(s3):
    url = put(s3, "data/train.jsonl.gz", gzip.compress(jsonl_bytes([{"n": 1}, {"n": 2}])))
    rows = [row for row, _ in read_rows(url)]
    assert [r.value for r in rows] == [{"n": 1}, {"n": 2}]
    assert rows[1].where == f"{url}:2"


def test_s3_jsonl_resumes_at_byte_offsets(s3, monkeypatch):
    monkeypatch.setattr("job.data.sources.BUFFER_SIZE", 64)  # many reads per file, not one
    url = put(s3, "data/train.jsonl", jsonl_bytes(ROWS))
    full = list(read_rows(url))
    assert values(full) == ROWS
    assert [pos.offset for _, pos in full] == [len(jsonl_bytes(ROWS[: i + 1])) for i in range(len(ROWS))]
    for cut in (0, 4, 8):
        assert full[: cut + 1] + list(read_rows(url, full[cut][1])) == full


def test_s3_parquet(s3, tmp_path, groups_read):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet", row_group_size=3)
    url = put(s3, "data/train.parquet", (tmp_path / "d.parquet").read_bytes())
    assert values(read_rows(url)) == ROWS
    assert values(read_rows(url, Position(9))) == ROWS[9:]
    assert groups_read[-1:] == [[3]]


def test_s3_expand_glob(s3):
    put(s3, "data/train.jsonl.gz", gzip.compress(jsonl_bytes([{"n": 1}])))
    put(s3, "data/a-extra.jsonl.gz", gzip.compress(jsonl_bytes([{"n": 2}])))
    put(s3, "data/c.csv", b"n\n3\n")
    put(s3, "other/b.jsonl.gz", gzip.compress(jsonl_bytes([{"n": 4}])))
    files = expand([f"s3://{s3.bucket}/data/*.jsonl.gz"], "data.train")
    assert files == [f"s3://{s3.bucket}/data/a-extra.jsonl.gz", f"s3://{s3.bucket}/data/train.jsonl.gz"]
    assert [r.value for f in files for r, _ in read_rows(f)] == [{"n": 2}, {"n": 1}]
    files = expand([f"s3://{s3.bucket}/data/*"], "data.train")
    assert [r.value for f in files for r, _ in read_rows(f)] == [{"n": 2}, {"n": "3"}, {"n": 1}]


def test_s3_missing_object_names_the_key(s3):
    with pytest.raises(UserError, match=r"^data\.train\[0\]: no such file: s3://"):
        expand([f"s3://{s3.bucket}/data/nope.jsonl"], "data.train")


def test_s3_storage_options_endpoint(s3, s3_server, monkeypatch):
    """storage_options per protocol reach s3fs (here: the endpoint without AWS_ENDPOINT_URL)."""
    url = put(s3, "data/train.jsonl.gz", gzip.compress(jsonl_bytes([{"n": 1}])))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    configure_storage({"s3": {"endpoint_url": s3_server}})
    assert expand([f"s3://{s3.bucket}/data/*.jsonl.gz"], "data.train") == [url]
    assert values(read_rows(url)) == [{"n": 1}]


def saved_dataset(target: str, n: int, **storage) -> None:
    from datasets import Dataset

    Dataset.from_list([{"n": i, "text": f"row {i}"} for i in range(n)]).save_to_disk(target, **storage)


def test_a_saved_dataset_on_object_storage(s3, s3_server):
    saved_dataset(f"s3://{s3.bucket}/ds", 5, storage_options={"endpoint_url": s3_server})
    url = f"s3://{s3.bucket}/ds"
    assert expand([url], "data.train") == [url]
    assert values(read_rows(url)) == [{"n": i, "text": f"row {i}"} for i in range(5)]


def put_gzipped_jsonl(fs, key: str, rows: list) -> str:
    body = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    fs.pipe(f"{fs.bucket}/{key}", body)
    return f"s3://{fs.bucket}/{key}"


def test_sharding_over_s3(s3, tokenizer):
    put_gzipped_jsonl(s3, "data/p0.jsonl.gz", [{"prompt": "p", "completion": f"c{i}"} for i in range(5)])
    put_gzipped_jsonl(s3, "data/p1.jsonl.gz", [{"prompt": "p", "completion": f"d{i}"} for i in range(4)])
    spec = one_epoch_spec([f"s3://{s3.bucket}/data/*.jsonl.gz"], format="completion")
    seen = []
    for rank in range(2):
        pipeline = pipeline_for(spec, tokenizer, rank, 2)
        seen += [completion_text(tokenizer, e) for e in pipeline.examples if e is not EPOCH_END]
    assert sorted(seen) == sorted([f"c{i}" for i in range(5)] + [f"d{i}" for i in range(4)])


def test_validate_check_access_reads_every_source(tiny_model_dir, isolated, s3):
    from helpers import ALPACA_ROWS

    from job.cli import main

    s3.pipe(f"{s3.bucket}/data/a.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in ALPACA_ROWS))
    s3.pipe(f"{s3.bucket}/data/b.jsonl", b"{broken\n")
    spec = make_spec(
        model=tiny_model_dir,
        data={"train": [f"s3://{s3.bucket}/data/a.jsonl"]},
        output={"uri": f"s3://{s3.bucket}/runs/x"},
    )
    write_spec(isolated / "spec.json", spec)
    assert main(["validate", "spec.json", "--check-access"]) == 0
    spec["data"]["train"].append(f"s3://{s3.bucket}/data/b.jsonl")
    write_spec(isolated / "spec.json", spec)
    assert main(["validate", "spec.json", "--check-access"]) == 2


def test_unreadable_bucket_is_exit_2_without_credentials(tokenizer, s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRET-MARKER-123")
    with pytest.raises(UserError) as error:
        pipeline_for(one_epoch_spec(["s3://no-such-bucket-xyz/data/*.jsonl"]), tokenizer)
    assert error.value.exit_code == 2
    assert "data.train[0]" in str(error.value) and "SECRET-MARKER" not in str(error.value)
