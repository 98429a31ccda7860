"""How the job ends on user mistakes and on faults (issue 12, point 5): a user mistake is a short
message and exit 2, a fault that a later attempt may fix is exit 1, and nothing is a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from helpers import ALPACA_ROWS, S3_ENV, free_port, ftjob, make_spec, write_spec

from job.data.sources import read_rows
from job.errors import JobError, UserError


def assert_user_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr


# ---- the spec


# ---- storage


@pytest.fixture
def spec_file(isolated, tiny_model_dir, data_files):
    def write(model: Path | dict = tiny_model_dir, **sections) -> str:
        spec = make_spec("lora", model=model, files=data_files, tracking={"enabled": False}, **sections)
        return str(write_spec(isolated / "spec.json", spec))

    return write


@pytest.fixture
def locked_s3(isolated):
    """A second moto server that checks credentials: every request after the first two (a bucket
    and one object made here) is refused with 403 for keys it does not know, as a store with wrong
    credentials answers."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_keys())
    for _ in range(100):
        try:
            client.create_bucket(Bucket="locked")
            break
        except Exception:
            time.sleep(0.1)
    client.put_object(Bucket="locked", Key="train.jsonl", Body=b'{"instruction": "a", "output": "b"}\n')
    yield endpoint
    server.terminate()
    server.wait()


def _keys() -> dict:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": "wrong"}


def s3_env(endpoint: str) -> dict:
    return {**S3_ENV, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}


def test_an_unreachable_output_endpoint_is_a_user_error(spec_file, isolated):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = ftjob("run", spec_file(output={"uri": "s3://bucket/run"}), cwd=isolated, env=s3_env(endpoint))
    assert_user_error(
        result, "output.uri s3://bucket/run: cannot reach the storage endpoint", "AWS_ENDPOINT_URL"
    )


def test_missing_credentials_are_a_user_error(spec_file, isolated, s3_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_server, AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE="/nonexistent",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "job", "run", spec_file(output={"uri": "s3://bucket/run"})],
        cwd=isolated,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_user_error(result, "no credentials found")


def test_denied_output_is_a_user_error_naming_access(spec_file, isolated, locked_s3):
    result = ftjob("run", spec_file(output={"uri": "s3://locked/run"}), cwd=isolated, env=s3_env(locked_s3))
    assert_user_error(result, "output.uri s3://locked/run", "access denied")


def test_denied_data_says_access_denied_not_missing(spec_file, isolated, locked_s3):
    result = ftjob(
        "run",
        spec_file(data={"train": ["s3://locked/train.jsonl"], "eval": []}),
        cwd=isolated,
        env=s3_env(locked_s3),
    )
    assert_user_error(result, "data.train[0]: cannot read s3://locked/train.jsonl", "access denied")
    assert "no such file" not in result.stderr


def test_a_store_outage_at_start_is_retryable(spec_file, isolated, s3, fault_proxy):
    fault_proxy.outage("503")
    result = ftjob(
        "run", spec_file(output={"uri": f"s3://{s3.bucket}/run"}), cwd=isolated, env=s3_env(fault_proxy.url)
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        f"output.uri s3://{s3.bucket}/run" in result.stderr and "a later attempt may succeed" in result.stderr
    )


def test_data_that_may_be_listed_but_not_read_is_access_denied(spec_file, isolated, s3, fault_proxy):
    """A store that answers HEAD and LIST but refuses GET: the run fails as it reads the first rows,
    after the model loaded, as access denied (exit 2), not as bad data (exit 3)."""
    url = f"s3://{s3.bucket}/train.jsonl"
    s3.pipe_file(url, "".join(json.dumps(row) + "\n" for row in ALPACA_ROWS).encode())
    fault_proxy.only = lambda method, path: method == "GET" and path.startswith(f"/{s3.bucket}/train.jsonl")
    fault_proxy.outage("403")
    result = ftjob(
        "run", spec_file(data={"train": [url], "eval": []}), cwd=isolated, env=s3_env(fault_proxy.url)
    )
    assert_user_error(result, f"{url}:1: cannot read: access denied")
    assert fault_proxy.faults["403"] > 0


