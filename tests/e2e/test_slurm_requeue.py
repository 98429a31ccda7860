"""A lost peer (exit 76) requeues the whole Slurm job, from whichever task sees it, within the requeue cap:
the submitit task (launch/slurm.py's FtjobTask) and slurm/ftjob.sbatch, each with stand-ins for ftjob
and `scontrol`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from launch.slurm import FtjobFailed, FtjobTask


@pytest.fixture
def tools(tmp_path, monkeypatch) -> Path:
    """On PATH: `scontrol` that records its arguments and exits SCONTROL_EXIT (0), `srun` that runs its
    command here, and `ftjob` (for the sbatch script) that exits FAKE_EXIT. Returns scontrol's record."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol_log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "$*" >> {scontrol_log}\nexit "${{SCONTROL_EXIT:-0}}"\n'
    )
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "ftjob").write_text('#!/bin/sh\nexit "$FAKE_EXIT"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    return scontrol_log


def requeued(scontrol_log: Path) -> list[str]:
    return scontrol_log.read_text().splitlines() if scontrol_log.exists() else []


def task_whose_ftjob_exits(code: int, max_requeues: int = 2) -> FtjobTask:
    return FtjobTask({"name": "x"}, "auto", False, max_requeues, [sys.executable, "-c", f"raise SystemExit({code})"])  # fmt: skip


def test_any_task_that_lost_a_peer_requeues_the_job_up_to_the_cap(tools, monkeypatch, capfd):
    monkeypatch.setenv("SLURM_PROCID", "1")  # not task 0: task 0's node may be the one that died
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(SystemExit) as exited:
        task_whose_ftjob_exits(76)()
    assert exited.value.code == 76 and requeued(tools) == ["requeue 77"]
    assert "another node of the job is gone (exit 76); requeueing job 77" in capfd.readouterr().err
    with pytest.raises(FtjobFailed, match="ftjob exited with 1"):  # a failure of its own: no requeue
        task_whose_ftjob_exits(1)()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the cap, shared with 75's requeues
    with pytest.raises(FtjobFailed, match="ftjob exited with 76"):
        task_whose_ftjob_exits(76)()
    assert requeued(tools) == ["requeue 77"]


def test_a_requeue_that_fails_ends_the_task_with_76(tools, monkeypatch, capfd):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SCONTROL_EXIT", "1")
    with pytest.raises(FtjobFailed, match="ftjob exited with 76"):
        task_whose_ftjob_exits(76)()
    assert requeued(tools) == ["requeue 77"]
    assert "cannot requeue" in capfd.readouterr().err


def run_sbatch(code: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "slurm" / "ftjob.sbatch"), "spec.yaml"],
        env={**os.environ, "FAKE_EXIT": str(code), "SLURM_JOB_NODELIST": "n1", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_sbatch_script_requeues_on_76_up_to_the_cap_and_passes_76_on(tools):
    lost = run_sbatch(76, SLURM_RESTART_COUNT="0", FTJOB_MAX_REQUEUES="1")
    assert lost.returncode == 76 and requeued(tools)[-1] == "requeue 77", lost.stderr
    assert "a node lost a peer (exit 76); requeueing job 77" in lost.stderr
    capped = run_sbatch(76, SLURM_RESTART_COUNT="1", FTJOB_MAX_REQUEUES="1")
    assert capped.returncode == 76 and "giving up" in capped.stderr
    failed = run_sbatch(76, SLURM_RESTART_COUNT="0", SCONTROL_EXIT="1")
    assert failed.returncode == 76 and "scontrol requeue failed; the job ends with 76" in failed.stderr
    assert requeued(tools).count("requeue 77") == 2
