"""Storage options: the spec's and the AWS variables override ftjob's defaults for the S3 client."""

from __future__ import annotations

from job import storage
from job.storage import (
    s3_options,
)


def test_spec_options_and_aws_variables_override_the_defaults(monkeypatch):
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    given = {
        "endpoint_url": "http://x",
        "config_kwargs": {"read_timeout": 60, "retries": {"max_attempts": 9}},
    }
    options = s3_options(given)
    assert options["endpoint_url"] == "http://x"
    assert options["config_kwargs"] == {
        "read_timeout": 60,
        "connect_timeout": storage.S3_CONNECT_TIMEOUT,
        "retries": {"max_attempts": 9, "mode": "standard"},  # botocore would let total_max_attempts win
    }
    assert given["config_kwargs"]["retries"] == {"max_attempts": 9}, "the spec's dict is not modified"
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert "retries" not in s3_options({})["config_kwargs"], "botocore reads the AWS variables itself"
