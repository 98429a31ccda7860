"""tests/e2e: ftjob's CLI and scripts as processes, where the process boundary is the point: exit codes a
scheduler sees, real signals, several ranks or nodes, fresh interpreters, Slurm, the image, the bench."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, RESUME_STEPS, ftjob, losses, mark_tier, may_set_up_the_machine

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items) -> None:
    mark_tier(items, HERE, pytest.mark.e2e)


@pytest.fixture(scope="session")
def slurm():
    """A real single-node Slurm (slurm/testcluster.sh: slurmctld, slurmd, slurmdbd on MariaDB, munge).
    Brought up here when it is not up yet (installing Debian's packages when missing, so as root, unless
    FTJOB_TEST_INSTALL=no) and down again at the end of the session. Yields the environment its commands
    need, which is also set in os.environ for sbatch, squeue, sacct and scancel, here and in children."""
    script = str(REPO / "slurm" / "testcluster.sh")
    already_up = subprocess.run([script, "status"], capture_output=True).returncode == 0
    if not already_up:
        if not may_set_up_the_machine():
            pytest.skip(
                "the Slurm test cluster (slurm/testcluster.sh) needs root to install and start its daemons"
                " (and FTJOB_TEST_INSTALL unset)"
            )
        started = subprocess.run([script, "up"], capture_output=True, text=True)
        assert started.returncode == 0, started.stderr
    slurm_dir = Path(os.environ.get("FTJOB_SLURM_DIR", "/tmp/ftjob-slurm"))
    env = {"SLURM_CONF": str(slurm_dir / "etc" / "slurm.conf")}
    os.environ.update(env)
    yield env
    if not already_up:
        subprocess.run([script, "down"], check=False)


@pytest.fixture(scope="module")
def uninterrupted(spec_path, workdir) -> str:
    """The resume spec run straight through by `ftjob run` (in this process): the run each stopped and
    resumed one equals."""
    result = ftjob("run", str(spec_path), "--set", "output.uri=./straight", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert len(losses(workdir / "straight")) == RESUME_STEPS
    return "straight"
