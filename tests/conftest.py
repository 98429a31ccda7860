"""Shared fixtures: a tiny local model, a real S3 (moto's server over HTTP), and an isolated working dir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}

ALPACA_ROWS = [
    {"instruction": "Reverse the words: red green blue", "output": "blue green red"},
    {"instruction": "Reverse the words: one two", "output": "two one"},
    {"instruction": "Add one", "input": "41", "output": "42"},
    {"instruction": "Say hi", "output": "hi"},
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ftjob(*args: str, cwd: Path, env: dict | None = None, stdin: str | None = None, timeout: int = 600):
    """Run the real CLI in a subprocess (as a batch job would), capturing output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "job", *args],
        cwd=cwd,
        env=full_env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test runs in its own directory (./runs, ./mlruns land there), offline, with its own cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FTJOB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FTJOB_SPEC", raising=False)
    for name in list(os.environ):
        if name.startswith("FTJOB__"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from job.data.formats import alpaca_prompt
    from job.tiny import build_tiny_model

    corpus = [alpaca_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in ALPACA_ROWS] * 20
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny", corpus, hidden_size=64, layers=2, vocab_size=300
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, reached over HTTP by s3fs through the standard AWS variables."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket; returns an s3fs filesystem. The AWS variables reach subprocesses too."""
    import boto3
    import s3fs

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    bucket = f"b{free_port()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    fs.bucket = bucket
    return fs


@pytest.fixture
def fault_proxy(s3_server):
    """A fault-injecting HTTP proxy (tests/fault_proxy.py) in front of moto's S3, healthy until told
    otherwise (`fault_proxy.fail_fraction = 0.3`, `.mode = "reset"`, `.outage()`, `.heal()`).

    Point clients at `fault_proxy.url` (storage_options {"s3": {"endpoint_url": ...}} or
    AWS_ENDPOINT_URL). Seeded: the same requests in the same order get the same faults. Seed 31 fails
    the first request, and never more than 3 in a row among the first 100 at a fraction of 0.3, so
    that tests exercise backoff without waiting on botocore's long waits.
    """
    import s3fs
    from fault_proxy import FaultProxy

    s3fs.S3FileSystem.clear_instance_cache()  # no cached filesystem keeps talking to an old endpoint
    with FaultProxy(s3_server, seed=31) as proxy:
        yield proxy
    s3fs.S3FileSystem.clear_instance_cache()
