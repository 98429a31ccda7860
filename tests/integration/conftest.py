"""tests/integration: the code under test runs in the test process, with the tiny model, a local server
(moto, mlflow, the hub, a fake Kubernetes API), an MLflow store, a lint tool or a helper child process that
is not ftjob's CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import mark_tier

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items) -> None:
    mark_tier(items, HERE, pytest.mark.integration)
