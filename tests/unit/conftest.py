"""tests/unit: in-process only. No process of python, ftjob or a tool, no server, no model weights; `make
test-fast` runs this folder in under a minute. A test that needs more belongs in tests/integration (the
tiny model, a local server, a lint tool or a helper process) or tests/e2e (ftjob as processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mark_tier

HERE = Path(__file__).parent
STARTS_A_PROCESS = {
    "torchrun", "ftjob", "bash", "sh", "sbatch", "srun", "scontrol", "squeue", "docker", "podman",
    "kubectl", "hadolint", "shellcheck", "mlflow", Path(sys.executable).name,
}  # fmt: skip


def pytest_collection_modifyitems(items) -> None:
    mark_tier(items, HERE, pytest.mark.unit)


def program_of(args) -> str:
    first = args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]
    return Path(str(first)).name


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    """Unit tests start no process (git, true and ldconfig are fine): the CLI is tested in this process."""
    real_init = subprocess.Popen.__init__

    def guarded(self, args, *more, **kwargs):
        program = program_of(args)
        if program.startswith("python") or program in STARTS_A_PROCESS:
            raise AssertionError(f"a unit test started {program}: move it to tests/integration or tests/e2e")
        real_init(self, args, *more, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@pytest.fixture(autouse=True)
def template_budget_unchecked(monkeypatch):
    """The chat-template budget's child process (job/data/template_budget.py) is tested in
    tests/integration; here templates are checked by rendering alone."""
    from job.data import template_budget

    monkeypatch.setattr(template_budget, "_check", lambda given: None)


def refused(fixture: str, instead: str):
    def stand_in():
        pytest.fail(f"unit tests use no {fixture}: {instead}, or move the test to tests/integration")

    return pytest.fixture(stand_in, name=fixture)


tiny_model_dir = refused("tiny_model_dir", "use tokenizer (no weights) or an in-memory model")
data_files = refused("data_files", "write the rows the test needs into tmp_path")
s3_server = refused("s3_server", "use a memory:// or local path")
server = refused("server", "track into a spool folder or an inactive tracker")
