"""Storage faults (issue 5, point 6): transient S3 errors are retried, a persistent outage fails clearly.

moto's S3 server sits behind a fault-injecting proxy of the tests' own (tests/fault_proxy.py) on
127.0.0.1; ftjob's own code paths (upload_dir, download_dir, read_rows, fetch_cached) talk to the proxy
over HTTP with job.storage's default retry settings. What they write is checked through a second,
fault-free client straight to moto.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import pytest
from helpers import write_jsonl

from job import storage
from job.data.sources import read_rows
from job.errors import JobError
from job.model.source import fetch_cached
from job.storage import (
    configure_storage,
    download_dir,
    filesystem,
    s3_retry_budget_seconds,
    upload_dir,
)

MiB = 1 << 20
# (mode, fraction of requests that get it); "slow" answers come late but within the read timeout.
TRANSIENT = [pytest.param("503", 0.3, id="503-30pct"), pytest.param("reset", 0.2, id="reset-20pct")]
TRANSIENT += [pytest.param("slow", 0.3, id="slow-30pct")]
COMMITTED = "COMMITTED"


@pytest.fixture(autouse=True)
def steady_backoff():
    """botocore draws its backoff jitter from the global RNG: seed it, so a test waits the same each
    run (the proxy's own RNG already fixes which requests fail), and put the RNG back afterwards."""
    state = random.getstate()
    random.seed(1)
    yield
    random.setstate(state)


def via(proxy, **config_kwargs) -> None:
    """Configure storage to send S3 traffic through the proxy (ftjob's retry defaults still apply,
    under any config_kwargs given)."""
    options = {"endpoint_url": proxy.url, **({"config_kwargs": config_kwargs} if config_kwargs else {})}
    configure_storage({"s3": options})


def tree(directory: Path) -> dict[str, str]:
    """Relative name -> sha256 of every file under directory."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def stored(s3, prefix: str) -> dict[str, str]:
    """Relative name -> sha256 of every object under prefix, read straight from moto (no faults)."""
    root = f"{s3.bucket}/{prefix}"
    return {
        path[len(root) + 1 :]: hashlib.sha256(s3.cat_file(path)).hexdigest() for path in sorted(s3.find(root))
    }


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> Path:
    """A checkpoint-like directory: a file S3 gets in multipart (3 parts), one over 5 MB, small ones."""
    directory = tmp_path_factory.mktemp("payload")
    rng = random.Random(0)
    (directory / "optimizer.pt").write_bytes(rng.randbytes(2 * storage.UPLOAD_PART_SIZE + MiB))
    (directory / "trainable.safetensors").write_bytes(rng.randbytes(6 * MiB))
    (directory / "run.json").write_text(json.dumps({"step": 100}))
    (directory / "ranks" / "rank-00000.json").parent.mkdir()
    (directory / "ranks" / "rank-00000.json").write_text(json.dumps({"rng": [1, 2, 3]}))
    (directory / "empty.txt").write_bytes(b"")
    (directory / COMMITTED).write_text("step 100\n")
    return directory


def small_dir(directory: Path, step: int) -> Path:
    directory.mkdir(parents=True)
    (directory / "trainable.safetensors").write_bytes(os.urandom(64 * 1024))
    (directory / "run.json").write_text(json.dumps({"step": step}))
    (directory / COMMITTED).write_text(f"step {step}\n")
    return directory


def inject(proxy, mode: str, fraction: float) -> None:
    proxy.mode = mode
    proxy.slow_seconds = 0.3
    proxy.fail_fraction = fraction


# ---- defaults


def test_s3_defaults_reach_the_client(s3, fault_proxy):
    via(fault_proxy)
    fs, _ = filesystem(f"s3://{s3.bucket}/x")
    config = fs.s3.meta.config
    assert config.retries == {"mode": storage.S3_RETRY_MODE, "total_max_attempts": storage.S3_MAX_ATTEMPTS}
    assert (config.connect_timeout, config.read_timeout) == (
        storage.S3_CONNECT_TIMEOUT,
        storage.S3_READ_TIMEOUT,
    )
    assert fs.retries == storage.S3FS_RETRIES
    # a persistent fault that fails fast surfaces within a minute of waiting (plus attempt time)
    assert s3_retry_budget_seconds() <= 60


def test_persistent_outage_gives_up_after_the_configured_attempts(s3, fault_proxy, monkeypatch):
    """Defaults end to end, without the waits: botocore's backoff is zeroed, the attempts are counted."""
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    via(fault_proxy)
    fs, path = filesystem(f"s3://{s3.bucket}/x/run.json")
    fault_proxy.outage("503")
    with pytest.raises(
        OSError, match="Service Unavailable|reduce your request rate|unable to handle request"
    ):
        fs.cat_file(path)
    assert fault_proxy.requests == storage.S3_MAX_ATTEMPTS * storage.S3FS_RETRIES


# ---- transient faults: retried, results identical


@pytest.mark.parametrize("mode,fraction", TRANSIENT)
def test_upload_dir_survives_transient_faults(s3, fault_proxy, payload, mode, fraction):
    inject(fault_proxy, mode, fraction)
    via(fault_proxy)
    upload_dir(payload, f"s3://{s3.bucket}/run/checkpoints/step-000100", last=COMMITTED)
    assert stored(s3, "run/checkpoints/step-000100") == tree(payload)
    assert fault_proxy.faults[mode] > 0, fault_proxy.faults


@pytest.mark.parametrize("mode,fraction", TRANSIENT)
def test_read_rows_survives_transient_faults(s3, fault_proxy, mode, fraction):
    rows = [{"instruction": f"row {i} " + "x" * (i % 200), "output": str(i)} for i in range(25_000)]
    s3.put_file(str(write_jsonl(Path("train.jsonl"), rows)), f"{s3.bucket}/data/train.jsonl")
    url = f"s3://{s3.bucket}/data/train.jsonl"  # ~5.6 MB: ranged reads of 4 MiB
    expected = [(row, position) for row, position in read_rows(url)]  # straight to moto, no faults
    assert len(expected) == len(rows)
    inject(fault_proxy, mode, fraction)
    via(fault_proxy)
    assert list(read_rows(url)) == expected
    assert fault_proxy.faults[mode] > 0, fault_proxy.faults


@pytest.mark.parametrize("mode,fraction", TRANSIENT)
def test_fetch_cached_survives_transient_faults(s3, fault_proxy, mode, fraction):
    model = Path("model")
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(os.urandom(512 * 1024))
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    s3.put(str(model) + "/", f"{s3.bucket}/models/tiny/", recursive=True)
    inject(fault_proxy, mode, fraction)
    via(fault_proxy)
    cached, _ = fetch_cached(f"s3://{s3.bucket}/models/tiny/")  # list, then download_dir
    assert {k: v for k, v in tree(cached).items() if not k.startswith(".ftjob")} == tree(model)
    assert fault_proxy.faults[mode] > 0, fault_proxy.faults


def test_reads_that_time_out_are_retried(s3, fault_proxy):
    """Answers later than the read timeout: the attempt is abandoned and made again."""
    s3.pipe_file(f"{s3.bucket}/data/t.jsonl", b"".join(b'{"text": "%d"}\n' % i for i in range(1000)))
    url = f"s3://{s3.bucket}/data/t.jsonl"
    via(fault_proxy, read_timeout=0.3)
    fault_proxy.mode, fault_proxy.slow_seconds, fault_proxy.fail_fraction = "slow", 0.8, 0.2
    rows = [row.value["text"] for row, _ in read_rows(url)]
    assert rows == [str(i) for i in range(1000)]
    assert fault_proxy.faults["slow"] > 0


# ---- persistent outage: fails in bounded time, the committed checkpoint stays intact


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_persistent_outage_fails_the_upload_and_keeps_the_committed_checkpoint(s3, fault_proxy, mode):
    checkpoints = f"s3://{s3.bucket}/run/checkpoints"
    previous = small_dir(Path("step-1"), 1)
    via(fault_proxy)
    upload_dir(previous, f"{checkpoints}/step-000001", last=COMMITTED)

    # Fewer attempts than the defaults keep the test short; test_persistent_outage_gives_up_after_the_
    # configured_attempts and test_s3_defaults_reach_the_client cover the defaults.
    via(fault_proxy, retries={"total_max_attempts": 2})
    fault_proxy.outage(mode)
    start = time.monotonic()
    with pytest.raises(JobError, match=rf"cannot upload to {checkpoints}/step-000002/\S+: \w+") as failure:
        upload_dir(small_dir(Path("step-2"), 2), f"{checkpoints}/step-000002", last=COMMITTED)
    elapsed = time.monotonic() - start
    assert elapsed < s3_retry_budget_seconds(max_attempts=2) + 10, elapsed
    assert fault_proxy.requests >= 2 * storage.S3FS_RETRIES, "retried before giving up"
    assert failure.value.__cause__ is not None, "the storage error is kept as the cause"

    fault_proxy.heal()
    assert stored(s3, "run/checkpoints/step-000001") == tree(previous)
    restored = Path("restored")
    download_dir(f"{checkpoints}/step-000001", restored)
    assert tree(restored) == tree(previous)
    assert not s3.exists(f"{s3.bucket}/run/checkpoints/step-000002/{COMMITTED}")


def test_outage_in_the_middle_of_an_upload_leaves_no_commit_marker(s3, fault_proxy, payload):
    uri = f"s3://{s3.bucket}/run/checkpoints/step-000100"
    via(fault_proxy, retries={"total_max_attempts": 2})
    fault_proxy.outage("503", after=3)  # the marker probe (HEAD, LIST) and the first file go through
    with pytest.raises(JobError, match="cannot upload to .*/optimizer.pt: OSError"):
        upload_dir(payload, uri, last=COMMITTED)
    fault_proxy.heal()
    written = stored(s3, "run/checkpoints/step-000100")
    assert written, "the upload had begun"
    assert COMMITTED not in written and len(written) < len(tree(payload))


# ---- the proxy itself


def test_proxy_forwards_chunked_bodies_and_stops_with_idle_connections_open(s3, fault_proxy):
    """s3fs sends Content-Length bodies; other clients stream chunked ones. Both reach moto whole."""
    import http.client

    host, port = fault_proxy.url.removeprefix("http://").split(":")
    client = http.client.HTTPConnection(host, int(port), timeout=10)
    bodies = {"a.bin": os.urandom(300_000), "b.bin": os.urandom(70_000)}
    for name, body in bodies.items():  # over one keep-alive connection; moto takes unsigned PUTs
        chunks = (body[i : i + 65_536] for i in range(0, len(body), 65_536))
        client.request("PUT", f"/{s3.bucket}/{name}", body=chunks, encode_chunked=True)
        response = client.getresponse()
        assert (response.status, response.read()) == (200, b"")
        assert s3.cat_file(f"{s3.bucket}/{name}") == body
    assert fault_proxy.requests == 2 and fault_proxy.faults_injected == 0
    fault_proxy.outage("503")
    client.request("PUT", f"/{s3.bucket}/c.bin", body=b"x")
    response = client.getresponse()
    assert response.status == 503 and b"<Code>SlowDown</Code>" in response.read()
    assert not s3.exists(f"{s3.bucket}/c.bin"), "a request that got a 503 did not reach moto"
    start = time.monotonic()
    fault_proxy.stop()  # the client's connection is still open and idle
    assert time.monotonic() - start < 5
    client.close()
