"""slurm/ftjob.sbatch run for real, with stand-in `srun` and `scontrol`: exit codes, requeues, signals,
its log lines and umask (its lint: tests/integration/test_deploy_lint.py; its #SBATCH directives:
tests/unit/test_deploy_files.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

SBATCH = REPO / "slurm" / "ftjob.sbatch"


# ---------------------------------------------------------------------------------------------
# Slurm


@pytest.fixture
def slurm_stand_ins(tmp_path) -> dict[str, str]:
    """`srun` that runs its command here and `scontrol` that records its arguments, as on one node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\necho "$*" >> "$SCONTROL_LOG"\n'
        'if [ "$1" = show ] && [ "$2" = hostnames ]; then echo node7; echo node8; fi\n'
    )
    # A stand-in ftjob: records what it got, then exits FAKE_EXIT or waits for a signal (FAKE_EXIT=wait).
    (bin_dir / "ftjob").write_text(
        "#!/bin/bash\n"
        'echo "pid=$$ args=$* master=$MASTER_ADDR:$MASTER_PORT" >> "$FAKE_LOG"\n'
        'if [ "$FAKE_EXIT" != wait ]; then exit "$FAKE_EXIT"; fi\n'
        "trap 'echo got-usr1 >> \"$FAKE_LOG\"; exit 75' USR1\n"
        "trap 'echo got-term >> \"$FAKE_LOG\"; exit 75' TERM\n"
        'echo ready >> "$FAKE_LOG"\n'
        "while :; do sleep 0.05; done\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "FAKE_LOG": str(tmp_path / "ftjob.log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[7-8]",
        "SLURM_JOB_NUM_NODES": "2",
    }


def run_sbatch(env: dict[str, str], *args: str, exit_code: int | str = 0) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "FAKE_EXIT": str(exit_code)}
    return subprocess.run(
        ["bash", str(SBATCH), *args], env=full_env, capture_output=True, text=True, timeout=120
    )


def logged(path: str) -> str:
    return Path(path).read_text() if Path(path).exists() else ""


@pytest.mark.parametrize("exit_code", [0, 1, 2, 3, 75])
def test_sbatch_passes_exit_codes_on_and_requeues_only_on_75(slurm_stand_ins, exit_code):
    env = slurm_stand_ins
    result = run_sbatch(env, "spec.yaml", "--set", "train.max_steps=5", exit_code=exit_code)
    assert result.returncode == exit_code, result.stderr
    assert "args=run --nproc-per-node auto spec.yaml --set train.max_steps=5 master=node7:" in logged(
        env["FAKE_LOG"]
    )
    requeued = "requeue 4242" in logged(env["SCONTROL_LOG"])
    assert requeued == (exit_code == 75), result.stderr


def test_sbatch_without_a_spec_is_a_usage_error(slurm_stand_ins):
    env = {**slurm_stand_ins, "FTJOB_SPEC": ""}
    result = run_sbatch(env)
    assert result.returncode == 2
    assert "no spec" in result.stderr
    assert not logged(env["FAKE_LOG"])


@pytest.mark.parametrize(
    "args,spec,shown",
    [
        ((), '{"name": "t", "storage_options": {"s3": {"secret": "hunter2"}}}', "inline JSON in FTJOB_SPEC"),
        (("s3://AKIAEXAMPLE:hunter2@bucket/spec.yaml",), "", "spec s3://***@bucket/spec.yaml"),
        (("s3://AKIAEXAMPLE:hun/ter2@bucket/spec.yaml",), "", "spec s3://***@bucket/spec.yaml"),
        ((), "https://u:hunter2@host/spec.yaml", "spec https://***@host/spec.yaml (FTJOB_SPEC)"),
        (("spec.yaml",), "", "spec spec.yaml"),
    ],
)
def test_sbatch_logs_the_spec_without_its_content_or_credentials(slurm_stand_ins, args, spec, shown):
    result = run_sbatch({**slurm_stand_ins, "FTJOB_SPEC": spec}, *args)
    assert result.returncode == 0, result.stderr
    assert shown in result.stderr and "hunter2" not in result.stderr and "ter2" not in result.stderr


def test_sbatch_writes_with_a_private_umask(slurm_stand_ins, tmp_path):
    (Path(slurm_stand_ins["PATH"].split(os.pathsep)[0]) / "ftjob").write_text(
        '#!/bin/sh\numask > "$FAKE_LOG"\n'
    )
    result = run_sbatch({**slurm_stand_ins, "FTJOB_SPEC": "spec.yaml"})
    assert result.returncode == 0, result.stderr
    assert logged(slurm_stand_ins["FAKE_LOG"]).strip() == "0077"


def test_sbatch_runs_the_real_ftjob_and_passes_its_exit_2_on(slurm_stand_ins, tmp_path):
    env = {**slurm_stand_ins, "FTJOB_CMD": f"{sys.executable} -m job"}
    result = run_sbatch(env, str(tmp_path / "missing-spec.yaml"))
    assert result.returncode == 2, result.stderr
    assert "spec file not found" in result.stderr
    assert "requeue" not in logged(env["SCONTROL_LOG"])


def start_waiting_sbatch(env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """The script with a stand-in ftjob that runs until signalled; returns (script process, ftjob pid)."""
    process = subprocess.Popen(
        ["bash", str(SBATCH), "spec.yaml"],
        env={**os.environ, **env, "FAKE_EXIT": "wait"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while "ready" not in logged(env["FAKE_LOG"]):
        assert time.monotonic() < deadline and process.poll() is None, "the stand-in ftjob did not start"
        time.sleep(0.05)
    return process, int(re.search(r"pid=(\d+)", logged(env["FAKE_LOG"])).group(1))


def test_sbatch_passes_usr1_on_to_the_step_and_requeues(slurm_stand_ins):
    """With --signal=B:USR1@N Slurm signals the batch shell; it must reach ftjob, and the job requeue."""
    env = slurm_stand_ins
    process, _ = start_waiting_sbatch(env)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 75, stderr
    assert "got-usr1" in logged(env["FAKE_LOG"])
    assert "requeue 4242" in logged(env["SCONTROL_LOG"])


def test_sbatch_after_sigterm_passes_75_on_without_requeueing(slurm_stand_ins):
    """scancel / preemption: Slurm sends SIGTERM to the shell and the step; ftjob checkpoints, no requeue here."""
    env = slurm_stand_ins
    process, ftjob_pid = start_waiting_sbatch(env)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    os.kill(ftjob_pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 75, stderr
    assert "got-term" in logged(env["FAKE_LOG"])
    assert "requeue" not in logged(env["SCONTROL_LOG"])
