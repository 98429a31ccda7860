"""Shared fixtures: a tiny local model and its tokenizer, a real S3 (moto's server over HTTP), an isolated
working dir.

The tests live in three tiers, one folder each, and each folder's conftest marks its tests:
tests/unit (in-process, no process, server or model weights: `make test-fast`), tests/integration (the
tiny model, local servers, lint tools, helper processes) and tests/e2e (ftjob as processes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import (
    ALPACA_ROWS,
    REPO,
    S3_ENV,
    causal_attention,
    free_port,
    make_spec,
    tiny_corpus,
    write_jsonl,
    write_spec,
)

import job  # noqa: F401  first: ftjob's refusal of hub kernels holds for the whole test process

TESTS = Path(__file__).parent
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.path.parent not in {TESTS / tier for tier in TIERS}:
            raise pytest.UsageError(
                f"{item.path}: a test file belongs in tests/unit, tests/integration or tests/e2e"
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
    from job.storage import configure_storage

    configure_storage(None)  # a test that configures storage options leaves none to the next
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from job.model.tiny import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny", tiny_corpus(), hidden_size=64, layers=2, vocab_size=300
    )


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny model's tokenizer files (the same bytes as tiny_model_dir's), without the model: unit tests
    tokenize, they load no weights."""
    from job.model.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(tiny_corpus(), vocab_size=300).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder for one module's runs of the resume spec."""
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def spec_path(tiny_model_dir, workdir) -> Path:
    """The resume spec (make_spec's "stop": a packed LoRA run with dropout, RESUME_STEPS steps, a checkpoint
    every 5) in workdir."""
    spec = make_spec("stop", model=tiny_model_dir, files=workdir, data={"shuffle_buffer": 16})
    return write_spec(workdir / "spec.json", spec)


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` (tests/mlflow_server.py) for the module's tests."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server.url)


@pytest.fixture
def spool_dir(isolated, monkeypatch) -> Path:
    """A spool folder (FTJOB_SPOOL_DIR) of the test's own."""
    path = isolated / "spool"
    monkeypatch.setenv("FTJOB_SPOOL_DIR", str(path))
    return path


@pytest.fixture
def data_files(isolated) -> tuple[Path, Path]:
    train = write_jsonl(isolated / "data" / "train.jsonl", ALPACA_ROWS * 8)
    evaluation = write_jsonl(isolated / "data" / "eval.jsonl", ALPACA_ROWS)
    return train, evaluation


@pytest.fixture
def cpu_flash_kernels(monkeypatch):
    """transformers' own flash-attention path (kernel choice, cu_seqlens from position_ids) over plain
    torch stand-ins for the CUDA kernels; records which kernel each attention call took."""
    import torch
    import transformers.modeling_flash_attention_utils as flash_utils

    calls = []

    def dense(q, k, v, softmax_scale=None, **_):
        calls.append("dense")
        return causal_attention(q, k, v, softmax_scale)

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, **_):
        calls.append("varlen")
        bounds = cu_seqlens_q.tolist()
        pieces = [
            causal_attention(q[a:b], k[a:b], v[a:b], softmax_scale)
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        return torch.cat(pieces)

    def kwargs(**given):
        return {"softmax_scale": given.get("softmax_scale")}

    kernels = ((dense, varlen, None, None, None), (kwargs, kwargs))
    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", lambda *a, **k: kernels)
    return calls


@pytest.fixture
def groups_read(monkeypatch) -> list:
    """The row groups each ParquetFile.iter_batches call reads."""
    import pyarrow.parquet as pq

    calls: list = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("row_groups"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    return calls