def test_a_store_outage_while_data_is_read_is_retryable_not_bad_data(s3, fault_proxy, monkeypatch):
    """Reads of a file fail for good after its first block: exit 1 (a later attempt may succeed)
    naming the file and the line it stopped at; the rows before it came through."""
    from job.storage import configure_storage

    monkeypatch.setattr("job.data.sources.REMOTE_BLOCK_SIZE", 64 << 10)  # many reads per file
    monkeypatch.setattr("job.data.sources.BUFFER_SIZE", 64 << 10)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    url = f"s3://{s3.bucket}/t.jsonl"
    s3.pipe_file(url, b"".join(b'{"text": "row %d"}\n' % i for i in range(50_000)))  # about 1 MB
    configure_storage({"s3": {"endpoint_url": fault_proxy.url}})
    fault_proxy.only = lambda method, path: method == "GET" and path.startswith(f"/{s3.bucket}/t.jsonl")
    fault_proxy.outage("503", after=1)
    read = []
    with pytest.raises(JobError) as failure:
        for row, _ in read_rows(url):
            read.append(row.value["text"])
    assert type(failure.value) is JobError and failure.value.exit_code == 1
    assert f"{url}:{len(read) + 1}: cannot read: storage failed" in str(failure.value)
    assert "a later attempt may succeed" in str(failure.value)
    assert read[:3] == ["row 0", "row 1", "row 2"] and len(read) < 50_000


def test_a_saved_dataset_that_may_not_be_read_is_access_denied(s3, s3_server, fault_proxy):
    from datasets import Dataset

    from job.storage import configure_storage

    url = f"s3://{s3.bucket}/ds"
    Dataset.from_list([{"text": "a"}]).save_to_disk(url, storage_options={"endpoint_url": s3_server})
    configure_storage({"s3": {"endpoint_url": fault_proxy.url}})
    fault_proxy.only = lambda method, path: method == "GET" and path.startswith(f"/{s3.bucket}/ds/")
    fault_proxy.outage("403")
    with pytest.raises(UserError, match=rf"{url}:1: cannot read: access denied"):
        list(read_rows(url))


def test_a_full_local_disk_is_retryable(spec_file, isolated):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (CI runs as root)")
    disk = isolated / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
    )
    assert mounted.returncode == 0, mounted.stderr
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'fill'}", "bs=4k"], capture_output=True)
        result = ftjob("run", spec_file(output={"uri": str(disk / "run")}), cwd=isolated)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert result.returncode == 1, result.stderr
    assert "the local disk is full" in result.stderr and "Traceback" not in result.stderr


# ---- model weights


def test_damaged_weights_are_a_user_error(spec_file, isolated, tiny_model_dir):
    import shutil

    damaged = isolated / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:1000])
    result = ftjob("run", spec_file(model={"source": str(damaged)}), cwd=isolated)
    assert_user_error(result, f"model.source: cannot load {damaged}")


def test_weights_that_do_not_fit_the_config_are_a_user_error(spec_file, isolated, tiny_model_dir):
    import shutil

    other = isolated / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    result = ftjob("run", spec_file(model={"source": str(other)}), cwd=isolated)
    assert_user_error(result, f"the weights in {other} do not fit its config.json")


@pytest.mark.parametrize("broken", ["model", "adapter"])
def test_restart_deletes_nothing_until_the_model_and_adapter_load(
    spec_file, isolated, tiny_model_dir, broken
):
    import shutil

    spec = spec_file(output={"uri": str(isolated / "out")}, train={"max_steps": 2, "checkpoint_every": 1})
    assert ftjob("run", spec, cwd=isolated).returncode == 0
    before = sorted(p.relative_to(isolated) for p in (isolated / "out").rglob("*"))
    damaged = isolated / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    (damaged / "model.safetensors").write_bytes(b"not weights")
    change = f"model.source={damaged}" if broken == "model" else 'adapter.target_modules=["no_such_layer"]'
    result = ftjob("run", spec, "--restart", "--set", change, cwd=isolated)
    assert_user_error(result, "model.source" if broken == "model" else "adapter.target_modules")
    assert sorted(p.relative_to(isolated) for p in (isolated / "out").rglob("*")) == before
