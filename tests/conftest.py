"""Shared fixtures: a tiny local model, a real S3 (moto's server over HTTP), an isolated working dir.

Tests that need a model, a server or a subprocess are marked `integration`; `make test-fast` runs the
others (pure logic) in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import ALPACA_ROWS, REPO, S3_ENV, causal_attention, free_port, write_jsonl

import job  # noqa: F401  first: ftjob's refusal of hub kernels holds for the whole test process

INTEGRATION_FIXTURES = {"tiny_model_dir", "s3_server", "data_files", "slurm", "image"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


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
    from job.data.formats import alpaca_prompt
    from job.model.tiny import build_tiny_model

    corpus = [alpaca_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in ALPACA_ROWS] * 20
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny", corpus, hidden_size=64, layers=2, vocab_size=300
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def slurm():
    """A real single-node Slurm (slurm/testcluster.sh: slurmctld, slurmd, slurmdbd on MariaDB, munge).
    `.ci/run` brings it up; otherwise this brings it up (installing Debian's packages when missing,
    so it needs root) and down again at the end. Yields the environment its commands need."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip(
            "the Slurm test cluster (slurm/testcluster.sh) needs root to install and start its daemons"
        )
    script = str(REPO / "slurm" / "testcluster.sh")
    already_up = subprocess.run([script, "status"], capture_output=True).returncode == 0
    if not already_up:
        started = subprocess.run([script, "up"], capture_output=True, text=True)
        assert started.returncode == 0, started.stderr
    env = {
        "SLURM_CONF": str(Path(os.environ.get("FTJOB_SLURM_DIR", "/tmp/ftjob-slurm"), "etc", "slurm.conf"))
    }
    os.environ.update(env)  # sbatch, squeue, sacct, scancel in this process and its children
    yield env
    if not already_up:
        subprocess.run([script, "down"], check=False)


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
